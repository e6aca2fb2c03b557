"""Per-step overhead of split training: throughput against the unsplit model, and one training step
decomposed into compute per party, encode/decode, copies, transport, waits and Python bookkeeping.

    .venv/bin/python bench/overhead.py            # writes the overhead section of BENCHMARKS.md
    .venv/bin/python bench/overhead.py --quick    # a smoke run (under a minute): prints it, writes nothing

For the bench CNN and the MLP on digits, split training in one process (``splitlearn.train(plan,
launcher="threads")``: the parties take turns on one thread) and over loopback gRPC with mutual TLS (``launcher="processes"``)
is measured against the unsplit model trained in this process on the same batches (``bench/run.py``'s
``unsplit_samples_per_s``), split and unsplit runs alternated; medians and every run's ratio.

Split step times come from step marks (``bench/_stepmark.py``: ``Party.step`` wrapped, in party processes
through ``sitecustomize``): *steady* steps are the training steps whose party's previous step was a training step
too, so neither the first step (FLOP counting) nor an epoch's first (at the hospital it waits for the server's
end-of-epoch evaluation metrics) is in them. The unsplit figure leaves out only its first step, as bench/run.py
does. Split samples/s: the steady steps' rows over their seconds, at the slower party.

The decomposition samples every thread of the split run (py-spy, ``--idle``: blocked threads too) in a run of its
own, and maps each sample of a party's steady step to a category by the innermost frame that matches :data:`RULES`
(stated there). A party's category share of its steady samples times its mean steady step gives ms per step.
In party processes every thread's CPU (``/proc/self/task/*/schedstat``) is read at each step's ends as well: the
gRPC and math threads work beside the party's thread and are not in its wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import _stepmark
from _md import write_section

HERE = Path(__file__).parent
PLANS = {"cnn": ("bench CNN (32x32x3, cut after the first block)", HERE / "plans" / "cnn_synthetic.toml"),
         "mlp": ("MLP on digits", HERE / "plans" / "mlp_digits.toml")}
RATES = {"cnn": 250, "mlp": 1000}  # py-spy's samples per second: an MLP step takes a few ms
LAUNCHERS = {"threads": "in one process (threads)", "processes": "loopback gRPC, mutual TLS (processes)"}

# A sample's category: the innermost frame that matches a rule, each frame tried against the rules in this
# order (file: py-spy's short path; function: its qualified name; innermost: only as the sample's innermost frame).
# Before them: a sample whose innermost frame blocks (a lock, a condition, a queue) under Link.recv is "wait".
# (category, file pattern, function pattern or None, innermost only)
RULES: list[tuple[str, str, str | None, bool]] = [
    ("copies", r"splitlearn/wire/codec\.py$", r"^(from_bytes|to_bytes)$", False),  # the receiver's own tensor
    ("copies", r"splitlearn/wire/transport/frames\.py$", r"frame", False),  # gRPC: the frame joined
    ("copies", r"splitlearn/wire/transport/inprocess\.py$", r"\.send$", True),  # in process: the bytes kept
    ("checks", r"splitlearn/wire/codec\.py$", r"check_values", False),
    ("encode/decode", r"splitlearn/wire/(codec|messages)\.py$|^google/protobuf/", None, False),
    ("transport", r"splitlearn/wire/transport/|^queue\.py$|^threading\.py$|^grpc/", None, False),
    ("link", r"splitlearn/wire/link\.py$", None, False),
    ("metering", r"splitlearn/wire/metering\.py$|^torch/utils/(flop_counter|_python_dispatch)\.py$", None, False),
    ("engine", r"^torch/nn/modules/module\.py$", r"Module\.(train|__setattr__)$", False),  # modes set per step
    ("compute: optimizer", r"^torch/optim/|splitlearn/core/optimizing\.py$", None, False),
    ("compute: backward", r"^torch/autograd/", None, False),
    ("compute: forward", r"^torch/nn/|^torch/_jit_internal\.py$|^torch/functional\.py$", None, False),
    ("randomness", r"splitlearn/core/randomness\.py$|^torch/random\.py$", None, False),
    ("recording", r"splitlearn/run/observe\.py$", None, False),
    ("checks", r"splitlearn/core/(admission|bounds|flow|early|defense)\.py$", None, False),
    ("engine", r"splitlearn/", None, False),  # engine.py, step.py, precision, graph, dry-run's merge: the rest
]
_RULES = [(c, re.compile(f), re.compile(fn) if fn else None, inner) for c, f, fn, inner in RULES]
BLOCKING = re.compile(r"^(threading|queue|selectors)\.py$|^grpc/_common\.py$")
BLOCKING_FN = re.compile(r"(^|\.)(wait|_wait_once|acquire|get|select|poll)$")
CATEGORIES = ["compute: forward", "compute: backward", "compute: optimizer", "encode/decode", "copies", "transport",
              "wait", "engine", "link", "metering", "randomness", "recording", "checks", "other"]
BOOKKEEPING = ["engine", "link", "metering", "randomness", "recording", "checks", "other"]
GRPC_CORE = re.compile(r"os=(grpc|event_engine|lifeguard|default-exec|resolver|timer)")  # gRPC's C threads
MARK = re.compile(r"^stepmark_(\w+)\[(.+)\]$")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- runs -------------------------------------------------------------------------------------------------------

def split_run(path: Path, launcher: str, epochs: int | None, profile: bool = False, rate: int = 250) -> dict:
    """One split run of the plan at ``path``; its steady-step figures, and with ``profile`` py-spy's samples."""
    from splitlearn.api.training import train

    logs, out = Path(tempfile.mkdtemp(prefix="overhead-steps-")), Path(tempfile.mkdtemp(prefix="overhead-run-"))
    spy = Spy(rate) if profile else None
    env = {_stepmark.ENV: str(logs), _stepmark.CPU_ENV: "1" if profile else "0"}
    site = _stepmark.site_dir() if launcher == "processes" else None
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    samples = None
    try:
        if spy is not None:
            spy.follow(logs) if launcher == "processes" else spy.attach(os.getpid())
        result = train(path, launcher=launcher, epochs=epochs, **({"out": out} if launcher == "processes" else {}))
        samples = spy.stop() if spy is not None else []
        steps = _stepmark.read(logs)
    finally:
        if spy is not None and samples is None:  # the run failed: no profiler left behind
            spy.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for folder in (logs, out, site):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        _settle()
    steady = [s for s in steps if s["kind"] == "steady"]
    if not steady:
        raise SystemExit(f"no steady training steps were marked in the {launcher} run of {path.name}: the step marks "
                         "(bench/_stepmark.py) were not installed in the parties")
    parties = sorted({s["party"] for s in steady})
    per = {p: [s for s in steady if s["party"] == p] for p in parties}
    step_s = {p: statistics.fmean(s["t1"] - s["t0"] for s in per[p]) for p in parties}
    rate_of = {p: sum(s["rows"] for s in per[p]) / sum(s["t1"] - s["t0"] for s in per[p]) for p in parties}
    ps = result["parties"]  # bench/run.py's count: every training step but the first, at the slower party
    runpy = (ps["hospital"]["train_samples"] - ps["hospital"]["first_step_samples"]) / max(
        p["train_s"] - p["first_step_s"] for p in ps.values())
    run = {"samples_per_s": min(rate_of.values()), "runpy_samples_per_s": runpy, "step_s": step_s,
           "between_s": _between(steps), "cpu": _cpu(steady, launcher), "samples": samples,
           "steady": len(steady) // len(parties), "steady_of": {p: len(per[p]) for p in parties},
           "rows": statistics.fmean(s["rows"] for s in steady)}
    if launcher == "threads" and samples:  # one thread: a party's samples are its own turns, sampled at this rate
        marked = sum(n for _, _, frames, n in samples if _mark(frames) and _mark(frames)[0] == "steady")
        run["one_thread_rate"] = marked / _union([(s["t0"], s["t1"]) for s in steady])
    return run


def _mark(frames: list[tuple[str, str]]) -> tuple[str, str] | None:
    """(kind, party) of a sample's innermost step mark, or None."""
    for fn, _ in reversed(frames):
        if m := MARK.match(fn):
            return m.group(1), m.group(2)
    return None


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by any of ``spans``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _settle(timeout: float = 15.0) -> None:
    """Wait until this process's children have ended: the launcher's forker still runs (exiting) for a moment after
    ``train`` returns, and would take a core from the unsplit run that follows (measured: MLP 16,845 samples/s
    right after, 61,000-78,000 otherwise)."""
    deadline = time.monotonic() + timeout
    me = str(os.getpid())
    while time.monotonic() < deadline:
        alive = []
        for d in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{d}/stat").read_text() if d.isdigit() else ""
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and fields[1] == me and fields[0] != "Z":
                alive.append(d)
        if not alive:
            return
        time.sleep(0.05)


def _between(steps: list[dict]) -> dict[str, float]:
    """Per party: the mean time from the end of a steady step to the start of the next (the session's loop)."""
    gaps = defaultdict(list)
    by = defaultdict(list)
    for s in steps:
        by[(s["pid"], s["party"])].append(s)
    for (_, party), rows in by.items():
        rows.sort(key=lambda s: s["t0"])
        gaps[party] += [b["t0"] - a["t1"] for a, b in zip(rows, rows[1:]) if a["kind"] == b["kind"] == "steady"]
    return {p: statistics.fmean(g) for p, g in gaps.items() if g}


def _cpu(steady: list[dict], launcher: str) -> dict[str, dict[str, float]]:
    """Per party, CPU seconds per steady step: its step's thread on a core and runnable but waiting for a core;
    in a party process also its other threads (gRPC's Python threads, gRPC's core threads, the math threads)."""
    out: dict[str, dict[str, float]] = {}
    for party in sorted({s["party"] for s in steady}):
        rows = [s for s in steady if s["party"] == party and s["threads"]]
        if not rows:
            continue
        acc: Counter = Counter()
        for s in rows:
            own = s["tid"]
            for tid, (name, run, wait) in s["threads"].items():
                if tid == own:
                    acc["on a core"] += run
                    acc["waiting for a core"] += wait
                elif launcher == "processes":
                    group = ("gRPC core threads" if GRPC_CORE.match(name)
                             else "math and other threads" if name.startswith("os=") else "other Python threads")
                    acc[group] += run
        out[party] = {k: v / len(rows) for k, v in acc.items()}
    return out


# -- profiling --------------------------------------------------------------------------------------------------

class Spy:
    """py-spy recording processes: attached to this process (threads), or to each party process as its first
    step mark appears (processes)."""

    def __init__(self, rate: int):
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(self.exe).exists():
            raise SystemExit("py-spy is needed for the decomposition (pip install py-spy); or run with --no-profile")
        self.rate, self.procs, self.files = rate, {}, {}
        self.folder = Path(tempfile.mkdtemp(prefix="overhead-spy-"))
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def attach(self, pid: int) -> None:
        out = self.folder / f"{pid}.txt"
        self.files[pid] = out
        self.procs[pid] = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--threads", "--idle", "--nonblocking",
             "--format", "raw", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def follow(self, logs: Path) -> None:
        def watch() -> None:
            while not self._stop.is_set():
                for f in logs.glob("*.steps"):
                    pid = int(f.stem)
                    if pid not in self.procs:
                        self.attach(pid)
                time.sleep(0.02)

        self._watch = threading.Thread(target=watch, daemon=True)
        self._watch.start()

    def stop(self) -> list[tuple[int, str, list[tuple[str, str]], int]]:
        """Stop recording; every sample as (pid, thread name, frames outermost first as (function, file), count)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.join()
        for pid, p in self.procs.items():
            if pid == os.getpid():
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        samples = []
        for pid, path in self.files.items():
            if path.exists():
                samples += [(pid, *s) for s in parse_raw(path.read_text(errors="replace"))]
        shutil.rmtree(self.folder, ignore_errors=True)
        return samples


def parse_raw(text: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    """py-spy's ``--format raw --threads`` lines: (thread name, frames outermost first, count)."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = parts[0].partition(": ")[2] if parts[0].startswith("thread") else ""
        frames = []
        for f in parts[1:] if parts[0].startswith("thread") else parts:
            fn, _, where = f.rpartition(" (")
            frames.append((fn, where.rstrip(")").rpartition(":")[0]))
        out.append((thread, frames, int(count)))
    return out


def classify(frames: list[tuple[str, str]]) -> str:
    """The category of one sample of a step (frames outermost first, below the step mark)."""
    if frames:
        fn, file = frames[-1]
        if BLOCKING.search(file) and BLOCKING_FN.search(fn) and any(
                f.endswith("wire/link.py") and n.endswith("recv") for n, f in frames):
            return "wait"
    for i in range(len(frames) - 1, -1, -1):
        fn, file = frames[i]
        for category, file_re, fn_re, innermost in _RULES:
            if (innermost and i != len(frames) - 1) or not file_re.search(file):
                continue
            if fn_re is None or fn_re.search(fn):
                return category
    return "other"


def decompose(run: dict) -> dict[str, dict[str, float]]:
    """Per party: seconds per steady step in each category (its share of the party's steady samples times its
    mean steady step), with "samples" (how many were classified)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for _, _, frames, n in run["samples"]:
        marks = [i for i, (fn, _) in enumerate(frames) if MARK.match(fn)]
        if not marks:
            continue
        kind, party = MARK.match(frames[marks[-1]][0]).groups()
        if kind == "steady":
            counts[party][classify(frames[marks[-1] + 1:])] += n
    out = {}
    for party, c in counts.items():
        total = sum(c.values())
        if "one_thread_rate" in run:  # the parties take turns on one thread: a sample is its own turn's time; the
            # rest of its step the others had the thread (its "wait")
            own = {k: v / run["one_thread_rate"] / run["steady_of"][party] for k, v in c.items()}
            own["wait"] = max(0.0, run["step_s"][party] - sum(v for k, v in own.items() if k != "wait"))
            out[party] = own
        else:
            out[party] = {k: v / total * run["step_s"][party] for k, v in c.items()}
        out[party]["samples"] = total
    return out


def hotspots(run: dict, top: int = 4) -> dict[tuple[str, str], list[tuple[float, str]]]:
    """Per (party, category) outside compute and waits: the innermost splitlearn functions its steady samples were in,
    as (ms per step, ``function (file)``), the largest first: where to look."""
    c: dict[tuple[str, str], Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for _, _, frames, n in run["samples"]:
        marks = [i for i, (fn, _) in enumerate(frames) if MARK.match(fn)]
        if not marks:
            continue
        kind, party = MARK.match(frames[marks[-1]][0]).groups()
        if kind != "steady":
            continue
        below = frames[marks[-1] + 1:]
        totals[party] += n
        category = classify(below)
        if category.startswith("compute") or category == "wait":
            continue
        own = next((f"{fn} ({f})" for fn, f in reversed(below) if "splitlearn/" in f), "-")
        c[(party, category)][own] += n
    return {k: [(v / totals[k[0]] * run["step_s"][k[0]], where) for where, v in cnt.most_common(top)]
            for k, cnt in c.items()}


def unclassified(run: dict, top: int = 8) -> list[tuple[int, str]]:
    """The innermost frames of steady samples that fell in "other" (to refine :data:`RULES`)."""
    c: Counter = Counter()
    for _, _, frames, n in run["samples"]:
        marks = [i for i, (fn, _) in enumerate(frames) if MARK.match(fn)]
        if marks and classify(frames[marks[-1] + 1:]) == "other":
            c[" <- ".join(f"{fn} ({f})" for fn, f in frames[-3:][::-1])] += n
    return [(n, k) for k, n in c.most_common(top)]


# -- the benchmark ----------------------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> dict:
    from run import unsplit_samples_per_s

    _stepmark.install()  # the threads launcher's parties run in this process
    pairs = [(m, ln) for m in args.models for ln in args.launchers]
    runs: dict[tuple, list[dict]] = {p: [] for p in pairs}
    unsplit: dict[tuple, list[float]] = {p: [] for p in pairs}
    profiles: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    for m in args.models if args.repeats else ():
        unsplit_samples_per_s(PLANS[m][1], 1)  # warm-up, part of no figure (--quick: none)
    for r in range(args.repeats):  # alternated: a slower spell of the machine hits split and unsplit alike
        for m, ln in pairs:
            runs[(m, ln)].append(split_run(PLANS[m][1], ln, args.epochs))
            unsplit[(m, ln)].append(unsplit_samples_per_s(PLANS[m][1], args.epochs))
            got = runs[(m, ln)][-1]
            print(f"{time.perf_counter() - t0:4.0f} s [{r}] {m} {ln}: split {got['samples_per_s']:.0f}/s "
                  f"(bench/run.py's count {got['runpy_samples_per_s']:.0f}/s), unsplit {unsplit[(m, ln)][-1]:.0f}/s",
                  flush=True)
    if args.profile:
        for m, ln in pairs:
            epochs = args.profile_epochs.get(m)
            rate = args.rate or RATES[m]
            profiles[(m, ln)] = run = split_run(PLANS[m][1], ln, epochs, profile=True, rate=rate)
            if not args.repeats:  # --quick: the profiled run is the measured one
                runs[(m, ln)].append(run)
                unsplit[(m, ln)].append(unsplit_samples_per_s(PLANS[m][1], epochs))
            d = decompose(run)
            print(f"{time.perf_counter() - t0:4.0f} s profiled {m} {ln}: {run['steady']} steady steps per party, "
                  + ", ".join(f"{p} {run['step_s'][p] * 1e3:.1f} ms/step ({d.get(p, {}).get('samples', 0)} samples)"
                              for p in sorted(run["step_s"])), flush=True)
            for (party, category), where in sorted(hotspots(run).items()):
                print(f"    {party} {category}: " + "; ".join(f"{_ms(t)} ms {w}" for t, w in where))
            for n, frames in unclassified(run, 5):
                print(f"    other: {n} {frames}")
    return {"runs": runs, "unsplit": unsplit, "profiles": profiles, "pairs": pairs}


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def decomposition_table(run: dict, unsplit_step: float, launcher: str, between: dict[str, float]) -> list[str]:
    d = decompose(run)
    parties = sorted(d)
    lines = ["| category | " + " | ".join(f"{p} ms/step | share" for p in parties) + " |",
             "|---|" + "---:|---:|" * len(parties)]
    for c in CATEGORIES:
        if any(d[p].get(c, 0) for p in parties) or c.startswith("compute") or c == "wait":
            lines.append(f"| {c} | " + " | ".join(f"{_ms(d[p].get(c, 0))} | {d[p].get(c, 0) / run['step_s'][p]:.1%}"
                                                    for p in parties) + " |")
    lines.append("| **step (steady, this run)** | " + " | ".join(f"**{_ms(run['step_s'][p])}** | 100%"
                                                                  for p in parties) + " |")
    lines.append("| between steps (the session's loop; unprofiled runs' median) | "
                 + " | ".join(f"{_ms(between.get(p, 0))} | " for p in parties) + " |")
    cpu_rows = ["on a core", "waiting for a core"] + (["other Python threads", "gRPC core threads",
                                                      "math and other threads"] if launcher == "processes" else [])
    names = {"on a core": "the step's thread: on a core (CPU)", "waiting for a core": "the step's thread: runnable, "
             "waiting for a core", "other Python threads": "other threads, CPU: Python's (gRPC streams, dialing)",
             "gRPC core threads": "other threads, CPU: gRPC core threads",
             "math and other threads": "other threads, CPU: math (OpenMP) and other threads"}
    for k in cpu_rows:  # (in one process the parties share one thread: its CPU is every party's; not shown)
        if "one_thread_rate" not in run and any(k in run["cpu"].get(p, {}) for p in parties):
            lines.append(f"| {names[k]} | " + " | ".join(f"{_ms(run['cpu'].get(p, {}).get(k, 0))} | "
                                                        for p in parties) + " |")
    lines.append(f"| *unsplit step (same batches, this process)* | {_ms(unsplit_step)} | |"
                 + " | |" * (len(parties) - 1))
    return lines


def reading(run: dict, unsplit_step: float, launcher: str) -> list[str]:
    d = decompose(run)
    parties = sorted(d)
    compute = {p: sum(v for k, v in d[p].items() if k.startswith("compute")) for p in parties}
    total = sum(compute.values())
    over = {c: sum(d[p].get(c, 0) for p in parties) for c in ("encode/decode", "copies", "transport")}
    book = {c: sum(d[p].get(c, 0) for p in parties) for c in BOOKKEEPING}
    step = max(run["step_s"].values())
    out = [f"- Compute of both parties (forward, backward, optimizer): {_ms(total)} ms per step, "
           f"{total / unsplit_step:.2f}x the unsplit step's {_ms(unsplit_step)} ms ("
           + ", ".join(f"{p} {_ms(compute[p])}" for p in parties) + ").",
           f"- Outside compute and waits, both parties together: encode/decode {_ms(over['encode/decode'])} ms, copies "
           f"{_ms(over['copies'])} ms, transport {_ms(over['transport'])} ms, "
           f"bookkeeping {_ms(sum(book.values()))} ms ("
           + ", ".join(f"{c} {_ms(v)}" for c, v in sorted(book.items(), key=lambda kv: -kv[1]) if v >= 5e-5) + ").",
           ("- Waits (the other party's turns on the one thread): " if "one_thread_rate" in run else
            "- Waits (blocked in `Link.recv`): ") + ", ".join(f"{p} {_ms(d[p].get('wait', 0))} ms "
                                                           f"({d[p].get('wait', 0) / run['step_s'][p]:.0%})"
                                                           for p in parties)
           + f"; the step takes {_ms(step)} ms against the unsplit {_ms(unsplit_step)} ms "
             f"({unsplit_step / step:.2f} of unsplit speed in this profiled run)."]
    waiting = {p: run["cpu"].get(p, {}).get("waiting for a core", 0) for p in parties}
    if any(waiting.values()):
        out.append("- Runnable but waiting for a core, the step's own thread: "
                   + ", ".join(f"{p} {_ms(waiting[p])} ms" for p in parties) + " per step.")
    if launcher == "processes":
        helpers = {p: sum(v for k, v in run["cpu"].get(p, {}).items() if k not in ("on a core", "waiting for a core"))
                   for p in parties}
        out.append("- CPU of each party process's other threads (gRPC, TLS, math threads), beside its step: "
                   + ", ".join(f"{p} {_ms(helpers[p])} ms" for p in parties) + " per step.")
    return out


def section(args: argparse.Namespace, got: dict, seconds: float, load: tuple[str, str]) -> str:
    import torch

    runs, unsplit = got["runs"], got["unsplit"]
    lines = [
        "## Per-step overhead: split training against the unsplit model, and where a step's time goes",
        "",
        f"Written by `.venv/bin/python bench/overhead.py{' --quick' if args.quick else ''}` in {seconds:.0f} s. "
        f"Machine: {os.cpu_count()} cores (shared), {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}. Load average (1, 5, 15 min) before: "
        f"{load[0]}; after: {load[1]} (its own party processes included)."
        + BUSY * (float(load[0].split()[0]) > (os.cpu_count() or 1)),  # (others' load: before it ran)
        "",
        "Vanilla plans (hospital: bottom + labels; server: top + loss). *In one process*: `splitlearn.train(plan, "
        "launcher=\"threads\")`, the parties taking turns on one thread (`wire/transport/turns.py`). *gRPC*: `launcher=\"processes\"`, one process per party on "
        "loopback with mutual TLS. *Unsplit*: bottom and top composed in this process, same batches, same optimizer "
        "(`bench/run.py`'s `unsplit_samples_per_s`: every training step but the first). Split samples/s: the "
        "*steady* training steps (a party's training step after a training step: neither the run's first, which "
        "counts FLOPs, nor an epoch's first), rows over seconds at the slower party. *bench/run.py's count*: "
        "every training step but the first (`train_s - first_step_s` of the slower party), as `bench/run.py` and "
        "the network section count.",
        "",
        f"Each model and launcher: {max(1, args.repeats)} split run(s), each followed by an unsplit run; medians; "
        "*per run*: each split run over the unsplit run after it.",
        "",
        "| model | launcher | split samples/s | unsplit samples/s | split / unsplit | per run | "
        "bench/run.py's count / unsplit |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for m, ln in got["pairs"]:
        rs, us = runs[(m, ln)], unsplit[(m, ln)]
        ratios = [r["samples_per_s"] / u for r, u in zip(rs, us)]
        runpy = statistics.median(r["runpy_samples_per_s"] / u for r, u in zip(rs, us))
        lines.append(f"| {PLANS[m][0]} | {LAUNCHERS[ln]} | {statistics.median(r['samples_per_s'] for r in rs):.0f} | "
                     f"{statistics.median(us):.0f} | {statistics.median(ratios):.3f} | "
                     f"{', '.join(f'{x:.2f}' for x in sorted(ratios))} | {runpy:.3f} |")
    if got["profiles"]:
        rates = ", ".join(f"{m} {args.rate or RATES[m]}" for m in args.models)
        lines += [
            "", "### One steady training step, decomposed", "",
            f"A run of its own per model and launcher, sampled by py-spy ({rates} per second, `--idle --threads "
            "--nonblocking`: every thread, blocked ones too; party processes each by their own py-spy), "
            f"epochs: {', '.join(f'{m} {args.profile_epochs.get(m) or PLANNED}' for m in args.models)}. "
            "Each sample of a party's steady step is put in the category of its innermost frame that matches "
            "`RULES` in `bench/overhead.py`: *compute* is torch's modules and losses (forward), autograd "
            "(backward) and the optimizer with `core/optimizing.py`; *encode/decode* `wire/codec.py` and "
            "`wire/messages.py` (protobuf included); *copies* the receiver's own tensor (`codec.from_bytes`), the "
            "in-process transport keeping the bytes, the gRPC frame's join; *transport* the transports, queues and "
            "gRPC calls in the party's thread; *wait* a blocked lock, condition or queue under `Link.recv` (in one "
            "process: the rest of the party's step, while the other party had the thread); "
            "*engine* `core/engine.py`, `core/step.py` and the rest of splitlearn (with their own tensor ops: the "
            "batch's rows taken, the loss read); *link* `wire/link.py`; *metering* `wire/metering.py` (and FLOP "
            "counting); *randomness* `core/randomness.py`; *recording* `run/observe.py`; *checks* admission, "
            "learnt bounds, flow control, early messages, defenses and `codec.check_values`. A category's share "
            "of the party's steady samples times its mean steady step (from the step marks of the same run) gives "
            "ms per step, so each party's column adds up to its step (in one process, where the parties take turns on one "
            "thread: a party's samples over the rate at which the thread was sampled during steady steps, "
            "their count over the time steady steps covered, per step; *wait* the rest of its step). CPU rows: `/proc/self/task/*/schedstat` "
            "read at each step's ends (the step's thread; in a party process its other threads too, which work "
            "beside the step and are not in its wall time).",
        ]
        for m, ln in got["pairs"]:
            run = got["profiles"].get((m, ln))
            if run is None:
                continue
            unsplit_step = run["rows"] / statistics.median(unsplit[(m, ln)])
            split_step = statistics.median(run_["rows"] / run_["samples_per_s"] for run_ in runs[(m, ln)])
            lines += ["", f"#### {PLANS[m][0]}, {LAUNCHERS[ln]}", "",
                      f"{run['steady']} steady steps per party; "
                      + (f"unprofiled, a steady step took {_ms(split_step)} ms (median of the runs above)"
                         if args.repeats else "the runs above are this one (--quick)")
                      + f"; the unsplit step {_ms(unsplit_step)} ms.", ""]
            between = {p: statistics.median(r["between_s"][p] for r in runs[(m, ln)] if p in r["between_s"])
                       for p in run["step_s"] if any(p in r["between_s"] for r in runs[(m, ln)])}
            lines += decomposition_table(run, unsplit_step, ln, between)
            lines += [""] + reading(run, unsplit_step, ln)
    if READING.exists():
        lines += ["", READING.read_text().strip()]
    return "\n".join(lines)


PLANNED = "as planned"
BUSY = (" **The machine was busy (load over its cores): other processes took cores from both the split and the "
        "unsplit runs, and torch's two math threads then wait for each other, which the unsplit model (one process, "
        "two threads) suffers from most; these figures are not the quiet machine's.**")
READING = HERE / "overhead_reading.md"  # the hand-written reading of the figures, kept beside the script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: one profiled run each, 1 epoch (MLP 3); "
                    "prints the section and writes nothing unless --write")
    ap.add_argument("--write", action="store_true", help="with --quick: write BENCHMARKS.md all the same")
    ap.add_argument("--repeats", type=int, default=5, help="split and unsplit runs per model and launcher")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the measured runs (default: the plans')")
    ap.add_argument("--models", default=",".join(PLANS), help="of " + ", ".join(PLANS))
    ap.add_argument("--launchers", default=",".join(LAUNCHERS), help="of " + ", ".join(LAUNCHERS))
    ap.add_argument("--rate", type=int, default=None, help="py-spy's samples per second (default: "
                    + ", ".join(f"{m} {r}" for m, r in RATES.items()) + ")")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="throughput only")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.launchers = [ln for ln in args.launchers.split(",") if ln]
    bad = [x for x in args.models if x not in PLANS] + [x for x in args.launchers if x not in LAUNCHERS]
    if bad:
        ap.error(f"unknown {bad}: models are {list(PLANS)}, launchers {list(LAUNCHERS)}")
    args.profile_epochs = {"cnn": None, "mlp": 10}  # the MLP's steps are short: more of them for the samples
    if args.quick:  # one profiled run each, which is the measured one (with --no-profile: one plain run each)
        args.repeats, args.epochs = (0 if args.profile else 1), 1
        args.profile_epochs = {"cnn": 1, "mlp": 3}
    load0, t0 = loadavg(), time.perf_counter()
    if float(load0.split()[0]) > (os.cpu_count() or 1):
        print(f"warning: load average {load0} on {os.cpu_count()} cores: the figures will not be a quiet machine's")
    got = measure(args)
    text = section(args, got, time.perf_counter() - t0, (load0, loadavg()))
    if args.quick and not args.write:
        print(text)
        return
    write_section("overhead", text)
    print("wrote the overhead section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
