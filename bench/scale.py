"""Benchmark: many clients in one process. Sequential split learning on digits with 1 to 500
clients, each size in a fresh process; peak memory (resident set) and time against the
1-client run of the same plan in the same benchmark run.

    .venv/bin/python bench/scale.py           # writes the "scale" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
PLAN = HERE.parent / "examples" / "sequential.toml"


def one(clients: int, epochs: int) -> dict:
    """Run the plan with ``clients`` clients in this process; what it took."""
    from splitlearn.api import train_clients
    from splitlearn.plan import load_plan

    plan = load_plan(PLAN).with_train(epochs=epochs)
    plan = plan.replace(clients=plan.clients.model_copy(update={"count": clients}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = train_clients(plan)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"clients": clients, "seconds": seconds, "peak_rss_mb": peak / 1024, "start_rss_mb": before / 1024,
            "accuracy": result["metrics"]["test_accuracy"], "skipped": len(result["skipped"]),
            "per_client_bytes": result["per_client"]["bytes"]["mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,10,100,250,500")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.epochs)))
        return
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--epochs", str(args.epochs)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = rows[0]
    lines = [
        "## Many clients in one process: memory and time against the number of clients",
        "",
        f"Written by `.venv/bin/python bench/scale.py`. Machine: {platform.machine()}, Python "
        f"{platform.python_version()}. Plan: `examples/sequential.toml` (digits, 1437 training rows "
        f"shared among the clients), {args.epochs} epochs, every client in its own thread of one process "
        "over the in-process transport; each client count in a fresh process. Peak memory is the process's "
        "peak resident set; the reference is the 1-client run.",
        "",
        "| clients | peak memory (MB) | / 1 client | seconds | / 1 client | test accuracy | skipped |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x "
                     f"| {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.1f}x | {r['accuracy']:.4f} "
                     f"| {r['skipped']} |")
    big = rows[-1]
    slope = (big["peak_rss_mb"] - ref["peak_rss_mb"]) / max(1, big["clients"] - ref["clients"])
    lines += ["", f"Memory grows by about {slope * 1024:.0f} KB per client (its own bottom weights, optimizer "
              "state, meters and thread); the data and the schedule are shared. Time grows with the number "
              "of turns: every turn opens a session (hello, a one-row handshake) with the server."]
    from _md import write_section

    write_section("scale", "\n".join(lines))


if __name__ == "__main__":
    main()
