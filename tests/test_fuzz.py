"""Mutated messages against a party's receive path: no crash, nothing non-finite taken, and the
party trains as it would have afterwards.

The mutants come from captured valid envelopes of the vanilla plan (activations, labels,
gradients, hello, goodbye, errors), changed by a seeded mutator: bytes flipped, cut or
inserted, and fields rewritten (kind, step, sender, wire, dtype, shape, codec, buffers, NaN and
huge values, out-of-range labels). Run in CI-sized batches of whole training steps, so what a
mutant gets past the checks meets the real forward and backward.
"""

import json
import math
import random
import struct
import threading

import pytest
import torch

from splitlearn.wire.codec import get_codec
from splitlearn.core.engine import Party, PartyError
from splitlearn.wire.link import Link
from splitlearn.wire.messages import Kind, Message, decode, encode, kind_of
from splitlearn.wire.proto import splitlearn_pb2 as pb
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.transport import InProcessHub
from splitlearn.wire.transport.base import Transport, TransportTimeout

from .conftest import EXAMPLES

pytestmark = pytest.mark.timeout(300)

ACT, LABEL = "bottom->top", "hospital.y->digit"
MUTANTS_PER_STEP = 1000
STEPS = 100  # 100,000 mutants


class Mutator:
    """Seeded mutations of valid envelopes."""

    NAMES = ["hospital", "server", ACT, LABEL, "", "x" * 300, "hospital.x->top", "t", "u"]
    DTYPES = ["float32", "int64", "float16", "bfloat16", "int8", "uint8", "bool", "float64", "int32", "complex64", ""]
    CODECS = ["float32", "raw", "int8", "topk:0.5", "float16", "bogus", ""]

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def bytes_level(self, data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(self.r.randint(1, 8)):
            op = self.r.random()
            if not b:
                b += bytes([self.r.randrange(256)])
            elif op < 0.4:
                b[self.r.randrange(len(b))] = self.r.randrange(256)
            elif op < 0.6:
                del b[self.r.randrange(len(b)):][: self.r.randint(1, 64)]
            elif op < 0.8:
                i = self.r.randrange(len(b))
                b[i:i] = bytes(self.r.randrange(256) for _ in range(self.r.randint(1, 16)))
            else:
                b = b[: self.r.randrange(len(b) + 1)]
        return bytes(b)

    def field_level(self, data: bytes, step: int) -> bytes:
        env = pb.Envelope()
        env.ParseFromString(data)
        for _ in range(self.r.randint(1, 3)):
            op = self.r.randrange(13)
            if op == 0:
                env.kind = self.r.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 3, 3, 4, 99])
            elif op == 1:
                env.step = self.r.choice([step, step, step + 1, step + 2, step + 3, step - 1, -1, 2**62, -2**62])
            elif op == 2:
                env.sender = self.r.choice(self.NAMES)
            elif op == 3:
                env.wire = self.r.choice(self.NAMES)
            elif op == 4 and env.tensors:
                env.tensors[0].dtype = self.r.choice(self.DTYPES)
            elif op == 5 and env.tensors:
                t = env.tensors[0]
                shape = list(t.shape)
                choice = self.r.randrange(4)
                if choice == 0 and shape:
                    shape[self.r.randrange(len(shape))] = self.r.choice([0, 1, 31, 33, 128, 2**31, -1, 2**40])
                elif choice == 1:
                    shape.append(self.r.choice([1, 2, 1000]))
                elif choice == 2 and shape:
                    shape.pop()
                else:
                    shape = [self.r.choice([1, 32]), self.r.choice([128, 2**14]), self.r.choice([1, 2**14])]
                del t.shape[:]
                t.shape.extend(shape)
            elif op == 6 and env.tensors:
                env.tensors[0].codec = self.r.choice(self.CODECS)
            elif op == 7 and env.tensors:  # poison one float in the buffer
                t = env.tensors[0]
                if len(t.data) >= 4:
                    i = 4 * self.r.randrange(len(t.data) // 4)
                    v = self.r.choice([math.nan, math.inf, -math.inf, 3e38, -3e38, 1e7])
                    t.data = t.data[:i] + struct.pack("<f", v) + t.data[i + 4:]
            elif op == 8 and env.tensors:  # labels: one out of range
                t = env.tensors[0]
                if len(t.data) >= 8:
                    i = 8 * self.r.randrange(len(t.data) // 8)
                    v = self.r.choice([10, 11, -1, 10**12, -2**63, 2**63 - 1])
                    t.data = t.data[:i] + struct.pack("<q", v) + t.data[i + 8:]
            elif op == 9 and env.tensors:
                t = env.tensors[0]
                t.extra[self.r.choice(["affine", "indices", "x"])] = self.r.choice(
                    [b"", struct.pack("<ff", 0.0, math.nan), struct.pack("<ff", math.inf, 1.0), b"\x00" * 7,
                     struct.pack("<i", 2**31 - 1) * 4])
            elif op == 10:
                env.tensors.add().CopyFrom(env.tensors[0] if env.tensors and self.r.random() < 0.5 else
                                           pb.Tensor(name=self.r.choice(self.NAMES), dtype="float32", shape=[1],
                                                     codec="float32", data=b"\x00" * 4))
            elif op == 11:
                env.text = self.r.choice(["done", "", "{}", "[" * 5000, '{"protocol": 1e999}', "x" * 5000,
                                          json.dumps({"plan_hash": [[[]]]})])
            else:
                env.receiver = self.r.choice(self.NAMES)
        return env.SerializeToString()

    def __call__(self, data: bytes, step: int) -> bytes:
        return self.bytes_level(data) if self.r.random() < 0.3 else self.field_level(data, step)


class Sink(Transport):
    """The hospital's end is never read: what the server sends back is dropped; the queue is ours to fill."""

    def __init__(self, party: str):
        self.party = party
        self.inbox: list[tuple[str, bytes]] = []
        self.sent = 0

    def send(self, dst, data):
        self.sent += 1

    def recv(self, timeout=None):
        if not self.inbox:
            raise TransportTimeout("all delivered")
        return self.inbox.pop(0)


def _valid_envelopes(setups, step):
    """One of each kind of message an honest run sends the server, for step ``step``."""
    hs = setups["hospital"]
    rows = step.rows
    act = hs.modules["bottom"](hs.inputs["hospital.x"][rows]).detach()
    y = hs.inputs["hospital.y"][rows]

    def env(kind, wire="", tensors=None, text=""):
        return encode(Message(kind, "hospital", "server", step.id, wire, tensors or {}, text))

    return [
        env(Kind.ACTIVATION, ACT, {"t": get_codec("float32").encode(act)}),
        env(Kind.ACTIVATION, LABEL, {"t": get_codec("raw").encode(y)}),
        env(Kind.GRADIENT, ACT, {"t": get_codec("float32").encode(torch.ones_like(act))}),
        env(Kind.ACTIVATION, ACT, {"t": get_codec("int8").encode(act)}),
        env(Kind.ACTIVATION, ACT, {"t": get_codec("topk:0.25").encode(act)}),
        env(Kind.HELLO, text=json.dumps({"protocol": 1, "plan_hash": "0", "ids_hash": "0"})),
        env(Kind.STOP, text="done"),
        env(Kind.ERROR, text="hospital failed"),
        env(Kind.WEIGHTS, "weights", {"bottom.0.weight": get_codec("raw").encode(torch.zeros(3, 3))}),
    ], act, y


def _state(party):
    return ({k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in party.modules.items()},
            party.optimizer.state_dict() if party.optimizer else None)


def _restore(party, saved):
    import copy

    modules, opt = saved
    for k, m in party.modules.items():
        m.load_state_dict(modules[k])
    if opt is not None:
        party.optimizer.load_state_dict(copy.deepcopy(opt))


def _clean_training(server, setups, shapes, offset):
    """Both parties step through the schedule in threads (the session was done already); returns the server's weights."""
    hs = setups["hospital"]
    hub = InProcessHub(["hospital", "server"])
    hospital = Party(hs.graph, "hospital", Link(hub.transport("hospital")), hs.modules, hs.optimizer, hs.inputs,
                     dict(shapes), timeout=30)
    server.link = Link(hub.transport("server"), server.meter, server.limits)  # same party, a fresh connection
    steps = list(schedule(setups["server"].plan, setups["server"].splits))
    errors = []

    def run(party):
        try:
            for s in steps:
                party.step(s.id + offset, s.rows, s.mode)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            hub.close()

    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in (hospital, server)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in server.modules.items()}


def _server(setups, shapes, transport, timeout=5.0):
    s = setups["server"]
    return Party(s.graph, "server", Link(transport), s.modules, s.optimizer, s.inputs, dict(shapes), timeout=timeout)


def test_a_hundred_thousand_mutants_leak_nothing_and_the_party_trains_as_before():
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    train_steps = [s for s in schedule(plan, setups["server"].splits) if s.mode == "train"]

    sink = Sink("server")
    server = _server(setups, shapes, sink)
    initial = _state(server)
    taken_bad, seen = [], []

    def observer(wire, direction, st, t):  # every tensor the server takes into a step
        seen.append(wire)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            taken_bad.append((wire, "non-finite"))
        if wire == LABEL and (int(t.min()) < 0 or int(t.max()) >= 10):
            taken_bad.append((wire, "label out of range"))

    server.observer = observer
    # the handshake fixes the head's classes, against which labels are checked
    sink.inbox += [("hospital", encode(Message(Kind.ACTIVATION, "hospital", "server", -1, ACT,
                                               {"t": get_codec("float32").encode(torch.zeros(1, 128))}))),
                   ("hospital", encode(Message(Kind.ACTIVATION, "hospital", "server", -1, LABEL,
                                               {"t": get_codec("raw").encode(torch.zeros(1, dtype=torch.long))})))]
    server.step(-1, None, "handshake")
    mutate = Mutator(seed=1234)
    leaked, stopped, completed, mutants = [], 0, 0, 0
    base = 1_000_000  # the barrage's step ids; clean training comes after them
    for i in range(STEPS):
        step = train_steps[i % len(train_steps)]
        sid, mode = base + 10 * i, ("train" if i % 2 == 0 else "eval")
        shifted = type(step)(sid, mode, 0, step.rows)
        valid, act, y = _valid_envelopes(setups, shifted)
        sink.inbox.clear()
        for _ in range(MUTANTS_PER_STEP):
            sink.inbox.append(("hospital", mutate(mutate.r.choice(valid), sid)))
        mutants += MUTANTS_PER_STEP
        sink.inbox += [("hospital", valid[0]), ("hospital", valid[1])]  # the honest messages complete the step
        while sink.inbox:  # every mutant is read: a step that ends early is run again on the rest
            server.finished.clear()
            try:
                server.step(sid, step.rows, mode)
                completed += 1
            except PartyError:  # an ERROR, a goodbye while the step waits, or nothing left to read
                stopped += 1
            except Exception as e:  # noqa: BLE001 - anything else leaked
                leaked.append(repr(e))
        for m in server.modules.values():
            assert all(bool(torch.isfinite(p).all()) for p in m.parameters()), f"non-finite weights after step {i}"
    assert mutants == 100_000
    assert leaked == [] and taken_bad == []
    print(f"refused {server.link.refused_count}, steps completed {completed}, stopped {stopped}, taken {len(seen)}")
    assert server.link.refused_count > 50_000  # most mutants are refused, and counted
    assert completed >= STEPS  # every barrage step completed at least once, with the labels checked
    assert seen.count(LABEL) >= completed
    held = server.held_early
    assert all(n <= server.limits.early_messages and b <= server.limits.early_bytes for n, b in held.values())

    # A mutant that passes every check is, by design, a message the peer could have sent: it
    # trained the barrage's steps. Back to the weights the run started with, the same party object
    # (its link limits, agreed shapes, classes, held messages) trains as a clean party does.
    _restore(server, initial)
    offset = base + 10 * STEPS + 10
    after = _clean_training(server, setups, shapes, offset)
    _, fresh_setups, _ = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    clean = _clean_training(_server(fresh_setups, shapes, Sink("server")), fresh_setups, shapes, offset)
    for seg in clean:
        for n in clean[seg]:
            assert torch.equal(after[seg][n], clean[seg][n]), f"{seg}.{n} differs from the clean run"


def test_a_few_hundred_mutants_over_grpc_with_a_valid_certificate(tmp_path):
    """The hospital, with a valid certificate, follows every honest message with four mutants of
    it and ignores the refusals: the server keeps training to the end. (Mutants that say the
    hospital stopped are left out: a peer that says so ends the run, as it should.)"""
    from splitlearn.run.session import run_party
    from splitlearn.wire.transport.grpc import GrpcTransport
    from splitlearn.wire.transport.tls import load_credentials, make_certs

    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    make_certs(["hospital", "server"], tmp_path)
    srv_t = GrpcTransport("server", listen="127.0.0.1:0", accept=["hospital"],
                          credentials=load_credentials(tmp_path, "server"))
    srv_t.start()
    hosp_t = GrpcTransport("hospital", dial={"server": f"127.0.0.1:{srv_t.port}"},
                           credentials=load_credentials(tmp_path, "hospital"))
    hosp_t.start()
    srv_t.wait_connected(20)
    hosp_t.wait_connected(20)
    mutate = Mutator(seed=99)
    sent_mutants = []

    class Hostile(Transport):
        party = "hospital"

        def send(self, dst, data):
            hosp_t.send(dst, data)
            if len(sent_mutants) < 400:
                env = decode(data)
                for _ in range(4):
                    m = mutate(data, env.step)
                    while kind_of(m) in (Kind.ERROR, Kind.STOP):  # saying it gave up would end the run, by design
                        m = mutate(data, env.step)
                    hosp_t.send(dst, m or b"\x00")
                    sent_mutants.append(1)

        def recv(self, timeout=None):
            while True:
                peer, data = hosp_t.recv(timeout)
                if decode(data).kind != Kind.ERROR:  # the server's refusals, ignored
                    return peer, data

    hs, ss = setups["hospital"], setups["server"]
    hospital = Party(hs.graph, "hospital", Link(Hostile()), hs.modules, hs.optimizer, hs.inputs, timeout=30)
    server = Party(ss.graph, "server", Link(srv_t), ss.modules, ss.optimizer, ss.inputs, timeout=30)
    bad, taken = [], 0

    def observer(wire, direction, st, t):
        nonlocal taken
        taken += 1
        if (t.is_floating_point() and not bool(torch.isfinite(t).all())) or (
                wire == LABEL and (int(t.min()) < 0 or int(t.max()) >= 10)):
            bad.append(wire)

    server.observer = observer
    reports, errors = {}, {}

    def run(party, setup):
        try:
            reports[party.name] = run_party(party, schedule(plan, setup.splits), ids_hash=setup.ids_hash)
        except Exception as e:  # noqa: BLE001
            errors[party.name] = e

    threads = [threading.Thread(target=run, args=a, daemon=True) for a in ((hospital, hs), (server, ss))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    hosp_t.close()
    srv_t.close()
    assert errors == {}, errors
    assert len(sent_mutants) >= 300
    assert server.link.refused_count > 100
    assert bad == [] and taken > 0
    assert len(reports["server"].metrics["digit"]["test_accuracy"]) == 1  # the whole schedule ran
    assert all(bool(torch.isfinite(p).all()) for m in ss.modules.values() for p in m.parameters())
