"""The space of plans that ``inspect`` accepts, as a hypothesis strategy, and the checks every drawn plan
must pass (tests/test_plan_space.py draws from it).

A drawn :class:`Study` says: the task (binary or multi-class classification, regression), 1 to 3 feature
parties holding column ranges, where the labels are (at a feature party, at the server, at a label-only
registry), the configuration (vanilla, U-shaped, multi-hop with 1 to 3 relays, multi-task), where the
rows come from (the embedded dataset, or each party's own CSV with string ids, shuffled rows and missing
patients aligned by PSI), the merge of two or three feature parties' bottoms (concatenated, or summed securely:
``merge = "secure_sum"``), the pipeline (1 or 2 micro-batches) and the training recipe of issue #24: 1 or 2
batches per optimizer step (``[train] accumulate``), every party's optimizer SGD or AdamW with weight decay except
on the biases and a per-step cosine schedule after a linear warmup (:data:`RECIPES`), and with or without validation
rows and early stopping (``[data] validation_fraction``, ``[train] early_stop``). A drawn ``[clients]`` study
(:func:`client_studies`) has 1 to 3 clients playing one feature party ``clinic`` that holds the labels too, a
schedule (sequential with a peer or server hand-off, SplitFed v1 or v2, independent, or the baselines FedAvg and
large-batch SGD, whose plan puts the whole model at the client as ``splitlearn compare`` does), vanilla, U-shaped,
multi-hop or multi-task, and rows from shares of the embedded dataset (iid or Dirichlet over the classes) or
each client's own CSV (string ids, shuffled, uneven sizes and class balance), and for SplitFed and FedAvg with two
clients or more, secure aggregation or not. :func:`build` writes its plan and
files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

TASKS = {  # embedded dataset, feature columns, head width, loss kind
    "binary": ("breast_cancer", 30, 2, "cross_entropy"),
    "multiclass": ("wine", 13, 3, "cross_entropy"),
    "regression": ("diabetes", 10, 1, "mse"),
}
NAMES = {"binary": ["benign", "malignant"], "multiclass": ["barolo", "grignolino", "barbera"]}


@dataclass(frozen=True)
class Study:
    task: str
    features: int  # feature parties
    labels: str  # "feature" (site_0), "server", "registry"
    shape: str  # "vanilla", "u_shaped", "multi_hop", "multi_task"
    hops: int  # relays between site_0 and the server (multi_hop)
    files: bool  # each party's own CSV, string ids, missing patients, PSI
    pipeline: int
    seed: int
    clients: int = 0  # clients playing the template party "clinic" (0: no [clients] section)
    schedule: str = ""  # "sequential", "splitfed_v1", "splitfed_v2", "independent", "fedavg", "large_batch"
    handoff: str = "peer"  # sequential: "peer" or "server"
    partition: str = "iid"  # shares of the embedded dataset: "iid" or "dirichlet"
    accumulate: int = 1  # [train] accumulate: training batches per optimizer step
    recipe: str = "sgd"  # every party's optimizer: "sgd" or "adamw" (RECIPES)
    validation: bool = False  # [data] validation_fraction and [train] early_stop (plain plans only: [clients] refuse)
    # u_shaped: the label holder's head also reads its own features beside the server's output (data read by two of
    # its segments: a shared input once joined their stages, and the head waited on the bottom's gradient: deadlock)
    head_reads_x: bool = False
    lost: bool = False  # stopped mid-run, one party lost every checkpoint: the resume begins again from the start
    guard: bool = False  # the label holder's bottom wire has [wires] hijack_guard (silent in an honest run)
    secure: bool = False  # the server sums the feature parties' bottoms securely (merge = "secure_sum", #28); with
    # [clients] of a schedule that averages: the federation receives them by secure aggregation (secure_aggregation)

    def __str__(self) -> str:
        shape = f"{self.shape}{self.hops if self.shape == 'multi_hop' else ''}"
        if self.clients:
            sched = self.schedule + (f"/{self.handoff}" if self.schedule == "sequential" else "")
            rows = "own files" if self.files else f"{self.partition} shares"
            return (f"{self.task} {shape} clients={self.clients} {sched} {rows} pipeline={self.pipeline} "
                    f"seed={self.seed}{' secure-aggregation' if self.secure else ''}")
        return (f"{self.task} {shape} features={self.features} "
                f"labels@{self.labels} {'files+psi' if self.files else 'embedded'} pipeline={self.pipeline} "
                f"accumulate={self.accumulate} {self.recipe}{' validation' if self.validation else ''}"
                f"{' head+x' if self.head_reads_x else ''}{' lost-checkpoints' if self.lost else ''}"
                f"{' hijack-guard' if self.guard else ''}{' secure-sum' if self.secure else ''}")


@st.composite
def studies(draw) -> Study:
    task = draw(st.sampled_from(sorted(TASKS)))
    shape = draw(st.sampled_from(["vanilla", "u_shaped", "multi_hop", "multi_task"]))
    features = 1 if shape == "multi_hop" else draw(st.integers(1, 3))
    labels = "feature" if shape == "u_shaped" else draw(st.sampled_from(["feature", "server", "registry"]))
    hops = draw(st.integers(1, 3)) if shape == "multi_hop" else 0
    return Study(task, features, labels, shape, hops, draw(st.booleans()), draw(st.sampled_from([1, 2])),
                 draw(st.integers(0, 3)), accumulate=draw(st.sampled_from([1, 2])),
                 recipe=draw(st.sampled_from(RECIPES)), validation=draw(st.booleans()),
                 head_reads_x=shape == "u_shaped" and draw(st.booleans()), lost=draw(st.booleans()),
                 # (not behind relays: there honest binary plans raised it, 3 of 96: docs/privacy.md says so)
                 guard=labels == "feature" and task != "regression" and shape != "multi_hop" and draw(st.booleans()),
                 # (two heads reading the bottoms would see them in the clear: a secure sum feeds one segment alone)
                 secure=features > 1 and shape in ("vanilla", "u_shaped") and draw(st.booleans()))


RECIPES = ["sgd", "adamw"]  # build() writes each: SGD (momentum 0.9 but for regression), or AdamW as below; sgd
# first, so hypothesis's simplest draw is the plan it always was (SIMPLEST in tests/test_plan_space.py)
ADAMW = {"name": "AdamW", "lr": 0.01, "weight_decay": 0.01, "no_decay": ["bias"],
         "schedule": {"name": "CosineAnnealingLR", "T_max": 50, "every": "step", "warmup_steps": 2}}
VALIDATION_FRACTION = 0.2
EARLY_STOP = {"metric": "val_loss", "patience": 1}

SCHEDULES = ["sequential", "splitfed_v1", "splitfed_v2", "independent", "fedavg", "large_batch"]
WHOLE_MODEL = ("fedavg", "large_batch")  # the baselines of ``splitlearn compare``: every segment at the client


@st.composite
def client_studies(draw) -> Study:
    """A ``[clients]`` study: the template ``clinic`` holds the features and the labels."""
    task = draw(st.sampled_from(sorted(TASKS)))
    shape = draw(st.sampled_from(["vanilla", "u_shaped", "multi_hop", "multi_task"]))
    schedule = draw(st.sampled_from(SCHEDULES))
    handoff = draw(st.sampled_from(["peer", "server"])) if schedule == "sequential" else "peer"
    files = draw(st.booleans())
    partition = "iid" if files or task == "regression" else draw(st.sampled_from(["iid", "dirichlet"]))
    clients = draw(st.integers(1, 3))
    # up to 3 relays: then two fixed parties are neither neighbours nor the coordinator, so have no link to each
    # other (a turn's wait once asked the transport about every fixed party, and such a run failed over gRPC)
    return Study(task, 1, "feature", shape, draw(st.integers(1, 3)) if shape == "multi_hop" else 0, files,
                 draw(st.sampled_from([1, 2])), draw(st.integers(0, 3)), clients, schedule, handoff, partition,
                 secure=clients > 1 and (schedule.startswith("splitfed") or schedule == "fedavg") and draw(st.booleans()))


def _table(task: str):
    from splitlearn.data import load_table

    t = load_table(TASKS[task][0])
    return t.fields["x"], t.fields["y"]


def _ranges(width: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, width, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def build(study: Study, folder: Path, exact_ids: bool = False) -> dict:
    """The plan of ``study`` (files written into ``folder``). ``exact_ids``: the CSVs hold only the ids every
    party holds, aligned exactly: what the PSI run must equal bit for bit."""
    dataset, width, out, kind = TASKS[study.task]
    sites = ["clinic"] if study.clients else [f"site_{i}" for i in range(study.features)]
    holder = {"feature": sites[0], "server": "server", "registry": "registry"}[study.labels]
    ranges = _ranges(width, study.features)
    # targets of 25 to 346 (diabetes progression, not standardised) take a small step
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9} if kind != "mse" else {"name": "sgd", "lr": 2e-4}
    if study.recipe == "adamw":  # Adam's step does not grow with the targets' scale: one learning rate for all
        opt = ADAMW
    elif study.recipe != "sgd":
        raise ValueError(f"unknown recipe {study.recipe!r}: one of {RECIPES}")
    parties: dict[str, dict] = {p: {"holds": {"x": {"field": "x", "columns": list(r)} if not study.files else "x"},
                                    "optimizer": opt} for p, r in zip(sites, ranges)}
    parties.setdefault("server", {"optimizer": opt})
    if study.labels == "registry":
        parties["registry"] = {"optimizer": opt}
    parties[holder].setdefault("holds", {})["y"] = "y"
    plan: dict = {"name": "drawn", "train": {"epochs": 2, "batch_size": 32, "seed": study.seed,
                                             "pipeline": study.pipeline}, "parties": parties}
    if study.accumulate > 1:
        plan["train"]["accumulate"] = study.accumulate
    if study.validation:  # the one figure every task gives; multi-task plans name whose loss it watches
        plan["train"]["early_stop"] = {**EARLY_STOP, **({"loss": "task"} if study.shape == "multi_task" else {})}
    if study.clients:
        plan["clients"] = {"template": "clinic", "count": study.clients, "schedule": study.schedule,
                           "handoff": study.handoff, "partition": study.partition, "timeout": 60,
                           **({"secure_aggregation": True} if study.secure else {})}
        parties["clinic"]["holds"]["x"] = "x"  # the whole row (a client's file holds only the features)
    if study.clients and study.files:
        _write_client_files(study, folder)
        parties["clinic"]["data"] = {"dataset": "csv", "path": str(folder / "{client}.csv"), "id_column": "pid",
                                     "label_column": "target",
                                     **({"options": {"classes": NAMES[study.task]}} if study.task in NAMES else {})}
    elif study.files:
        plan["data"] = {"align": "exact" if exact_ids else "psi"}
        _write_files(study, folder, sites, holder, ranges, exact_ids)
        for p in [*sites, holder]:
            parties[p]["data"] = {"dataset": "csv", "path": str(folder / f"{p}.csv"), "id_column": "pid",
                                  **({"label_column": "target"} if p == holder else {})}
            if p == holder and study.task in NAMES:
                parties[p]["data"]["options"] = {"classes": NAMES[study.task]}
    else:
        plan["data"] = {"dataset": dataset}
    if study.validation:
        plan.setdefault("data", {})["validation_fraction"] = VALIDATION_FRACTION
    networks, segments, losses = {}, {}, {}
    for p, (a, b) in zip(sites, ranges):
        networks[f"bottom_{p}"] = {"zoo": "mlp", "args": {"sizes": [b - a, 8], "out_activation": True}}
        segments[f"bottom_{p}"] = {"party": p, "inputs": [f"{p}.x"], "network": f"bottom_{p}"}
    merged = [f"bottom_{p}" for p in sites]
    width_in = 8 if study.secure and not study.clients else 8 * len(sites)  # a sum of the bottoms, or concatenated
    if study.shape == "multi_hop":
        prev = merged[0]
        for k in range(study.hops):
            networks[f"relay_{k}"] = {"zoo": "mlp", "args": {"sizes": [8, 8], "out_activation": True}}
            parties[f"relay_{k}"] = {"optimizer": opt}
            segments[f"relay_{k}"] = {"party": f"relay_{k}", "inputs": [prev], "network": f"relay_{k}"}
            prev = f"relay_{k}"
        merged, width_in = [prev], 8
    heads = {"task": "server"}
    if study.shape == "u_shaped":
        networks["middle"] = {"zoo": "mlp", "args": {"sizes": [width_in, 8], "out_activation": True}}
        segments["middle"] = {"party": "server", "inputs": merged, "network": "middle"}
        merged, width_in, heads = ["middle"], 8, {"task": holder}
        if study.head_reads_x:  # beside the server's output, its own features again (concatenated)
            a, b = ranges[sites.index(holder)]
            merged, width_in = ["middle", f"{holder}.x"], 8 + b - a
    if study.shape == "multi_task":
        heads = {"task": "server", "second": "server"}
    for name, party in heads.items():
        networks[f"head_{name}"] = {"zoo": "mlp", "args": {"sizes": [width_in, out]}}
        segments[f"head_{name}"] = {"party": party, "inputs": merged, "network": f"head_{name}"}
        losses[name] = {"input": f"head_{name}", "target": f"{holder}.y", "kind": kind,
                        "weight": 1.0 if name == "task" else 0.5}
    if study.secure and not study.clients:  # the segment that merges the bottoms: the server's middle or its head
        segments["middle" if study.shape == "u_shaped" else "head_task"]["merge"] = "secure_sum"
    plan.update(networks=networks, segments=segments, losses=losses)
    if study.guard:  # the holder watches the gradients it gets back: an honest run trains as without it
        plan["wires"] = {f"bottom_{holder}": {"hijack_guard": True}}
    if study.schedule in WHOLE_MODEL:  # FedAvg (local epochs) or large-batch SGD (one local step): as ``compare``
        plan["parties"] = {"clinic": parties["clinic"]}  # builds them (clients/baselines.method_plan): one party,
        for seg in segments.values():  # every segment at the client, the whole model averaged by a federation
            seg["party"] = "clinic"
        plan["clients"].update(schedule="fedavg", federation="federation",
                               **({"local_steps": 1} if study.schedule == "large_batch" else {}))
        plan["clients"].pop("handoff")
    return plan


def _write_files(study: Study, folder: Path, sites: list[str], holder: str, ranges, exact_ids: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _table(study.task)
    n = len(y)
    rng = np.random.default_rng(study.seed)
    owners = list(dict.fromkeys([*sites, holder]))
    missing = {p: set(rng.choice(n, size=n // 25, replace=False).tolist()) for p in owners}
    everywhere = set(range(n)) - set().union(*missing.values())
    for p in owners:
        keep = sorted(everywhere) if exact_ids else [i for i in range(n) if i not in missing[p]]
        keep = [keep[i] for i in rng.permutation(len(keep))]  # each party its own order
        cols = ranges[sites.index(p)] if p in sites else (0, 0)
        with open(folder / f"{p}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pid", *[f"c{j}" for j in range(*cols)], *(["target"] if p == holder else [])])
            for i in keep:
                label = []
                if p == holder:
                    label = [NAMES[study.task][int(y[i])] if study.task in NAMES else f"{float(y[i]):.1f}"]
                w.writerow([f"id-{i:04d}", *[f"{v:.7g}" for v in x[i, cols[0]:cols[1]]], *label])


def _write_client_files(study: Study, folder: Path) -> None:
    """Each client's own CSV (``clinic-1.csv`` ...): string ids, its own row order, uneven sizes and class
    balance (the rows are ordered by their target plus noise, then cut at random sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _table(study.task)
    n = len(y)
    rng = np.random.default_rng(study.seed)
    order = np.argsort(np.asarray(y, dtype=np.float64) + rng.normal(0, 0.3 * float(np.std(y)) + 0.5, n), kind="stable")
    weights = rng.uniform(1, 3, study.clients)
    cuts = (np.cumsum(weights)[:-1] / weights.sum() * n).round().astype(int)
    for k, rows in enumerate(np.split(order, cuts), start=1):
        rows = rows[rng.permutation(len(rows))]
        with open(folder / f"clinic-{k}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pid", *[f"c{j}" for j in range(x.shape[1])], "target"])
            for i in rows:
                label = NAMES[study.task][int(y[i])] if study.task in NAMES else f"{float(y[i]):.1f}"
                w.writerow([f"id-{i:04d}", *[f"{v:.7g}" for v in x[i]], label])

