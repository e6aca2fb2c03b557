"""What a run's results are, as its schedule shapes them: each party's entry and the metrics of
``result.json`` (a schedule's figures pooled over every site its evaluations scored), its schedule
part, the run's model (whose weights :func:`predict` uses) and what each client's traffic left in a
run folder (and what the federation averaged in its last round: :func:`federation_record`). A plain
plan is the trivial case: its loss parties' own figures, no schedule part, its parties' own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.graph import Graph, build_graph
from ..core.metrics import Scores, evaluation_metrics
from ..core.plan import Plan, per_client
from ..core.specs import PlanError
from ..run.report import PartyReport, RunError
from .layout import clients_playing
from .roles import client_names, coordinator_of, federation_of
from .strategies import strategy_of

__all__ = ["metric_histories", "party_entry", "schedule_part", "failures_part", "missing_part", "final_client",
           "model_holder", "predicting_plan", "recording_parties", "client_views", "FederationRound",
           "federation_record", "federation_received", "FEDERATION_KEY", "Averaging", "averaging_of", "RECORDED_CLIENTS"]

RECORDED_CLIENTS = 5  # clients whose weights the federation keeps for the audit (the first averaged each round)

FEDERATION_KEY = "federation"  # observed.safetensors: federation|average|W, federation|client|C|W, federation|samples|C


def metric_histories(plan: Plan, reports: dict[str, PartyReport]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Each loss's per-epoch history (``train_loss``, ``test_*`` lists: what
    :func:`~splitlearn.launch.results.summarize` takes) and what more the ``metrics`` of a result hold: a
    schedule's figures are pooled over every site it scored (``scored``, ``per_client``); a plain plan's are
    its loss parties' own, and with validation the best epoch kept (:func:`_validation`)."""
    if plan.clients is None:
        tasks: dict[str, dict] = {}
        for rep in reports.values():
            tasks.update(rep.metrics)
        return tasks, _validation(tasks, reports)
    tasks, pools = _client_tasks(plan, reports)
    return tasks, _scored(plan, build_graph(plan), tasks, pools)


def _validation(tasks: dict[str, dict], reports: dict[str, PartyReport]) -> dict[str, Any]:
    """With ``[data] validation_fraction``: the ``best_epoch`` every party kept (its weights are the saved ones,
    and the test figures are its), ``stopped_at`` (the epoch after which the run stopped early; None: it ran
    every epoch) and ``validation``: the watched figure and the watched loss's ``val_*`` figures per epoch.
    Nothing without validation."""
    said = next((r.stopping for r in reports.values() if r.stopping), None)
    if said is None:
        return {}
    history = tasks.get(said["loss"], {})
    return {"best_epoch": said["best_epoch"], "stopped_at": said["stopped_at"],
            "validation": {"loss": said["loss"], "metric": said["metric"],
                           "per_epoch": {k: v for k, v in history.items() if k.startswith("val_")}}}


def party_entry(plan: Plan, rep: PartyReport) -> dict[str, Any]:
    """A physical party's entry in ``result.json``'s ``parties``: its traffic and work, what it refused (a
    schedule's: the first 20), privacy and data; a schedule's party also the plan party it ``plays`` and its
    evaluation traffic apart."""
    schedule = plan.clients is not None
    entry = {**rep.meter, "refused": rep.refused[:20] if schedule else rep.refused, "refused_jumps": rep.refused_jumps}
    if rep.privacy:
        entry["privacy"] = rep.privacy
    if rep.data:
        entry["data"] = rep.data
    if schedule:
        entry = {"plays": rep.plays, **entry,
                 "eval": {k: rep.eval_meter.get(k, 0) for k in ("bytes_sent", "bytes_received", "flops")}}
    return entry


def schedule_part(plan: Plan, reports: dict[str, PartyReport], parties: dict[str, dict]) -> dict[str, Any]:
    """The schedule's keys of ``result.json`` (``schedule``, ``per_client`` cost, ``skipped`` clients and the
    ``final_client`` whose weights are the run's model); none for a plain plan."""
    return {} if plan.clients is None else _clients_part(plan, reports, parties)


def failures_part(plan: Plan, errors: dict[str, str]) -> dict[str, Any]:
    """What ``result.json`` says of party processes that failed without ending the run: a schedule's clients
    (``failed_processes``; their failure is data). A plain plan has none: any failure ends its run."""
    return {} if plan.clients is None else {"failed_processes": errors}


def missing_part(plan: Plan, missing: list[str]) -> dict[str, Any]:
    """What a result gathered from one site's folder says of the party reports not there: a plain plan's
    headline is its lead party's own, so ``parties_missing`` names the others; a schedule's figures need every
    client's report (RunError naming the first three missing)."""
    if plan.clients is not None and missing:
        raise RunError({n: "its report.json is not in this folder" for n in missing[:3]})
    return {"parties_missing": missing} if missing else {}


def model_holder(plan: Plan, party: str, final: str | None) -> str:
    """The physical party that holds the run's model of plan party ``party``: the party itself; for a
    ``[clients]`` template the final client (``final``, :func:`final_client`). ValueError where the schedule
    left no single model."""
    if not clients_playing(plan, party):
        return party
    if final is None:
        raise ValueError(f"a {plan.clients.schedule} run has no single model: take each client's from result.modules")
    return final


def predicting_plan(plan: Plan) -> tuple[Plan, str | None]:
    """The plan a finished run predicts with, its one model between the plan's parties, and the plan party
    whose weights and rows are the final client's (a ``[clients]`` template; None for a plain plan).
    PlanError where the schedule left a model per client."""
    if plan.clients is None:
        return plan, None
    if not strategy_of(plan).one_model:
        raise PlanError(f"this run's schedule is {plan.clients.schedule!r}: every client trained a model of its own "
                        "and there is no single model to predict with",
                        hint="each client's model: its own weights (parties/CLIENT/weights.safetensors) and the "
                             "fixed parties' copy for it (parties/PARTY/weights-CLIENT.safetensors)")
    return plan.replace(clients=None), plan.clients.template


def recording_parties(plan: Plan) -> list[str]:
    """The physical parties whose run folders may hold what they received (``observed.safetensors``): the
    plan's parties, or with ``[clients]`` its fixed parties and every client, and a federation of its own where
    the schedule averages (what it averaged in its last round, :func:`federation_record`)."""
    spec = plan.clients
    if spec is None:
        return list(plan.parties)
    fed = federation_of(plan)
    own = [fed] if strategy_of(plan).averages and fed not in plan.parties else []
    return [p for p in plan.parties if p != spec.template] + own + spec.names()


@dataclass(frozen=True)
class Averaging:
    """Who averages the clients' weights of a run: the ``federation``, the plan party the clients play
    (``template``: its segments are what is averaged), the ``clients`` in order, and whether the federation holds
    only their weighted sum (``secure``: ``secure_aggregation``)."""

    federation: str
    template: str
    clients: list[str]
    secure: bool


def averaging_of(plan: Plan) -> Averaging | str:
    """Who averages the clients' weights of ``plan`` (:class:`Averaging`), or, where no federation does, why
    (one line: a plain plan, or a schedule that does not average)."""
    spec = plan.clients
    if spec is None:
        return "not a [clients] run: no federation receives clients' weights"
    if not strategy_of(plan).averages:
        return (f"schedule {spec.schedule!r} does not average: no federation receives each client's weights "
                "(splitfed_v1, splitfed_v2 and fedavg do)")
    return Averaging(federation_of(plan), spec.template, spec.names(), spec.secure_aggregation)


@dataclass(frozen=True)
class FederationRound:
    """What the federation averaged in one round: the ``average`` it holds after it, and, where the weights came
    in the clear (no ``secure_aggregation``), the weights of the first :data:`RECORDED_CLIENTS` clients averaged, as
    received (``clients``), and the samples it weighted them by (``samples``)."""

    average: dict[str, torch.Tensor]
    clients: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)


def federation_record(last: FederationRound) -> dict[str, torch.Tensor]:
    """``last`` as the federation's part of its ``observed.safetensors``: ``federation|average|W``,
    ``federation|client|C|W`` and ``federation|samples|C`` (``W`` a weight's name, ``segment.key``)."""
    def own(v: torch.Tensor) -> torch.Tensor:
        return v.detach().cpu().contiguous().clone()

    out = {f"{FEDERATION_KEY}|average|{k}": own(v) for k, v in last.average.items()}
    for c, state in last.clients.items():
        out.update({f"{FEDERATION_KEY}|client|{c}|{k}": own(v) for k, v in state.items()})
        out[f"{FEDERATION_KEY}|samples|{c}"] = torch.tensor([int(last.samples[c])], dtype=torch.int64)
    return out


def federation_received(plan: Plan, observed: dict[str, torch.Tensor]) -> FederationRound | None:
    """What :func:`federation_record` wrote, read back from the federation's recording (None where it holds no
    round: not the federation, nothing averaged, or the run not recorded); its clients in the plan's order."""
    head = f"{FEDERATION_KEY}|"
    average: dict[str, torch.Tensor] = {}
    clients: dict[str, dict[str, torch.Tensor]] = {}
    samples: dict[str, int] = {}
    for key, v in observed.items():
        if not key.startswith(head):
            continue
        what, _, rest = key[len(head):].partition("|")
        if what == "average":
            average[rest] = v
        elif what == "client":
            c, _, k = rest.partition("|")
            clients.setdefault(c, {})[k] = v
        elif what == "samples":
            samples[rest] = int(v.reshape(-1)[0])
    if not average:
        return None
    order = client_names(plan)
    return FederationRound(average, {c: clients[c] for c in order if c in clients},
                           {c: samples[c] for c in order if c in samples})


def client_views(plan: Plan, observed: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """What each client's turns left in the recordings: per client, per plan party, the tensors (a fixed party
    keeps them under the client's name, ``CLIENT/KEY``; the template's are the client's own). None of a
    plain plan's (every party's recording is one view)."""
    spec = plan.clients
    if spec is None:
        return {}
    fixed = [p for p in plan.parties if p != spec.template]
    views = {}
    for c in spec.names():
        views[c] = {p: {k[len(c) + 1:]: v for k, v in observed.get(p, {}).items() if k.startswith(f"{c}/")}
                    for p in fixed}
        views[c][spec.template] = observed.get(c, {})
    return views


def _client_tasks(plan: Plan, reports: dict[str, PartyReport]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each loss's per-epoch history from the turns' records: the training loss the row-weighted
    mean over the epoch's training turns (every turn once); the test metrics those of the epoch's
    last evaluation, pooled over every site it scored (:func:`_pools`). Also the pools."""
    train: dict[str, dict[int, list]] = {}  # loss -> epoch -> (value, rows) pairs
    steps: dict[str, list[tuple[int, list[float]]]] = {}  # loss -> (turn, train losses of its steps)
    seen: set[tuple] = set()
    for rep in reports.values():
        for r in rep.records:
            if r["mode"] != "train":
                continue
            for loss, v in r["losses"].items():
                if (r["turn"], loss) in seen:
                    continue
                seen.add((r["turn"], loss))
                if r.get("steps", {}).get(loss):
                    steps.setdefault(loss, []).append((r["turn"], r["steps"][loss]))
                if isinstance(v.get("train_loss"), (int, float)):
                    train.setdefault(loss, {}).setdefault(r["epoch"], []).append((v["train_loss"], r["rows"]))
    pools = _pools(plan, reports)
    out = {}
    for loss in sorted(set(train) | set(pools)):
        per_epoch = train.get(loss, {})
        h: dict[str, list] = {"train_loss": [sum(x * w for x, w in p) / sum(w for _, w in p)
                                             for _, p in sorted(per_epoch.items())]}
        evals = [pools[loss][e]["metrics"] for e in sorted(pools.get(loss, {}))]
        for name in sorted({"test_loss", "test_accuracy"} | {n for m in evals for n in m} - {"ci95", "curves"}):
            h[name] = [m.get(name) for m in evals]
        if all(v is None for v in h["test_accuracy"]):
            h["test_accuracy"] = []
        for name in ("ci95", "curves"):  # of the last evaluation
            if evals and evals[-1].get(name):
                h[name] = evals[-1][name]
        pts = [v for _, vs in sorted(steps.get(loss, [])) for v in vs]
        every = max(1, -(-len(pts) // 500))
        h["train_loss_steps"] = [[i, v] for i, v in enumerate(pts)][::every]
        out[loss] = h
    return out, pools


def _pools(plan: Plan, reports: dict[str, PartyReport]) -> dict[str, dict[int, dict]]:
    """Per loss and epoch, the epoch's last evaluation: ``metrics`` over the union of the test rows
    of every site it scored, ``sites`` (each client's own figures and rows), ``rows``. A head that
    is a fixed party pooled them itself (its ``pooled`` record); heads at the clients each kept
    their scores, pooled here; where there are none, the row-weighted mean (clients evaluated on
    the same rows, each with its own model)."""
    evals: dict[tuple[str, int], dict[int, dict]] = {}  # (loss, round) -> turn -> the head's record
    pooled: dict[tuple[str, int], list[dict]] = {}  # (loss, round) -> the heads' pooled records
    for rep in reports.values():
        for r in rep.records:
            for loss in r["losses"]:
                if r["mode"] == "eval":
                    evals.setdefault((loss, r["round"]), {})[r["turn"]] = r
                elif r["mode"] == "pooled":
                    pooled.setdefault((loss, r["round"]), []).append(r)
    out: dict[str, dict[int, dict]] = {}
    last = {loss: rnd for loss, rnd in sorted(evals, key=lambda k: k[1])}  # the evaluation whose intervals are given
    for (loss, rnd), turns in sorted(evals.items(), key=lambda kv: kv[0][1]):
        recs = [turns[t] for t in sorted(turns)]
        heads = pooled.get((loss, rnd), [])
        if len(heads) == 1:
            metrics = heads[0]["losses"][loss]
        elif all("scores" in r and loss in r["scores"] for r in recs):
            metrics = evaluation_metrics(plan.losses[loss].kind, [_scores(r["scores"][loss]) for r in recs],
                                         intervals=rnd == last[loss])
        else:
            metrics = _mean(recs, loss)
        sites = {r["client"]: {"rows": r["rows"], **{k: v for k, v in r["losses"][loss].items()
                                                     if k not in ("train_loss", "test_rows")}} for r in recs}
        out.setdefault(loss, {})[recs[0]["epoch"]] = {"metrics": metrics, "sites": sites, "round": rnd,
                                                      "rows": sum(r["rows"] for r in recs)}
    return out


def _scores(s: dict) -> Scores:
    """A client's scores as its turn's record keeps them (``right``: classification only)."""
    return Scores(np.asarray(s["outputs"], dtype=np.float64), np.asarray(s["targets"]), float(s["loss_sum"]),
                  int(s["rows"]), None if s.get("right") is None else int(s["right"]))


def _mean(recs: list[dict], loss: str) -> dict[str, float | None]:
    """The row-weighted mean of each figure over the records that have it."""
    names = {n for r in recs for n, v in r["losses"][loss].items() if n.startswith("test_")} - {"test_rows"}
    out: dict[str, float | None] = {"test_rows": sum(r["rows"] for r in recs)}
    for n in sorted(names):
        p = [(r["losses"][loss][n], r["rows"]) for r in recs if isinstance(r["losses"][loss].get(n), (int, float))]
        out[n] = sum(x * w for x, w in p) / sum(w for _, w in p) if p and sum(w for _, w in p) else None
    return out


def _scored(plan: Plan, graph: Graph, tasks: dict[str, dict], pools: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """What the headline was computed on: ``scored`` (rows, clients; ``own_rows``: each client
    scored its own test rows, else the plan's shared test split) and ``per_client`` (each site's
    rows and own figures) of the main loss's last evaluation."""
    order = [n.name for n in graph.losses() if n.name in tasks]
    classif = [k for k in order if tasks[k]["test_accuracy"]]
    main = classif[0] if classif else (order[0] if order else None)
    if main is None or not pools.get(main):
        return {}
    last = pools[main][max(pools[main])]
    return {"scored": {"rows": last["rows"], "clients": list(last["sites"]), "loss": main,
                       "own_rows": per_client(plan)},
            "per_client": last["sites"]}


def final_client(plan: Plan, reports: dict[str, PartyReport]) -> str | None:
    """The client whose weights were evaluated last: the run's model (sequential: the last holder;
    averaging schedules: the averaged weights). None where the strategy keeps a model per client."""
    evals = [r for rep in reports.values() for r in rep.records if r["mode"] == "eval"]
    if not evals or not strategy_of(plan).one_model:
        return None
    last = max(evals, key=lambda r: r["turn"])
    return last.get("model") or last["client"]  # a site that evaluated with lent weights: their owner


def _clients_part(plan: Plan, reports: dict[str, PartyReport], parties: dict[str, dict]) -> dict[str, Any]:
    spec = plan.clients
    clients = [parties[c] for c in spec.names() if c in parties]

    def spread(key: str) -> dict[str, float]:
        vals = [c["bytes_sent"] + c["bytes_received"] if key == "bytes" else c[key] for c in clients]
        return {"mean": float(np.mean(vals)), "max": float(np.max(vals)), "min": float(np.min(vals))}

    coord = coordinator_of(plan)
    return {
        "schedule": {"kind": spec.schedule, "clients": spec.count, "partition": spec.partition.model_dump(),
                     **strategy_of(plan).describe(plan), "coordinator": coord},
        "per_client": {"flops": spread("flops"), "bytes": spread("bytes")},
        "skipped": reports[coord].skipped if coord in reports else [],
        "final_client": final_client(plan, reports),
    }
