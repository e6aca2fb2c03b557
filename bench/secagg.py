"""Costs of secure aggregation (``[clients] secure_aggregation = true``) and of the secure-sum merge
(``merge = "secure_sum"``), issue #28, each against the plain run of the same plan measured in the same run.

    .venv/bin/python bench/secagg.py                   # writes the "secagg" and "securesum" sections of BENCHMARKS.md
    .venv/bin/python bench/secagg.py --only securesum

Averaging rounds: ``examples/sequential.toml`` (digits, MLP 64-128-64-10) as SplitFed v2 and FedAvg with 10 and
100 clients, in-process, with and without secure aggregation, and 10 clients of SplitFed v2 over loopback gRPC with
mutual TLS (one process per party). Dropout recovery: one round of the protocol in this process (``privacy/secagg``'s
client and server, 100 clients, a vector the size of the FedAvg model) with 0, 1 and 10 clients dropped after
sharing their keys. Secure sum: ``vertical.toml`` and ``vertical_three.toml`` with ``sum`` and ``secure_sum``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from _md import write_section

ROOT = Path(__file__).resolve().parents[1]
SEQUENTIAL = ROOT / "examples" / "sequential.toml"
MACHINE = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def _at_federation(result: dict, fed: str) -> tuple[int, int]:
    """Bytes the federation received and sent on the averaging wires (``weights``, ``secagg``)."""
    rows = result["parties"][fed]
    return tuple(sum(r["bytes"] for r in rows[d] if r["wire"] in ("weights", "secagg")) for d in ("received", "sent"))


def _rounds_run(method: str, clients: int, secure: bool, epochs: int, launcher: str = "threads") -> dict:
    from splitlearn.api import train
    from splitlearn.clients.baselines import method_plan
    from splitlearn.core.load import load_plan

    plan = method_plan(load_plan(SEQUENTIAL).with_train(epochs=epochs), method, clients)
    if secure:
        plan = plan.with_clients(secure_aggregation=True)
    with tempfile.TemporaryDirectory() as tmp:
        if launcher == "processes":  # party processes read the plan from its file: the same plan, as TOML
            assert method == "splitfed_v2"
            plan = Path(tmp) / "plan.toml"
            plan.write_text(SEQUENTIAL.read_text().replace("epochs = 8", f"epochs = {epochs}")
                            .replace('schedule = "sequential"', 'schedule = "splitfed_v2"'
                                     + ("\nsecure_aggregation = true" if secure else ""))
                            .replace("count = 10", f"count = {clients}"))
        t0 = time.perf_counter()
        result = train(plan, launcher=launcher, out=Path(tmp) / "run" if launcher == "processes" else None)
        seconds = time.perf_counter() - t0
    fed = result["schedule"]["federation"]
    received, sent = _at_federation(result, fed)
    rounds = epochs  # local_epochs = 1: one round an epoch
    return {"method": method, "clients": clients, "secure": secure, "seconds": seconds, "rounds": rounds,
            "received": received / rounds, "sent": sent / rounds, "accuracy": result["metrics"]["test_accuracy"],
            "skipped": len(result["skipped"])}


def _recovery(clients: int, dropped: int, length: int) -> dict:
    """One round of the protocol in this process, ``dropped`` clients gone after sharing: seconds per phase."""
    from splitlearn.privacy.secagg import SecAggClient, SecAggServer, decode, default_threshold, encode, seeded_bytes

    names = [f"c{i}" for i in range(clients)]
    t = default_threshold(clients)
    rng = np.random.default_rng(0)
    xs = {n: rng.normal(size=length) for n in names}
    ctx = b"bench round"
    made = {n: SecAggClient(n, ctx, t, seeded_bytes(i)) for i, n in enumerate(names)}
    server = SecAggServer(names, t, length, ctx)
    times = {}
    t0 = time.process_time()
    for n in names:
        server.add_keys(n, made[n].advertise())
    roster = server.close_keys()
    for n in names:
        server.add_shares(n, made[n].share(roster))
    routed = server.close_shares()
    times["keys and shares"] = time.process_time() - t0
    gone = set(names[:dropped])
    t0 = time.process_time()
    for n in names:
        if n not in gone:
            server.add_masked(n, made[n].mask(routed[n], encode(xs[n], 1 / clients)))
    times["masking"] = time.process_time() - t0
    t0 = time.process_time()
    survivors, lost = server.close_masked()
    for n in survivors:
        server.add_unmask(n, made[n].unmask(survivors, lost))
    times["unmasking"] = time.process_time() - t0  # the survivors' shares, then the federation's part: the median of 3
    rebuilt = []
    for _ in range(3):
        t0 = time.process_time()
        total = server.total()
        rebuilt.append(time.process_time() - t0)
    times["unmasking"] += statistics.median(rebuilt)
    mean = decode(total, len(survivors) / clients)
    exact = sum(xs[n] for n in survivors) / len(survivors)
    assert np.abs(mean - exact).max() < 1e-6
    return {"clients": clients, "dropped": dropped, "threshold": t, **times}


def section_secagg(grpc: bool, grpc_hundred: bool = False) -> None:
    t_all = time.perf_counter()
    _rounds_run("splitfed_v2", 10, False, epochs=1)  # warm-up: the first run in a process imports what the others reuse
    runs = []
    for clients in (10, 100):
        for method in ("splitfed_v2", "fedavg"):
            for secure in (False, True):
                runs.append(_rounds_run(method, clients, secure, epochs=2))
                print(runs[-1], flush=True)
    net = []
    if grpc:
        for clients in (10, 100) if grpc_hundred else (10,):
            for secure in (False, True):
                net.append(_rounds_run("splitfed_v2", clients, secure, epochs=2, launcher="processes"))
                print(net[-1], flush=True)
    from splitlearn.clients.baselines import method_plan
    from splitlearn.core.load import load_plan
    from splitlearn.models import build_segment

    fedavg = method_plan(load_plan(SEQUENTIAL), "fedavg", 10)
    length = sum(p.numel() for seg in fedavg.segments for p in build_segment(fedavg, seg).parameters())
    recovery = [_recovery(100, d, length) for d in (0, 1, 10)]
    for r in recovery:
        print(r, flush=True)
    seconds = time.perf_counter() - t_all

    def table(rows: list[dict]) -> list[str]:
        out = ["| schedule | clients | secure | rounds | run s | s per round | extra s per round | KB in per round "
               "| KB out per round | bytes / plain | test accuracy | skipped |",
               "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            plain = next(p for p in rows if p["method"] == r["method"] and p["clients"] == r["clients"]
                         and not p["secure"])
            extra = (r["seconds"] - plain["seconds"]) / r["rounds"]
            ratio = (r["received"] + r["sent"]) / (plain["received"] + plain["sent"])
            out.append(f"| {r['method']} | {r['clients']} | {'yes' if r['secure'] else 'no'} | {r['rounds']} "
                       f"| {r['seconds']:.1f} | {r['seconds'] / r['rounds']:.2f} | "
                       f"{f'{extra:+.2f}' if r['secure'] else ''} | {r['received'] / 1e3:.0f} | {r['sent'] / 1e3:.0f} "
                       f"| {ratio:.2f}x | {r['accuracy']:.4f} | {r['skipped']} |")
        return out

    lines = [
        "## Secure aggregation: bytes and time per round, and dropout recovery",
        "",
        f"Written by `.venv/bin/python bench/secagg.py` in {seconds:.0f} s. Machine: {MACHINE}. Plan: "
        "`examples/sequential.toml` (digits, MLP 64-128-64-10) as SplitFed v2 (the clients' bottom layer, 8,320 "
        f"values, averaged at the server) and FedAvg (the whole model, {length:,} values, averaged at a federation "
        "party), 2 epochs of one round each, with and without `[clients] secure_aggregation = true` (threshold "
        "ceil(2n/3)). Bytes: what the federation received and sent on the averaging wires (`weights`, `secagg`: "
        "the clients' weights or the protocol's keys, roster, shares, masked vectors and unmasking shares, and "
        "the average it sends back), per round; *extra s per round*: the secure run's seconds minus the plain "
        "run's, over the rounds (the rest of a round, the clients' training, is the same). Both runs of a pair "
        "end with the same test accuracy: the average differs by a fixed-point rounding (`secagg.error_bound`); "
        "wall times are of a machine shared with other work, where a second either way is noise; "
        "two rounds are what these accuracies are, not what the schedules reach.",
        "",
        "### In one process (threads, in-process transport)",
        "",
        *table(runs),
        "",
        "At 10 clients the protocol's work (two key pairs, nine shares and nine masks a client) is within these "
        "runs' noise (about half a second on this shared machine, either way); at 100 clients it is the round "
        "of the dropout table below with none dropped (keys and shares, masking, unmasking), the clients' "
        "threads sharing the machine's cores. The masked vectors are int64 (8 bytes a value where the weights "
        "travel as float32), and every client sends a share to each other through the federation, so the bytes "
        "grow with the square of the clients.",
        "",
    ]
    if net:
        local = next(r for r in runs if r["method"] == "splitfed_v2" and r["clients"] == 10 and r["secure"])
        signed = f"{(net[1]['received'] - local['received']) / 1e3:.0f} KB in and " \
                 f"{(net[1]['sent'] - local['sent']) / 1e3:.0f} KB out"
        hundred = ("100 clients over gRPC: the pair above (`--grpc-hundred`, every client a process of its own)." if
                   grpc_hundred else "100 clients over gRPC are not run by default (`--grpc-hundred` runs them): one "
                   "plain SplitFed v2 epoch of 100 client processes takes about 104 s on this machine "
                   "(`bench/load.py`), so the pair (two epochs each: over 400 s) more than doubles this script's time.")
        lines += ["### Over loopback gRPC with mutual TLS (one process per party)", "", *table(net), "",
                  "The party processes share the machine's cores with each other and with other work: their extra "
                  "seconds per round vary by several seconds from one run of this script to the next.", "",
                  hundred + " The protocol's messages are those of the in-process run, "
                  "and its computation is the clients' own, in parallel processes. Its bytes are the in-process run's "
                  "plus the certificates and signatures (in one process nothing is signed): each client's certificate "
                  "comes with its keys and the roster carries every client's to each client, here "
                  f"{signed} per round more than in one process (what goes out growing with the square of the clients).", ""]
    else:
        lines += ["Over gRPC: not run (`--no-grpc`).", ""]
    base = recovery[0]["unmasking"]
    lines += [
        "### Dropout recovery",
        "",
        f"One round of the protocol in this process (`privacy/secagg.py`'s clients and server, {recovery[0]['clients']} "
        f"clients, threshold {recovery[0]['threshold']}, a vector of {length:,} values: the FedAvg model), the given "
        "clients gone after sharing their keys (as a client killed mid-round is): the survivors' masked vectors, "
        "then the unmasking: each survivor's shares, the federation rebuilding every survivor's self-mask seed and "
        "every dropped client's mask key (Shamir, Lagrange at 0 over 2^521 - 1) and removing their masks. "
        "CPU seconds of this one thread, every client's work included (in a run the clients compute in parallel; the "
        "federation's part of the unmasking is the median of 3); in a run the federation first waits "
        "`clients.timeout` for the masked vectors that do not come.",
        "",
        "| dropped | keys and shares CPU s | masking CPU s | unmasking CPU s | unmasking / none dropped |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in recovery:
        share = f"{r['dropped']} ({100 * r['dropped'] / r['clients']:.0f} %)"
        lines.append(f"| {share} | {r['keys and shares']:.2f} | {r['masking']:.2f} | {r['unmasking']:.2f} "
                     f"| {r['unmasking'] / base:.2f}x |")
    lines += ["", "A dropped client costs the federation one key to rebuild and one pairwise mask per survivor to "
              "remove, and spares it one self mask; the survivors' shares are the same in number."]
    write_section("secagg", "\n".join(lines))


def _vertical(example: str, merge: str, epochs: int, launcher: str = "threads") -> dict:
    from splitlearn.api import train
    from splitlearn.core.load import load_plan

    body = tomllib.loads((ROOT / "examples" / f"{example}.toml").read_text())
    body["segments"]["top"]["merge"] = merge
    body["networks"]["top"]["args"]["sizes"][0] = 16  # vertical.toml concatenates: its top takes 16 as for a sum
    body["train"]["epochs"] = epochs
    plan = load_plan(body)
    with tempfile.TemporaryDirectory() as tmp:
        if launcher == "processes":  # party processes read the plan from its file: the same plan, as TOML
            plan = Path(tmp) / "plan.toml"
            text = (ROOT / "examples" / f"{example}.toml").read_text().replace("epochs = 20", f"epochs = {epochs}")
            plan.write_text(text.replace('merge = "concat"', f'merge = "{merge}"').replace('merge = "sum"',
                            f'merge = "{merge}"').replace("sizes = [32, 16, 2]", "sizes = [16, 16, 2]"))
        t0 = time.perf_counter()
        result = train(plan, launcher=launcher, out=Path(tmp) / "run" if launcher == "processes" else None)
        seconds = time.perf_counter() - t0
    acts = [w for w in result["wires"] if w["carries"] == "activation"]
    steps = result["parties"]["server"]["sent"]
    train_steps = max(r["messages"] for r in steps if r["direction"] == "backward")  # one gradient a step a wire
    per = {d: sum(r["payload"] for p in result["parties"].values() for r in p["sent"]
                  if r["direction"] == d and any(r["wire"] == w["name"] for w in acts)) for d in ("forward", "backward")}
    members = [w["src"] for w in acts]
    return {"example": example, "merge": merge, "seconds": seconds, "train_steps": train_steps,
            "forward": per["forward"], "backward": per["backward"], "members": len(members),
            "compute": {p: v["compute_s"] for p, v in result["parties"].items()},
            "accuracy": result["metrics"]["test_accuracy"]}


def _masking_cost(rows: int, width: int, members: int, repeat: int = 20) -> tuple[float, float]:
    """Seconds per step of one member's encoding and masking and of the merger's decoding, ``rows x width``."""
    from splitlearn.core.securesum import decode, encode, keystream

    x = torch.randn(rows, width)
    keys = [os.urandom(32) for _ in range(members - 1)]
    member, merger = [], []
    for i in range(repeat):
        t0 = time.process_time()
        q = encode(x)
        for k in keys:
            q += keystream(k, f"top|train|{i}".encode(), q.size)
        member.append(time.process_time() - t0)
        t0 = time.process_time()
        total = np.zeros(q.size, dtype=np.uint64)
        for _ in range(members):
            total += q
        torch.from_numpy(decode(total)).float()
        merger.append(time.process_time() - t0)
    return statistics.median(member), statistics.median(merger)


def section_securesum(grpc: bool) -> None:
    t_all = time.perf_counter()
    epochs = 5
    _vertical("vertical", "sum", 1)  # warm-up: the first run in a process imports and initialises what the others reuse
    runs = []
    for e in ("vertical", "vertical_three"):
        for m in ("sum", "secure_sum"):
            tries = [_vertical(e, m, epochs) for _ in range(5)]
            runs.append(sorted(tries, key=lambda r: r["seconds"])[2])  # the median run
    for r in runs:
        print({k: v for k, v in r.items() if k != "compute"}, flush=True)
    net = [_vertical("vertical_three", m, 1, "processes") for m in ("sum", "secure_sum")] if grpc else []
    for r in net:
        print({k: v for k, v in r.items() if k != "compute"}, flush=True)
    micro = [(rows, width, 3, *_masking_cost(rows, width, 3)) for rows, width in ((32, 16), (256, 1024))]
    seconds = time.perf_counter() - t_all
    lines = [
        "## Secure-sum merge: bytes and time per step",
        "",
        f"Written by `.venv/bin/python bench/secagg.py` (this section alone: `--only securesum`) in {seconds:.0f} s. "
        f"Machine: {MACHINE}. "
        "Plans: `examples/vertical.toml` (2 clinics; its top made to take a 16-wide sum instead of the "
        "concatenation) and `examples/vertical_three.toml` (3 clinics), breast cancer, batches of 32, each "
        f"clinic's embedding 16 wide, {epochs} epochs in one process (the median of 5 runs: this machine is shared, "
        "and single runs vary by tens of percent), with `merge = \"sum\"` and "
        "`merge = \"secure_sum\"`. Bytes: the tensor payload on the clinics' wires, per training step (training "
        "and evaluation steps' activations, over the training steps; gradients); seconds: the whole run's wall "
        "time over its training steps, and the clinics' and the server's compute time (masking and the decoding "
        "included) over the same steps.",
        "",
        "| plan | merge | activations KB per step | gradients KB per step | ms per step | clinic compute ms per "
        "step | server compute ms per step | test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        n = r["train_steps"]
        clinic = statistics.mean(v for p, v in r["compute"].items() if p != "server")
        lines.append(f"| {r['example']} | {r['merge']} | {r['forward'] / n / 1e3:.2f} | {r['backward'] / n / 1e3:.2f} "
                     f"| {1e3 * r['seconds'] / n:.1f} | {1e3 * clinic / n:.2f} | {1e3 * r['compute']['server'] / n:.2f} "
                     f"| {r['accuracy']:.4f} |")
    lines += ["", "The masked tensor is int64: twice float32's bytes forward; the gradient of the sum comes back in "
              "float32 as before. Accuracy is the plain sum's: the merges differ by a float32 rounding "
              "(`core/securesum.error_bound`).", ""]
    if net:
        lines += ["Over loopback gRPC with mutual TLS (`vertical_three.toml`, one epoch, one process per party, "
                  "their start included):", "",
                  "| merge | run s | activations KB per step | test accuracy |", "|---|---:|---:|---:|"]
        for r in net:
            lines.append(f"| {r['merge']} | {r['seconds']:.1f} | {r['forward'] / r['train_steps'] / 1e3:.2f} "
                         f"| {r['accuracy']:.4f} |")
        lines.append("")
    lines += ["Masking alone (CPU time of one thread, median of 20): a member's fixed-point encoding and its masks (ChaCha20 "
              "keystreams, one per other member), the merger's sum and decoding:", "",
              "| activation | members | member ms | merger ms |", "|---|---:|---:|---:|"]
    for rows, width, members, member, merger in micro:
        lines.append(f"| {rows} x {width} | {members} | {1e3 * member:.3f} | {1e3 * merger:.3f} |")
    write_section("securesum", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["secagg", "securesum"], help="one section only")
    ap.add_argument("--no-grpc", action="store_true", help="in-process runs only")
    ap.add_argument("--grpc-hundred", action="store_true", help="also 100 clients over gRPC (over 400 s more)")
    args = ap.parse_args()
    if args.only in (None, "secagg"):
        section_secagg(not args.no_grpc, args.grpc_hundred)
    if args.only in (None, "securesum"):
        section_securesum(not args.no_grpc)
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    sys.exit(main())
