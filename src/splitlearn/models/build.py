"""Build a plan's networks deterministically and cut them into segments.

Every party builds the networks it needs on its own. A network is initialised from a seed
derived from the plan seed and the network's name, so the bottom built by a hospital and the
top built by a server are the two halves of the very same initial model: training the
composed, unsplit model starts from identical weights.
"""

from __future__ import annotations

import importlib
import sys
import zlib

import torch
from torch import nn

from ..core.plan import Plan, PlanError
from .zoo import ZOO

__all__ = ["build_network", "build_segment", "network_seed"]

# Packages whose functions a plan may not call as factories: a plan file is data, and these
# would let it run commands or load pickles (``os:system``, ``torch:load``, ...).
_NOT_FACTORIES = {"torch", "numpy", "scipy", "sklearn", "pandas", "joblib", "dill", "cloudpickle", "safetensors",
                  "grpc", "google", "splitlearn", "typer", "click", "rich", "matplotlib", "pydantic", "cryptography",
                  "pip", "setuptools", "opacus", "IPython"}


def network_seed(plan_seed: int, network: str) -> int:
    return (plan_seed * 1_000_003 + zlib.crc32(network.encode())) % (2**63 - 1)


def _factory(plan: Plan, name: str):
    spec = plan.networks[name]
    entry = f"networks.{name}"
    if spec.zoo is not None:
        if spec.zoo not in ZOO:
            raise PlanError(f"unknown model-zoo network {spec.zoo!r}", entry=f"{entry}.zoo",
                            hint=f"choose one of {sorted(ZOO)} or give factory = 'package.module:function'")
        return ZOO[spec.zoo], f"{entry}.zoo"
    module_name, func_name = spec.factory.split(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in _NOT_FACTORIES:
        raise PlanError(f"factory {spec.factory!r} is not a network factory: functions of {top!r} are refused",
                        entry=f"{entry}.factory",
                        hint="name a function of your own package that returns a torch.nn.Module "
                        "(a plan's factory runs that code: only run plans you trust)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise PlanError(f"cannot import module {module_name!r} of factory {spec.factory!r}: {e}",
                        entry=f"{entry}.factory",
                        hint="check the module path and that its package is installed or on PYTHONPATH") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise PlanError(f"module {module_name!r} has no function {func_name!r}", entry=f"{entry}.factory",
                        hint="name a function that returns a torch.nn.Module")
    return fn, f"{entry}.factory"


def build_network(plan: Plan, name: str) -> nn.Module:
    """Instantiate network ``name`` of the plan with its deterministic seed."""
    fn, entry = _factory(plan, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(network_seed(plan.train.seed, name))
        try:
            net = fn(**plan.networks[name].args)
        except (TypeError, ValueError) as e:
            raise PlanError(f"building network {name!r} failed: {e}", entry=f"networks.{name}.args",
                            hint="check the arguments the network takes") from None
    if not isinstance(net, nn.Module):
        raise PlanError(f"{entry.split('.')[-1]} of network {name!r} returned {type(net).__name__}, not a torch.nn.Module",
                        entry=entry, hint="return a torch.nn.Module (an nn.Sequential to cut it at layer indices)")
    return net


def build_segment(plan: Plan, segment: str) -> nn.Module:
    """The module a segment runs: its network, or layers ``[start, stop)`` of it."""
    spec = plan.segments[segment]
    net = build_network(plan, spec.network)
    if spec.layers is None:
        return net
    if not isinstance(net, nn.Sequential):
        raise PlanError(f"network {spec.network!r} is a {type(net).__name__}, which cannot be cut at layer indices",
                        entry=f"segments.{segment}.layers",
                        hint="remove 'layers' or make the factory return an nn.Sequential")
    start, stop = spec.layers
    if stop > len(net):
        raise PlanError(f"layers {list(spec.layers)} but network {spec.network!r} has {len(net)} layers (0..{len(net) - 1})",
                        entry=f"segments.{segment}.layers", hint=f"use a stop of at most {len(net)}")
    return net[start:stop]
