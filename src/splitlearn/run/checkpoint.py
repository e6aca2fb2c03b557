"""Consistent checkpoints of a party: everything it needs to continue from a step boundary.

A checkpoint holds the party's weights, optimizer state, random stream, codec state (error
feedback), noise secret, accounting and metrics so far, and the step it was taken after. Every
party takes one at the same step boundaries (``[train] checkpoint_every`` training steps, and at
the end of every epoch), in ``parties/NAME/checkpoints/step-N/``: ``state.safetensors`` (tensors,
no code) and ``manifest.json`` (the rest, with the SHA-256 of the tensors file). It is written
to a temporary folder, flushed to disk and renamed, so a kill during the write leaves no
checkpoint that looks whole; the last :data:`KEEP` are kept. On ``--resume`` the parties tell
each other in the hello which steps they hold and continue from the last step all of them hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.engine import Party
from ..wire.metering import Meter, Traffic

__all__ = ["Checkpoints", "KEEP", "capture", "restore", "module_tensors", "load_modules", "optimizer_tensors",
           "load_optimizer", "meter_state", "load_meter"]

KEEP = 2
FORMAT = "splitlearn-checkpoint-1"


def module_tensors(modules: dict[str, torch.nn.Module], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The weights (and buffers) of ``modules``, keyed ``PREFIX SEGMENT.NAME``."""
    return {f"{prefix}{seg}.{k}": v.detach().cpu().contiguous().clone()
            for seg, mod in modules.items() for k, v in mod.state_dict().items()}


def load_modules(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor],
                 prefix: str = "module.") -> None:
    for seg, mod in modules.items():
        start = f"{prefix}{seg}."
        mod.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})


def optimizer_tensors(optimizer: torch.optim.Optimizer | None, prefix: str = "optim.") \
        -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest entry) of an optimizer's state."""
    if optimizer is None:
        return {}, {}
    sd = optimizer.state_dict()
    tensors, entry = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                entry["scalars"][f"{pid}.{name}"] = value
    return tensors, entry


def load_optimizer(optimizer: torch.optim.Optimizer | None, tensors: dict[str, torch.Tensor], entry: dict[str, Any],
                   prefix: str = "optim.") -> None:
    if optimizer is None:
        return
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            pid, name = k[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for k, v in entry.get("scalars", {}).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": entry["param_groups"]})


def meter_state(meter: Meter) -> dict[str, Any]:
    """A meter's totals, as JSON."""
    return {"sent": [[w, d, t.messages, t.bytes, t.payload] for (w, d), t in meter.sent.items()],
            "received": [[w, d, t.messages, t.bytes, t.payload] for (w, d), t in meter.received.items()],
            "flops_forward": meter.flops_forward, "flops_backward": meter.flops_backward,
            "compute_s": meter.compute_s, "wait_s": meter.wait_s}


def load_meter(meter: Meter, m: dict[str, Any]) -> None:
    meter.sent = {(w, d): Traffic(n, b, p) for w, d, n, b, p in m["sent"]}
    meter.received = {(w, d): Traffic(n, b, p) for w, d, n, b, p in m["received"]}
    meter.flops_forward, meter.flops_backward = m["flops_forward"], m["flops_backward"]
    meter.compute_s, meter.wait_s = m["compute_s"], m["wait_s"]


def capture(party: Party, extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest) of a party's state after a step; ``extra``: the caller's own (metrics, timing)."""
    tensors = module_tensors(party.modules)
    optim_tensors, optim = optimizer_tensors(party.optimizer)
    tensors.update(optim_tensors)
    for name, value in party.rng.state().items():
        tensors[f"rng.{name}"] = value.clone()
    for (wire, kind), codec in party.encoders.items():
        residual = getattr(codec, "residual", None)
        if residual is not None:
            tensors[f"codec.{wire}.{int(kind)}.residual"] = residual.detach().cpu().contiguous().clone()
    manifest = {"format": FORMAT, "party": party.name, "optimizer": optim, "noise_secret": str(party.noise_secret),
                "meter": meter_state(party.meter), **extra}
    return tensors, manifest


def restore(party: Party, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Put a party back in the state :func:`capture` saw."""
    load_modules(party.modules, tensors)
    load_optimizer(party.optimizer, tensors, manifest["optimizer"])
    party.rng.load({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
    for (wire, kind), codec in party.encoders.items():
        key = f"codec.{wire}.{int(kind)}.residual"
        if hasattr(codec, "residual"):
            codec.residual = tensors[key].clone() if key in tensors else None
    party.noise_secret = int(manifest["noise_secret"])
    load_meter(party.meter, manifest["meter"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Checkpoints:
    """A party's checkpoint folder: ``every`` training steps (None: at epoch ends only)."""

    folder: Path
    every: int | None = None
    plan_hash: str = ""  # only checkpoints of this plan are listed (set by the party that takes them)
    label: str = "step"  # what the number counts: steps (``step-N``), or rounds of a [clients] plan (``round-N``)

    def clear(self) -> None:
        """A run from the start: an earlier run's checkpoints must never be taken for this one's."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def save(self, step: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{self.label}-{step:09d}"
        tmp = self.folder / f".{self.label}-{step:09d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        with open(tmp / "state.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        body = {**manifest, "step": step, "plan_hash": self.plan_hash,
                "tensors_sha256": _sha256(tmp / "state.safetensors")}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(self.folder / f"{self.label}-{old:09d}", ignore_errors=True)
        return final

    def steps(self) -> list[int]:
        """The steps of the whole checkpoints of this plan held (a torn or damaged one is not
        listed), ascending."""
        if not self.folder.is_dir():
            return []
        out = []
        for d in self.folder.glob(f"{self.label}-*"):
            try:
                step = int(d.name[len(self.label) + 1:])
                body = json.loads((d / "manifest.json").read_text())
                if body.get("format") != FORMAT or body.get("step") != step or body.get("plan_hash") != self.plan_hash:
                    continue
                if _sha256(d / "state.safetensors") != body.get("tensors_sha256"):
                    continue
            except (ValueError, OSError):
                continue
            out.append(step)
        return sorted(out)

    def load(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        d = self.folder / f"{self.label}-{step:09d}"
        return load_file(str(d / "state.safetensors")), json.loads((d / "manifest.json").read_text())
