"""Benchmarks: split training over loopback gRPC with mutual TLS against the same model trained
unsplit in one process, in the same run; and the bytes on the wire against the raw tensor bytes.

    .venv/bin/python bench/run.py            # writes BENCHMARKS.md

Speed is a ratio (split samples/s over unsplit samples/s) so it does not depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _md import write_section
from splitlearn.launch.processes import launch
from splitlearn.models import build_segment
from splitlearn.run.setup import prepare, schedule
from splitlearn.core.losses import LOSSES

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
    ap.add_argument("--repeats", type=int, default=3, help="split and unsplit runs per model, alternated (median)")
    args = ap.parse_args()
    rows = []
    for label, path in PLANS.items():
        epochs = args.epochs
        unsplit_samples_per_s(path, epochs or 1)  # warm-up, part of no figure
        splits, unsplits = [], []
        for _ in range(args.repeats):  # alternated, so a slower spell of the machine hits both
            splits.append(split_figures(path, epochs))
            unsplits.append(unsplit_samples_per_s(path, epochs))
        s_rates = sorted(r["samples_per_s"] for r in splits)
        split, unsplit = splits[0], statistics.median(unsplits)
        s_med = statistics.median(s_rates)
        ratios = sorted(a["samples_per_s"] / b for a, b in zip(splits, unsplits))
        overhead = (split["bytes"] - split["payload"]) / split["payload"]
        rows.append((label, s_med, unsplit, s_med / unsplit, split["payload"], split["bytes"], overhead,
                     split["messages"], ratios))
        print(f"{label}: split {s_med:.0f}/s, unsplit {unsplit:.0f}/s, ratio {s_med / unsplit:.3f} "
              f"(runs {', '.join(f'{r:.3f}' for r in ratios)}), framing {100 * overhead:.3f}%")
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
        f"Each model: {args.repeats} split and {args.repeats} unsplit runs, alternated; medians, and the",
        "ratio of each split run to the unsplit run after it.",
        "",
        "| model | split samples/s | unsplit samples/s | split / unsplit | per run | tensor bytes | envelope bytes | framing overhead | messages |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for label, s, u, r, payload, nbytes, ov, msgs, ratios in rows:
        lines.append(f"| {label} | {s:.0f} | {u:.0f} | {r:.3f} | {', '.join(f'{x:.2f}' for x in ratios)} "
                     f"| {payload:,} | {nbytes:,} | {100 * ov:.3f}% | {msgs:,} |")
    lines += ["", "Targets: CNN split/unsplit at least 0.85; framing overhead at most 2%.", "",
              "Reading the figures: framing is far below its target. The speed target is not met on this",
              "2-core machine. What was measured on the way (CNN, same machine):",
              "",
              "- The same split written in plain PyTorch in one process (bottom, detach, top, backward, the",
              "  gradient back, even through a bytes round trip) runs at the unsplit speed: cutting the",
              "  model costs nothing by itself.",
              "- Encoding a 2 MB activation took 5 ms instead of 0.23 ms because glibc mapped and unmapped",
              "  every large buffer; party processes now keep them on the heap (`tune_allocator`).",
              "- Idle math threads of the waiting party spun on the cores the computing party needed;",
              "  party processes now sleep them (`OMP_WAIT_POLICY=PASSIVE`): split 1130-1290 -> 1330-1460 samples/s.",
              "- What is left: each party's compute time is about 1.5x that of the same operations in the",
              "  unsplit process. Both processes and their gRPC/TLS threads share two cores, and the",
              "  activations and gradients cross between processes every step (with one math thread per",
              "  process the split is slower still). Whether 0.85 is reached with a core or two per party",
              "  could not be measured here: this machine has two.",
              "",
              "For the MLP a step computes for well under a millisecond, so message latency dominates.", ""]
    write_section("network", "\n".join(lines))
    print("wrote the network section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
