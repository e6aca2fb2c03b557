"""Split training on real links: synchronous and pipelined steps over loopback and over emulated
wide-area links, against unsplit training of the same model in one process, in the same run.

    .venv/bin/python bench/pipeline.py               # writes the pipeline section of BENCHMARKS.md
    .venv/bin/python bench/pipeline.py --repeats 1 --models bench

Each split run is `splitlearn run` (one process per party, mutual TLS), its connections through
the emulated link of :mod:`splitlearn.wire.transport.slowlink` where one is named. Samples/s count the
training steps after the first (which warms up and counts FLOPs). Repeats are alternated (every
setting once, then every setting again) and the figures are medians. Beside each row the
physical bound: min(unsplit samples/s, link bandwidth / wire bytes per sample in one direction).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _md import write_section
from run import unsplit_samples_per_s

HERE = Path(__file__).parent
MODELS = {"bench": ("bench CNN (32x32x3, 32x16x16 crossing)", HERE / "plans" / "cnn_synthetic.toml", 32 * 16 * 16),
          "large": ("larger CNN (six convolutions, 4096 crossing)", HERE / "plans" / "cnn_large.toml", 4096)}
LINKS = {"loopback": None, "20 ms / 1 Gbit/s": "20ms,1gbit", "50 ms / 100 Mbit/s": "50ms,100mbit"}
CODECS = {"identity": 4.0, "float16": 2.0, "int8": 1.0}  # bytes per value on the wire
PIPELINES = [1, 2, 4, 8]
READING = (HERE / "pipeline_reading.md").read_text() if (HERE / "pipeline_reading.md").exists() else ""


def plan_text(path: Path, pipeline: int, codec: str) -> str:
    text = path.read_text().replace("seed = 0\n", f"seed = 0\npipeline = {pipeline}\n", 1)
    text = text.replace("epochs = 2\n", "epochs = 1\n", 1)
    if codec != "identity":
        text += f'\n[wires.bottom]\ncodec = "{codec}"\ngrad_codec = "{codec}"\n'
    return text


def split_run(text: str, link: str | None) -> dict:
    from splitlearn.launch.processes import launch

    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.toml"
        plan.write_text(text)
        result = launch(plan, Path(tmp) / "run", link=link)
    parties = result["parties"]
    seconds = max(p["train_s"] - p["first_step_s"] for p in parties.values())
    samples = parties["hospital"]["train_samples"] - parties["hospital"]["first_step_samples"]
    h, s = parties["hospital"], parties["server"]
    return {"samples_per_s": samples / seconds, "seconds": seconds,
            "client_compute": h["compute_s"], "client_wait": h["wait_s"],
            "server_compute": s["compute_s"], "server_wait": s["wait_s"], "train_s": max(h["train_s"], s["train_s"])}


def bound(unsplit: float, link: str | None, values: int, codec: str) -> float:
    if link is None:
        return unsplit
    from splitlearn.wire.transport.slowlink import parse_link

    _, bandwidth = parse_link(link)
    per_sample = values * CODECS[codec] + (8 / 64 if codec == "int8" else 0)  # int8: 8 bytes of scale per tensor
    return min(unsplit, bandwidth / 8 / per_sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="bench,large")
    ap.add_argument("--links", default=",".join(LINKS))
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--pipelines", default=",".join(map(str, PIPELINES)))
    args = ap.parse_args()
    t_start = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    links = [k for k in args.links.split(",") if k]
    codecs = [c for c in args.codecs.split(",") if c]
    pipelines = [int(k) for k in args.pipelines.split(",") if k]
    settings = [(m, ln, c, k) for m in models for ln in links for c in codecs for k in pipelines]
    runs: dict[tuple, list[dict]] = {s: [] for s in settings}
    unsplit: dict[str, list[float]] = {m: [] for m in models}
    for m in models:
        unsplit_samples_per_s(MODELS[m][1], 1)  # warm-up, part of no figure
    for r in range(args.repeats):
        for m in models:
            unsplit[m].append(unsplit_samples_per_s(MODELS[m][1], 1))
            for s in [s for s in settings if s[0] == m]:
                _, link, codec, k = s
                runs[s].append(split_run(plan_text(MODELS[m][1], k, codec), LINKS[link]))
                got = runs[s][-1]
                print(f"[{r}] {m} {link} {codec} K={k}: {got['samples_per_s']:.0f}/s "
                      f"(unsplit {unsplit[m][-1]:.0f}/s)", flush=True)
    lines = [
        "## Pipelined split steps on loopback and on emulated wide-area links",
        "",
        f"Written by `.venv/bin/python bench/pipeline.py` in {time.perf_counter() - t_start:.0f} s. Machine: "
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}.",
        "",
        "Vanilla split (hospital: convolutions + labels; server: the rest + loss), `splitlearn run` (one process per "
        "party, mutual TLS), batch 64, one epoch; *links*: every connection through `splitlearn.wire.transport.slowlink` "
        "(half the round trip each way, the bandwidth each way). *Unsplit*: the same model in one process, same "
        "batches. Samples/s: training steps after the first; medians of "
        f"{args.repeats} alternated repeats. *Bound*: min(unsplit samples/s, bandwidth / wire bytes per sample one "
        "way). The codec is on the activation and on its gradient. *K*: `[train] pipeline` (1: synchronous). "
        "*Client compute, wait*: the client's compute seconds (encoding included) and seconds blocked on the link, "
        "over the training steps' seconds.",
        "",
    ]
    for m in models:
        u = statistics.median(unsplit[m])
        lines += [f"### {MODELS[m][0]}: unsplit {u:.0f} samples/s", "",
                  "| link | codec | K | samples/s | / unsplit | bound | / bound | client compute, wait |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for link in links:
            for codec in codecs:
                for k in pipelines:
                    rs = runs[(m, link, codec, k)]
                    sps = statistics.median(r["samples_per_s"] for r in rs)
                    b = bound(u, LINKS[link], MODELS[m][2], codec)
                    comp = statistics.median(r["client_compute"] / r["train_s"] for r in rs)
                    wait = statistics.median(r["client_wait"] / r["train_s"] for r in rs)
                    lines.append(f"| {link} | {codec} | {k} | {sps:.0f} | {sps / u:.2f} | {b:.0f} | {sps / b:.2f} "
                                 f"| {comp:.0%}, {wait:.0%} |")
        lines.append("")
    lines.append(READING)
    write_section("pipeline", "\n".join(lines))
    print("wrote the pipeline section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
