"""Consistent checkpoints of a party: everything it needs to continue from a cursor.

A checkpoint is named by a :class:`~splitlearn.wire.control.Cursor` ``(round, step)``: the state
after step ``step`` of round ``round`` (-1: the start of the round). A plain plan (one round) takes
one before its first step, (0, -1), then every ``[train] checkpoint_every`` training steps and at
the end of every epoch, (0, k) after step id k (never inside a gradient group of ``[train] accumulate``);
a ``[clients]`` plan on the coordinator's word before the first round and at the end of every round r,
(r + 1, -1). It holds the party's weights, optimizer state (with its learning-rate schedule's position),
the loss scale where a party is in fp16 (:class:`~splitlearn.core.precision.LossScale`), with validation
the agreed best epoch, the early-stopping rule's state and the best epoch's weights (``best.SEGMENT.NAME``;
:mod:`~splitlearn.core.stopping`), random stream,
codec state (error feedback), noise secret, the bounds learnt from the run (``max_jump``), accounting
and metrics so far, in
``parties/NAME/checkpoints/round-RRRRRR-step-SSSSSSSSS/``: ``state.safetensors`` (tensors, no
code), ``manifest.json`` (the rest, its cursor too) and ``SHA256SUMS`` (the SHA-256 of both, as
``sha256sum`` writes it): a changed byte in any of the three makes the checkpoint unusable, and it
is read from the very bytes whose hash was checked. It is written to a temporary folder, flushed to
disk and renamed, so a kill during the write leaves no checkpoint that looks whole; the last
:data:`KEEP` are kept. On ``--resume`` the parties go on from the last cursor every party holds
(:func:`~splitlearn.run.resume.agree_on_resume`); a run that begins again instead moves the folder
aside (:meth:`Checkpoints.set_aside`), never deleting what a peer's word made useless. A checkpoint
of an earlier splitlearn (``step-N``, ``round-N``, an earlier format) is never read: it is named,
with the reason, among those that cannot be used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..core.engine import Party, PartyError
from ..core.optimizing import PartyOptimizer
from ..wire.control import Cursor
from ..wire.messages import Kind, Message, encode
from ..wire.metering import Meter, Traffic

__all__ = ["Checkpoints", "CheckpointError", "KEEP", "folder_name", "after_step", "capture", "restore",
           "module_tensors", "load_modules", "optimizer_tensors", "load_optimizer", "meter_state", "load_meter",
           "read_verified", "goodbye_bytes", "without_goodbyes", "resumable_meter", "FILES", "FORMAT", "SUMS"]

KEEP = 2
FORMAT = "splitlearn-checkpoint-3"  # 2: SHA256SUMS covers the manifest too; 3: named by a cursor (round, step)
FILES = ("manifest.json", "state.safetensors")  # in SHA256SUMS, in this order
SUMS = "SHA256SUMS"
_NAME = re.compile(r"round-(\d{6,})-step-(-0{7}1|\d{9,})")  # folder_name's names, and no other
_EARLIER = re.compile(r"(step|round)-(-?\d+)")  # the names of splitlearn-checkpoint-2 and earlier


class CheckpointError(PartyError):
    """A checkpoint that cannot be used (damaged, changed, of another plan or an earlier splitlearn)."""


def folder_name(cursor: Cursor) -> str:
    """The folder of the checkpoint of ``cursor``: ``round-RRRRRR-step-SSSSSSSSS`` (step -1: ``-00000001``)."""
    return f"round-{cursor.round:06d}-step-{cursor.step:09d}"


def after_step(step: int) -> Cursor:
    """A plain plan's cursor after step id ``step`` (-1: before the first): its schedule is one round, 0."""
    return Cursor(0, step)


def _cursor_of(name: str) -> Cursor | None:
    """The cursor a folder's name says (None: not a checkpoint's name)."""
    match = _NAME.fullmatch(name)
    return Cursor(int(match[1]), int(match[2])) if match else None


def module_tensors(modules: dict[str, torch.nn.Module], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The weights (and buffers) of ``modules``, keyed ``PREFIX SEGMENT.NAME``."""
    return {f"{prefix}{seg}.{k}": v.detach().cpu().contiguous().clone()
            for seg, mod in modules.items() for k, v in mod.state_dict().items()}


def load_modules(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor],
                 prefix: str = "module.") -> None:
    for seg, mod in modules.items():
        start = f"{prefix}{seg}."
        mod.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)})


def optimizer_tensors(optimizer: PartyOptimizer | None, prefix: str = "optim.") \
        -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest entry) of an optimizer's state; the entry has its schedule's position (``schedule``:
    steps taken, last epoch) where it has a schedule."""
    if optimizer is None:
        return {}, {}
    sd = optimizer.state_dict()
    tensors, entry = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    if "schedule" in sd:
        entry["schedule"] = sd["schedule"]
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                entry["scalars"][f"{pid}.{name}"] = value
    return tensors, entry


def load_optimizer(optimizer: PartyOptimizer | None, tensors: dict[str, torch.Tensor], entry: dict[str, Any],
                   prefix: str = "optim.") -> None:
    """Put an optimizer (and its schedule) back as :func:`optimizer_tensors` saw it."""
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
    schedule = {"schedule": entry["schedule"]} if "schedule" in entry else {}
    optimizer.load_state_dict({"state": state, "param_groups": entry["param_groups"], **schedule})


def meter_state(meter: Meter) -> dict[str, Any]:
    """A meter's totals, as JSON."""
    return {"sent": [[w, d, t.messages, t.bytes, t.payload] for (w, d), t in meter.sent.items()],
            "received": [[w, d, t.messages, t.bytes, t.payload] for (w, d), t in meter.received.items()],
            "flops_forward": meter.flops_forward, "flops_backward": meter.flops_backward,
            "compute_s": meter.compute_s, "wait_s": meter.wait_s, "counted": meter.counted,
            "tokens": [meter.tokens_forward, meter.tokens_backward]}


def load_meter(meter: Meter, m: dict[str, Any]) -> None:
    meter.sent = {(w, d): Traffic(n, b, p) for w, d, n, b, p in m["sent"]}
    meter.received = {(w, d): Traffic(n, b, p) for w, d, n, b, p in m["received"]}
    meter.flops_forward, meter.flops_backward = m["flops_forward"], m["flops_backward"]
    meter.compute_s, meter.wait_s = m["compute_s"], m["wait_s"]
    meter.counted = m.get("counted", {})  # (a checkpoint of an earlier splitlearn: counted again)
    meter.tokens_forward, meter.tokens_backward = m.get("tokens", [0, 0])


def goodbye_bytes(sender: str, receiver: str) -> int:
    """The bytes of a goodbye (STOP "done") as the session sends it, as its receiver meters it."""
    return len(encode(Message(Kind.STOP, sender, receiver, text="done")))


def without_goodbyes(meter: Meter, party: Party) -> Meter:
    """``meter`` without the goodbyes received from neighbours that finished already (a party that
    ran ahead, such as a label-only registry): a resumed run's neighbours say goodbye again at its
    end, so a run never stopped counts each once. Changes and returns ``meter``."""
    for peer in party.finished:
        t = meter.received.get(("", "control"))
        if t is not None and t.messages:
            t.messages, t.bytes = t.messages - 1, t.bytes - goodbye_bytes(peer, party.name)
    return meter


def resumable_meter(party: Party) -> Meter:
    """A party's accounting as a run resumed after its last step must find it: without the messages of
    later steps read early (their senders send them again), with the credits owed for the steps
    done that have not come yet (their senders will not), and without the goodbyes of neighbours that
    finished already (:func:`without_goodbyes`). A run never stopped counts each once."""
    meter, step, k = copy.deepcopy(party.meter), party.last_step, party.pipeline
    for msg in party.early.later(step):
        t = meter.received[(msg.wire, "forward" if msg.kind == Kind.ACTIVATION else "backward")]
        t.messages, t.bytes, t.payload = (t.messages - 1, t.bytes - len(encode(msg)), t.payload - msg.payload_bytes)
    for consumer, steps in party.flow.unread.items():
        wire = party.flow.out[consumer].wire
        for s in steps:
            if s <= step:
                meter.on_recv(wire, "credit", len(encode(Message(Kind.CREDIT, consumer, party.name, s * k, wire))), 0)
    return without_goodbyes(meter, party)


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
    meter = resumable_meter(party)
    manifest = {"format": FORMAT, "party": party.name, "optimizer": optim, "noise_secret": str(party.noise_secret),
                "meter": meter_state(meter), "learnt_bounds": party.bounds.state(), **extra}
    if party.precision.scale is not None:  # a loss-scaled network (a party in fp16): the scale every party holds
        manifest["loss_scale"] = party.precision.scale.state_dict()
    epochs = party.precision.epochs  # validation: the agreed best epoch, the rule's state, the best epoch's weights
    if epochs is not None:
        manifest["stopping"] = epochs.state()
        if epochs.kept is not None:
            tensors.update({f"best.{seg}.{k}": v.detach().cpu().contiguous().clone()
                            for seg, sd in epochs.kept.items() for k, v in sd.items()})
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
    party.bounds.load(manifest.get("learnt_bounds", {}))
    if party.precision.scale is not None:
        try:
            party.precision.scale.load_state_dict(manifest["loss_scale"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{party.name}: the checkpoint holds no loss scale, which fp16 needs ({e})") from None
    epochs = party.precision.epochs
    if epochs is not None:  # (the state before any step, taken before the agreement existed: its start)
        try:
            epochs.load(manifest.get("stopping", {"epoch": 0, "best_epoch": None, "stopped_at": None}))
        except ValueError as e:
            raise CheckpointError(f"{party.name}: {e}") from None
        kept: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("best."):
                seg, name = k[len("best."):].split(".", 1)
                kept.setdefault(seg, {})[name] = v.clone()  # (load_state_dict copies it onto the module's device)
        epochs.kept = kept or None


def _sums_text(digests: dict[str, str]) -> str:
    """``SHA256SUMS`` as ``sha256sum`` writes it (``sha256sum -c SHA256SUMS`` checks a checkpoint by hand)."""
    return "".join(f"{digests[f]}  {f}\n" for f in FILES)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_verified(folder: Path) -> dict[str, bytes]:
    """The bytes of a checkpoint's files, once each matches its SHA-256 in ``SHA256SUMS`` (and
    ``SHA256SUMS`` is exactly what :meth:`Checkpoints.save` writes). Raises CheckpointError naming
    the file that differs."""
    try:
        sums = (folder / SUMS).read_bytes()
        data = {f: (folder / f).read_bytes() for f in FILES}
    except OSError as e:
        raise CheckpointError(f"{folder.name}: {e.strerror or e} ({Path(e.filename or '').name or 'a file'})") from None
    digests = {f: hashlib.sha256(b).hexdigest() for f, b in data.items()}
    if sums != _sums_text(digests).encode():
        told = {}
        for line in sums.decode("utf-8", "replace").splitlines():
            digest, _, name = line.partition("  ")
            told[name] = digest
        bad = [f for f in FILES if told.get(f) != digests[f]] if set(told) == set(FILES) else []
        raise CheckpointError(f"{folder.name}: {', '.join(bad)} does not match its SHA-256 in {SUMS} "
                              "(changed or damaged since it was written)" if bad else
                              f"{folder.name}: {SUMS} is not the one written with it (changed or damaged)")
    return data


def _manifest(folder: Path, data: bytes, cursor: Cursor) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        raise CheckpointError(f"{folder.name}: manifest.json is not JSON") from None
    told = body.get("format") if isinstance(body, dict) else None
    if isinstance(told, str) and told.startswith("splitlearn-checkpoint-") and told != FORMAT:
        raise CheckpointError(f"{folder.name}: written by an earlier splitlearn ({told}; this one reads {FORMAT})")
    if told != FORMAT or body.get("cursor") != list(cursor):
        raise CheckpointError(f"{folder.name}: not a {FORMAT} checkpoint {cursor}")
    return body


def _earlier(folder: Path) -> str:
    """Why a folder named as an earlier splitlearn named its checkpoints is not read."""
    return (f"{folder.name}: written by an earlier splitlearn (it named checkpoints step-N or round-N; this one "
            f"reads {FORMAT}, named {folder_name(Cursor(0, 0))} and the like); finish that run with the version that "
            "began it, or start it again without --resume")


@dataclass
class Checkpoints:
    """A party's checkpoint folder, one checkpoint per :class:`~splitlearn.wire.control.Cursor`; a plain
    plan's party takes one ``every`` training steps (None: at epoch ends only)."""

    folder: Path
    every: int | None = None
    plan_hash: str = ""  # only checkpoints of this plan are listed (set by the party that takes them)
    lag: int = 0  # how many steps behind this party a neighbour may be (flow control's window): kept too

    def clear(self) -> None:
        """A run from the start (without --resume, the user's word): an earlier run's checkpoints
        must never be taken for this one's."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def set_aside(self) -> Path | None:
        """A resumed run that begins again: move the folder, whatever it holds, to
        ``checkpoints.before-TIME`` beside it (nothing is deleted). The new place (None: nothing held)."""
        if not self.folder.is_dir() or not any(self.folder.iterdir()):
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.folder.with_name(f"{self.folder.name}.before-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.folder.with_name(f"{self.folder.name}.before-{stamp}-{n}")
        os.replace(self.folder, dest)
        _fsync_dir(self.folder.parent)
        return dest

    def save(self, cursor: Cursor, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        """Write the checkpoint of ``cursor`` (its manifest says the cursor); its folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / folder_name(cursor)
        tmp = self.folder / f".{folder_name(cursor)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        with open(tmp / "state.safetensors", "rb+") as f:
            os.fsync(f.fileno())
            f.seek(0)
            digests = {"state.safetensors": hashlib.file_digest(f, "sha256").hexdigest()}
        body = json.dumps({**manifest, "format": FORMAT, "cursor": list(cursor), "plan_hash": self.plan_hash}).encode()
        digests["manifest.json"] = hashlib.sha256(body).hexdigest()
        _write(tmp / "manifest.json", body)
        _write(tmp / SUMS, _sums_text(digests).encode())
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        # the last KEEP, and every one a neighbour up to `lag` steps behind may hold as its last: a party that
        # runs ahead (a label-only registry) must still hold the cursor all will agree on
        held = self.cursors()
        cutoff = Cursor(cursor.round, cursor.step - self.lag)  # a neighbour is at or after it; its last checkpoint
        below = [h for h in held if h < cutoff]  # is the newest held at or after it, or the newest one before it
        keep = set(held[-KEEP:]) | {h for h in held if h >= cutoff} | set(below[-1:])
        for old in held:
            if old not in keep:
                shutil.rmtree(self.folder / folder_name(old), ignore_errors=True)
        return final

    def scan(self) -> tuple[list[Cursor], list[str]]:
        """(the cursors of the whole checkpoints of this plan held, ascending; why each other one
        here cannot be used, an earlier splitlearn's among them). Another plan's checkpoints are
        passed over in silence."""
        if not self.folder.is_dir():
            return [], []
        out, bad = [], []
        for d in sorted(self.folder.iterdir()):
            cursor = _cursor_of(d.name)
            if cursor is None:
                if _EARLIER.fullmatch(d.name) and d.is_dir():
                    bad.append(_earlier(d))
                continue
            try:
                body = _manifest(d, read_verified(d)["manifest.json"], cursor)
            except CheckpointError as e:
                bad.append(str(e))
                continue
            if body.get("plan_hash") == self.plan_hash:
                out.append(cursor)
        return sorted(out), bad

    def cursors(self) -> list[Cursor]:
        """The cursors of the whole checkpoints of this plan held (a torn, changed or damaged one
        is not listed), ascending."""
        return self.scan()[0]

    def load(self, cursor: Cursor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and manifest of the checkpoint of ``cursor``, read from the bytes whose SHA-256
        was just checked (a change since :meth:`cursors` listed it raises CheckpointError)."""
        d = self.folder / folder_name(cursor)
        data = read_verified(d)
        body = _manifest(d, data["manifest.json"], cursor)
        if body.get("plan_hash") != self.plan_hash:
            raise CheckpointError(f"{d.name}: a checkpoint of another plan")
        try:
            tensors = load_bytes(data["state.safetensors"])
        except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds on a malformed file
            raise CheckpointError(f"{d.name}: state.safetensors cannot be read ({e})") from None
        return tensors, body
