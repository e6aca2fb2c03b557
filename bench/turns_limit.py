"""The limit of a simulation's parties in one process, without the engine: plain PyTorch with the bottom and
the top of the bench CNN and of the digits MLP as two parties handing the activation and its gradient over,
as OS threads (through queues) and as greenlets on one thread (what ``wire/transport/turns.py`` does),
against the unsplit model; the same batches and SGD. Prints ms per step (medians of alternated runs).

    .venv/bin/python bench/turns_limit.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from collections import deque

import greenlet
import torch
import torch.nn as nn


def models(which: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if which == "cnn":  # bench/plans/cnn_synthetic.toml: cut after conv-relu-pool, 32x16x16 crossing
        bottom = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        top = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
        return bottom, top, torch.randn(64 * 30, 3, 32, 32), torch.randint(0, 10, (64 * 30,))
    bottom = nn.Sequential(nn.Linear(64, 256), nn.ReLU())  # bench/plans/mlp_digits.toml
    top = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    return bottom, top, torch.randn(64 * 200, 64), torch.randint(0, 10, (64 * 200,))


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

    return {"unsplit": unsplit, "two OS threads": threads, "two greenlets, one thread": greenlets, "n": n}


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
                fn()
                got[k].append((time.perf_counter() - t0) / n * 1e3)
        ref = statistics.median(got["unsplit"])
        for k, v in got.items():
            print(f"{which} {k:28s} {statistics.median(v):7.3f} ms/step (runs {min(v):.3f}-{max(v):.3f}); "
                  f"unsplit / this {ref / statistics.median(v):.2f}")


if __name__ == "__main__":
    main()
