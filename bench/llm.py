"""Split LoRA fine-tuning of a small Llama-style causal language model on the CPU: tokens per second split
against unsplit, bytes per token on the activation wires per codec, and each party's memory against the
whole model's, every figure measured in the same run.

    .venv/bin/python bench/llm.py                 # writes the "llm" section of BENCHMARKS.md
    .venv/bin/python bench/llm.py --quick --out /tmp/b.md   # tiny sizes, seconds (tests/test_bench_llm.py)

The model is saved with ``save_pretrained`` to a temporary folder; the data are random token ids of random
lengths (right padding; each step's rows padded to their own longest, as ``splitlearn.data.text`` does).
*U-shaped*: the hospital holds the embeddings and the first block, the server the middle blocks, the hospital
the last block, the norm, the head and the labels (``splitlearn.train``, in-process parties). *One segment*: the
whole model at the hospital through the same engine. *Unsplit*: a plain PyTorch loop over the same batches with
the same ``peft`` LoRA adapters (``splitlearn.models.lora.add_lora``: the same initial adapters) and AdamW. Every
setting runs once per repeat, alternated; figures are medians and their spread (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _md import FILE, write_section

SIZES = {  # model and data of the full run and of --quick
    "full": {"hidden": 256, "intermediate": 688, "layers": 6, "heads": 4, "vocab": 2000, "lengths": (64, 128),
             "rows": 160, "batch": 8, "repeats": 5, "cuts": ("model.layers.0", "model.layers.4")},
    "quick": {"hidden": 32, "intermediate": 64, "layers": 4, "heads": 2, "vocab": 100, "lengths": (8, 16),
              "rows": 40, "batch": 8, "repeats": 1, "cuts": ("model.layers.0", "model.layers.2")},
}
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LR, SEED, TEST_FRACTION = 1e-3, 0, 0.2
CODECS = ("float32", "bfloat16", "int8")
SETTINGS = ("unsplit", "one segment", *(f"U-shaped {c}" for c in CODECS))


def save_model(folder: Path, size: dict) -> int:
    """A randomly initialised Llama-style causal LM saved to ``folder``; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                      num_key_value_heads=size["heads"], pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def token_arrays(size: dict) -> dict[str, np.ndarray]:
    """Random token ids of random lengths, right-padded: ``input_ids``, ``attention_mask``, ``lm_labels``."""
    g = np.random.default_rng(SEED)
    lo, hi = size["lengths"]
    lengths = g.integers(lo, hi + 1, size["rows"])
    mask = (np.arange(hi)[None] < lengths[:, None]).astype(np.int64)
    ids = g.integers(1, size["vocab"], (size["rows"], hi)) * mask
    return {"input_ids": ids, "attention_mask": mask, "lm_labels": np.where(mask == 1, ids, -100)}


def plan_of(folder: Path, arrays: dict, size: dict, setting: str) -> dict:
    """The plan of an engine setting: ``one segment`` or ``U-shaped CODEC``."""
    from splitlearn.core.specs import DataSpec

    hi = size["lengths"][1]
    train = {"epochs": 1, "batch_size": size["batch"], "eval_batch_size": size["batch"], "seed": SEED}
    opt = {"optimizer": {"name": "adamw", "lr": LR}}
    holds = {k: k for k in arrays}
    ins = ["hospital.input_ids", "hospital.attention_mask"]
    plan: dict[str, Any] = {"name": "llm", "data": DataSpec.of_arrays(arrays, test_fraction=TEST_FRACTION),
                            "train": train, "networks": {"lm": {"hf": {"folder": str(folder), "task": "causal_lm"}}},
                            "losses": {"lm": {"input": "top", "target": "hospital.lm_labels", "kind": "causal_lm"}}}
    if setting == "one segment":
        plan["parties"] = {"hospital": {**opt, "holds": holds}}
        plan["segments"] = {"top": {"party": "hospital", "inputs": ins, "merge": "module", "network": "lm",
                                    "lora": LORA}}
        return plan
    outs = [{"name": "hidden", "vary": {1: hi}}, {"name": "mask", "vary": {1: hi}}]
    bottom, middle = size["cuts"]
    plan["parties"] = {"hospital": {**opt, "holds": holds}, "server": opt}
    plan["segments"] = {
        "bottom": {"party": "hospital", "inputs": ins, "merge": "module", "network": "lm", "cut": bottom,
                   "outputs": outs, "lora": LORA},
        "middle": {"party": "server", "inputs": ["bottom"], "network": "lm", "cut": middle, "outputs": outs,
                   "lora": LORA},
        "top": {"party": "hospital", "inputs": ["middle:hidden", "hospital.attention_mask"], "merge": "module",
                "network": "lm", "lora": LORA}}
    codec = setting.rpartition(" ")[2]
    plan["wires"] = {w: {"codec": codec, "grad_codec": codec} for w in ("bottom", "middle")}
    return plan


def schedule(arrays: dict, size: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The rows of each training step and of each evaluation step, as every party derives them."""
    from splitlearn.data.split import batches, train_test_split_ids

    train, test = train_test_split_ids(np.arange(size["rows"]), TEST_FRACTION, SEED)
    return ([train[b] for b in batches(len(train), size["batch"], SEED, 0)],
            [test[b] for b in batches(len(test), size["batch"], SEED, 0, shuffle=False)])


def tokens(arrays: dict, rows: np.ndarray) -> tuple[int, int]:
    """Real tokens of ``rows`` and the positions they take padded to their longest."""
    lengths = arrays["attention_mask"][rows].sum(1)
    return int(lengths.sum()), int(len(rows) * lengths.max())


def unsplit_run(folder: Path, arrays: dict, steps: list[np.ndarray]) -> dict:
    """The same fine-tuning in a plain loop: tokens/s over the steps after the first, and each step's loss."""
    from transformers import AutoModelForCausalLM

    from splitlearn.models.build import network_seed
    from splitlearn.models.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    add_lora(model, LORA, network_seed(SEED, "lm"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    losses, seconds, counted = [], 0.0, 0
    for i, rows in enumerate(steps):
        n = int(t["attention_mask"][rows].sum(1).max())
        t0 = time.perf_counter()
        out = model(input_ids=t["input_ids"][rows, :n], attention_mask=t["attention_mask"][rows, :n],
                    labels=t["lm_labels"][rows, :n])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if i:
            seconds += time.perf_counter() - t0
            counted += tokens(arrays, rows)[0]
        losses.append(out.loss.item())
    return {"tokens_per_s": counted / seconds, "losses": losses}


def engine_run(folder: Path, arrays: dict, size: dict, setting: str, steps: list[np.ndarray]) -> dict:
    """One ``splitlearn.train`` run: tokens/s over the training steps after the first, its meter and losses."""
    import splitlearn

    result = splitlearn.train(plan_of(folder, arrays, size, setting), timeout=300)
    parties = result["parties"]
    seconds = max(p["train_s"] - p["first_step_s"] for p in parties.values())
    fig = {"tokens_per_s": sum(tokens(arrays, r)[0] for r in steps[1:]) / seconds,
           "losses": [v for _, v in result["metrics"]["train_loss_steps"]],
           "compute": {n: p["compute_s"] for n, p in parties.items()},
           "wait": {n: p["wait_s"] for n, p in parties.items()}, "train_s": seconds}
    masks = {w["name"] for w in result["wires"] if w["name"].startswith("bottom:mask")}
    hidden = {w["name"] for w in result["wires"] if w["carries"] == "activation"} - masks
    for key, wires in (("hidden", hidden), ("mask", masks)):
        for d in ("forward", "backward"):
            sent = [row for p in parties.values() for row in p["sent"]
                    if row["wire"] in wires and row["direction"] == d]
            fig[f"{key}_{d}"] = sum(row["bytes"] for row in sent)
            fig[f"{key}_{d}_payload"] = sum(row["payload"] for row in sent)
    return fig


def start_memory(folder: Path, cuts: tuple[str, ...], repeats: int) -> subprocess.Popen:
    """The process that measures, per build (each piece, the whole model) and repeat, the peak and resident RSS it
    adds and its weight bytes (``_measure``). It imports, then waits for :func:`memory` to tell it that ``folder``
    holds the model (:func:`go`)."""
    cmd = [sys.executable, __file__, "--measure-memory", str(folder), "--cuts", ",".join(cuts),
           "--repeats", str(repeats)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go(proc: subprocess.Popen) -> None:
    """Tell the memory process that the model folder is written."""
    proc.stdin.write("go\n")
    proc.stdin.flush()  # (communicate closes it)


def memory(proc: subprocess.Popen) -> dict[str, list[dict]]:
    """What :func:`start_memory`'s process measured."""
    out, err = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the memory measurement failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(folder: Path, cuts: tuple[str, ...], repeats: int) -> dict[str, list[dict]]:
    """In this otherwise idle process, after the imports: for each build a forked child builds the same kind of
    module from a tiny model first (so the library code it runs, mapped but not yet resident in a child, and the
    lazy imports are paged in before the baseline), then takes ``ru_maxrss`` and the resident set, builds, reads
    every weight once, and reports the rises."""
    torch.set_num_threads(1)  # no math thread pool to cross the fork
    import transformers

    from splitlearn.models.hfload import load_piece

    def build(what: str, where: Path, cut: tuple[str, ...]) -> torch.nn.Module:
        if what == "whole":
            return transformers.AutoModelForCausalLM.from_pretrained(str(where))
        return load_piece(where, "causal_lm", cut, int(what)).hf

    whats = ["whole", *map(str, range(len(cuts) + 1))]
    out: dict[str, list[dict]] = {w: [] for w in whats}
    with tempfile.TemporaryDirectory() as tiny:
        tiny_cuts = tuple(f"model.layers.{i}" for i in range(len(cuts)))
        save_model(Path(tiny), {**SIZES["quick"], "hidden": 8, "intermediate": 8, "layers": len(cuts) + 1,
                                "vocab": 10})
        if sys.stdin.readline().strip() != "go":
            raise RuntimeError("the benchmark did not say that the model folder is written")
        for _ in range(repeats):
            for what in whats:
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: measure, report, leave without running the parent's exit handlers
                    os.close(read)
                    build(what, Path(tiny), tiny_cuts)  # faults in the code it runs (shared with the parent)
                    before, resident = _maxrss_bytes(), _resident_bytes()
                    module = build(what, folder, cuts)
                    with torch.no_grad():  # every weight read once, as a forward step reads them (a mapped file's
                        weights = sum(p.numel() * p.element_size() for p in module.parameters() if p.sum() is not None)
                    peak, held = _maxrss_bytes() - before, _resident_bytes() - resident  # pages count once read)
                    os.write(write, json.dumps({"peak": peak, "held": held, "weights": weights}).encode())
                    os._exit(0)
                os.close(write)
                with os.fdopen(read) as f:
                    text = f.read()
                _, status = os.waitpid(pid, 0)
                if status or not text:
                    raise RuntimeError(f"building {what} in a child process failed (status {status})")
                out[what].append(json.loads(text))
    return out


def mbs(xs: list[int]) -> str:
    """Median and spread of byte counts in MB: ``12.3 (12.1-12.4)``."""
    m, lo, hi = (v / 1024 / 1024 for v in (statistics.median(xs), min(xs), max(xs)))
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ({lo:.1f}-{hi:.1f})"


def med(xs: list[float]) -> str:
    """Median and spread of ``xs``: ``1234 (1200-1250)``."""
    m = statistics.median(xs)
    return f"{m:.0f}" if len(xs) == 1 else f"{m:.0f} ({min(xs):.0f}-{max(xs):.0f})"


def measure(size: dict, quick: bool) -> dict[str, Any]:
    """Every figure of the section, in one run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        proc = start_memory(folder, size["cuts"], size["repeats"]) if quick else None  # beside: only timings suffer
        params = save_model(folder, size)
        if proc is not None:
            go(proc)
        arrays = token_arrays(size)
        steps, evals = schedule(arrays, size)
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        if not quick:  # warm-up, part of no figure
            unsplit_run(folder, arrays, steps[:2])
            engine_run(folder, arrays, size, "U-shaped float32", steps)
        for r in range(size["repeats"]):
            for s in SETTINGS:
                runs[s].append(unsplit_run(folder, arrays, steps) if s == "unsplit"
                               else engine_run(folder, arrays, size, s, steps))
                print(f"[{r}] {s}: {runs[s][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        if proc is None:
            go(proc := start_memory(folder, size["cuts"], size["repeats"]))
        mem = memory(proc)
    train_tok = [tokens(arrays, b) for b in steps]
    eval_tok = [tokens(arrays, b) for b in evals]
    return {"params": params, "runs": runs, "memory": mem, "train_tokens": sum(t for t, _ in train_tok),
            "forward_tokens": sum(t for t, _ in train_tok + eval_tok),
            "forward_positions": sum(p for _, p in train_tok + eval_tok),
            "backward_positions": sum(p for _, p in train_tok), "handshake_positions": tokens(arrays, np.arange(1))[1],
            "train_rows": sum(len(b) for b in steps),
            "forward_rows": sum(len(b) for b in steps + evals), "steps": len(steps)}


def figures(m: dict, size: dict) -> dict[str, Any]:
    """The section's figures from the measurements: tokens/s and ratios, bytes per token, memory."""
    runs, unsplit = m["runs"], m["runs"]["unsplit"]
    speed = {s: {"tokens_per_s": [r["tokens_per_s"] for r in rs],
                 "ratio": [r["tokens_per_s"] / u["tokens_per_s"] for r, u in zip(rs, unsplit)],
                 "loss_gap": max(abs(a - b) for r, u in zip(rs, unsplit) for a, b in zip(r["losses"], u["losses"]))}
             for s, rs in runs.items()}
    wires = {}
    for c in CODECS:
        r = runs[f"U-shaped {c}"][0]  # bytes are the same every repeat
        wires[c] = {"forward_per_token": (r["hidden_forward"] + r["mask_forward"]) / m["forward_tokens"],
                    "backward_per_token": r["hidden_backward"] / m["train_tokens"],
                    "forward_per_sample": (r["hidden_forward"] + r["mask_forward"]) / m["forward_rows"],
                    "backward_per_sample": r["hidden_backward"] / m["train_rows"],
                    "hidden_forward": r["hidden_forward"], "hidden_backward": r["hidden_backward"],
                    "mask_forward": r["mask_forward"], "hidden_forward_payload": r["hidden_forward_payload"],
                    "hidden_backward_payload": r["hidden_backward_payload"]}
    per_position = 2 * size["hidden"] * 4  # two hidden-state wires, float32
    exact = {"forward": (m["forward_positions"] + m["handshake_positions"]) * per_position,
             "backward": m["backward_positions"] * per_position}
    mem = {w: {"peak": [x["peak"] for x in xs], "held": [x["held"] for x in xs], "weights": xs[0]["weights"]}
           for w, xs in m["memory"].items()}
    return {"speed": speed, "wires": wires, "memory": mem, "fp32_payload_expected": exact,
            "fp32_payload_exact": all(wires["float32"][f"hidden_{d}_payload"] == v for d, v in exact.items())}


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages of this machine."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def section(m: dict, f: dict, size: dict, head: str) -> str:
    """The markdown of the section."""
    mb = 1024 * 1024
    sp, w, mem = f["speed"], f["wires"], f["memory"]
    pieces = [k for k in mem if k != "whole"]
    owners = ["hospital: embeddings + blocks up to " + size["cuts"][0]] + [
        f"server: blocks to {size['cuts'][1]}"] + ["hospital: the rest, norm, head"]
    lines = [head, "",
             f"Model: Llama-style causal LM, {m['params']:,} parameters (hidden {size['hidden']}, intermediate "
             f"{size['intermediate']}, {size['layers']} blocks, {size['heads']} heads, vocabulary {size['vocab']}, "
             "untied head), saved with `save_pretrained`. LoRA r 8, alpha 16 on q_proj and v_proj, AdamW lr 1e-3. "
             f"Data: {size['rows']} rows of random token ids, lengths uniform in {size['lengths'][0]}-"
             f"{size['lengths'][1]}, test fraction {TEST_FRACTION}; batch {size['batch']}, one epoch "
             f"({m['steps']} training steps, {m['train_tokens']:,} real tokens). U-shaped cuts after "
             f"`{size['cuts'][0]}` and `{size['cuts'][1]}`.", "",
             "### Tokens per second of a LoRA fine-tuning step", "",
             "Real (unpadded) tokens of the training steps after the first, over their seconds (engine runs: the "
             "slowest party's `train_s - first_step_s` from the run's meter; unsplit: the same steps timed in the "
             f"loop). {size['repeats']} alternated repeats: median (min-max); the ratio is each run's over the "
             "unsplit run of its repeat. *Loss gap*: the largest difference, over the steps, between a run's "
             "training loss and the unsplit loop's at the same step (same batches, same initial adapters).", "",
             "| setting | tokens/s | / unsplit | loss gap |", "|---|---:|---:|---:|"]
    for s in SETTINGS:
        r = sp[s]
        ratio = statistics.median(r["ratio"])
        spread = "" if len(r["ratio"]) == 1 else f" ({min(r['ratio']):.2f}-{max(r['ratio']):.2f})"
        lines.append(f"| {s} | {med(r['tokens_per_s'])} | {ratio:.2f}{spread} | {r['loss_gap']:.1e} |")
    one, split = (statistics.median(sp[s]["tokens_per_s"]) for s in ("one segment", "U-shaped float32"))
    unsplit = statistics.median(sp["unsplit"]["tokens_per_s"])
    lines += ["", f"Engine (one segment against unsplit): {one / unsplit:.2f}x; split (U-shaped float32 against one "
              f"segment): {split / one:.2f}x.", "",
              "Where the time goes, from each run's meter over the whole run (the training steps, the evaluation and "
              "the FLOP counts: the engine runs each segment, loss and stage backward under torch's FlopCounterMode the "
              "first time it meets a shape, so that FLOPs are exact per sequence length; with lengths drawn from "
              "64-128 that is most of this short run's steps, and the U-shaped plan has three segments and stages to "
              "count where the one segment has one: a cost paid once per length, not per step, in a longer run), "
              "medians: *compute* (each party's "
              "segments, losses, backward, optimizer and encoding of what it sends), *wait* (blocked on a message). "
              "*Other*: the longest party's compute + wait minus both parties' compute, the time neither computed "
              "(hand-offs between the parties' threads).", "",
              "| setting | hospital compute s | server compute s | compute sum s | / one segment | hospital wait s "
              "| other s |", "|---|---:|---:|---:|---:|---:|---:|"]
    ref, seen = None, {}
    for s in SETTINGS[1:]:
        rs = m["runs"][s]
        comp = {p: statistics.median(r["compute"][p] for r in rs) for p in rs[0]["compute"]}
        total = statistics.median(sum(r["compute"].values()) for r in rs)
        other = statistics.median(max(0.0, max(r["compute"][p] + r["wait"][p] for p in r["compute"])
                                      - sum(r["compute"].values())) for r in rs)  # (the meter rounds to 0.1 ms)
        ref = ref or total
        seen[s] = (total / ref, other, statistics.median(max(r["compute"][p] + r["wait"][p] for p in r["compute"])
                                                         for r in rs))
        lines.append(f"| {s} | {comp['hospital']:.2f} | {comp.get('server', 0.0):.2f} | {total:.2f} | "
                     f"{total / ref:.2f} | {statistics.median(r['wait']['hospital'] for r in rs):.2f} | "
                     f"{other:.2f} |")
    share, other, wall = seen["U-shaped float32"]
    lines += ["", ("Reading: in one process the split's time is compute. " if other < 0.05 * wall else "Reading: ")
              + f"The U-shaped float32 run's two parties compute {share:.2f}x what the one segment computes for the "
              f"same work, and for {other:.2f} s of its {wall:.1f} s neither computes. The codecs save bytes only "
              "here: no link is emulated (bench/pipeline.py measures links).", "",
              "### Bytes per token on the activation wires", "",
              "Metered bytes sent (envelopes) on the U-shaped plan's activation wires, codec and grad_codec on both "
              "(`[wires.bottom]`, `[wires.middle]`). Forward: the hidden states bottom->middle and middle->top plus "
              f"the attention mask (int64, always raw) bottom->middle, over the {m['forward_tokens']:,} real tokens "
              f"({m['forward_rows']} rows) of the training and evaluation steps; backward: the two hidden-state "
              f"gradients over the {m['train_tokens']:,} real tokens ({m['train_rows']} rows) of the training steps. "
              "Each step's rows are padded to their own longest: "
              f"{m['forward_positions'] / m['forward_tokens']:.3f} positions per real token forward, "
              f"{m['backward_positions'] / m['train_tokens']:.3f} backward.", "",
              "| codec | forward B/token | backward B/token | forward B/sample | backward B/sample | forward / float32 "
              "| of which mask B/token |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in CODECS:
        x = w[c]
        lines.append(f"| {c} | {x['forward_per_token']:,.1f} | {x['backward_per_token']:,.1f} | "
                     f"{x['forward_per_sample']:,.0f} | {x['backward_per_sample']:,.0f} | "
                     f"{x['forward_per_token'] / w['float32']['forward_per_token']:.3f} | "
                     f"{x['mask_forward'] / m['forward_tokens']:.1f} |")
    x, hs = w["float32"], m["handshake_positions"]
    lines += ["", f"Check: the float32 hidden-state payloads, {x['hidden_forward_payload']:,} bytes forward and "
              f"{x['hidden_backward_payload']:,} backward, {'are' if f['fp32_payload_exact'] else 'are NOT'} "
              f"exactly 2 wires x 4 bytes x {size['hidden']} x the padded positions ({m['forward_positions']:,} "
              f"forward, plus the handshake's one row of {hs}; {m['backward_positions']:,} backward). The handshake's "
              "bytes are in the forward figures.", "",
              "### Memory per party against the whole model", "",
              "*Weights*: the parameter bytes each built module holds (exact; the rotary tables, non-persistent "
              "buffers, are recomputed in every piece). Pieces are built with `splitlearn.models.hfload.load_piece` "
              "(which reads only its own tensors from the folder), the whole model with "
              "`AutoModelForCausalLM.from_pretrained` (which maps the safetensors file: its weights become resident "
              "as they are read, so every build is followed by reading each weight once, as a step would). *Peak*: "
              "the rise of `ru_maxrss` over building and that read; *resident*: the rise of the resident set after "
              "it. Each build in a child forked from an otherwise idle process after the imports, the child having "
              "built the same kind of module from a tiny model first (library code and lazy imports paged in before "
              f"its baseline). {size['repeats']} alternated repeats: median (min-max).", "",
              "| module | weights MB | / whole | peak RSS rise MB | / whole | resident rise MB | / whole |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    whole = mem["whole"]
    for k, label in [("whole", "whole model"), *((p, f"piece {p} ({owners[int(p)]})") for p in pieces)]:
        x = mem[k]
        lines.append(f"| {label} | {x['weights'] / mb:.2f} | {x['weights'] / whole['weights']:.3f} | "
                     f"{mbs(x['peak'])} | {statistics.median(x['peak']) / statistics.median(whole['peak']):.2f} | "
                     f"{mbs(x['held'])} | {statistics.median(x['held']) / statistics.median(whole['held']):.2f} |")
    total = sum(mem[p]["weights"] for p in pieces)
    lines += ["", f"The pieces' weights sum to {total:,} bytes, the whole model's {whole['weights']:,}.", ""]
    peak = {p: statistics.median(mem[p]["peak"]) / mem[p]["weights"] for p in pieces}
    held = {p: statistics.median(mem[p]["held"]) / mem[p]["weights"] for p in pieces}
    lines += [f"Reading: a piece stays resident at {min(held.values()):.2f}-{max(held.values()):.2f}x its weights, "
              f"but its peak while building is {min(peak.values()):.2f}-{max(peak.values()):.2f}x"
              + (" (`load_piece` maps the folder's file once and puts each tensor read from it in place of the "
                 "piece's empty one: a weight is held once).")
              + f" The whole model's peak is {statistics.median(whole['peak']) / whole['weights']:.2f}x its weights.",
              "",
              "GPU: no figures; no device was lent to this run.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and data (seconds; for the test)")
    ap.add_argument("--repeats", type=int, help="alternated repeats (default 5; --quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=FILE, help="the markdown file whose llm section is written")
    ap.add_argument("--measure-memory", type=Path, help=argparse.SUPPRESS)  # the memory subprocess
    ap.add_argument("--cuts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_memory is not None:
        print(json.dumps(_measure(args.measure_memory, tuple(args.cuts.split(",")), args.repeats or 1)))
        return {}
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.repeats:
        size["repeats"] = args.repeats
    torch.set_num_threads(args.threads)
    load_before, t0 = loadavg(), time.perf_counter()
    m = measure(size, args.quick)
    f = figures(m, size)
    import peft
    import transformers

    cmd = " ".join(["bench/llm.py", *(sys.argv[1:] if argv is None else argv)])
    head = "\n".join([
        "## Split LoRA fine-tuning of a causal language model (CPU)", "",
        f"Written by `.venv/bin/python {cmd}` in {time.perf_counter() - t0:.0f} s. Machine: {os.cpu_count()} cores "
        f"(shared), {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}; {args.threads} torch thread(s), "
        f"in-process parties. Load average (1, 5, 15 min) before: {load_before}; after: {loadavg()}."
        + (" --quick: the memory process runs beside the timed runs." if args.quick else "")])
    write_section("llm", section(m, f, size, head), args.out)
    print(f"wrote the llm section of {args.out}")
    return {"measured": m, "figures": f}


if __name__ == "__main__":
    main()
