"""A small model zoo. Every network is an ``nn.Sequential`` so a plan can cut it at layer indices."""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["ZOO", "mlp", "cnn"]


def _act(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(acts)}")
    return acts[name]()


def mlp(sizes: list[int], activation: str = "relu", out_activation: bool = False) -> nn.Sequential:
    """Linear layers of the given widths with an activation between them (and after the last
    one if ``out_activation``, for a network that ends at a cut).

    ``mlp([64, 128, 10])`` is ``Linear(64,128), ReLU, Linear(128,10)``: layer indices 0, 1, 2.
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2 or out_activation:
            layers.append(_act(activation))
    return nn.Sequential(*layers)


def cnn(in_channels: int = 1, image_size: int = 8, channels: list[int] = (16, 32), hidden: int = 64,
        classes: int = 10, pool_every: int = 1) -> nn.Sequential:
    """Conv-ReLU pairs with a MaxPool after every ``pool_every`` of them (and after the last),
    then Flatten, Linear-ReLU, Linear.

    With ``pool_every = 1`` each block is three layers (conv, relu, pool); with two blocks the
    indices are 0-5 for the blocks, 6 Flatten, 7 Linear, 8 ReLU, 9 Linear.
    """
    if pool_every < 1:
        raise ValueError("pool_every must be at least 1")
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for i, out in enumerate(channels):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        c = out
        if (i + 1) % pool_every == 0 or i + 1 == len(channels):
            layers.append(nn.MaxPool2d(2))
            size //= 2
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for the pooling layers of {len(channels)} "
                                 f"convolutions pooled every {pool_every}")
    layers += [nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}

from .cifar import resnet50, vgg16  # noqa: E402

ZOO.update({"vgg16": vgg16, "resnet50": resnet50})
