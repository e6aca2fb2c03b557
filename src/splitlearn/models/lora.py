"""LoRA adapters (``peft``) on a piece of a Hugging Face model, its base frozen; merged back into plain weights.

Each adapter's A is drawn from a stream of its own (the plan seed and its name) and B is zero: a layer's adapters
are the same whichever party builds it, so a split run starts where an unsplit one does.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Sequence

import torch
from torch import nn

from .hf import HFError, HFPiece, set_module

__all__ = ["add_lora", "merge_lora"]

_ADAPTABLE = ("Linear", "Conv1D")  # layers LoRA adapters go on (torch's, and GPT-2's transposed one)


def _lora_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def add_lora(piece: nn.Module, lora: dict[str, Any], seed: int, within: Sequence[str] | None = None) -> nn.Module:
    """``peft`` LoRA adapters on the piece's ``target_modules`` (``r``, ``alpha``, ``dropout``), the base frozen
    but for the modules named in ``train`` (``["score"]``: trained whole) and weights the model folder lacks (a new
    classification head, initialised from the seed).
    Each adapter's A is drawn from a stream of its own (the seed and its name), B is zero: the adapters of a
    layer are the same whichever party builds it, so a split run starts where an unsplit one does. ``within``:
    only layers under these module names (a whole model given a piece's adapters)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 2 * int(lora.get("r", 8)))),
                        target_modules=list(lora["target_modules"]), lora_dropout=float(lora.get("dropout", 0.0)),
                        bias="none")
    hf = piece.hf if isinstance(piece, HFPiece) else piece
    layers = {n: m for n, m in hf.named_modules() if type(m).__name__ in _ADAPTABLE}
    targets = [n for n in layers if n.rpartition(".")[2] in config.target_modules
               and (within is None or any(n == w or n.startswith(w + ".") for w in within))]
    if not targets:
        raise HFError(f"none of its layers is named {sorted(config.target_modules)} (its linear layers end in "
                      f"{sorted({n.rpartition('.')[2] for n in layers})})")
    config.target_modules = targets
    config.fan_in_fan_out = any(type(layers[n]).__name__ == "Conv1D" for n in targets)  # GPT-2's (in, out) layers
    before = {n: p.requires_grad for n, p in hf.named_parameters()}  # (peft freezes every weight it does not adapt)
    with warnings.catch_warnings():  # a whole model given each segment's adapters in turn: one adapter, "default"
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, hf)
    also = set(lora.get("train") or ()) | set(getattr(piece, "fresh", ()))  # whole modules, new weights: trained
    for name, p in hf.named_parameters():
        if within is None or any(name.startswith(w + ".") for w in within):  # (a whole model: this segment's layers)
            p.requires_grad_("lora_" in name or name in also or any(part in also for part in name.split(".")[:-1]))
        else:
            p.requires_grad_(before.get(name.replace(".base_layer", ""), before.get(name, True)))
    for name, m in hf.named_modules():
        if name.endswith("lora_A.default"):
            g = torch.Generator().manual_seed(_lora_seed(seed, name))
            bound = 1 / math.sqrt(m.weight.shape[1])  # kaiming_uniform(a=sqrt(5)) as nn.Linear draws
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
    if isinstance(piece, HFPiece):  # children may have been replaced by adapter wrappers: register them again
        for name, child in hf.named_children():
            piece.add_module(name, child)
    return piece


def merge_lora(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA adapters merged into the base weights and removed (plain layers again)."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            set_module(model, name, m.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
