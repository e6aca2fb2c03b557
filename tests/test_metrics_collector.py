"""One metrics collector: a session's :class:`~splitlearn.run.report.Metrics` and the pooling of a
``[clients]`` evaluation over its sites give their test figures from the same scored rows through one
function, :func:`~splitlearn.core.metrics.evaluation_metrics`, so two sites' scores pooled are, number for
number, what one session over the union of their rows reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from splitlearn.clients.results import metric_histories
from splitlearn.clients.schedule import Turn
from splitlearn.clients.scoring import EvaluationPool
from splitlearn.core.graph import build_graph
from splitlearn.core.load import load_plan
from splitlearn.core.metrics import classification_metrics, evaluation_metrics
from splitlearn.core.plan import Plan
from splitlearn.core.step import StepOutput
from splitlearn.run.report import Metrics, PartyReport
from splitlearn.run.setup import Step

from .support import split_mlp

CLASSES = 3
SITES = {"hospital-1": (0, 2), "hospital-2": (2, 3)}  # client -> its evaluation batches [start, stop)


def _plan(kind: str, clients: bool = False) -> Plan:
    body = split_mlp("collector", [4, 8, 1 if kind == "mse" else CLASSES], loss="y", data={"dataset": "digits"},
                     **({"clients": {"template": "hospital", "count": len(SITES), "schedule": "sequential"}}
                        if clients else {}))
    body["losses"]["y"]["kind"] = kind
    return load_plan(body)


def _batches(kind: str) -> list[StepOutput]:
    """Three evaluation batches of the server's head (rows 7, 5 and 6); regression targets vary."""
    rng = np.random.default_rng(4)
    out = []
    for rows in (7, 5, 6):
        width = 1 if kind == "mse" else CLASSES
        pred = torch.from_numpy(rng.normal(size=(rows, width)).astype(np.float32))
        if kind == "mse":
            target = torch.from_numpy(rng.normal(size=(rows, 1)).astype(np.float32))
            loss = float(((pred - target) ** 2).mean())
        else:
            target = torch.from_numpy(rng.integers(0, CLASSES, rows))
            loss = float(torch.nn.functional.cross_entropy(pred, target))
        out.append(StepOutput({"y": loss}, {"y": pred}, {"y": target}))
    return out


def _session(plan: Plan, batches: list[StepOutput]) -> Metrics:
    """The server's metrics of one session that evaluated ``batches`` in one epoch."""
    metrics = Metrics(SimpleNamespace(graph=build_graph(plan), name="server"))
    for i, out in enumerate(batches):
        metrics.add(Step(i, "eval", 0, torch.arange(len(out.targets["y"]))), out)
    metrics.close_epoch(0)
    return metrics


def _figures(metrics: Metrics) -> dict:
    """A session's test figures of its last evaluation, as evaluation_metrics names them."""
    h = metrics.history()["y"]
    return {**{k: v[-1] for k, v in h.items() if k.startswith("test_") and v}, "ci95": h["ci95"], "curves": h["curves"]}


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_two_sites_pooled_equal_one_session_over_the_union_of_their_rows(kind):
    plan, batches = _plan(kind), _batches(kind)
    union = _figures(_session(plan, batches))
    assert union["test_rows"] == 18 and set(union["ci95"]) and union["curves"]
    assert ("test_accuracy" in union) == (kind == "cross_entropy") and ("test_r2" in union) == (kind == "mse")
    # a fixed head: each site's turn session keeps its scores; the pool writes one pooled record
    pool, records = EvaluationPool(plan), []
    for i, (client, (a, b)) in enumerate(SITES.items()):
        site = _session(plan, batches[a:b])
        records.append({"turn": i, "round": 0, "epoch": 0, "mode": "eval", "client": client, "rows": 0,
                        "losses": {"y": {}}})
        records = pool.add(records, Turn(i, 0, "eval", None, ()), 0, site.scores, records[-1], keep_in_record=False)
    (pooled,) = [r for r in pool.close(records) if r["mode"] == "pooled"]
    assert "ci95" not in pooled["losses"]["y"]  # drawn once asked for (a checkpoint, the report), not every round
    pool.settle()
    assert pooled["losses"]["y"] == union
    # heads at the clients: each keeps its scores in its record (through JSON); the result pools them
    plan = _plan(kind, clients=True)
    reports = {}
    for i, (client, (a, b)) in enumerate(SITES.items()):
        site = _session(plan, batches[a:b])
        record = {"turn": i, "round": 0, "epoch": 0, "mode": "eval", "client": client, "rows": _figures(site)["test_rows"],
                  "losses": {"y": {k: v for k, v in _figures(site).items() if k not in ("ci95", "curves")}}}
        EvaluationPool(plan).add([record], Turn(i, 0, "eval", None, ()), 0, site.scores, record, keep_in_record=True)
        reports[client] = PartyReport(client, records=[json.loads(json.dumps(record))])
    tasks, more = metric_histories(plan, reports)
    assert {k: v[-1] for k, v in tasks["y"].items() if k.startswith("test_") and v} == \
        {k: v for k, v in union.items() if k not in ("ci95", "curves")}
    assert tasks["y"]["ci95"] == union["ci95"] and tasks["y"]["curves"] == union["curves"]
    assert more["scored"]["rows"] == 18 and list(more["per_client"]) == list(SITES)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_a_sessions_figures_are_the_one_functions_on_its_scores(kind):
    plan = _plan(kind)
    metrics = _session(plan, _batches(kind))
    assert [p.rows for p in metrics.scores["y"]] == [7, 5, 6]
    assert _figures(metrics) == evaluation_metrics(kind, metrics.scores["y"])


def test_the_same_scores_asked_again_give_equal_figures_that_are_each_the_callers_own():
    """An evaluation turn and the pooled record of that one turn ask for the figures of the same scored rows;
    the second is not computed again, and neither caller can change what the other reads."""
    plan = _plan("cross_entropy")
    parts = _session(plan, _batches("cross_entropy")).scores["y"]
    first = evaluation_metrics("cross_entropy", parts)
    first["test_accuracy"] = -1.0
    first["ci95"]["test_accuracy"][0] = -1.0
    first["curves"]["confusion"][0][0] = -1
    again = evaluation_metrics("cross_entropy", list(parts))
    fresh = evaluation_metrics("cross_entropy", [type(p)(p.outputs.copy(), p.targets.copy(), p.loss_sum, p.rows, p.right)
                                                 for p in parts])  # other objects: scored anew
    assert again == fresh and again["test_accuracy"] >= 0 and again["ci95"]["test_accuracy"][0] >= 0
    assert again["curves"]["confusion"][0][0] >= 0
    assert evaluation_metrics("cross_entropy", parts[:2])["test_rows"] == 12  # other parts: their own figures


def test_accuracy_counts_the_heads_decisions_where_probabilities_tie():
    """A bce logit of 1e-9 is decided 1 (``correct``: logit > 0), while its float32 probabilities tie at
    0.5 (the argmax says 0): session and pool both count the decision, so they agree."""
    plan = load_plan({**split_mlp("ties", [4, 8, 1], loss="y", data={"dataset": "digits"}),
                      "losses": {"y": {"input": "top", "target": "hospital.y", "kind": "bce"}}})
    pred, target = torch.tensor([[1e-9], [3.0], [-2.0], [-1.0]]), torch.tensor([[1], [1], [0], [1]])
    out = StepOutput({"y": 0.5}, {"y": pred}, {"y": target})
    metrics = _session(plan, [out])
    assert metrics.history()["y"]["test_accuracy"] == [0.75]
    pool, record = EvaluationPool(plan), {"turn": 0, "round": 0, "epoch": 0, "mode": "eval", "client": "a",
                                          "rows": 4, "losses": {"y": {}}}
    (pooled,) = [r for r in pool.close(pool.add([record], Turn(0, 0, "eval", None, ()), 0, metrics.scores, record,
                                                keep_in_record=True)) if r["mode"] == "pooled"]
    assert pooled["losses"]["y"]["test_accuracy"] == 0.75 and record["scores"]["y"]["right"] == 3
    assert classification_metrics(metrics.scores["y"][0].outputs, target.numpy())["accuracy"] == 0.5  # the tie
