"""Build a plan's networks deterministically and cut them into segments.

Every party builds the networks it needs on its own. A network is initialised from a seed
derived from the plan seed and the network's name, so the bottom built by a hospital and the
top built by a server are the two halves of the very same initial model: training the
composed, unsplit model starts from identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.plan import Plan, beside_plan, plan_dir
from ..core.specs import PlanError, refused_factory_package
from .cut import CutError, cut_module
from .hf import HFError, HFPiece, is_hf_model, owned_modules
from .hfload import load_piece, piece_of
from .lora import add_lora
from .zoo import ZOO

__all__ = ["build_network", "build_segment", "network_seed", "load_factory", "is_hf_network"]


def network_seed(plan_seed: int, network: str) -> int:
    return (plan_seed * 1_000_003 + zlib.crc32(network.encode())) % (2**63 - 1)


@contextlib.contextmanager
def _beside(folder: Path | None):
    """The plan's folder first on sys.path (importing the factory and calling it, which may import more)."""
    added = folder is not None and str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(folder))


def _import(module_name: str, folder: Path | None):
    """Import a factory's module; a module next to the plan file is found without PYTHONPATH."""
    top = module_name.split(".")[0]
    here = folder is not None and ((folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file())
    cached = sys.modules.get(top)
    if here and cached is not None:
        file = Path(getattr(cached, "__file__", "") or "").resolve()
        if folder.resolve() not in file.parents:
            raise ImportError(f"a module {top!r} from {file} is already imported in this process, so the one next to "
                              f"the plan, in {folder}, cannot be: give one of them another name")
    with _beside(folder):
        return importlib.import_module(module_name)


def _factory(plan: Plan, name: str):
    spec = plan.networks[name]
    entry = f"networks.{name}"
    if spec._object is not None:
        return spec._object, f"{entry}.factory" if spec.factory else entry
    if spec.python is not None:
        raise PlanError(f"network {name!r} was given in Python as {spec.python}, which exists only in the process "
                        "that built the plan", entry=entry,
                        hint="pass the object again (splitlearn.train / predict(networks=...)), or name a factory "
                        "function that other processes can import ('module:function', next to the plan)")
    if spec.zoo is not None:
        if spec.zoo not in ZOO:
            raise PlanError(f"unknown model-zoo network {spec.zoo!r}", entry=f"{entry}.zoo",
                            hint=f"choose one of {sorted(ZOO)} or give factory = 'package.module:function'")
        return ZOO[spec.zoo], f"{entry}.zoo"
    return load_factory(plan, spec.factory, f"{entry}.factory"), f"{entry}.factory"


def load_factory(plan: Plan, factory: str, entry: str, kind: str = "a network",
                 returns: str = "a torch.nn.Module") -> Callable[..., Any]:
    """The function ``factory`` (``module:function``) names, for plan entry ``entry``: its module imported from
    next to the plan file or from ``sys.path``; ``kind``'s factory (the error says "is not KIND factory") returns
    ``returns``. PlanError naming the
    entry when its package is refused (the standard library, torch, ...), it cannot be imported or has no such
    function."""
    module_name, func_name = factory.split(":")
    top = module_name.split(".")[0]
    if refused_factory_package(module_name):
        raise PlanError(f"factory {factory!r} is not {kind} factory: functions of {top!r} are refused",
                        entry=entry, hint=f"name a function of your own package that returns {returns} "
                        "(a plan's factory runs that code: only run plans you trust)")
    folder = plan_dir(plan)
    try:
        module = _import(module_name, folder.resolve() if folder else None)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        where = f" (looked next to the plan, in {folder}, and on sys.path)" if folder else ""
        raise PlanError(f"cannot import module {module_name!r} of factory {factory!r}{where}: "
                        f"{type(e).__name__}: {e}", entry=entry,
                        hint="put the module next to the plan file, or install its package") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise PlanError(f"module {module_name!r} has no function {func_name!r}", entry=entry,
                        hint=f"name a function that returns {returns}")
    return fn


def build_network(plan: Plan, name: str) -> nn.Module:
    """Instantiate network ``name`` of the plan with its deterministic seed.

    A network given as an ``nn.Module`` object is copied (the caller's object is left as it is);
    a factory is called with the plan's ``args`` under the network's seed. A transformers network is the whole
    model (an :class:`~splitlearn.models.hf.HFPiece` of one piece) with the LoRA adapters of every segment cut
    from it on the layers that segment runs.
    """
    if is_hf_network(plan, name):
        segments = _chain(plan, next(s for s, spec in plan.segments.items() if spec.network == name))
        whole = _hf_piece(plan, name, [], 0, f"networks.{name}")
        cuts = [plan.segments[s].cut for s in segments if plan.segments[s].cut is not None]
        for k, s in enumerate(segments):
            if plan.segments[s].lora is not None:
                add_lora(whole, plan.segments[s].lora.model_dump(), network_seed(plan.train.seed, name),
                         within=owned_modules(whole.hf, cuts, k) if cuts else None)
        return whole
    fn, entry = _factory(plan, name)
    if isinstance(fn, nn.Module):
        return copy.deepcopy(fn)
    folder = plan_dir(plan)
    with torch.random.fork_rng(devices=[]), _beside(folder.resolve() if folder else None):
        torch.manual_seed(network_seed(plan.train.seed, name))
        try:
            net = fn(**plan.networks[name].args)
        except Exception as e:  # noqa: BLE001 - the user's code: any error is a plan problem, not a crash
            raise PlanError(f"building network {name!r} failed: {type(e).__name__}: {e}", entry=entry,
                            hint="check the factory and the arguments it takes ('args')") from None
    if not isinstance(net, nn.Module):
        raise PlanError(f"{entry.split('.')[-1]} of network {name!r} returned {type(net).__name__}, not a torch.nn.Module",
                        entry=entry, hint="return a torch.nn.Module (an nn.Sequential to cut it at layer indices)")
    return net


def _plain_sequential(net: nn.Module) -> bool:
    """An nn.Sequential (or a subclass) that runs its layers in order: cut by slicing."""
    return isinstance(net, nn.Sequential) and type(net).forward is nn.Sequential.forward


def _chain(plan: Plan, segment: str) -> list[str]:
    """The segments cut from ``segment``'s network, in plan order."""
    network = plan.segments[segment].network
    return [s for s, spec in plan.segments.items() if spec.network == network]


def _bounds(plan: Plan, segment: str, net: nn.Module) -> tuple[int, int] | None:
    """Which part of a plain nn.Sequential the segment runs: ``[start, stop)``, or None for all of it.

    Segments of one network form a chain in plan order: ``layers`` gives the range, ``cut``
    ends it after a named layer, and neither, after an earlier bounded segment, means the rest.
    """
    mine = _chain(plan, segment)
    if all(plan.segments[s].layers is None and plan.segments[s].cut is None for s in mine):
        return None
    names = [n for n, _ in net.named_children()]
    pos = 0
    for s in mine:
        spec = plan.segments[s]
        if spec.layers is not None:
            start, stop = spec.layers
        elif spec.cut is not None:
            if spec.cut not in names:
                raise PlanError(f"network {spec.network!r} has no layer named {spec.cut!r} (its layers: {names})",
                                entry=f"segments.{s}.cut", hint="name one of its layers")
            start, stop = pos, names.index(spec.cut) + 1
        else:
            start, stop = pos, len(net)
        if stop > len(net):
            raise PlanError(f"layers {[start, stop]} but network {spec.network!r} has {len(net)} layers "
                            f"(0..{len(net) - 1})", entry=f"segments.{s}.layers", hint=f"use a stop of at most {len(net)}")
        if start >= stop:
            raise PlanError(f"segment {s!r} has no layers left of network {spec.network!r}: the segments before it "
                            f"end at layer {pos}", entry=f"segments.{s}", hint="give it 'layers' or 'cut', or remove it")
        if s == segment:
            return start, stop
        pos = stop
    raise AssertionError(segment)


def _piece(plan: Plan, segment: str, net: nn.Module) -> nn.Module:
    """The part of a module that is no plain nn.Sequential, cut after named submodules with torch.fx."""
    spec = plan.segments[segment]
    mine = _chain(plan, segment)
    bounded = [s for s in mine if plan.segments[s].cut is not None]
    for s in mine:
        if plan.segments[s].layers is not None:
            raise PlanError(f"network {spec.network!r} is a {type(net).__name__}, which cannot be cut at layer "
                            "indices", entry=f"segments.{s}.layers",
                            hint="cut it after a named submodule instead: cut = \"layer1\" (see docs/plans.md)")
    if not bounded:
        return net
    rest = [s for s in mine if plan.segments[s].cut is None]
    if rest and (len(rest) > 1 or rest[0] != mine[-1]):
        raise PlanError(f"segments {mine} of network {spec.network!r}: only the last may leave out 'cut' "
                        "(it runs the rest)", entry=f"segments.{rest[0]}",
                        hint="give every segment of the network but the last a 'cut'")
    cuts = [plan.segments[s].cut for s in bounded]
    try:
        pieces = cut_module(net, cuts)
    except CutError as e:
        raise PlanError(f"cannot cut network {spec.network!r} ({type(net).__name__}) after {cuts}: {e}",
                        entry=f"segments.{segment}.cut", hint="see 'Cutting a network' in docs/plans.md") from None
    piece = pieces[bounded.index(segment) if segment in bounded else len(bounded)]
    names = getattr(piece, "cut_outputs", [])
    if names and spec.output_names != names:  # a skip connection crosses the cut: the piece returns a tuple
        written = "[" + ", ".join(f'"{n}"' for n in names) + "]"
        raise PlanError(f"segment {segment!r} ends at the cut after {spec.cut!r}, which values used after it cross "
                        f"({names[1:]} besides {names[0]!r}): it returns the tuple {tuple(names)}, and its outputs "
                        f"{'are ' + str(spec.output_names) if spec.outputs else 'are not declared'}",
                        entry=f"segments.{segment}.outputs", hint=f"write outputs = {written} in segments.{segment} "
                        "(the segment after the cut takes them all by its bare name)")
    return piece


def is_hf_network(plan: Plan, name: str) -> bool:
    """Whether network ``name`` is a transformers model (a folder, or a model object given in Python)."""
    spec = plan.networks[name]
    return spec.hf is not None or is_hf_model(spec._object)


def _hf_piece(plan: Plan, name: str, cuts: list[str], index: int, entry: str) -> HFPiece:
    spec, seed = plan.networks[name], network_seed(plan.train.seed, name)
    try:
        if spec.hf is None:
            return piece_of(spec._object, cuts, index, seed=seed)
        return load_piece(beside_plan(plan, spec.hf.folder).resolve(), spec.hf.task, cuts, index, seed=seed,
                          config=spec.hf.config)
    except HFError as e:
        raise PlanError(f"network {name!r}: {e}", entry=entry,
                        hint="see 'Language models' and 'Vision transformers' in docs/plans.md") from None


def _hf_segment(plan: Plan, segment: str) -> nn.Module:
    """A segment of a transformers network: the piece of the model it runs, with its LoRA adapters."""
    spec = plan.segments[segment]
    mine = _chain(plan, segment)
    if [s for s in mine if plan.segments[s].cut is None] not in ([], [mine[-1]]):
        raise PlanError(f"segments {mine} of network {spec.network!r}: each but the last ends after a block named "
                        "in its 'cut'", entry=f"segments.{segment}", hint='e.g. cut = "model.layers.1"')
    cuts = [plan.segments[s].cut for s in mine if plan.segments[s].cut is not None]
    piece = _hf_piece(plan, spec.network, cuts, mine.index(segment), f"segments.{segment}.cut")
    if len(spec.inputs) > 1 and piece.vision:
        raise PlanError(f"segment {segment!r} runs a vision model ({type(piece.hf).__name__}) on {spec.inputs}: it "
                        "takes one input, the pixel values or the hidden states of the segment before (no mask)",
                        entry=f"segments.{segment}.inputs", hint="give one input")
    if len(spec.inputs) > 1 and spec.merge != "module":
        raise PlanError(f"segment {segment!r} runs a transformers model on {spec.inputs}, which it takes as its "
                        f"arguments (token ids or hidden states, then the attention mask), not merged by "
                        f"{spec.merge!r}", entry=f"segments.{segment}.merge", hint='write merge = "module"')
    if spec.lora is not None:
        try:
            add_lora(piece, spec.lora.model_dump(), network_seed(plan.train.seed, spec.network))
        except HFError as e:
            raise PlanError(f"segment {segment!r}: {e}", entry=f"segments.{segment}.lora",
                            hint="name the last part of linear layers this segment runs") from None
    tied = _tied_names(piece)
    if getattr(piece, "tied_across", False) and any(p.requires_grad for n, p in piece.named_parameters() if n in tied):
        raise PlanError(f"segment {segment!r} trains a weight tied to one another segment holds (an embedding and a "
                        "language-model head, tie_word_embeddings): the two copies would train apart",
                        entry=f"segments.{segment}", hint="freeze it (lora = {...}, not naming it in train), or save "
                        "the model untied (tie_word_embeddings=False)")
    return piece


def _tied_names(piece: HFPiece) -> set[str]:
    """The names of a piece's weights tied to another's (an embedding and a language-model head)."""
    tied = getattr(piece.hf, "all_tied_weights_keys", None) or {}
    return {*tied, *tied.values()}


def build_segment(plan: Plan, segment: str) -> nn.Module:
    """The module a segment runs: its network, a slice of it (nn.Sequential) or a piece cut by name, with the
    trainable parameters of its wires' defenses (:func:`~splitlearn.core.defense.attach_modules`)."""
    from ..core.defense import attach_modules

    return attach_modules(plan, segment, _segment_module(plan, segment))


def _segment_module(plan: Plan, segment: str) -> nn.Module:
    spec = plan.segments[segment]
    if is_hf_network(plan, spec.network):
        return _hf_segment(plan, segment)
    net = build_network(plan, spec.network)
    if not _plain_sequential(net):
        return _piece(plan, segment, net)
    bounds = _bounds(plan, segment, net)
    if bounds is None:
        return net
    start, stop = bounds
    return nn.Sequential(OrderedDict(list(net.named_children())[start:stop]))
