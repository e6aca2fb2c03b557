"""The limit of a simulation's parties in one process, without the engine: plain PyTorch with the bottom and
the top of the bench CNN and of the digits MLP as two parties handing the activation and its gradient over,
as OS threads (through queues) and as greenlets on one thread (what ``wire/transport/turns.py`` does),
against the unsplit model; the bench plans' modules and batches (those of ``bench/run.py``'s unsplit loop) and SGD.
And the limit of party processes on one machine: the same two parties as two processes (spawned interpreters
with the math threads' environment of ``launch/processes.child_env``, which forked party processes get alike)
handing the tensors' bytes over a pipe, no gRPC, no TLS, no engine; timed from both having built their half,
so their first step is in it. Prints ms per step (medians of alternated runs).

    .venv/bin/python bench/turns_limit.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import greenlet
import torch
import torch.nn as nn


PLAN_FILES = {"cnn": Path(__file__).parent / "plans" / "cnn_synthetic.toml",
              "mlp": Path(__file__).parent / "plans" / "mlp_digits.toml"}
EPOCHS = {"cnn": 1, "mlp": 10}  # the MLP's steps are short: more of them


def models(which: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The bench plan's bottom and top, built as ``bench/run.py`` builds them, and its training batches in order
    (full ones, each a contiguous block): the batches of ``bench/run.py``'s unsplit loop, whose step the
    benchmarks' ratios are taken against."""
    from splitlearn.models import build_segment
    from splitlearn.run.setup import prepare, schedule

    plan, setups, _ = prepare(PLAN_FILES[which], epochs=EPOCHS[which])
    h = setups["hospital"]
    (x_name,) = [k for k in h.inputs if k != "hospital.y"]
    rows = torch.cat([s.rows for s in schedule(plan, h.splits) if s.mode == "train" and len(s.rows) == 64])
    torch.manual_seed(0)
    return build_segment(plan, "bottom"), build_segment(plan, "top"), h.inputs[x_name][rows], h.inputs["hospital.y"][rows]


def runs(which: str) -> dict:
    bottom, top, x, y = models(which)
    ob = torch.optim.SGD(bottom.parameters(), lr=0.01, momentum=0.9)
    ot = torch.optim.SGD(top.parameters(), lr=0.01, momentum=0.9)
    b, n = 64, len(x) // 64

    def hospital(send, recv) -> None:
        for i in range(n):
            ob.zero_grad()
            a = bottom(x[i * b:(i + 1) * b])
            send(a.detach())
            a.backward(recv())
            ob.step()

    def server(send, recv) -> None:
        for i in range(n):
            a = recv().requires_grad_()
            ot.zero_grad()
            nn.functional.cross_entropy(top(a), y[i * b:(i + 1) * b]).backward()
            send(a.grad)
            ot.step()

    def unsplit() -> None:
        for i in range(n):
            ob.zero_grad()
            ot.zero_grad()
            nn.functional.cross_entropy(top(bottom(x[i * b:(i + 1) * b])), y[i * b:(i + 1) * b]).backward()
            ob.step()
            ot.step()

    def threads() -> None:
        up, down = queue.Queue(), queue.Queue()
        ts = [threading.Thread(target=hospital, args=(up.put, down.get)),
              threading.Thread(target=server, args=(down.put, up.get))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def greenlets() -> None:
        up, down, loop = deque(), deque(), greenlet.getcurrent()

        def recv(box):
            while not box:
                loop.switch()
            return box.popleft()

        gs = [greenlet.greenlet(lambda: hospital(up.append, lambda: recv(down))),
              greenlet.greenlet(lambda: server(down.append, lambda: recv(up)))]
        while not all(g.dead for g in gs):
            for g in gs:
                if not g.dead:
                    g.switch()

    def processes() -> float:
        """Two party processes over pipes: seconds of the ``n`` steps (after both built their models)."""
        import multiprocessing as mp
        import os

        from splitlearn.launch.processes import child_env
        from splitlearn.run.allocator import math_threads

        spawn, saved = mp.get_context("spawn"), dict(os.environ)
        os.environ.clear()
        os.environ.update(child_env(2))  # read by each child's OpenMP as it starts
        os.environ.setdefault("OMP_NUM_THREADS", str(math_threads(2)))
        try:
            (h_end, s_end), (hc, h_ctl), (sc, s_ctl) = spawn.Pipe(), spawn.Pipe(), spawn.Pipe()
            procs = [spawn.Process(target=_party, args=("hospital", which, h_end, hc), daemon=True),
                     spawn.Process(target=_party, args=("server", which, s_end, sc), daemon=True)]
            for p in procs:
                p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        for end in (h_end, s_end, hc, sc):  # the children's: a child that dies ends its pipes (EOFError here)
            end.close()

        def wait(ctl) -> None:
            if not ctl.poll(600):
                raise SystemExit("a party process did not answer within 600 s")
            ctl.recv_bytes()

        try:
            for ctl in (h_ctl, s_ctl):
                wait(ctl)  # built (its interpreter started, its half of the model and the data made)
            t0 = time.perf_counter()
            for ctl in (h_ctl, s_ctl):
                ctl.send_bytes(b"go")
            wait(h_ctl)  # the hospital's last step done
            seconds = time.perf_counter() - t0
        except EOFError:
            raise SystemExit(f"a party process failed (exit codes {[p.exitcode for p in procs]})") from None
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
        return seconds

    return {"unsplit": unsplit, "two OS threads": threads, "two greenlets, one thread": greenlets,
            "two processes, pipes": processes, "n": n}


def _party(role: str, which: str, conn, ctl) -> None:
    """One party of :func:`runs`' ``processes``: its half of the model, tensors as raw float32 bytes on ``conn``."""
    bottom, top, x, y = models(which)
    b, n = 64, len(x) // 64
    opt = torch.optim.SGD((bottom if role == "hospital" else top).parameters(), lr=0.01, momentum=0.9)
    ctl.send_bytes(b"built")
    ctl.recv_bytes()
    for i in range(n):
        opt.zero_grad()
        if role == "hospital":
            a = bottom(x[i * b:(i + 1) * b])
            conn.send_bytes(a.detach().numpy())
            g = torch.frombuffer(bytearray(conn.recv_bytes()), dtype=torch.float32).view(a.shape)
            a.backward(g)
        else:
            shape = (b, 32, 16, 16) if which == "cnn" else (b, 256)
            a = torch.frombuffer(bytearray(conn.recv_bytes()), dtype=torch.float32).view(shape).requires_grad_()
            nn.functional.cross_entropy(top(a), y[i * b:(i + 1) * b]).backward()
            conn.send_bytes(a.grad.numpy())
        opt.step()
    ctl.send_bytes(b"done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for which in ("cnn", "mlp"):
        fns = runs(which)
        n = fns.pop("n")
        fns["unsplit"]()  # warm-up
        got: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):  # alternated
            for k, fn in fns.items():
                t0 = time.perf_counter()
                seconds = fn()  # (the processes' own count: their start is not a step)
                got[k].append((time.perf_counter() - t0 if seconds is None else seconds) / n * 1e3)
        ref = statistics.median(got["unsplit"])
        for k, v in got.items():
            print(f"{which} {k:28s} {statistics.median(v):7.3f} ms/step (runs {min(v):.3f}-{max(v):.3f}); "
                  f"unsplit / this {ref / statistics.median(v):.2f}")


if __name__ == "__main__":
    main()
