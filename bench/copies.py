"""Copies of an activation on its way from one party's tensor to the other party's tensor.

    .venv/bin/python bench/copies.py      # writes the copies section of BENCHMARKS.md

The path of one bench-CNN activation (64 x 32 x 16 x 16 float32, 2 MiB) through the pieces a
party process uses: codec, envelope, the gRPC transport's frame, and back (gRPC's own buffers
are not counted: neither path can avoid them). *Before*: the path as it was (the tensor's bytes
taken with ``tobytes``, put into a protobuf ``Envelope`` and serialised, framed by concatenation;
on receipt the frame sliced, parsed, the field read out and copied into a new array). *After*:
the current path. Copies are counted two ways: by construction (each full-size buffer made,
listed), and measured as *copy-equivalents*: the path's time over the time of one ``memcpy`` of
the same bytes (``bytearray`` copy), medians of alternated repeats.
"""

from __future__ import annotations

import statistics
import struct
import time

import numpy as np
import torch

from _md import write_section
from splitlearn.wire import messages as m
from splitlearn.wire.codec import get_codec
from splitlearn.wire.messages import Kind, Message
from splitlearn.wire.proto import splitlearn_pb2 as pb

SEQ = struct.Struct(">Q")


def before(t: torch.Tensor) -> torch.Tensor:
    data = t.numpy().astype("<f4", copy=False).tobytes()  # 1: the tensor's bytes
    env = pb.Envelope(sender="hospital", receiver="server", step=7, kind=int(Kind.ACTIVATION), wire="bottom->top")
    env.tensors.add(name="t", dtype="float32", shape=list(t.shape), codec="float32", data=data)  # 2: into protobuf
    wire = env.SerializeToString()  # 3: serialised
    frame = b"D" + SEQ.pack(1) + wire  # 4: the transport's frame
    payload = frame[9:]  # 5: the frame sliced off
    got = pb.Envelope()
    got.ParseFromString(payload)  # 6: parsed into protobuf's arena
    field = got.tensors[0].data  # 7: the field read out as bytes
    return torch.from_numpy(np.frombuffer(field, dtype="<f4").copy().reshape(t.shape))  # 8: a tensor of its own


def after(t: torch.Tensor) -> torch.Tensor:
    enc = get_codec("float32").encode(t)  # a view of the tensor's memory
    wire = m.encode(Message(Kind.ACTIVATION, "hospital", "server", 7, "bottom->top", {"t": enc}))  # 1: joined once
    frame = b"D" + SEQ.pack(1) + wire  # 2: the transport's frame
    msg = m.decode(memoryview(frame)[9:])  # 3: parsed into protobuf's arena, 4: the field read out
    return get_codec("float32").decode(msg.tensors["t"])  # 5: a tensor of its own


def timed(fn, *args, n: int = 50) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n


def main() -> None:
    from splitlearn.run.allocator import tune_allocator

    tune_allocator()  # as party processes do: large buffers stay on the heap (no mmap and page faults per copy)
    t = torch.randn(64, 32, 16, 16)
    assert torch.equal(before(t), t) and torch.equal(after(t), t)
    buf = bytearray(t.numpy().tobytes())
    rows = {"before": [], "after": [], "memcpy": []}
    for _ in range(7):  # alternated
        rows["memcpy"].append(timed(lambda: bytes(buf)))
        rows["before"].append(timed(before, t))
        rows["after"].append(timed(after, t))
    copy = statistics.median(rows["memcpy"])
    b, a = statistics.median(rows["before"]), statistics.median(rows["after"])
    mb = t.numel() * 4 / 2**20
    lines = [
        "## Copies of an activation per message",
        "",
        "Written by `.venv/bin/python bench/copies.py`: one 64 x 32 x 16 x 16 float32 activation "
        f"({mb:.0f} MiB, the bench CNN's) from the sender's tensor to the receiver's, through codec, envelope "
        "and the gRPC transport's frame (gRPC's own buffers, the same for both, are not counted), with the "
        "allocator tuned as in party processes (`tune_allocator`). Every message of a step takes this path: per "
        "training step one activation and one gradient.",
        "",
        "| path | full-size copies (by construction) | time per message | copy-equivalents (time / one memcpy) |",
        "|---|---:|---:|---:|",
        f"| before | 8 | {b * 1e3:.2f} ms | {b / copy:.1f} |",
        f"| after | 5 | {a * 1e3:.2f} ms | {a / copy:.1f} |",
        "",
        f"One memcpy of {mb:.0f} MiB: {copy * 1e3:.2f} ms. Before: `tobytes`, into the protobuf message, "
        "serialised, framed, sliced off the frame, parsed, read out of the field, copied into a new array. "
        "After: the envelope is written by splitlearn (`wire/messages.encode`, byte for byte what protobuf "
        "writes) from a view of the tensor's memory in one join, the frame is sliced as a view, and a codec "
        "that converts (float16, bfloat16, int8) makes its conversion the copy. Left: the frame's "
        "concatenation (gRPC takes one bytes object per message), protobuf's parse and its field read (the "
        "received envelope is parsed by protobuf, the well-kept parser, not by hand), and the receiver's own "
        "copy of float32 data (a tensor needs writable memory).",
    ]
    write_section("copies", "\n".join(lines))
    print(f"before {b * 1e3:.2f} ms ({b / copy:.1f} copies), after {a * 1e3:.2f} ms ({a / copy:.1f}); memcpy "
          f"{copy * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
