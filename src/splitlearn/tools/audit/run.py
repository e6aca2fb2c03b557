"""Auditing a finished run: find in its folder what each party received, attack it where the
attacker sits, and write ``RUN_DIR/audit/audit.json`` and the inversion figures.

A run folder (``splitlearn.train(plan, out=DIR)``) holds ``plan.json``, ``result.json`` and per
party ``parties/P/observed.safetensors``: what P *received* during training, per wire and
direction, with sample ids (the first and the last 4096 rows of the run). The attacks:

- on an activation wire, the **receiver** holds the smashed data (``last`` rows: the trained
  model): its distance correlation with the sender's raw inputs, and a model-inversion decoder
  trained on an auxiliary share of the rows; where those inputs are token ids and it saw hidden states, the
  text inversion attacks instead (:mod:`splitlearn.tools.audit.inversion`: tokens recovered against chance);
- on an activation wire whose **sender** does not hold the labels of the loss its gradients
  come from, the sender holds those gradients (``first`` rows: early training leaks most): the
  norm and direction label-leakage attacks;
- on a label wire, the receiver holds the labels: how many match the truth (randomized
  response lowers it).

The ground truth used to score the attacks (raw inputs, labels) is read from each party's data
by sample id, as :func:`splitlearn.run.setup.setup_party` loads it. In a ``[clients]`` run whose
clients read their own files, the template's data is the concatenation of the clients' tables (in
the plan's client order) and every recorded row is a position in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...clients.results import client_views, recording_parties
from ...clients.roles import plays_of
from ...core.graph import Graph, Wire, build_graph
from ...core.plan import Plan, per_client as own_files
from ...core.specs import PlanError
from ...core.wirespec import WireSpec
from ...launch.results import load_run_plan
from .verdicts import add_verdicts, secure_sum_note
from ...launch.results import non_finite
from . import inversion, measures
from .inversion import _widen
from .where import image_shape, loss_sources, wire_slug
from .attacks import Settings, attack_notes, check_settings, chosen, not_named, run_attacks
from .wires import WIRE_MEASURES, keep_measures

__all__ = ["AuditError", "audit_run", "RunFolder"]


class AuditError(ValueError):
    """A run folder or sweep that cannot be audited, with what to do instead."""


@dataclass
class RunFolder:
    """What the audit reads from a run folder (each party's data is loaded on first use)."""

    folder: Path
    plan: Plan
    graph: Graph
    result: dict[str, Any]
    observed: dict[str, dict[str, torch.Tensor]]  # party -> key -> tensor
    per_client: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)  # [clients]: client -> observed
    # [clients] on own files: the clients whose tables, concatenated in this order, are the template's data, and
    # where each one's rows begin in it (every recorded row is then a position in that concatenation)
    joined: dict[str, int] | None = None
    joined_party: str | None = None  # the plan party whose data those tables are (the clients' template)
    _setups: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: str | Path) -> "RunFolder":
        from safetensors.torch import load_file

        folder = Path(run_dir)
        if not folder.is_dir():
            raise AuditError(f"{folder}: no such folder; give the --out folder of a finished run")
        if not (folder / "plan.json").is_file():
            raise AuditError(f"{folder}: not a run folder (plan.json is missing); give the --out folder of a "
                             "finished 'splitlearn run' or splitlearn.train(..., out=...)")
        try:
            plan = load_run_plan(folder)
        except (ValueError, PlanError) as e:
            raise AuditError(f"{folder / 'plan.json'}: not a valid plan: {e}") from None
        result_file = folder / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        observed = {}
        for party in recording_parties(plan):
            f = folder / "parties" / party / "observed.safetensors"
            if f.is_file():
                observed[party] = load_file(str(f))
                bad = non_finite(observed[party])
                if bad:
                    raise AuditError(f"{f}: what {party!r} received holds NaN or infinite values ({', '.join(bad[:3])}); "
                                     "the run was poisoned or diverged, so no leakage figure from it would mean "
                                     "anything (a distance correlation of such data reads as 'no leakage')")
            w = folder / "parties" / party / "weights.safetensors"
            if w.is_file():
                bad = non_finite(load_file(str(w)))
                if bad:
                    raise AuditError(f"{w}: the weights of {party!r} hold NaN or infinite values ({', '.join(bad[:3])}); "
                                     "the run was poisoned or diverged: audit a run that trained")
        if not observed:
            raise AuditError(f"{folder}: no party left an observed.safetensors (what it received during training); "
                             "train with out=... (or 'splitlearn run --out') to record it")
        run = cls(folder, plan, build_graph(plan), result, observed, client_views(plan, observed))
        if own_files(plan):  # a [clients] run whose clients each read their own file
            run._join_clients()
        if run.per_client:  # a [clients] run: what every client's turns left, party by party
            run.observed = _merged(run.per_client.values())
        return run

    def _join_clients(self) -> None:
        """A [clients] run whose clients read their own files: every row a party recorded for a client is in
        that client's rows (a fixed party counts them in schedule order, the client in its sorted ids); make
        each a position in the concatenation of the tables of the clients that recorded anything."""
        template = self.joined_party = plays_of(self.plan, next(iter(self.per_client)))
        holders = [p for p in self.plan.parties if p != template and self.plan.parties[p].holds]
        if holders:  # a fixed party's own rows match no client's: there is no truth to score its view against
            raise AuditError(f"{self.folder}: {holders[0]!r} holds data of its own in a [clients] run whose clients "
                             "read their own files: the rows it recorded match no client's, so the audit cannot "
                             "score them")
        self.joined, offset = {}, 0
        for c, view in self.per_client.items():
            if not any(view.values()):
                continue
            s = self.client_setup(c)
            n, order = len(s.splits.ids), np.concatenate([s.splits.train, s.splits.test])
            self.joined[c] = offset
            self.per_client[c] = {p: _shifted(tensors, c, p, offset, s.splits.ids,
                                              None if p == template else order)
                                  for p, tensors in view.items()}
            offset += n

    def client_setup(self, client: str):
        """A client of a [clients] run on own files as it trained: the template party on its own file."""
        from ...run.setup import setup_party

        if client not in self._setups:  # (a client's name is never a party's)
            try:
                self._setups[client] = setup_party(self.plan, plays_of(self.plan, client), self._cache,
                                                   optimizer=False, client=client)
            except PlanError as e:
                raise AuditError(f"the data of client {client!r}, whose rows the run recorded, cannot be read: {e}; "
                                 "audit where every client's file is at hand") from None
        return self._setups[client]

    def setup(self, party: str):
        """The party as it trained: its data, restricted to the ids every party holds when the run aligned
        them privately (the audit, like ``predict``, has every party's data at hand)."""
        from ...run.setup import setup_party

        if party not in self._setups:
            s = setup_party(self.plan, party, self._cache, optimizer=False)
            common = self.aligned_ids()
            if s.table is not None and common is not None and len(common) != len(s.splits.ids):
                s.restrict(common)
            self._setups[party] = s
        return self._setups[party]

    def aligned_ids(self) -> np.ndarray | None:
        """The sorted sample ids the run trained on (None before any party with data is read)."""
        from ...run.setup import setup_party

        if "_ids" not in self._cache:
            holders = [p for p in self.plan.parties if self.plan.parties[p].holds]
            ids = None
            for p in holders:
                own = setup_party(self.plan, p, self._cache, optimizer=False).splits.ids
                ids = own if ids is None else np.intersect1d(ids, own)
                if self.plan.data.align == "exact":
                    break
            self._cache["_ids"] = ids
        return self._cache["_ids"]

    def rows(self, party: str, node: str, positions: torch.Tensor) -> torch.Tensor:
        """``node``'s values (a field of ``party``'s data) at the given positions in the run's sorted ids (own
        files: in the concatenation of the clients' tables)."""
        if party == self.joined_party:
            key = f"_joined|{node}"
            if key not in self._cache:
                self._cache[key] = torch.cat([self.client_setup(c).inputs[node] for c in self.joined])
            return self._cache[key][positions]
        return self.setup(party).inputs[node][positions]

    def seen(self, party: str, wire: str, direction: str, part: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What ``party`` received on ``wire``: (positions in the run's sorted ids, values). A party with
        integer ids recorded the ids; a party without data, or with string ids, positions."""
        obs = self.observed.get(party, {})
        key = f"{wire}|{direction}|{part}"
        if f"{key}|values" not in obs:
            return None
        if self.joined is not None:  # own files: positions in the clients' tables, concatenated (_join_clients)
            return obs[f"{key}|positions"], obs[f"{key}|values"]
        known = self.aligned_ids()
        if f"{key}|positions" in obs:
            pos = obs[f"{key}|positions"].long()
            if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= len(known)):
                raise AuditError(f"what {party!r} recorded names rows beyond the {len(known)} the run trained on: "
                                 "was the run made on other data?")
            if not self.plan.parties[party].holds:  # a party without data counts rows in schedule order:
                holder = next(p for p in self.plan.parties if self.plan.parties[p].holds)  # training rows, then test
                splits = self.setup(holder).splits
                pos = torch.from_numpy(np.concatenate([splits.train, splits.test]))[pos]
            return pos, obs[f"{key}|values"]
        ids = obs[f"{key}|ids"].numpy()
        if known.dtype.kind not in "iu":
            raise AuditError(f"{party!r} recorded integer ids, but the data's ids are strings: was the run made on "
                             "other data?")
        pos = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        if not np.array_equal(known[pos], ids):
            raise AuditError(f"the data holds no rows for some ids {party!r} recorded (first: "
                             f"{ids[known[pos] != ids][:5].tolist()}): was the run made on other data?")
        return torch.from_numpy(pos), obs[f"{key}|values"]


def _shifted(tensors: dict[str, torch.Tensor], client: str, party: str, offset: int, ids: np.ndarray,
             order: np.ndarray | None) -> dict[str, torch.Tensor]:
    """What ``party`` recorded for ``client`` with every row made a position in the clients' concatenated tables:
    ``order`` maps a position counted in schedule order (a party without data) to one in the client's sorted
    ``ids``; the client records positions in them (or, integer ids, the ids), which start at ``offset``."""
    out = {}
    for k, v in tensors.items():
        head, _, label = k.rpartition("|")
        if label == "positions":
            pos = v.long().numpy()
            bound = len(ids) if order is None else len(order)
            if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= bound):
                raise AuditError(f"what {party!r} recorded for {client!r} names rows beyond the {bound} {client!r} "
                                 "holds: was the run made on other data?")
            pos = pos if order is None else order[pos]
        elif label == "ids":
            got = v.numpy()
            if ids.dtype.kind not in "iu":
                raise AuditError(f"{party!r} recorded integer ids for {client!r}, but {client!r}'s ids are strings: "
                                 "was the run made on other data?")
            pos = np.clip(np.searchsorted(ids, got), 0, max(len(ids) - 1, 0))
            if len(got) and (not len(ids) or not np.array_equal(ids[pos], got)):
                missing = got[ids[pos] != got] if len(ids) else got
                raise AuditError(f"{client!r}'s data holds no rows for some ids {party!r} recorded (first: "
                                 f"{missing[:5].tolist()}): was the run made on other data?")
        else:
            out[k] = v
            continue
        out[f"{head}|positions"] = torch.from_numpy(pos.astype(np.int64) + offset)
    return out


def _merged(views) -> dict[str, dict[str, torch.Tensor]]:
    """What every client's view holds, party by party (rows concatenated)."""
    out: dict[str, dict[str, list]] = {}
    for view in views:
        for party, tensors in view.items():
            for k, v in tensors.items():
                out.setdefault(party, {}).setdefault(k, []).append(v)
    return {p: {k: torch.cat(vs) for k, vs in kv.items()} for p, kv in out.items()}


def _defenses(w: Wire) -> dict[str, Any]:
    """The wire's settings that differ from the defaults (nested settings in full)."""
    default = WireSpec().model_dump(mode="json")
    return {k: v for k, v in w.spec.model_dump(mode="json").items() if v != default.get(k)}


def _activation_wire(run: RunFolder, w: Wire, *, aux_fraction: float, seed: int, epochs: int, max_rows: int,
                     out_dir: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"carries": "activation", "sender": w.src_party, "receiver": w.dst_party,
                             "defenses": _defenses(w), "distance_correlation": None, "inversion": None,
                             "label_leakage": None, "why_not": {}}
    why = entry["why_not"]
    # -- what the receiver learns about the sender's raw inputs ------------------------------------
    sources = run.graph.raw_inputs(w.src)
    smashed = run.seen(w.dst_party, w.name, "sum" if w.masked else "forward", "last")  # a secure sum's: the sum
    if w.masked:  # merge = "secure_sum": the receiver holds only the sum, which the figures below are of
        why["attack_on_its_own_activation"] = secure_sum_note(run.graph, w)
    if not sources:
        reason = (f"{w.src_party!r} computes {w.src!r} from no data of its own (only from tensors it received): "
                  "the raw inputs are audited on the wires that carry them from their owner")
        why["distance_correlation"] = why["inversion"] = reason
    elif smashed is None:
        why["distance_correlation"] = why["inversion"] = f"{w.dst_party!r} recorded no activations on this wire"
    elif _as_text(run, w, entry, smashed, sources, aux_fraction=aux_fraction, seed=seed, epochs=epochs):
        pass  # token ids: attacked by text inversion, not as numbers
    else:
        ids, values = measures.latest_per_id(*smashed)
        raw_parts = {n: run.rows(w.src_party, n, ids) for n in sources}
        raw = torch.cat([raw_parts[n].reshape(len(ids), -1).float() for n in sources], dim=1)
        entry["raw_inputs"] = sources
        entry["attacker"] = w.dst_party
        dcor, used = measures.smashed_dcor(raw, values, max_rows=max_rows, seed=seed)
        entry["distance_correlation"] = dcor
        entry["distance_correlation_rows"] = used
        shape = image_shape(run.plan, sources, raw_parts)
        try:
            inv = measures.invert(values, raw, aux_fraction=aux_fraction, seed=seed, epochs=epochs, image_shape=shape)
        except ValueError as e:
            why["inversion"] = str(e)
        else:
            png = out_dir / f"inversion_{wire_slug(w.name)}.png"
            from .figures import inversion_grid

            ssim_txt = f", SSIM {inv.figures['ssim']:.3f}" if inv.figures.get("ssim") is not None else ""
            inversion_grid(png, inv.originals, inv.reconstructions, shape,
                           f"{w.name}: {w.dst_party} inverts {w.src_party}'s {', '.join(sources)} "
                           f"(MSE {inv.figures['mse']:.4f}{ssim_txt})")
            entry["inversion"] = {**inv.figures, "figure": str(png.relative_to(run.folder))}
    # -- what the sender learns about the labels from the gradients it receives --------------------
    losses = loss_sources(run.graph, w)
    foreign = [n for n in losses if run.graph.nodes[n.inputs[1]].party != w.src_party]
    if not losses:
        why["label_leakage"] = "no loss downstream of this wire"
    elif not foreign:
        held = ", ".join(n.inputs[1] for n in losses)
        why["label_leakage"] = f"the sender {w.src_party!r} holds the labels ({held}) its gradients come from"
    else:
        grads = run.seen(w.src_party, w.name, "backward", "first")
        if grads is None:
            why["label_leakage"] = f"{w.src_party!r} recorded no gradients on this wire"
        else:
            ids, g = grads
            per_loss = {}
            for loss in foreign:
                target = loss.inputs[1]
                holder = run.graph.nodes[target].party
                head = {"loss": loss.name, "labels": target, "label_holder": holder, "attacker": w.src_party}
                if run.plan.losses[loss.name].kind == "mse":
                    per_loss[loss.name] = {**head, "norm_auc": None, "direction_auc": None,
                                           "note": "a regression target: the norm and direction attacks need classes"}
                    continue
                labels = run.rows(holder, target, ids)
                per_loss[loss.name] = {**head, **measures.label_leakage(g, labels)}
            first, *rest = per_loss.values()
            entry["label_leakage"] = {**first, **({"other_losses": {r["loss"]: r for r in rest}} if rest else {})}
    if not why:
        del entry["why_not"]
    return entry


def _as_text(run: RunFolder, w: Wire, entry: dict[str, Any], smashed: tuple[torch.Tensor, torch.Tensor],
             sources: list[str], *, aux_fraction: float, seed: int, epochs: int) -> bool:
    """Where the sender's raw inputs are token ids: the text inversion attacks on the hidden states the receiver
    got (``entry["text_inversion"]``), or an integer element that crosses as one of its fields is; False else."""
    ids, values = measures.latest_per_id(*smashed)
    node = run.graph.nodes[w.src]
    seg = node.inputs[0] if node.kind == "output" else w.src
    order = [n for n in (*run.graph.nodes[seg].inputs, *sources) if n in sources]
    raw = {n: run.rows(w.src_party, n, ids) for n in dict.fromkeys(order)}
    why = entry["why_not"]
    if not values.is_floating_point():  # a mask or ids: travels exactly, untouched
        same = inversion.exact_field(values, raw)
        if same is not None:
            why["distance_correlation"] = why["inversion"] = (
                f"{w.dst_party!r} receives {same} as it is: an integer element travels exactly, untouched by codecs "
                "and defenses")
        return same is not None
    found = inversion.token_inputs(values, raw)
    if found is None:
        return False
    tokens, mask_name = found
    width = values.shape[1]
    mask = _widen(raw[mask_name] if mask_name else torch.ones_like(raw[tokens]), width)
    why["distance_correlation"] = why["inversion"] = (
        f"{tokens} holds token ids, whose distances and squared errors as numbers mean nothing: the tokens are "
        "audited by text inversion")
    if f"_embedding|{seg}" not in run._cache:
        run._cache[f"_embedding|{seg}"] = inversion.base_embedding(run.plan, seg)
    table, no_table = run._cache[f"_embedding|{seg}"]
    truth = _widen(raw[tokens], width)
    try:
        got = inversion.text_inversion(values, truth, mask, embedding=table, aux_fraction=aux_fraction, seed=seed,
                                       epochs=epochs, vocab=None if table is not None else int(truth.max()) + 1)
    except ValueError as e:
        why["text_inversion"] = str(e)
        return True
    entry["text_inversion"] = {**got, "tokens": tokens, "mask": mask_name, "attacker": w.dst_party,
                               **({"nearest_embedding_note": no_table} if no_table else {})}
    return True


def _label_wire(run: RunFolder, w: Wire) -> dict[str, Any]:
    entry: dict[str, Any] = {"carries": "label", "sender": w.src_party, "receiver": w.dst_party,
                             "defenses": _defenses(w)}
    seen = run.seen(w.dst_party, w.name, "forward", "first")
    if seen is None:
        entry["why_not"] = {"labels_exposed": f"{w.dst_party!r} recorded no labels on this wire"}
        return entry
    ids, values = seen
    truth = run.rows(w.src_party, w.src, ids)
    entry["labels_exposed"] = {"attacker": w.dst_party, "rows": int(len(ids)),
                               "agreement": float((values.reshape(-1) == truth.reshape(-1)).float().mean()),
                               "note": "the labels travel to the receiver; randomized response lowers the agreement"}
    return entry


def audit_run(run_dir: str | Path, aux_fraction: float = 0.1, seed: int = 0, epochs: int = 200,
              max_rows: int = 1000, progress: Callable[[str], None] | None = None, attacks: Sequence[str] | None = None,
              known_labels: int | None = None, attribute: str | None = None) -> dict[str, Any]:
    """Audit the run in ``run_dir``; write ``run_dir/audit/audit.json`` (and the inversion figures
    ``audit/inversion_WIRE.png``) and return what it holds.

    ``aux_fraction``: the share of recorded rows the inversion attacker knows in the clear;
    ``epochs``: the inversion decoder's training epochs; ``max_rows``: rows used for the distance
    correlation; ``seed``: the attacks' randomness; ``progress`` is told each wire as it is audited.
    Every wire gets ``verdicts`` (see :mod:`splitlearn.tools.audit.verdicts`). ``attacks``: the registered
    attacks to run (:mod:`splitlearn.tools.audit.attacks`; default every passive one that applies, and for each
    active one where it applies, why it did not run: it trains the plan again, so it runs when named), each with its
    section in ``attacks``; ``known_labels`` and ``attribute``: the model completion's labelled rows and the
    attribute probe's attribute (:class:`~splitlearn.tools.audit.attacks.Settings`).
    """
    if not 0 < aux_fraction < 1:
        raise AuditError(f"aux_fraction must be between 0 and 1 (exclusive), got {aux_fraction}")
    if epochs < 1:
        raise AuditError(f"the decoder needs at least one epoch, got {epochs}")
    settings = Settings(aux_fraction, seed, epochs, max_rows, known_labels, attribute)
    try:
        per_wire, others = chosen(attacks)
        run = RunFolder.open(run_dir)
        check_settings(run, others, settings)
    except ValueError as e:
        raise AuditError(str(e)) from None
    audit = _audit(run, aux_fraction=aux_fraction, seed=seed, epochs=epochs, max_rows=max_rows,
                   progress=progress, per_wire=per_wire)
    audit["attacks"] = {**run_attacks(run, others, settings, run.folder / "audit", progress), **not_named(run, attacks, settings)}
    audit = add_verdicts(audit)
    audit["explanations"] += attack_notes(audit["attacks"])
    from ...launch.results import write_json

    write_json(run.folder / "audit" / "audit.json", audit)
    return audit


def _audit(run: RunFolder, *, aux_fraction: float, seed: int, epochs: int, max_rows: int,
           progress: Callable[[str], None] | None = None, per_wire: frozenset[str] = WIRE_MEASURES) -> dict[str, Any]:
    out_dir = run.folder / "audit"
    if not per_wire:  # only attacks of the registry's own asked for
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"run": str(run.folder), "plan": run.plan.name, "test_accuracy": run.result.get("metrics", {}).get(
            "test_accuracy"), "settings": {"aux_fraction": aux_fraction, "seed": seed}, "wires": {}}
    metrics = run.result.get("metrics", {})
    out = {"run": str(run.folder), "plan": run.plan.name, "test_accuracy": metrics.get("test_accuracy"),
           "test_loss": (metrics.get("per_epoch", {}).get("test_loss") or [metrics.get("test_loss")])[-1],
           "settings": {"aux_fraction": aux_fraction, "seed": seed, "decoder_epochs": epochs, "dcor_rows": max_rows},
           "wires": _wires(run, out_dir, aux_fraction=aux_fraction, seed=seed, epochs=epochs, max_rows=max_rows,
                           progress=progress)}
    if run.per_client:  # and what each client's own traffic gives away
        out["clients"] = {c: {"wires": _wires(replace(run, observed=view, per_client={}), out_dir / c,
                                               aux_fraction=aux_fraction, seed=seed, epochs=epochs, max_rows=max_rows,
                                               progress=progress, who=c)}
                          for c, view in run.per_client.items() if any(view.values())}
    return keep_measures(out, per_wire)


def _wires(run: RunFolder, out_dir: Path, progress: Callable[[str], None] | None = None, who: str = "",
           **kw: Any) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    wires = {}
    for w in run.graph.wires:
        if progress is not None:
            progress(f"auditing {w.name}" + (f" of {who}" if who else ""))
        if w.carries == "activation":
            wires[w.name] = _activation_wire(run, w, out_dir=out_dir, **kw)
        else:
            wires[w.name] = _label_wire(run, w)
    return wires
