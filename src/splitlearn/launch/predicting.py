"""Prediction from a finished run, one party's part: its rows (new ones: every row a test row), its saved
preprocessing and weights, and what a head's owner makes of its outputs. :func:`splitlearn.predict` runs
every party in one process; ``splitlearn party --predict RUN`` runs one site's part over gRPC
(:class:`PartyPrediction`), the predictions arriving only at the party that owns each head.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import losses
from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError
from ..data import batches
from ..run.report import PartyReport
from ..run.setup import PartySetup, Step, setup_party
from .results import load_preprocess, load_weights

__all__ = ["recorded_of", "recorded_classes", "prediction_setup", "prediction_steps", "prediction_outputs",
           "check_columns", "without_absent_labels", "write_predictions", "PartyPrediction"]


def recorded_of(run_dir: Path, party: str | None = None) -> tuple[dict, str | None]:
    """The run's ``result.json`` and its final client (``[clients]``). A site's run folder holds only its own
    party's part (the lead party writes ``result.json``): there, ``party``'s own ``report.json`` stands for it
    (its data schema: its columns and class names). ``{}`` where neither can be read."""
    for file, wrap in ((run_dir / "result.json", False), (run_dir / "parties" / str(party) / "report.json", True)):
        if wrap and party is None:
            break
        try:
            body = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(body, dict):
            return ({"parties": {party: body}}, None) if wrap else (body, body.get("final_client"))
    return {}, None


def prediction_setup(plan: Plan, run_dir: Path, party: str, spec: DataSpec | None, *, cache: dict | None = None,
                     recorded: dict | None = None, client: str | None = None, new_rows: bool = False) -> PartySetup:
    """Party ``party``'s setup for prediction: its rows (``spec``: new ones, every row a test row, with
    ``new_rows``; else the plan's), read with the training's class names and checked against the training's
    columns, its saved preprocessing applied, its trained weights loaded. A PlanError naming what does not fit."""
    from ..data.preprocess import wants_preprocess
    from ..run.rows import data_spec, holds_data, party_table

    recorded = recorded or {}
    classes = recorded_classes(plan, recorded)
    if party in classes and holds_data(plan, party):  # new labels are read with the training's mapping
        own = spec or data_spec(plan, party, client)
        if own is not None and own.label_column and "classes" not in own.options:
            spec = own.model_copy(update={"options": {**own.options, "classes": classes[party]}})
    folder = run_dir / "parties" / party
    try:
        pre = load_preprocess(folder / "preprocess.safetensors")
    except ValueError as e:
        raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
    if pre is None and holds_data(plan, party):
        own = spec or data_spec(plan, party, client or "")
        if own is not None and wants_preprocess(own.options):
            raise PlanError(f"party {party!r} standardises its data, but the run holds no preprocessing for it "
                            f"({folder / 'preprocess.safetensors'})", file=run_dir,
                            hint="train with this version of splitlearn")
    try:
        if spec is not None and holds_data(plan, party):  # read once (cached): its columns checked before any use
            check_columns(plan, party, party_table(plan, party, cache, spec, client), recorded)
        setup = setup_party(plan, party, cache, spec, predict=True, preprocess=pre, client=client,
                            every_row=new_rows, optimizer=False)
    except PlanError as e:
        raise e.in_file(e.file or run_dir) from None
    path = folder / "weights.safetensors"
    if setup.modules:
        if not path.is_file():
            raise PlanError(f"no weights for party {party!r} at {path}", file=run_dir, hint="train with --out first")
        try:
            load_weights(path, setup.modules)
        except ValueError as e:
            raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
    return setup


def prediction_steps(plan: Plan, setup: PartySetup) -> list[Step]:
    """The prediction steps every party derives alike: the test rows (every row, for new rows) in batches of
    ``[train] eval_batch_size``."""
    rows = setup.splits.test
    return [Step(i, "predict", 0, torch.from_numpy(np.asarray(rows[b])))
            for i, b in enumerate(batches(len(rows), plan.train.eval_batch_size, 0, 0, shuffle=False))]


def prediction_outputs(plan: Plan, task: str, party: str, outputs: torch.Tensor, ids: list, setup: PartySetup,
                       classes: dict[str, list[str]], unmatched: dict | None = None) -> dict[str, Any]:
    """What head ``task`` predicted at ``party``: its outputs (a standardised target back in its own units, with
    the holder's scale), the decided classes or values, each class's probability, the class names."""
    kind = losses.get(plan.losses[task].kind)
    probs = kind.probabilities(outputs.float()) if kind.probabilities is not None else None
    owner = plan.losses[task].target.partition(".")[0]
    scale = setup.scale_of(task)
    if scale is not None:  # the model learnt the standardised target: predictions in its own units
        outputs = torch.from_numpy(scale.undo(outputs.numpy()))
    return {"party": party, "ids": list(ids), "outputs": outputs,
            "predictions": losses.decide(plan.losses[task].kind, outputs).tolist(),
            "probabilities": None if probs is None else probs.tolist(),
            "classes": classes.get(owner) if kind.classification else None, "unmatched": unmatched or {}}


class PartyPrediction:
    """One site's part of a prediction over the network (``splitlearn party --predict RUN``): its setup from the
    run folder and its own new rows (``data``: its file; the plan's otherwise), the steps every party derives
    from the rows told in the hello, and, at a head's owner, ``predictions.csv`` in its run folder."""

    def __init__(self, plan: Plan, run_dir: Path, party: str, data: DataSpec | None):
        self.plan, self.run_dir, self.party = plan, run_dir, party
        self.recorded = recorded_of(run_dir, party)[0]
        self.setup = prediction_setup(plan, run_dir, party, without_absent_labels(data) if data is not None else None,
                                      cache={}, recorded=self.recorded, new_rows=data is not None)
        self.written: Path | None = None

    def steps(self) -> list[Step]:
        return prediction_steps(self.plan, self.setup)

    def attach(self, participant: Any) -> None:
        pass

    def finish(self, report: PartyReport) -> PartyReport:
        """At a head's owner: its predictions written to ``RUN/parties/NAME/predictions.csv`` (ids where it holds
        the rows, else their positions in the aligned order); at a party holding rows, ``predicted_rows.csv``:
        each position and its own id (to join a head owner's positions with); nothing else is kept."""
        s = self.setup
        if s.table is not None and not report.predictions:
            path = self.run_dir / "parties" / self.party / "predicted_rows.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["position", "id"])
                w.writerows(enumerate(s.splits.ids[s.splits.test].tolist()))
        if report.predictions:
            s = self.setup
            rows = s.splits.test
            ids = s.splits.ids[rows].tolist() if s.table is not None else list(range(len(rows)))
            classes = recorded_classes(self.plan, self.recorded)
            out = {t: prediction_outputs(self.plan, t, self.party, torch.cat(chunks), ids, s, classes)
                   for t, chunks in report.predictions.items()}
            self.written = self.run_dir / "parties" / self.party / "predictions.csv"
            write_predictions(self.written, out, self.party)
            report.meter["predicted"] = {"rows": len(ids), "file": str(self.written)}
        report.predictions, report.modules = {}, {}
        return report


def check_columns(plan: Plan, name: str, table: Any, result: dict) -> None:
    """New rows must have the feature columns the model was trained on, in the same order: a missing,
    extra or moved column is named (a model fed moved columns would predict nonsense without a word).
    Columns named in another way entirely (an embedded dataset's names against a file's) are left to the
    shape checks."""
    parties = result.get("parties") if isinstance(result.get("parties"), dict) else {}
    trained = ((parties.get(name) or {}).get("data") or {}).get("schema") or {}
    for local, ref in plan.parties[name].holds.items():
        want, have = (trained.get(local) or {}).get("columns"), table.columns.get(ref.field)
        if not isinstance(want, list) or have is None:
            continue
        if ref.columns is not None:
            have = have[ref.columns[0]:ref.columns[1]]
        if have != want and set(have) & set(want):  # (names from another source entirely: only counts can tell)
            missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
            problem = (f"lacks column(s) {missing}" if missing else f"has column(s) {extra} the model was not trained on"
                       if extra else f"has the columns in another order ({have}; trained on {want})")
            raise PlanError(f"party {name!r}: its new data {problem}", entry=f"parties.{name}.holds.{local}",
                            hint=f"give a file with the training's columns, in this order: {want}")


def recorded_classes(plan: Plan, result: dict) -> dict[str, list[str]]:
    """Label holder -> the class names its labels were mapped to in training (``result.json``'s data schema),
    for the holders whose labels were text."""
    out: dict[str, list[str]] = {}
    parties = result.get("parties") if isinstance(result.get("parties"), dict) else {}
    for loss in plan.losses.values():
        owner, _, local = loss.target.partition(".")
        entries = [v for k, v in parties.items() if isinstance(v, dict) and (k == owner or v.get("plays") == owner)]
        for entry in entries:
            names = (((entry.get("data") or {}).get("schema") or {}).get(local) or {}).get("classes")
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                out[owner] = names
                break
    return out


def without_absent_labels(spec: DataSpec) -> DataSpec:
    """New rows need no labels: a table without the training's label column is read without it."""
    if not spec.label_column or spec.dataset not in ("csv", "parquet") or not spec.path:
        return spec
    path = Path(spec.path).expanduser()
    try:
        if spec.dataset == "csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = [h.strip() for h in next(csv.reader(f), [])]
        else:
            import pyarrow.parquet as pq

            header = list(pq.read_schema(path).names)
    except Exception:  # noqa: BLE001 - the reader names the problem with the file
        return spec
    return spec if spec.label_column in header else spec.model_copy(update={"label_column": None})


def write_predictions(path: Path, out: dict[str, dict], party: str) -> None:
    tasks = [t for t, v in out.items() if v["party"] == party]
    path.parent.mkdir(parents=True, exist_ok=True)
    def columns(t: str) -> list[str]:
        probs = out[t]["probabilities"]
        k = len(probs[0]) if probs else 0
        return [t] + [f"{t}_p{c}" for c in range(k)]

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *(c for t in tasks for c in columns(t))])
        for i, id_ in enumerate(out[tasks[0]]["ids"]):
            row = [id_]
            for t in tasks:
                names, decided = out[t].get("classes"), out[t]["predictions"][i]
                row.append(names[decided] if names and 0 <= decided < len(names) else decided)
                if out[t]["probabilities"]:
                    row += [f"{p:.6g}" for p in out[t]["probabilities"][i]]
            w.writerow(row)
