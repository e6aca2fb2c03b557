"""A plan generator: plans drawn from the space ``inspect`` accepts (tests/plan_space.py), each checked
for what a user relies on. CI draws a bounded number (``SPLITLEARN_PLANS``, default 8, plus the fixed
examples); ``SPLITLEARN_PLANS=200 pytest tests/test_plan_space.py`` draws many more.

For every drawn plan: it trains; split training equals the unsplit model (1e-6; 1e-5 pipelined) over its
first steps; a PSI run on files with missing patients equals, bit for bit, the exact run on the
intersection; the task's metrics are present with the rows they were computed on; stopping mid-epoch and
resuming gives identical weights, metrics and bytes; ``audit`` runs or says why; ``report`` writes a page.
"""

from __future__ import annotations

import json
import os
import tempfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import splitlearn
from splitlearn.core.plan import DataSpec, PlanError
from splitlearn.core import losses as loss_kinds
from splitlearn.core.engine import merge_inputs
from splitlearn.core.graph import build_graph
from splitlearn.models import build_segment
from splitlearn.run.local import run_local
from splitlearn.run.setup import prepare, schedule

from .plan_space import Study, build, studies
from .test_faults import _weights as weights

pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's test "
                    "command (pip install --no-deps openmined-psi)")

PLANS = int(os.environ.get("SPLITLEARN_PLANS", "8"))
STEPS = 5


class Stop(Exception):
    pass


def unsplit_reference(plan, setups, steps) -> dict[str, torch.Tensor]:
    """The same networks trained as one model with plain autograd and one optimizer, on the same batches."""
    graph = build_graph(plan)
    ref = {seg: build_segment(plan, seg) for seg in plan.segments}
    data = {k: v for s in setups.values() for k, v in s.inputs.items()}
    o = next(iter(plan.parties.values())).optimizer
    opt = torch.optim.SGD([p for m in ref.values() for p in m.parameters()], lr=o.lr, momentum=o.momentum)
    for s in steps:
        values: dict[str, torch.Tensor] = {}
        total = 0.0
        for n in graph.order:
            node = graph.nodes[n]
            if node.kind == "input":
                values[n] = data[n][s.rows]
            elif node.kind == "segment":
                values[n] = merge_inputs(plan.segments[n].merge, ref[n], [values[i] for i in node.inputs])
            else:
                spec = plan.losses[n]
                total = total + spec.weight * loss_kinds.get(spec.kind).fn(values[node.inputs[0]], values[node.inputs[1]])
        opt.zero_grad()
        total.backward()
        opt.step()
    return {f"{seg}/{k}": v.detach().clone() for seg, m in ref.items() for k, v in m.state_dict().items()}


def same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) == 0.0
    ra, rb = (json.loads((r / "result.json").read_text()) for r in (a, b))
    assert ra["metrics"] == rb["metrics"]
    for p in ra["parties"]:
        for key in ("bytes_sent", "bytes_received", "flops"):
            assert ra["parties"][p][key] == rb["parties"][p][key], (p, key)


def check(study: Study) -> None:
    with tempfile.TemporaryDirectory(prefix="splitlearn-space-") as tmp:
        folder = Path(tmp)
        body = build(study, folder)
        if study.files:  # some arrangements cannot be aligned privately (a holder that would relay the others,
            try:  # holders with no common neighbour): refused before anything runs, naming why
                prepare(body)
            except PlanError as e:
                assert 'align = "psi"' in str(e) and ("not supported" in str(e) or "share a neighbour" in str(e)), e
                return
        # split = unsplit over the first training steps (on the exact intersection: PSI is checked below)
        exact = build(study, folder / "exact", exact_ids=True) if study.files else body
        plan, setups, shapes = prepare(exact, epochs=1)
        first = next(s for s in setups.values() if s.table is not None)
        steps = list(islice((s for s in schedule(plan, first.splits) if s.mode == "train"), STEPS))
        ref = unsplit_reference(plan, setups, steps)
        run_local(plan, setups, shapes, steps=steps)
        got = {f"{seg}/{k}": v for s in setups.values() for seg, m in s.modules.items() for k, v in m.state_dict().items()}
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= (1e-6 if study.pipeline == 1 else 1e-5), f"{study}: split differs from unsplit by {worst}"

        result = splitlearn.train(body, out=folder / "a")
        if study.files:  # PSI on the files with missing patients = exact alignment on the intersection
            exact_result = splitlearn.train(exact, out=folder / "e")
            assert result["metrics"] == exact_result["metrics"], study
            wa, we = weights(folder / "a"), weights(folder / "e")
            assert all(torch.equal(wa[k], we[k]) for k in wa), study
        m = result["metrics"]
        regression = study.task == "regression"
        names = ("test_mae", "test_rmse", "test_r2") if regression else ("test_accuracy", "test_f1")
        for name in names:
            assert isinstance(m.get(name), float), (study, name, sorted(m))
        assert ({"test_mae", "test_rmse", "test_r2"} if regression else {"test_accuracy"}) <= set(m["ci95"]), study
        assert m["test_rows"] == sum(len(s.rows) for s in schedule(plan, first.splits, 1) if s.mode == "eval") or \
            study.files, study
        if study.shape == "multi_task":
            assert set(m["tasks"]) == {"task", "second"}

        # stop mid-epoch, resume: identical weights, metrics and bytes
        total = sum(1 for _ in schedule(plan, first.splits, 2))
        stop_at = max(2, total // 2 + study.seed)
        def on_step(pr, seen={"k": 0}):
            seen["k"] += 1
            if seen["k"] == stop_at:
                raise Stop("stopped")
        resumable = json.loads(json.dumps(body))
        resumable["train"]["checkpoint_every"] = 3
        splitlearn.train(resumable, out=folder / "b")
        with pytest.raises(Exception, match="stopped"):
            splitlearn.train(resumable, out=folder / "c", on_step=on_step)
        splitlearn.train(resumable, out=folder / "c", resume=True)
        same_run(folder / "b", folder / "c")

        # one row predicted alone equals the same row predicted in a batch (matched by id under PSI)
        batch = splitlearn.predict(folder / "a", write=False)["task"]
        one_id = batch["ids"][0]
        if study.files:
            single = {p: str(_one_row(folder / f"{p}.csv", one_id, folder / "one")) for p in body["parties"]
                      if body["parties"][p].get("data")}
        else:
            from splitlearn.data import load_table

            t = load_table(body["data"]["dataset"])
            single = DataSpec.of_arrays({k: v[[one_id]] for k, v in t.fields.items()})
        alone = splitlearn.predict(folder / "a", data=single, write=False)["task"]
        assert len(alone["ids"]) == 1 and str(alone["ids"][0]) == str(one_id if study.files else 0), study
        assert torch.allclose(alone["outputs"][0], batch["outputs"][0], atol=1e-5), study

        from splitlearn.tools.audit.run import AuditError, audit_run
        from splitlearn.tools.report import write_report

        try:
            audit = audit_run(folder / "a", epochs=3)
            assert audit["wires"], study
        except AuditError as e:  # it may decline, saying why
            assert str(e), study
        page = write_report(folder / "a")
        assert "Results on the test rows" in page.read_text(), study


def _one_row(path: Path, pid: str, folder: Path) -> Path:
    """``path`` with its header and only the row of ``pid``."""
    import csv

    folder.mkdir(exist_ok=True)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(folder / path.name, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *[r for r in rows[1:] if r[0] == pid]])
    return folder / path.name


FIXED = [  # defects found by the generator or the issues, kept as examples
    Study("regression", 2, "registry", "vanilla", 0, True, 1, 0),  # a label-only registry, float targets, PSI
    Study("binary", 3, "feature", "u_shaped", 0, True, 2, 1),  # vertical U-shaped over files, pipelined
    Study("multiclass", 1, "server", "multi_hop", 3, False, 1, 2),
    Study("regression", 1, "feature", "multi_task", 0, False, 2, 0),
]


@pytest.mark.parametrize("study", FIXED, ids=str)
def test_fixed_examples_of_the_space(study):
    check(study)


@pytest.mark.timeout(60 * max(10, PLANS))  # a few seconds a plan; hypothesis shrinks a failure further
@settings(max_examples=max(1, PLANS), deadline=None, derandomize=os.environ.get("CI") == "true",
          suppress_health_check=list(HealthCheck), database=None)
@given(studies())
def test_every_drawn_plan_trains_equals_unsplit_resumes_and_reports(study):
    check(study)
