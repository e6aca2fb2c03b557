"""Prediction from a finished run: :func:`predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core import losses
from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError
from ..data import batches
from ..clients.results import predicting_plan
from ..launch.threads import run_local
from ..launch.results import load_run_plan, load_weights
from ..run.setup import Step, check_plan, setup_party

__all__ = ["predict"]


def predict(run_dir: str | Path, data: DataSpec | dict | str | Path | None = None, *, write: bool = True,
            networks: dict[str, nn.Module | Callable[[], nn.Module]] | None = None,
            id_column: str | None = None) -> dict[str, dict]:
    """Run a trained plan forward on new data (default: the run's test split).

    ``data``: one source for every party (a :class:`DataSpec` or its dict), or one per party
    (``{"clinic_a": "a.csv", "clinic_b": DataSpec(...)}``; a path keeps the party's own
    settings), or one file's path when one party holds data; ``id_column`` names the id column of
    files given by path (default: as at training). Each party loads only its own weights and its own preprocessing (fitted on its
    training rows, saved beside its weights), so one new row is predicted as it would be in a
    batch. Predictions arrive at the party that owns each head and are written to
    ``RUN_DIR/parties/PARTY/predictions.csv`` (the decided class and, for classification, each
    class's probability; a target its holder standardised, ``standardize_target``, is predicted in its
    own units, with the holder's saved scale: ``outputs`` too); the returned dict maps each task to
    ``{"party", "ids", "outputs", "predictions", "probabilities", "classes", "unmatched"}`` (``classes``:
    the names text labels were mapped from in training; ``unmatched``: per party, the ids of its rows that not every party holds, when
    the plan aligns rows with ``align = "psi"``: they are not predicted). ``networks`` gives again the networks the run was given
    as Python objects (their architecture; the weights come from the run folder).
    """
    from ..data.preprocess import wants_preprocess
    from ..launch.results import load_preprocess
    from ..run.rows import data_spec, holds_data, party_file, party_table

    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError("not a run folder: plan.json is missing", file=run_dir,
                        hint="give the --out folder of a finished 'splitlearn run'")
    plan = load_run_plan(run_dir, networks)
    tokens = [n for n, spec in plan.losses.items() if losses.get(spec.kind).tokens]
    if tokens:
        raise PlanError(f"loss {tokens[0]!r} is a language model's ({plan.losses[tokens[0]].kind}): it scores next "
                        "tokens, not rows", file=run_dir,
                        hint="continue a text with `splitlearn generate RUN --prompt ...` (splitlearn.generate)")
    try:  # the run's one model, between the plan's parties; the template's is the final client's
        plan, template = predicting_plan(plan)
    except PlanError as e:
        raise e.in_file(run_dir) from None
    aligned = plan.data.align == "psi"  # rows are matched as in training: by the ids every party holds
    if aligned:  # every party's rows are here, in one process: their intersection is taken directly
        plan = plan.replace(data=plan.data.model_copy(update={"align": "exact"}))
    per: dict[str, DataSpec] = {}
    holders = [p for p in plan.parties if holds_data(plan, p)]
    if isinstance(data, (str, Path)):
        if len(holders) != 1:
            raise PlanError(f"data {str(data)!r}: several parties hold data ({holders}); say whose each file is",
                            entry="--data", hint="--data NAME=FILE once per party (in Python: {NAME: FILE})")
        data = {holders[0]: data}
    per_party = isinstance(data, dict) and data and not set(data) & set(DataSpec.model_fields)  # else one DataSpec's dict
    if per_party and all(isinstance(d, (str, Path)) for d in data.values()):
        unknown = sorted(set(data) - set(plan.parties))
        if unknown:
            raise PlanError(f"new data for {unknown}, which are no parties of the run", entry="--data",
                            hint=f"parties with data: {holders}")
    if isinstance(data, dict) and data and set(data) <= set(plan.parties) and "dataset" not in data:
        for party, d in data.items():
            if not holds_data(plan, party):
                raise PlanError(f"party {party!r} holds no data, so it takes no data file", entry="--data",
                                hint=f"parties with data: {[p for p in plan.parties if holds_data(plan, p)]}")
            if isinstance(d, (str, Path)):
                if not Path(d).expanduser().exists():
                    raise PlanError(f"data of {party!r}: no such file or folder {str(Path(d).expanduser().resolve())!r}",
                                    entry="--data")
                per[party] = party_file(plan, party, d)
                if id_column is not None:
                    per[party] = per[party].model_copy(update={"id_column": id_column})
            else:
                per[party] = d if isinstance(d, DataSpec) else DataSpec.model_validate(d)
        missing = [p for p in plan.parties if holds_data(plan, p) and p not in per]
        if missing:
            raise PlanError(f"new data for {sorted(per)} but not for {missing}: every party with data needs its rows",
                            entry="--data", hint="give --data NAME=FILE once for each party that holds data")
    elif data is not None:
        if not isinstance(data, (DataSpec, dict)):
            raise PlanError(f"predict takes data as a DataSpec or its dict, not a {type(data).__name__}", entry="data",
                            hint="for tensors: DataSpec.of_arrays({'x': x}) with the field names the plan's parties hold")
        spec = DataSpec.model_validate(data) if isinstance(data, dict) else data
        per = {p: spec for p in plan.parties if holds_data(plan, p)}
    per = {p: _without_absent_labels(d) for p, d in per.items()}
    new_rows = bool(per)  # new data: every row is predicted; else the run's test rows
    try:
        recorded = json.loads((run_dir / "result.json").read_text())
        final = recorded.get("final_client")
    except (OSError, ValueError, AttributeError):
        recorded, final = {}, None
    classes = _recorded_classes(plan, recorded if isinstance(recorded, dict) else {})
    for p, names in classes.items():  # new labels are read with the training's mapping, never a new sorted one
        if holds_data(plan, p):
            spec = per.get(p) or data_spec(plan, p, final if p == template else None)
            if spec is not None and spec.label_column and "classes" not in spec.options:
                per[p] = spec.model_copy(update={"options": {**spec.options, "classes": names}})
    cache: dict = {}
    setups = {}
    for p in plan.parties:
        folder = run_dir / "parties" / p
        try:
            pre = load_preprocess(folder / "preprocess.safetensors")
        except ValueError as e:
            raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
        spec = per.get(p)
        client = final if p == template else None  # per-client files: the final client's test rows
        if pre is None and holds_data(plan, p):
            own = spec or data_spec(plan, p, client or "")
            if own is not None and wants_preprocess(own.options):
                raise PlanError(f"party {p!r} standardises its data, but the run holds no preprocessing for it "
                                f"({folder / 'preprocess.safetensors'})", file=run_dir,
                                hint="train again with this version of splitlearn")
        try:
            if spec is not None and holds_data(plan, p):  # read once (cached): its columns checked before any use
                _check_columns(plan, p, party_table(plan, p, cache, spec, client),
                               recorded if isinstance(recorded, dict) else {})
            setups[p] = setup_party(plan, p, cache, spec, predict=True, preprocess=pre, client=client)
        except PlanError as e:
            raise e.in_file(e.file or run_dir) from None
    for p, s in setups.items():
        path = run_dir / "parties" / p / "weights.safetensors"
        if s.modules:
            if not path.is_file():
                raise PlanError(f"no weights for party {p!r} at {path}", file=run_dir, hint="train with --out first")
            try:
                load_weights(path, s.modules)
            except ValueError as e:
                raise PlanError(str(e), file=run_dir, hint="predict from the run folder the weights came from") from None
    unmatched: dict[str, list] = {}
    if aligned:
        holders = [s for s in setups.values() if s.table is not None]
        common = holders[0].splits.ids
        for s in holders[1:]:
            common = np.intersect1d(common, s.splits.ids)
        if not len(common):
            raise PlanError("no id is held by every party: nothing can be predicted", file=run_dir,
                            hint="give each party's rows of the same patients (matched by id)")
        for s in holders:
            alone = np.setdiff1d(s.splits.ids, common)
            if len(alone):
                if new_rows:  # (the run's own rows outside the intersection were never part of it)
                    unmatched[s.name] = alone.tolist()
                s.restrict(common)
    shapes = check_plan(setups)
    first = next(s for s in setups.values() if s.table is not None)
    rows = first.splits.test if not new_rows else np.arange(len(first.splits.ids))
    steps = [Step(i, "predict", 0, torch.from_numpy(rows[b]))
             for i, b in enumerate(batches(len(rows), plan.train.eval_batch_size, 0, 0, shuffle=False))]
    reports = run_local(plan, setups, shapes, steps=steps, predicting=True)
    ids = first.splits.ids[rows]
    out: dict[str, dict] = {}
    for party, rep in reports.items():
        for task, chunks in rep.predictions.items():
            outputs = torch.cat(chunks)
            kind = losses.get(plan.losses[task].kind)
            probs = kind.probabilities(outputs.float()) if kind.probabilities is not None else None
            owner, _, local = plan.losses[task].target.partition(".")
            saved = setups[owner].preprocess if owner in setups else None  # the holder's, from the run folder
            scale = saved.targets.get(local) if saved is not None else None
            if scale is not None:  # the model learnt the standardised target: predictions in its own units
                outputs = torch.from_numpy(scale.undo(outputs.numpy()))
            out[task] = {"party": party, "ids": ids.tolist(), "outputs": outputs,
                         "predictions": losses.decide(plan.losses[task].kind, outputs).tolist(),
                         "probabilities": None if probs is None else probs.tolist(),
                         "classes": classes.get(owner) if kind.classification else None,
                         "unmatched": unmatched}
        if rep.predictions and write:
            _write_predictions(run_dir / "parties" / party / "predictions.csv", out, party)
    return out


def _check_columns(plan: Plan, name: str, table: Any, result: dict) -> None:
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


def _recorded_classes(plan: Plan, result: dict) -> dict[str, list[str]]:
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


def _without_absent_labels(spec: DataSpec) -> DataSpec:
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


def _write_predictions(path: Path, out: dict[str, dict], party: str) -> None:
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
