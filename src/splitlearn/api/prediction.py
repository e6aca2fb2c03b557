"""Prediction from a finished run: :func:`predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..core import losses
from ..core.specs import DataSpec, PlanError
from ..clients.results import predicting_plan
from ..launch.predicting import (prediction_outputs, prediction_setup, prediction_steps, recorded_classes,
                                 recorded_of, without_absent_labels, write_predictions)
from ..launch.threads import run_local
from ..launch.results import load_run_plan
from ..run.setup import check_plan

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
    from ..run.rows import holds_data, party_file

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
    per = {p: without_absent_labels(d) for p, d in per.items()}
    new_rows = bool(per)  # new data: every row is predicted (a test row); else the run's test rows
    recorded, final = recorded_of(run_dir)
    classes = recorded_classes(plan, recorded)
    cache: dict = {}
    setups = {p: prediction_setup(plan, run_dir, p, per.get(p), cache=cache, recorded=recorded,
                                  client=final if p == template else None, new_rows=new_rows)
              for p in plan.parties}  # (per-client files: the final client's test rows)
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
    reports = run_local(plan, setups, shapes, steps=prediction_steps(plan, first), predicting=True)
    ids = first.splits.ids[first.splits.test].tolist()
    out: dict[str, dict] = {}
    for party, rep in reports.items():
        for task, chunks in rep.predictions.items():
            out[task] = prediction_outputs(plan, task, party, torch.cat(chunks), ids, setups[party], classes, unmatched)
        if rep.predictions and write:
            write_predictions(run_dir / "parties" / party / "predictions.csv", out, party)
    return out
