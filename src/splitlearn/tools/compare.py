"""Split learning against its baselines on the same model, data and partition (``splitlearn compare``).

Every method is a plan derived from one split plan (:mod:`splitlearn.clients.baselines`) and run by the
same engine:

============== ==============================================================================
sequential     the plan with ``[clients]`` and the sequential schedule (peer hand-off)
splitfed_v1/v2 the plan with a SplitFed schedule
centralized    the plan's segments all at its template party, one party, no wires
fedavg         that one-party plan with ``[clients]``, schedule ``fedavg`` (one local epoch a round)
large_batch    the same with ``local_steps = 1``: each step every client computes its batch,
               the federation averages (with plain SGD, averaging the stepped weights equals
               stepping with the averaged gradient; the bytes are the same: the model up and down)
============== ==============================================================================

Per-client figures are the clients' own meters (training and weight traffic; evaluation apart);
the cost model (:mod:`splitlearn.tools.costmodel`) predicts the same figures from shapes alone.
Test figures are each method's headline, pooled over every client's test rows (the clinical ones
too: ROC AUC, sensitivity, specificity, F1; regression MAE, R2). With per-client files (the
template's path names ``{client}``) every client method runs on the clients' own files; the
centralized baseline, which needs every row at one party, is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..clients.baselines import (METHODS, client_count, method_plan, partition_of, row_sources, schedule_shape,
                                 template_of)
from ..core.load import load_plan
from ..core.plan import Plan, per_client
from ..core.specs import PlanError
from ..core.units import human

__all__ = ["DEFAULT_METHODS", "FIGURES", "run_compare", "predict_cost", "format_compare", "partition_text"]

DEFAULT_METHODS = ("sequential", "splitfed_v2", "fedavg", "large_batch", "centralized")
FIGURES = {"roc_auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1", "mae": "MAE",
           "r2": "R2"}  # the test figures a row shows beside accuracy, as test_<name> in a result


def predict_cost(plan: Plan, method: str, train_rows: int,
                 input_shape: tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """The cost model's per-client FLOPs and bytes for ``method`` on this plan (None where it has
    no formula: plans whose client part is not the first layers of one sequential network).
    ``input_shape`` (one row of the client's input) is read from the data when not given."""
    from . import costmodel
    from ..models.build import build_network

    t = template_of(plan)
    mine = [s for s in plan.segments.values() if s.party == t]
    if len({s.network for s in plan.segments.values()}) != 1:
        return None
    seg = mine[0]
    net = build_network(plan, seg.network)  # the whole model: one network cut into segments
    schedule = schedule_shape(plan)
    k = schedule.clients
    shape = input_shape or _data_shape(plan)[0]
    e = plan.train.epochs
    if method == "centralized":
        c = costmodel.fedavg_cost(net, shape, train_rows, 1, e)
        return {"flops": c.flops_per_client, "bytes": 0.0, "assumptions": c.assumptions}
    if method in ("fedavg", "large_batch"):
        if method == "fedavg":
            c = costmodel.fedavg_cost(net, shape, train_rows, k, e, rounds=schedule.rounds)
        else:
            c = costmodel.large_batch_sgd_cost(net, shape, train_rows, k, e,
                                               plan.train.batch_size, whole_steps=True)
        return {"flops": c.flops_per_client, "bytes": c.bytes_per_client, "assumptions": c.assumptions}
    if len(mine) != 1 or seg.layers is None or seg.layers[0] != 0:
        return None
    handoff = method == "sequential" and schedule.peer_handoff
    c = costmodel.split_cost(net, shape, seg.layers[1], train_rows, k, e, handoff=handoff)
    extra = 0.0
    notes = list(c.assumptions)
    if method.startswith("splitfed"):  # the client half down and up each round
        extra += 2 * c.details["bottom_values"] * 4 * schedule.rounds
        notes.append("splitfed: the client half is downloaded and uploaded once per round")
    from ..core.graph import build_graph

    labels = [w for w in build_graph(plan).wires if w.carries == "label" and w.src_party == t]
    if labels:  # labels the client shares (vanilla): int64 per row, as the plan sends them
        extra += len(labels) * 8 * train_rows / k * e
        notes.append("labels: the client sends its int64 labels with every training row (8 bytes each)")
    return {"flops": c.flops_per_client, "bytes": c.bytes_per_client + extra, "assumptions": notes}


def _data_shape(plan: Plan) -> tuple[tuple[int, ...], int]:
    """(shape of one row of the client's first segment input, number of training rows), read once
    (per-client files: the first client's rows' shape, every client's training rows)."""
    from ..run.rows import party_inputs, party_table, splits_for

    t = template_of(plan)
    seg = next(s for s in plan.segments.values() if s.party == t)
    tables = [party_table(plan, t, client=c) for c in row_sources(plan)]
    x = party_inputs(plan, t, tables[0])[seg.inputs[0]]
    return tuple(x.shape[1:]), sum(len(splits_for(plan, table).train) for table in tables)


def _train_here(p: Plan, dest: Path) -> dict[str, Any]:
    from ..api import train

    return dict(train(p, out=dest))


def _train_shipped(p: Plan) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A Ray task: train in a folder of the worker's own and send back the result and its files."""
    import tempfile

    from ..api import train
    from ..launch.onray import folder_files

    with tempfile.TemporaryDirectory(prefix="splitlearn-compare-") as tmp:
        result = dict(train(p, out=Path(tmp)))
        return result, folder_files(Path(tmp))


def run_compare(plan: Plan | str | Path, clients: int | None = None, methods: list[str] | None = None, *, out: Path,
                partition: dict | None = None, epochs: int | None = None, progress=None,
                ray: str | None = None) -> dict[str, Any]:
    """Train every method, write ``OUT/METHOD/result.json``, ``OUT/compare.json``, ``OUT/compare.md``
    and the two pictures; return the table. ``clients``: None for the plan's count (else 10);
    ``ray``: train the methods as Ray tasks, in parallel as the cluster at that address allows
    ("local": a cluster on this machine)."""
    from ..launch.onray import TaskFailure, run_tasks, write_files
    from ..run.report import RunError

    plan = load_plan(plan).with_train(epochs=epochs)
    clients = client_count(plan, clients)
    left_out = []
    if methods is None and per_client(plan):  # the centralized baseline needs every row at one party
        methods, left_out = [m for m in DEFAULT_METHODS if m != "centralized"], ["centralized"]
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        if m not in METHODS:
            raise PlanError(f"unknown method {m!r}", hint=f"choose from {', '.join(METHODS)}")
    out = Path(out)
    shape, train_rows = _data_shape(plan)  # the same data for every method
    rows = []
    plans = {m: method_plan(plan, m, clients, partition) for m in methods}
    if ray is None:
        def tell(i: int, value: Any) -> None:  # the next method starts
            if i + 1 < len(methods) and progress is not None:
                progress(methods[i + 1])

        if progress is not None:
            progress(methods[0])
        done = run_tasks(_train_here, [(plans[m], out / m) for m in methods], progress=tell)
    else:
        done = run_tasks(_train_shipped, [(plans[m],) for m in methods], ray_address=ray, use_ray=True,
                         progress=lambda i, value: progress(methods[i]) if progress is not None else None)
    failed = {m: d.error for m, d in zip(methods, done) if isinstance(d, TaskFailure)}
    if failed:
        raise RunError({f"method {m}": e for m, e in failed.items()})
    for m, d in zip(methods, done):
        p = plans[m]
        if ray is not None:
            result, files = d
            write_files(out / m, files)
        else:
            result = d
        cost = result.get("per_client")  # a schedule's clients' meters; else the one party's work, no traffic
        if cost is None:
            flops, nbytes = float(next(iter(result["parties"].values()))["flops"]), 0.0
        else:
            flops, nbytes = cost["flops"]["mean"], cost["bytes"]["mean"]
        metrics = result["metrics"]
        pred = predict_cost(p, m, train_rows, shape)
        rows.append({"method": m, "clients": schedule_shape(p).clients,
                     "per_client_tflops": flops / 1e12, "per_client_gb": nbytes / 1e9,
                     "accuracy": metrics.get("test_accuracy"),
                     "accuracy_per_epoch": metrics.get("test_accuracy_per_epoch", []),
                     **{k: metrics.get(f"test_{k}") for k in FIGURES if metrics.get(f"test_{k}") is not None},
                     "test_rows": metrics.get("scored", {}).get("rows", metrics.get("test_rows")),
                     "predicted_tflops": pred["flops"] / 1e12 if pred else None,
                     "predicted_gb": pred["bytes"] / 1e9 if pred else None,
                     "skipped": len(result.get("skipped", []))})
    for k in [k for k in FIGURES if any(k in r for r in rows)]:  # every row the same columns (None: no figure)
        for r in rows:
            r.setdefault(k, None)
    table = {"plan": plan.name, "clients": clients, "epochs": plan.train.epochs,
             "partition": partition or partition_of(plan),
             "rows": rows, **({"left_out": {m: "each client reads its own file: no party holds every row"
                                            for m in left_out}} if left_out else {})}
    from ..launch.results import write_json
    from .viz import compare_figures

    write_json(out / "compare.json", table)
    (out / "compare.md").write_text(format_compare(table))
    compare_figures(table, out)
    return table


def partition_text(partition: dict[str, Any]) -> str:
    """``iid`` or ``dirichlet (alpha 0.5)``."""
    kind = partition.get("kind", "iid")
    return f"dirichlet (alpha {partition.get('alpha'):g})" if kind == "dirichlet" else str(kind)


def format_compare(table: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    shown = [k for k in FIGURES if any(r.get(k) is not None for r in table["rows"])]
    lines = [f"# {table['plan']}: {table['clients']} clients, {table['epochs']} epochs, partition "
             f"{partition_text(table['partition'])}", "",
             "| method | clients | per-client compute | predicted | per-client traffic | predicted | accuracy | "
             + "".join(f"{FIGURES[k]} | " for k in shown) + "test rows | skipped |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(shown) + "---:|---:|"]

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def flops(tf: float | None) -> str:
        return human(None if tf is None else tf * 1e12, "FLOPs", missing="n/a")

    def nbytes(gb: float | None) -> str:
        return human(None if gb is None else gb * 1e9, "B", missing="n/a")

    for r in table["rows"]:
        lines.append(f"| {r['method']} | {r['clients']} | {flops(r['per_client_tflops'])} | "
                     f"{flops(r['predicted_tflops'])} | {nbytes(r['per_client_gb'])} | {nbytes(r['predicted_gb'])} "
                     f"| {num(r.get('accuracy'))} | " + "".join(f"{num(r.get(k))} | " for k in shown)
                     + f"{r.get('test_rows') if r.get('test_rows') is not None else 'n/a'} | {r['skipped']} |")
    lines += ["", "Per-client figures are means over the clients of what each metered in training (activations, "
              "gradients, labels, weights, commands; evaluation traffic apart); centralized is the one party's "
              "work, its evaluation included. Predicted: the cost model from shapes alone (activations, gradients, "
              "weights and the labels a client shares; no commands or framing). Test figures are pooled over every "
              "client's test rows (test rows: how many were scored)."]
    for m, why in table.get("left_out", {}).items():
        lines.append(f"{m} was not run: {why}.")
    return "\n".join(lines) + "\n"

