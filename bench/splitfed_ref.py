"""SplitFed v2 written in plain PyTorch against the engine's in-process simulation of the same plan, and
1,000 clients in one process: time and peak memory per client.

    .venv/bin/python bench/splitfed_ref.py            # writes the splitfed section of BENCHMARKS.md
    .venv/bin/python bench/splitfed_ref.py --quick    # a smoke run: prints it, writes nothing

The plan: ``examples/sequential.toml`` (an MLP 64-128-64-10 on digits, the clients hold the first layer)
with ``schedule = "splitfed_v2"``. The reference (:func:`reference`) runs the same rounds, turns and batches
(the engine's own schedule, :class:`splitlearn.clients.context.Context`, so both draw the same rows in the same
order), from the same initial weights: every round each client loads the averaged bottom, trains its batches
against the one server model (each client's SGD keeps its own momentum, as the engine's clients do), then the
bottoms are averaged by samples (in float64, as ``clients/weights.average``); after each epoch's last round the
averaged model is scored on the test rows. No messages, no sessions, no metering: the physical limit of a
simulation. Both run in this process after ``prepare`` (not timed); alternated, medians.

Scale: the engine's simulation with 1,000 clients (and with 10, the reference point) each in a fresh process;
peak resident memory (``ru_maxrss``) and seconds; memory per client is the difference over the difference in
clients, against its bottom's weights and momentum.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from _md import write_section

HERE = Path(__file__).parent
PLAN = HERE.parent / "examples" / "sequential.toml"


def plan_text(clients: int, epochs: int) -> str:
    text = PLAN.read_text()
    for old, new in (("count = 10", f"count = {clients}"), ('schedule = "sequential"', 'schedule = "splitfed_v2"'),
                     ("epochs = 8", f"epochs = {epochs}"), ("timeout = 30", "timeout = 600")):
        if old not in text:
            raise SystemExit(f"{PLAN} no longer says {old!r}: bench/splitfed_ref.py makes its plan from it")
        text = text.replace(old, new)
    return text


def prepared(folder: Path, clients: int, epochs: int) -> tuple:
    from splitlearn.run.setup import prepare

    path = folder / f"splitfed_{clients}.toml"
    path.write_text(plan_text(clients, epochs))
    return prepare(path)


def reference(plan, setups) -> dict:
    """SplitFed v2 in plain PyTorch over the engine's rounds: seconds and the last evaluation's accuracy. It
    computes with the math threads the engine gives each party of the same plan in one process."""
    from splitlearn.run.allocator import math_threads

    before = torch.get_num_threads()
    torch.set_num_threads(math_threads(plan.clients.count + len(plan.parties) - 1))
    try:
        return _reference(plan, setups)
    finally:
        torch.set_num_threads(before)


def _reference(plan, setups) -> dict:
    from splitlearn.clients.context import Context
    from splitlearn.models import build_segment

    template, server = plan.clients.template, next(p for p in plan.parties if p != plan.clients.template)
    setup = setups[template]
    ctx = Context.from_setup(plan, setup)
    (x_name,) = [k for k in setup.inputs if k != f"{template}.y"]
    x, y = setup.inputs[x_name], setup.inputs[f"{template}.y"]
    t0 = time.perf_counter()
    bottom, top = build_segment(plan, "bottom"), build_segment(plan, "top")
    spec_b, spec_t = plan.parties[template].optimizer, plan.parties[server].optimizer
    top_opt = torch.optim.SGD(top.parameters(), lr=spec_t.lr, momentum=spec_t.momentum)
    average = {k: v.detach().clone() for k, v in bottom.state_dict().items()}
    clients: dict[int, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    loss_fn = torch.nn.functional.cross_entropy
    accuracy = None
    for rnd in ctx.rounds:
        trained = []
        for turn in rnd.train:
            if turn.client not in clients:
                mod = copy.deepcopy(bottom)
                clients[turn.client] = (mod, torch.optim.SGD(mod.parameters(), lr=spec_b.lr, momentum=spec_b.momentum))
            mod, opt = clients[turn.client]
            with torch.no_grad():  # the average first (Download)
                for k, v in mod.state_dict().items():
                    v.copy_(average[k])
            mod.train()
            top.train()
            for step in turn.steps:
                opt.zero_grad(set_to_none=True)
                top_opt.zero_grad(set_to_none=True)
                loss_fn(top(mod(x[step.rows])), y[step.rows]).backward()
                top_opt.step()
                opt.step()
            trained.append(turn.client)
        weights = [rnd.samples[k] for k in trained]
        total = float(sum(weights))
        states = [clients[k][0].state_dict() for k in trained]
        average = {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(v.dtype)
                   for k, v in states[0].items()}
        for turn in rnd.evals:  # the averaged bottom with the server's top, on the test rows
            bottom.load_state_dict(average)
            bottom.eval()
            top.eval()
            right = rows = 0
            with torch.no_grad():
                for step in turn.steps:
                    right += int((top(bottom(x[step.rows])).argmax(1) == y[step.rows]).sum())
                    rows += len(step.rows)
            accuracy = right / rows
    return {"seconds": time.perf_counter() - t0, "accuracy": accuracy}


def _importers(name: str, fn: object) -> list:
    """splitlearn's modules that hold ``fn`` under ``name`` (imported it), its own module included."""
    return [m for key, m in list(sys.modules.items()) if key.startswith("splitlearn.") and getattr(m, name, None) is fn]


@contextmanager
def metrics_timed() -> Iterator[list[float]]:
    """Time every call of ``splitlearn.core.metrics.evaluation_metrics`` (the test figures of an evaluation, with
    their bootstrap intervals and curves) made meanwhile, wherever splitlearn's modules imported it: the seconds."""
    from splitlearn.core import metrics

    original, spent = metrics.evaluation_metrics, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    users = _importers("evaluation_metrics", original)
    for m in users:
        m.evaluation_metrics = timed
    try:
        yield spent
    finally:
        for m in users:
            m.evaluation_metrics = original


@contextmanager
def decomposed() -> Iterator[dict[str, float]]:
    """Seconds of the engine's work by part, while inside: each part's own time (less the parts it calls, and less
    the time its task waited while the others had the thread): the steps by mode, a turn's session around them
    (hellos, goodbye, the turn's figures), the turn's set-up (its view, link and party, its record), the evaluation
    metrics; the rest is the schedule's coordination (commands, weights, averaging) and the scheduler."""
    import greenlet

    from splitlearn.clients import turns as client_turns
    from splitlearn.core import engine as core_engine, metrics
    from splitlearn.run import session
    from splitlearn.wire.transport import turns as task_turns

    spent: dict[str, float] = {}
    stacks: dict = {}

    def timed(fn, key_of):
        def wrapper(*args, **kwargs):
            stack = stacks.setdefault(greenlet.getcurrent(), [])
            frame = [time.perf_counter(), 0.0, 0.0]  # start, parked, the parts it called
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                inside = time.perf_counter() - frame[0] - frame[1]
                key = key_of(args, kwargs)
                spent[key] = spent.get(key, 0.0) + inside - frame[2]
                if stack:
                    stack[-1][2] += inside
        return wrapper

    park = task_turns.Turns._park

    def parked(self, task, deadline):
        t0 = time.perf_counter()
        try:
            return park(self, task, deadline)
        finally:
            for frame in stacks.get(greenlet.getcurrent(), []):
                frame[1] += time.perf_counter() - t0

    step, run_party, run_turn = core_engine.Party.step, session.run_party, client_turns.TurnTaking.run_turn
    scored = metrics.evaluation_metrics
    metered = timed(scored, lambda a, k: "evaluation metrics")  # one wrapper everywhere: metrics_timed finds it
    patches = [(core_engine.Party, "step", timed(step, lambda a, k: f"steps: {a[3] if len(a) > 3 else k['mode']}")),
               (session, "run_party", timed(run_party, lambda a, k: "session around the steps")),
               (client_turns, "run_party", timed(run_party, lambda a, k: "session around the steps")),
               (client_turns.TurnTaking, "run_turn", timed(run_turn, lambda a, k: "turn set-up and record")),
               (task_turns.Turns, "_park", parked)]
    patches += [(m, "evaluation_metrics", metered) for m in _importers("evaluation_metrics", scored)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, new in patches:
        setattr(owner, name, new)
    try:
        yield spent
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def engine(plan, setups, shapes) -> dict:
    """The engine's in-process run: seconds, of which in evaluation metrics, and the last test accuracy."""
    from splitlearn.api.training import train_prepared

    with metrics_timed() as spent:
        t0 = time.perf_counter()
        result = train_prepared(plan, setups, shapes, launcher="threads")
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "metrics_s": sum(spent), "accuracy": result["metrics"]["test_accuracy"],
            "skipped": len(result.get("skipped", []))}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def one(clients: int, epochs: int) -> dict:
    """One scale point, in this (fresh) process: the engine's seconds, and the resident set before training
    (after ``prepare``) and its peak while training (sampled every 20 ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        plan, setups, shapes = prepared(Path(tmp), clients, epochs)
        before, peak, done = _rss_kib(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], _rss_kib())

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        try:
            got = engine(plan, setups, shapes)
        finally:
            done.set()
            watcher.join()
    bottom = setups[plan.clients.template].modules["bottom"]
    weights = sum(p.numel() * p.element_size() for p in bottom.parameters())
    return {"clients": clients, **got, "peak_kib": max(peak[0], _rss_kib()), "before_kib": before,
            "weights_bytes": weights, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100, help="clients of the comparison (default 100)")
    ap.add_argument("--epochs", type=int, default=8, help="epochs (rounds) of the comparison (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="engine and reference runs, alternated")
    ap.add_argument("--scale", default="10,1000", help="client counts of the scale runs (the first: the reference)")
    ap.add_argument("--scale-epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10 clients, 2 epochs, one repeat, scale 10 and 100; "
                    "prints the section, writes nothing")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.scale_epochs)))
        return
    if args.quick:
        args.clients, args.epochs, args.repeats, args.scale = 10, 2, 1, "10,100"
    load0, t_start = loadavg(), time.perf_counter()
    eng, ref = [], []
    with tempfile.TemporaryDirectory() as tmp:
        engine(*prepared(Path(tmp), min(args.clients, 10), 1))  # warm-up (imports, first evaluation), no figure
        for r in range(args.repeats):  # alternated; each from a fresh prepare (same seeds: the same run)
            eng.append(engine(*prepared(Path(tmp), args.clients, args.epochs)))
            plan, setups, _ = prepared(Path(tmp), args.clients, args.epochs)
            ref.append(reference(plan, setups))
            print(f"[{r}] engine {eng[-1]['seconds']:.2f} s ({eng[-1]['metrics_s']:.2f} s in evaluation metrics, "
                  f"accuracy {eng[-1]['accuracy']:.4f}), plain PyTorch "
                  f"{ref[-1]['seconds']:.2f} s (accuracy {ref[-1]['accuracy']:.4f})", flush=True)
        run = prepared(Path(tmp), args.clients, args.epochs)
        with decomposed() as parts:  # a run of its own: the timers cost a few percent
            t0 = time.perf_counter()
            engine(*run)
            whole = time.perf_counter() - t0
    scale = []
    for n in [int(c) for c in args.scale.split(",") if c]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--scale-epochs", str(args.scale_epochs)],
                             capture_output=True, text=True, check=True)
        scale.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(scale[-1], flush=True)
    e, p = statistics.median(r["seconds"] for r in eng), statistics.median(r["seconds"] for r in ref)
    m = sorted(eng, key=lambda r: r["seconds"])[len(eng) // 2]["metrics_s"]  # of the median run
    ratios = sorted(b["seconds"] / a["seconds"] for a, b in zip(eng, ref))
    lines = [
        f"## SplitFed v2 with {args.clients} clients: the engine's simulation against plain PyTorch; 1,000 clients",
        "",
        f"Written by `.venv/bin/python bench/splitfed_ref.py{' --quick' if args.quick else ''}` in "
        f"{time.perf_counter() - t_start:.0f} s. Machine: {os.cpu_count()} cores (shared), {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}. Load average (1, 5, 15 min) before: {load0}; "
        f"after: {loadavg()}.",
        "",
        f"`examples/sequential.toml` with `schedule = \"splitfed_v2\"`, {args.clients} clients (iid shares of the "
        f"1437 training rows), {args.epochs} epochs (one round each), batch 32. *Engine*: `train` in one process "
        "(every client and the server a task taking turns on one thread, `wire/transport/turns.py`; after `prepare`, which is not timed). *Plain PyTorch*: the loop of "
        "`bench/splitfed_ref.py:reference` on the same rounds, batches and initial weights, with the math threads "
        "the engine gives each party here (each client its own "
        "SGD momentum, sample-weighted average of the bottoms every round, the averaged model scored after each "
        f"round). {args.repeats} runs each, alternated; medians.",
        "",
        "| clients | engine s | plain PyTorch s | plain / engine (the engine's speed as a share of plain) | per run "
        "| engine accuracy | plain accuracy |",
        "|---:|---:|---:|---:|---|---:|---:|",
        f"| {args.clients} | {e:.2f} | {p:.2f} | {p / e:.3f} | {', '.join(f'{x:.3f}' for x in ratios)} "
        f"| {eng[-1]['accuracy']:.4f} | {ref[-1]['accuracy']:.4f} |",
        "",
        f"Target (issue #29): at least 0.8. The same test accuracy, {eng[-1]['accuracy']:.4f} and "
        f"{ref[-1]['accuracy']:.4f}: the loop trains what the engine trains. Of the engine's {e:.2f} s (the median "
        f"run), {m:.2f} s ({m / e:.0%}) are evaluation metrics (`core/metrics.evaluation_metrics`: "
        "the test figures with their 95% bootstrap intervals and curves; timed by wrapping it), computed once at each "
        "evaluation (the evaluating turn's report and the pooled record of that one turn share them) and, "
        "with intervals, once at the end; the other "
        f"{e - m:.2f} s are {e / p - m / p:.1f}x the plain loop's time, over "
        f"{args.clients * args.epochs} client turns ({(e - m - p) / (args.clients * args.epochs) * 1e3:.1f} ms more "
        "per turn than the plain loop).",
    ]
    turns = args.clients * args.epochs
    rest = whole - sum(parts.values())
    lines += [
        "", "### Where the engine's time goes", "",
        f"A run of its own with timers ({whole:.2f} s): each part's own time, less the parts it calls and less the "
        "time its task waited while the others had the thread (`bench/splitfed_ref.py:decomposed`); every client "
        "and the server each run a training step in every turn, and a handshake step in a client's first turn (the "
        "handshake: one row of zeros through the turn's parties, fixing its wires; a client's later turns take what "
        "it fixed, `run/agreement.py`).", "",
        "| part | s | ms per client turn | share |", "|---|---:|---:|---:|",
        *[f"| {k} | {v:.2f} | {v / turns * 1e3:.2f} | {v / whole:.0%} |"
          for k, v in sorted(parts.items(), key=lambda kv: -kv[1])],
        f"| the rest: the schedule's coordination (commands, weights, averaging), the scheduler, the collection "
        f"before the run, the timers themselves | {rest:.2f} | {rest / turns * 1e3:.2f} | {rest / whole:.0%} |",
        f"| *the plain loop, all of it* | {p:.2f} | {p / turns * 1e3:.2f} | |",
    ]
    if len(scale) > 1:
        a, b = scale[0], scale[-1]
        grew = [r["peak_kib"] - r["before_kib"] for r in (a, b)]  # what training added to the resident set
        per_client = (grew[1] - grew[0]) / (b["clients"] - a["clients"])
        own = 2 * b["weights_bytes"] / 1024  # its bottom's weights and their momentum
        lines += [
            "", f"### {b['clients']} clients in one process", "",
            f"The same plan, {args.scale_epochs} epoch(s), each client count in a fresh process: the resident set "
            "before training (after `prepare`: the libraries and the data) and its peak while training (sampled "
            "every 20 ms).", "",
            "| clients | seconds | seconds per client-turn | resident MiB before | peak MiB while training "
            "| test accuracy "
            "| skipped |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in scale:
            per_turn = r["seconds"] / (r["clients"] * args.scale_epochs)
            lines.append(f"| {r['clients']} | {r['seconds']:.1f} | {per_turn:.4f} "
                         f"| {r['before_kib'] / 1024:.0f} | {r['peak_kib'] / 1024:.0f} | {r['accuracy']:.4f} "
                         f"| {r['skipped']} |")
        lines += ["", f"Memory per client: {per_client:.0f} KiB (what training added at {b['clients']} clients, less "
                  f"what it added at {a['clients']}, over {b['clients'] - a['clients']}), of which its bottom's "
                  f"weights and momentum are {own:.0f} KiB: "
                  f"{per_client - own:.0f} KiB beyond them (target: under 1 MiB)."]
    text = "\n".join(lines)
    if args.quick:
        print(text)
        return
    write_section("splitfed", text)
    print("wrote the splitfed section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
