"""CIFAR-sized VGG-16 and ResNet-50 (32x32 inputs), flat ``nn.Sequential`` so a plan can cut them.

Both are written here from the papers (Simonyan & Zisserman 2014; He et al. 2015), in the
form usual for CIFAR: VGG-16 with batch norm and a small classifier, ResNet-50 with a 3x3
stride-1 stem and no max-pool. A cut at index ``c`` gives the client layers ``[0, c)``:
``cut = 1`` is "cut after the first convolution" for both networks.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["vgg16", "resnet50", "Bottleneck", "VGG16_CONFIG"]

VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")
"""Output channels of the 13 3x3 convolutions; ``"M"`` is a 2x2 max-pool."""


def vgg16(classes: int = 10, batch_norm: bool = True) -> nn.Sequential:
    """VGG-16 for 3x32x32 inputs: 13 conv3x3 (+BN) + ReLU, 5 max-pools, then a 3-layer classifier.

    Layer indices with ``batch_norm=True`` (52 layers): each convolution is three layers
    (Conv2d, BatchNorm2d, ReLU), each pool one; so the convolutions sit at 0, 3, 7, 10, 14, 17,
    20, 24, 27, 30, 34, 37, 40, the pools at 6, 13, 23, 33, 43 (the last leaves 512x1x1), then
    44 Flatten, 45 Dropout, 46 Linear(512, 512), 47 ReLU, 48 Dropout, 49 Linear(512, 512),
    50 ReLU, 51 Linear(512, classes).
    With ``batch_norm=False`` (39 layers) a convolution is two layers (Conv2d, ReLU): convs at
    0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, pools at 4, 9, 16, 23, 30, classifier 31-38.
    Either way ``cut = 1`` keeps only the first convolution (output 64x32x32) on the client.
    """
    if classes < 1:
        raise ValueError(f"classes must be positive, got {classes}")
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(c, int(v), 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU())
        c = int(v)
    layers += [nn.Flatten(), nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(),
               nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, each with BN; identity or
    1x1-conv+BN projection shortcut; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def resnet50(classes: int = 100) -> nn.Sequential:
    """ResNet-50 for 3x32x32 inputs: CIFAR stem, bottleneck stages [3, 4, 6, 3], pool, fc.

    Layer indices (22 layers): 0 Conv2d(3, 64, 3x3, stride 1), 1 BatchNorm2d, 2 ReLU (no
    max-pool); bottleneck blocks 3-5 (width 64, out 256x32x32), 6-9 (128, first with stride 2,
    out 512x16x16), 10-15 (256, out 1024x8x8), 16-18 (512, out 2048x4x4); 19 AdaptiveAvgPool2d,
    20 Flatten, 21 Linear(2048, classes). ``cut = 1`` keeps only the first convolution (output
    64x32x32) on the client; ``cut = 3`` the whole stem.
    """
    if classes < 1:
        raise ValueError(f"classes must be positive, got {classes}")
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU()]
    c = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(c, width, stride if i == 0 else 1))
            c = width * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net
