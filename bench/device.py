"""A device per party: the user's ResNet (examples/resnet.toml) split in one process, every
party on the CPU, every party on CUDA, and the hospital on the CPU with the server on CUDA;
beside each, the unsplit ResNet trained on the same device, same batches, in the same run.

    .venv/bin/python bench/device.py [--epochs 2] [--width 64]   # writes BENCHMARKS.md (needs CUDA)

Figures: split samples/s over unsplit samples/s on the same device (the cost of splitting),
CUDA over CPU samples/s, and the largest weight difference between the CPU and CUDA runs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _md import write_section
import splitlearn
from splitlearn.models import build_network
from splitlearn.run.setup import prepare, schedule

PLAN = Path(__file__).resolve().parents[1] / "examples" / "resnet.toml"


def _plan(epochs: int, width: int, hospital: str, server: str) -> splitlearn.Plan:
    plan = splitlearn.load_plan(PLAN).with_train(epochs=epochs)
    nets = {"resnet": plan.networks["resnet"].model_copy(update={"args": {"width": width}})}
    parties = {"hospital": plan.parties["hospital"].model_copy(update={"device": hospital}),
               "server": plan.parties["server"].model_copy(update={"device": server})}
    return plan.replace(networks=nets, parties=parties)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def split_run(plan: splitlearn.Plan) -> tuple[float, dict[str, torch.Tensor]]:
    steps = sum(1 for s in schedule(plan, prepare(plan)[1]["hospital"].splits) if s.mode == "train")
    t0 = time.perf_counter()
    result = splitlearn.train(plan)
    _sync()
    seconds = time.perf_counter() - t0
    return steps * plan.train.batch_size / seconds, result.model.state_dict()


def unsplit_run(plan: splitlearn.Plan, device: str) -> float:
    plan, setups, _ = prepare(plan)
    h = setups["hospital"]
    model = build_network(plan, "resnet").to(device)
    o = plan.parties["hospital"].optimizer
    opt = torch.optim.Adam(model.parameters(), lr=o.lr)
    x, y = h.inputs["hospital.x"], h.inputs["hospital.y"]
    t0, samples = time.perf_counter(), 0
    for s in schedule(plan, h.splits):
        if s.mode != "train":
            continue
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s.rows].to(device)), y[s.rows].to(device)).backward()
        opt.step()
        samples += len(s.rows)
    _sync()
    return samples / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (BENCHMARKS.md unchanged)")
        sys.exit(0)
    rows, states = [], {}
    for label, hosp, serv, ref in [("CPU, CPU", "cpu", "cpu", "cpu"), ("CUDA, CUDA", "cuda", "cuda", "cuda"),
                                    ("CPU, CUDA", "cpu", "cuda", "cuda")]:
        plan = _plan(args.epochs, args.width, hosp, serv)
        split_run(_plan(1, args.width, hosp, serv))  # warm-up (CUDA context, kernels)
        sps, states[label] = split_run(plan)
        ref_sps = unsplit_run(plan, ref)
        rows.append((label, sps, ref_sps))
    cpu = rows[0][1]
    diff = max((states["CPU, CPU"][k].double() - states["CUDA, CUDA"][k].cpu().double()).abs().max().item()
               for k in states["CPU, CPU"] if states["CPU, CPU"][k].is_floating_point())
    lines = [f"## A device per party: {torch.cuda.get_device_name(0)}", "",
             f"`examples/resnet.toml` at width {args.width}, {args.epochs} epochs in one process (`bench/device.py`; "
             f"torch {torch.__version__}, {platform.machine()}). Unsplit: the same ResNet on the server's device, "
             "same batches.", "",
             "| hospital, server | split samples/s | unsplit samples/s | split / unsplit | vs. all on CPU |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {lab} | {s:.0f} | {r:.0f} | {s / r:.2f} | {s / cpu:.2f} |" for lab, s, r in rows]
    lines += ["", f"Largest weight difference, all on CPU vs. all on CUDA after training: {diff:.2e} "
              "(CUDA kernels round differently; on one device the split run equals the unsplit one)."]
    write_section("device", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
