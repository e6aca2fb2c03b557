"""Benchmarks: split training over loopback gRPC with mutual TLS against the same model trained
unsplit in one process, in the same run; and the bytes on the wire against the raw tensor bytes.

    .venv/bin/python bench/run.py            # writes BENCHMARKS.md

Speed is a ratio (split samples/s over unsplit samples/s) so it does not depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from _md import write_section
from splitlearn.distributed import launch
from splitlearn.models import build_segment
from splitlearn.runner import prepare, schedule
from splitlearn.engine import LOSSES

HERE = Path(__file__).parent
PLANS = {"MLP on digits": HERE / "plans" / "mlp_digits.toml", "CNN on 32x32x3 synthetic": HERE / "plans" / "cnn_synthetic.toml"}


def unsplit_samples_per_s(plan_path: Path, epochs: int) -> float:
    """The vanilla plan's bottom and top composed into one model, trained in this process on the
    same batches in the same order."""
    plan, setups, _ = prepare(plan_path, epochs=epochs)
    hospital = setups["hospital"]
    model = torch.nn.Sequential(build_segment(plan, "bottom"), build_segment(plan, "top"))
    opt_spec = plan.parties["hospital"].optimizer
    opt = torch.optim.SGD(model.parameters(), lr=opt_spec.lr, momentum=opt_spec.momentum)
    (x_name,) = [k for k in hospital.inputs if k != "hospital.y"]
    x, y = hospital.inputs[x_name], hospital.inputs["hospital.y"]
    loss_fn = LOSSES[plan.losses["digit"].kind]
    seconds, samples, first = 0.0, 0, True
    for step in schedule(plan, hospital.splits):
        if step.mode != "train":
            continue
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[step.rows]), y[step.rows]).backward()
        opt.step()
        if not first:  # steady state: the first step warms up, as in the split run
            seconds += time.perf_counter() - t0
            samples += len(step.rows)
        first = False
    return samples / seconds


def split_figures(plan_path: Path, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = launch(plan_path, Path(out), epochs=epochs)
    parties = result["parties"]
    # steady state: without the first step, which counts FLOPs and warms up (both sides alike)
    seconds = max(p["train_s"] - p["first_step_s"] for p in parties.values())
    samples = parties["hospital"]["train_samples"] - parties["hospital"]["first_step_samples"]
    wire = {"bytes": 0, "payload": 0, "messages": 0}
    for p in parties.values():
        for row in p["sent"]:
            if row["wire"]:
                for k in wire:
                    wire[k] += row[k]
    return {"samples_per_s": samples / seconds, **wire}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=None, help="override the benchmark plans' epochs")
    args = ap.parse_args()
    rows = []
    for label, path in PLANS.items():
        epochs = args.epochs
        unsplit = unsplit_samples_per_s(path, epochs or 1)  # warm-up is part of neither: first run below
        split = split_figures(path, epochs)
        unsplit = unsplit_samples_per_s(path, epochs)
        overhead = (split["bytes"] - split["payload"]) / split["payload"]
        rows.append((label, split["samples_per_s"], unsplit, split["samples_per_s"] / unsplit, split["payload"],
                     split["bytes"], overhead, split["messages"]))
        print(f"{label}: split {split['samples_per_s']:.0f}/s, unsplit {unsplit:.0f}/s, "
              f"ratio {split['samples_per_s'] / unsplit:.3f}, framing {100 * overhead:.3f}%")
    lines = [
        "## Split training over loopback gRPC with mutual TLS vs. unsplit training in one process",
        "",
        "Written by `.venv/bin/python bench/run.py`. Machine: " + f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        "Vanilla plan (hospital: bottom + labels; server: top + loss), one operating-system process per",
        "party, TLS with throw-away certificates, identity codec. *Unsplit*: the same bottom and top",
        "composed in one process, same batches, same optimizer. Samples/s count training steps only,",
        "after the first (which warms up and, in the split run, counts FLOPs once per batch shape).",
        "Bytes are the serialised splitlearn envelopes (activations, gradients, labels, handshake);",
        "framing is envelope bytes over tensor bytes, minus one (gRPC/HTTP2/TLS framing below it is",
        "not counted).",
        "",
        "| model | split samples/s | unsplit samples/s | split / unsplit | tensor bytes | envelope bytes | framing overhead | messages |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s, u, r, payload, nbytes, ov, msgs in rows:
        lines.append(f"| {label} | {s:.0f} | {u:.0f} | {r:.3f} | {payload:,} | {nbytes:,} | {100 * ov:.3f}% | {msgs:,} |")
    lines += ["", "Targets: CNN split/unsplit at least 0.85; framing overhead at most 2%.", "",
              "Reading the figures: framing is far below its target. The speed target is not met on this",
              "2-core machine: each step moves a 2 MB activation and its gradient through about five copies",
              "a side (tensor bytes, protobuf, TLS) and the two party processes compete for the same two",
              "cores (their compute time, from result.json, is 1.5-2x that of the same split run with both",
              "parties in one process, which itself reaches about 0.8 of unsplit speed). For the MLP a step",
              "computes for well under a millisecond, so message latency dominates. An earlier figure of",
              "1.15 for the CNN was measured while other jobs loaded the machine and is void.", ""]
    write_section("network", "\n".join(lines))
    print("wrote the network section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
