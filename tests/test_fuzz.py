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
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from splitlearn.core.plan import plan_hash, plan_parts
from splitlearn.core.specs import PlanError
from splitlearn.core.graph import build_graph
from splitlearn.wire.codec import Encoded, WireError, get_codec
from splitlearn.wire.control import Cursor
from splitlearn.core.engine import Party, PartyError
from splitlearn.wire.link import Link
from splitlearn.wire.messages import PROTOCOL_VERSION, Kind, Message, decode, encode, hello, kind_of
from splitlearn.wire.proto import splitlearn_pb2 as pb
from splitlearn.run.resume import MAX_HELD
from splitlearn.run.session import MAX_ROWS, session
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.transport import InProcessHub
from splitlearn.wire.transport.base import Transport, TransportTimeout

from .conftest import EXAMPLES
from .support import clinic_files, tiny, vertical_plan

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
        env(Kind.HELLO, text=json.dumps({"protocol": PROTOCOL_VERSION, "plan_hash": "0", "ids_hash": "0"})),
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


# -- hello, resume, alignment and federation messages ------------------------------------------------
#
# Each generator mutates the honest messages of one exchange, feeds them to the code a party runs on
# receipt (the session's hello, the alignment's admission, a follower's command loop, a client's and
# the federation's weights, the coordinator's acknowledgements) and checks two things: nothing but a
# refusal (PartyError, PlanError, WireError) escapes, and nothing harmful is accepted, judged by an
# oracle of its own per message type. SPLITLEARN_FUZZ sets the cases of all four together.

CASES = int(os.environ.get("SPLITLEARN_FUZZ", "10000"))
SHARES = {"hello": 0.35, "align": 0.3, "command": 0.15, "weights": 0.12, "ack": 0.08}
REFUSALS = (PartyError, PlanError, WireError)
HOSTILE = [None, True, False, 0, 1, -1, 2, 9, 1.0, 1.5, -0.0, math.nan, math.inf, -math.inf, 1e308, 2**31, 2**63,
           -2**63, 10**30, "", "x", "0", "1", "hello", "rows", "resume", "request", "result", "NaN", [], [1], [1, 2],
           [-1, 5], [True, False], [1.0, 2.0], ["1", "2"], [2**40, 1], [1, 2, 3], {}, {"a": 1}, [[]], [None],
           "x" * 2000, list(range(1500)), {"server": [1]}, {"hospital": "x"}]


def _cases(kind: str) -> int:
    return max(1, round(CASES * SHARES[kind]))


class JsonMutator:
    """Seeded mutations of the JSON body of a hello, an alignment message, a command or an
    acknowledgement: fields rewritten (hostile values, near misses of the honest one), dropped or
    added; the text cut or flipped; the envelope's kind, names and step changed; or the bytes
    mangled by the envelope :class:`Mutator`."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.envelope_mutator = Mutator(seed + 1)

    def value(self, like: object) -> object:
        r = self.r
        if r.random() < 0.45:
            return r.choice(HOSTILE)
        if isinstance(like, bool):
            return r.choice([not like, int(like), str(like).lower()])
        if isinstance(like, int):
            return r.choice([like + 1, like - 1, -like - 1, float(like), str(like), [like], like + 2**40, True])
        if isinstance(like, str):
            return r.choice([like[:-1], like + "0", like.upper(), "", like * 2, [like], {"x": like}])
        if isinstance(like, list):
            out = list(like)
            op = r.randrange(4)
            if op == 0 and out:
                del out[r.randrange(len(out))]
            elif op == 1 and out:
                out.append(r.choice(out))
            elif op == 2 and out:
                i = r.randrange(len(out))
                out[i] = self.value(out[i])
            else:
                out.append(r.choice(HOSTILE))
            return out
        if isinstance(like, dict) and like:
            out = dict(like)
            k = r.choice(list(out))
            out[k] = self.value(out[k]) if r.random() < 0.7 else out.pop(k)
            if r.random() < 0.3:
                out[r.choice(["x", "server", "clinic_c", ""])] = r.choice(HOSTILE)
            return out
        return r.choice(HOSTILE)

    def body(self, body: dict, extra_keys: list[str]) -> dict:
        out = dict(body)
        for _ in range(self.r.randint(1, 3)):
            op = self.r.random()
            if op < 0.65 and out:
                k = self.r.choice(list(out))
                out[k] = self.value(out[k])
            elif op < 0.8 and out:
                del out[self.r.choice(list(out))]
            else:
                out[self.r.choice(extra_keys)] = self.r.choice(HOSTILE)
        return out

    def text(self, body: dict, extra_keys: list[str]) -> str:
        text = json.dumps(self.body(body, extra_keys))
        if self.r.random() < 0.1:
            i = self.r.randrange(len(text) + 1)
            text = self.r.choice([text[:i], text[:i] + self.r.choice('"{}[],:x\\') + text[i:], f"[{text}]",
                                  "null", "1e999"])
        return text

    def __call__(self, msg: Message, body: dict, extra_keys: list[str], peers: list[str]) -> bytes:
        """A mutant of ``msg`` (whose text is ``body``)."""
        r = self.r
        op = r.random()
        if op < 0.7:
            return encode(Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, msg.tensors,
                                  self.text(body, extra_keys)))
        if op < 0.85:
            changed = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, msg.tensors, msg.text)
            what = r.randrange(4)
            if what == 0:
                changed.kind = r.choice(list(Kind))
            elif what == 1:
                changed.sender = r.choice(peers)  # another party's name (the authenticated sender stays)
            elif what == 2:
                changed.step = r.choice([0, 1, -1, 2**62, msg.step + 1])
            else:
                changed.wire = r.choice(["", "align", "weights", "x" * 300])
            return encode(changed)
        return self.envelope_mutator(encode(msg), msg.step)


def _strict_int(v: object, low: int | None = None, high: int | None = None) -> bool:
    return type(v) is int and (low is None or v >= low) and (high is None or v <= high)


def _is_cursor(v: object) -> bool:
    """A checkpoint's cursor as a hello carries it: [round, step], never before the start [0, -1]."""
    return isinstance(v, list) and len(v) == 2 and _strict_int(v[0], 0) and _strict_int(v[1], -1)


def _body_of(data: bytes) -> tuple[Message | None, object]:
    """The message and its JSON text, as an honest reader would take them (None where either cannot be read)."""
    try:
        msg = decode(data)
        return msg, json.loads(msg.text)
    except Exception:  # noqa: BLE001 - not readable: it cannot have been taken
        return None, None


class Recorder(Sink):
    """A fed inbox that keeps what the party sends (forwards, acknowledgements, refusals)."""

    def __init__(self, party: str):
        super().__init__(party)
        self.out: list[tuple[str, bytes]] = []

    def send(self, dst, data):
        self.out.append((dst, bytes(data)))


class _Handshake(Exception):
    """The session took every hello and went on to the handshake."""


@pytest.fixture(scope="module")
def tally():
    """Figures of every generator, printed at the end (the long run's closing note)."""
    figures: dict[str, dict] = {}
    yield figures
    total = {k: sum(f[k] for f in figures.values()) for k in ("cases", "accepted", "harmful", "leaked")}
    print(f"\nfuzz figures: {figures} total {total}")


# -- hellos ----------------------------------------------------------------------------------------

HELLO_KEYS = ["protocol", "plan_hash", "ids_hash", "rows", "phase", "plan_parts", "id_count", "checkpoints",
              "resuming", "resume_from", "held"]
CHECKPOINTS = [Cursor(0, -1), Cursor(0, 4), Cursor(0, 9)]  # the fed party's own, in the resume scenario


class HelloScenario:
    """A party's session fed honest hellos (``slots``: sender, phase, JSON body, in order), one or two
    of them replaced by mutants. The party is built anew per case; its handshake only says it came."""

    def __init__(self, name: str, setups: dict, shapes: dict, me: str, slots: list[tuple[str, str, dict]],
                 setup=None, ids: str = "", checkpoints: list[Cursor] | None = None):
        self.name, self.setups, self.shapes, self.me, self.slots = name, setups, shapes, me, slots
        self.setup, self.ids, self.checkpoints = setup, ids, checkpoints
        self.plan_hash = plan_hash(setups[me].plan)

    def party(self, sink: Transport) -> Party:
        s = self.setups[self.me]
        party = Party(s.graph, self.me, Link(sink), s.modules, s.optimizer, s.inputs, dict(self.shapes), timeout=5)

        def handshake(*_):
            raise _Handshake()

        party.step = handshake
        return party

    def problems(self, fed: list[tuple[str, bytes]], party: Party) -> list[str]:
        """What is wrong with the hellos a session took (it took them all: it reached the handshake)."""
        out, read = [], {}
        for (sender, phase, _), (_, data) in zip(self.slots, fed):
            msg, body = _body_of(data)
            if msg is None or msg.kind != Kind.HELLO or msg.sender != sender or not isinstance(body, dict):
                out.append(f"{phase} from {sender}: not a hello of {sender}")
                continue
            read[(sender, phase)] = body
            if not (_strict_int(body.get("protocol")) and body["protocol"] == PROTOCOL_VERSION):
                out.append(f"{phase} from {sender}: protocol {body.get('protocol')!r}")
            if type(body.get("plan_hash")) is not str or body["plan_hash"] != self.plan_hash:
                out.append(f"{phase} from {sender}: plan hash {str(body.get('plan_hash'))[:40]}")
            if body.get("phase", "hello") != phase or type(body.get("phase", "")) is not str:
                out.append(f"{phase} from {sender}: phase {body.get('phase')!r}")
            ours = (self.ids if phase == "hello" else self.setup.ids_hash if phase == "rows" and self.setup else "")
            theirs = body.get("ids_hash")
            if ours and theirs and theirs != ours:  # no ids said (a party without data) is no ids compared
                out.append(f"{phase} from {sender}: ids hash {str(theirs)[:40]}")
            out += self.extra(sender, phase, body, read, party)
        return out

    def extra(self, sender: str, phase: str, body: dict, read: dict, party: Party) -> list[str]:
        """The scenario's own fields: row counts, checkpoints, the step resumed from."""
        out = []
        counts = self.name in ("counts", "holder") and phase == "hello" or phase == "rows"
        rows = body.get("rows")
        if counts and rows is not None:  # by design a hello that counts no rows is not compared (no setup)
            if not (isinstance(rows, list) and len(rows) == 2 and all(_strict_int(v, 0, MAX_ROWS) for v in rows)):
                out.append(f"{phase} from {sender}: rows {str(rows)[:60]}")
            elif self.setup is not None and self.setup.rows != tuple(rows):
                out.append(f"{phase} from {sender}: rows {rows}, but the party holds {self.setup.rows}")
        if self.checkpoints is not None and phase == "hello":
            held = body.get("checkpoints")
            if not (isinstance(held, list) and len(held) <= MAX_HELD and all(_is_cursor(v) for v in held)):
                out.append(f"checkpoints {str(held)[:60]}")
            if body.get("resuming") is not True:
                out.append(f"resuming {body.get('resuming')!r}")
        if phase == "resume":
            held = read.get((sender, "hello"), {}).get("checkpoints")
            common = set(CHECKPOINTS) & {Cursor(*v) for v in (held if isinstance(held, list) else []) if _is_cursor(v)}
            want = list(max(common)) if common else None
            got = body.get("resume_from")
            if json.dumps(got) != json.dumps(want) or want is not None and not _is_cursor(got):  # types too
                out.append(f"resume_from {got!r}, but the last checkpoint both hold is {want!r}")
            if party.resumed_at != (-1 if want is None else want[1]):
                out.append(f"the party resumes from {party.resumed_at}, not {want}")
        return out


def _hello_scenarios(tmp_path: Path) -> list[HelloScenario]:
    """The first hello at a party without data (counts ignored, and adopted), at a data holder (counts
    compared), a resumed session's two hellos, and the hellos around a private alignment (id_count,
    then the aligned rows of two clinics, which must agree)."""
    pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's "
                        "test command (pip install --no-deps openmined-psi)")

    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    ph, parts, hs = plan_hash(plan), plan_parts(plan), setups["hospital"]

    def body(sender, to, ids, **more):
        return json.loads(hello(sender, to, ph, ids, **more).text)

    first = body("hospital", "server", hs.ids_hash, rows=list(hs.rows), plan_parts=parts)
    resumed = {**first, "checkpoints": [[0, -1], [0, 4], [0, 9], [0, 12]], "resuming": True}
    again = body("hospital", "server", "", phase="resume", resume_from=[0, 9])
    out = [HelloScenario("first", setups, shapes, "server", [("hospital", "hello", first)]),
           HelloScenario("counts", setups, shapes, "server", [("hospital", "hello", first)], setup=setups["server"]),
           HelloScenario("holder", setups, shapes, "hospital",
                         [("server", "hello", body("server", "hospital", hs.ids_hash, rows=list(hs.rows),
                                                   plan_parts=parts))], setup=hs, ids=hs.ids_hash),
           HelloScenario("resume", setups, shapes, "server", [("hospital", "hello", resumed), ("hospital", "resume", again)],
                         checkpoints=list(CHECKPOINTS))]
    files, _, _ = clinic_files(tmp_path, missing_at_b=5)
    plan, setups, shapes = prepare(vertical_plan(tmp_path, {p: files[p] for p in ("clinic_a", "clinic_b")}, align="psi"))
    ph, parts = plan_hash(plan), plan_parts(plan)
    slots = [(c, "hello", body(c, "server", "", plan_parts=parts, id_count=569 - 5 * k))
             for k, c in enumerate(("clinic_a", "clinic_b"))]
    slots += [(c, "rows", body(c, "server", setups[c].ids_hash, rows=list(setups[c].rows), phase="rows"))
              for c in ("clinic_a", "clinic_b")]
    rows = HelloScenario("rows", setups, shapes, "server", slots, setup=setups["server"])
    return out + [rows]


def _no_alignment(link, graph, me, ids, *, timeout, keep, first=(), hellos=None, max_elements=0):
    """The alignment, done (fuzzed on its own below): the server hands back what came early and goes on."""
    for msg in first:
        keep(msg)
    return None


def test_mutated_hellos_leak_nothing_and_no_wrong_hello_is_taken(tmp_path, monkeypatch, tally):
    """Hellos of every phase (first, resume, rows) with fields rewritten, dropped, added or mangled, fed
    to the real session: each is refused (an error naming it, or the session stops with PartyError) or
    taken, and one taken never carries another plan's hash, protocol or ids, counts that are not
    [train, test] within bounds (or differ from the party's own), or a step to resume from other than
    the last checkpoint both hold."""
    from splitlearn.run import align

    monkeypatch.setattr(align, "align_psi", _no_alignment)
    scenarios = _hello_scenarios(tmp_path)
    mutate = JsonMutator(seed=7)
    figures = {"cases": 0, "accepted": 0, "harmful": 0, "leaked": 0}
    harmful, leaked = [], []
    start = time.perf_counter()
    for case in range(_cases("hello")):
        sc = scenarios[case % len(scenarios)]
        peers = sorted({s for s, _, _ in sc.slots} | {"server", "x"})
        chosen = set(mutate.r.sample(range(len(sc.slots)), min(len(sc.slots), mutate.r.choice([1, 1, 1, 2]))))
        fed = []
        for i, (sender, phase, body) in enumerate(sc.slots):
            msg = Message(Kind.HELLO, sender, sc.me, text=json.dumps(body))
            fed.append((sender, mutate(msg, body, HELLO_KEYS, peers) if i in chosen else encode(msg)))
        sink = Sink(sc.me)
        sink.inbox = list(fed)
        party = sc.party(sink)
        splits = sc.setup.splits if sc.setup is not None else None
        try:
            with session(party, sc.ids, sc.setup, sc.checkpoints):
                pass
        except _Handshake:
            figures["accepted"] += 1
            found = sc.problems(fed, party)
            if found:
                harmful.append((sc.name, found, fed))
        except REFUSALS:
            pass
        except Exception as e:  # noqa: BLE001 - anything else leaked
            leaked.append((sc.name, repr(e)[:300]))
        finally:
            if sc.setup is not None:
                sc.setup.splits = splits
        figures["cases"] += 1
    figures.update(harmful=len(harmful), leaked=len(leaked), seconds=round(time.perf_counter() - start, 1))
    tally["hello"] = figures
    assert leaked == [], leaked[:5]
    assert harmful == [], sorted({f"{name}: {found}" for name, found, _ in harmful})[:20]
    assert figures["accepted"] > 0.02 * figures["cases"]  # the honest path is reached, not only refusals


@pytest.mark.parametrize("resume_from", [[0, 9.0], [False, 9], [0.0, 9.0], [0, 9, 0], [[0, 9]]],
                         ids=["float-step", "bool-round", "floats", "three", "nested"])
def test_a_resume_hello_whose_cursor_only_looks_equal_is_refused(tmp_path, monkeypatch, resume_from):
    """The resume hello's ``resume_from`` must be the agreed cursor exactly, types included: values that
    compare equal in Python (``9.0 == 9``, ``False == 0``) are another JSON and another claim, refused."""
    from splitlearn.run import align

    monkeypatch.setattr(align, "align_psi", _no_alignment)
    sc = next(s for s in _hello_scenarios(tmp_path) if s.name == "resume")
    slots = [*sc.slots[:-1], (*sc.slots[-1][:2], {**sc.slots[-1][2], "resume_from": resume_from})]
    sink = Sink(sc.me)
    sink.inbox = [(sender, encode(Message(Kind.HELLO, sender, sc.me, text=json.dumps(body))))
                  for sender, _, body in slots]
    with pytest.raises(PartyError, match="resume_from differs"):
        with session(sc.party(sink), sc.ids, sc.setup, sc.checkpoints):
            pass
    sink.inbox = [(sender, encode(Message(Kind.HELLO, sender, sc.me, text=json.dumps(body))))
                  for sender, _, body in sc.slots]  # the honest cursor [0, 9] is taken
    with pytest.raises(_Handshake):
        with session(sc.party(sink), sc.ids, sc.setup, sc.checkpoints):
            pass


# -- alignment messages ------------------------------------------------------------------------------

ALIGN_KEYS = ["from", "to", "phase", "size", "ids", "x"]


def _align_honest() -> list[tuple[str, dict, bytes]]:
    """The honest alignment messages of two clinics relayed by the server: (hop into the server, body, data)."""
    ids = [f"PAT-{i:05d}-Q" for i in range(10)]
    return [("clinic_b", {"phase": "request", "size": 20, "from": "clinic_b", "to": "clinic_a"}, b"\x01" * 700),
            ("clinic_a", {"phase": "setup", "from": "clinic_a", "to": "clinic_b"}, b"\x02" * 300),
            ("clinic_a", {"phase": "response", "from": "clinic_a", "to": "clinic_b"}, b"\x03" * 700),
            ("clinic_b", {"phase": "result", "ids": ids, "from": "clinic_b", "to": "clinic_a"}, b"")]


def _align_mutant(mutate: JsonMutator, msg: Message, body: dict) -> bytes:
    """A mutant of an alignment message: its JSON and envelope (:class:`JsonMutator`) or its data."""
    r = mutate.r
    if r.random() < 0.25:
        tensors = dict(msg.tensors)
        op = r.randrange(3)
        if op == 0:
            tensors["data"] = Encoded("raw", "uint8", (n := r.choice([0, 1, 36_000, 80_000]),), b"\x05" * n)
        elif op == 1:
            tensors[r.choice(["x", "data2"])] = Encoded("raw", "uint8", (4,), b"\x00" * 4)
        else:
            tensors = {"data": Encoded("float32", "float32", (2,), b"\x00" * 8)}
        return encode(Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, tensors, msg.text))
    return mutate(msg, body, ALIGN_KEYS, ["clinic_a", "clinic_b", "server", "x"])


def _align_problems(run, me: str, hop_of: dict, counts_said: dict, rec: Recorder) -> list[str]:
    """What is wrong with what the alignment took: kept for this party or forwarded."""
    from splitlearn.run import align

    expected = {("clinic_b", "clinic_a", "request"), ("clinic_a", "clinic_b", "setup"),
                ("clinic_a", "clinic_b", "response"), ("clinic_b", "clinic_a", "result")}
    cap = align.MAX_ELEMENTS

    def bound(p):
        n = counts_said.get(p)
        return n if _strict_int(n, 0, cap) else cap

    taken = [(body, n, hop) for body, _, hop, n in run.inbox.values()]
    for dst, data in rec.out:
        msg = decode(data)
        if msg.kind == Kind.ALIGN:
            body = json.loads(msg.text)
            taken.append((body, len(msg.text) + msg.payload_bytes, "forwarded"))
            if set(msg.tensors) - {"data"} or dst != body.get("to"):
                return [f"forwarded {sorted(msg.tensors)} to {dst}"]
    out, seen = [], set()
    for body, n, hop in taken:
        origin, to, phase = body.get("from"), body.get("to"), body.get("phase")
        if not all(type(v) is str for v in (origin, to, phase)) or (origin, to, phase) not in expected:
            out.append(f"took {str(body)[:80]}")
            continue
        if (origin, to, phase) in seen:
            out.append(f"took a second {phase} from {origin}")
        seen.add((origin, to, phase))
        if hop != "forwarded" and (to != me or hop != hop_of[origin]):
            out.append(f"kept a {phase} for {to} that came from {hop}")
        n_from, n_to = bound(origin), bound(to)
        if phase == "request":
            if not _strict_int(body.get("size"), 0, n_from):
                out.append(f"took a request of size {body.get('size')!r} (at most {n_from})")
                continue
            n_from = body["size"]
        if phase == "result" and not (isinstance(body.get("ids"), list) and len(body["ids"]) <= min(n_from, n_to)
                                      and all(type(v) is str for v in body["ids"])):
            out.append(f"took a result of ids {str(body.get('ids'))[:60]}")
        if n > align.message_bytes(phase, n_from, n_to, run.link.limits.text_bytes):
            out.append(f"took a {phase} of {n} bytes")
    if any(not _strict_int(v, 0) for v in run.counts.values()):
        out.append(f"counts {run.counts}")
    out += [f"holds {v} bytes of {p}" for p, v in run.budget.held.items() if v > run.budget.limits.get(p, 0)]
    return out


def test_mutated_alignment_messages_leak_nothing_and_only_the_protocols_are_taken(tmp_path, tally):
    """PSI requests, setups, responses and results (and the id counts of the hellos before them),
    mutated and repeated, fed to the alignment of the relaying server and of a clinic: each is refused
    (PlanError naming the peer) or taken, and what is taken or forwarded is a message of the protocol
    on its route, once, with a size within the ids its sender said it holds and bytes within them."""
    from splitlearn.run import align
    pytest.importorskip("private_set_intersection.python", reason="openmined-psi is installed by the README's "
                        "test command (pip install --no-deps openmined-psi)")

    files, _, _ = clinic_files(tmp_path, missing_at_b=5)
    plan, _, _ = prepare(vertical_plan(tmp_path, {p: files[p] for p in ("clinic_a", "clinic_b")}, align="psi"))
    graph = build_graph(plan)
    honest = _align_honest()
    mutate = JsonMutator(seed=11)
    figures = {"cases": 0, "accepted": 0, "harmful": 0, "leaked": 0}
    harmful, leaked = [], []
    start = time.perf_counter()
    for case in range(_cases("align")):
        relay = case % 2 == 0
        me = "server" if relay else "clinic_a"
        mine = [(hop, b, d) for hop, b, d in honest if relay or b["to"] == "clinic_a"]
        hop_of = {"clinic_a": "clinic_a", "clinic_b": "clinic_b"} if relay else {"clinic_b": "server"}
        said = {"clinic_a": {"id_count": 569}, "clinic_b": {"id_count": 564}} if relay else {"server": {}}
        if relay and mutate.r.random() < 0.15:  # the id count of a hello, rewritten
            c = mutate.r.choice(["clinic_a", "clinic_b"])
            said[c] = {"id_count": mutate.value(said[c]["id_count"])}
        rec = Recorder(me)
        for _ in range(mutate.r.randint(1, 5)):
            hop, body, data = mutate.r.choice(mine)
            msg = Message(Kind.ALIGN, hop if relay else "server", me, wire="align", text=json.dumps(body),
                          tensors={"data": Encoded("raw", "uint8", (len(data),), data)} if data else {})
            rec.inbox.append((msg.sender, _align_mutant(mutate, msg, body) if mutate.r.random() < 0.7 else encode(msg)))
        counts_said = {p: h.get("id_count") for p, h in said.items() if "id_count" in h}
        kept: list[Message] = []
        run = None
        try:
            run = align.Alignment(Link(rec), graph, me, None if relay else 569, 5.0, kept.append, said,
                                   align.MAX_ELEMENTS)
            while rec.inbox:
                run.pump()
        except (TransportTimeout, *REFUSALS):
            pass
        except Exception as e:  # noqa: BLE001 - anything else leaked
            leaked.append(repr(e)[:300])
        if run is not None:
            found = _align_problems(run, me, hop_of, counts_said, rec)
            figures["accepted"] += bool(run.inbox or any(kind_of(d) == Kind.ALIGN for _, d in rec.out))
            if found:
                harmful.append(found)
        figures["cases"] += 1
    figures.update(harmful=len(harmful), leaked=len(leaked), seconds=round(time.perf_counter() - start, 1))
    tally["align"] = figures
    assert leaked == [], leaked[:5]
    assert harmful == [], harmful[:5]
    assert figures["accepted"] > 0.05 * figures["cases"]


# -- the federation's commands, acknowledgements and weights ------------------------------------------

COMMAND_KEYS = ["do", "request", "deadline", "turn", "client", "model", "source", "to", "evaluation", "lend", "ready",
                "clients", "samples", "reason", "cursor"]


class _Federation:
    """A FedAvg plan of two clients: a client follower and the coordinator (the federation), each
    reading from a fed inbox; the client's turns are recorded, not run."""

    def __init__(self):
        from splitlearn.clients.follower import Follower
        from splitlearn.clients.parties import make_role
        from splitlearn.wire.metering import Meter

        self.plan = tiny(count=2, schedule="fedavg")
        hub = InProcessHub(["server", "hospital-1", "hospital-2"])
        self.client = Follower(self.plan, "hospital-1", hub.transport("hospital-1"), timeout=5.0)
        self.server = make_role(self.plan, "server", hub.transport("server"), timeout=5.0)
        self.turns: list[tuple] = []
        self.client.run_turn = lambda turn, client, model=None: self.turns.append((turn, client, model)) or (True, "")
        self.meter = Meter

    def feed(self, role, inbox: list[tuple[str, bytes]]) -> Recorder:
        rec = Recorder(role.name)
        rec.inbox = list(inbox)
        role.link = Link(rec, self.meter(role.name), role.limits)
        return rec


def _weights_problems(before: dict, after: dict) -> list[str]:
    """Weights after must have the names, dtypes and shapes of before and be finite (new finite values
    are what an honest peer may send)."""
    out = [f"{k}: {str(v.dtype)}{list(v.shape)}" for k, v in after.items()
           if k not in before or v.dtype != before[k].dtype or v.shape != before[k].shape]
    out += [f"{k}: not finite" for k, v in after.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if set(after) != set(before):
        out.append(f"names {sorted(after)[:4]}")
    return out


def test_mutated_commands_acks_and_weights_leak_nothing_and_nothing_harmful_is_carried_out(tally):
    """A client's command loop fed mutated turn, load, send and stop commands; a client's and the
    federation's weights readers fed mutated WEIGHTS (NaN, shapes, dtypes, names, steps); the
    coordinator's reading of acknowledgements fed mutated ACKs. Nothing but a refusal escapes; no
    turn names a client or model outside the plan, no weights go to a party outside it, no weights
    that are not finite or do not fit are loaded or averaged, and no acknowledgement of another
    request (or without what was asked) is taken."""
    from splitlearn.clients.roles import physical_names
    from splitlearn.clients.weights import state_of
    from splitlearn.wire import messages as m
    from splitlearn.wire.control import CensusAnswer, Collect, LoadWeights, SendWeights, Stop, TakeTurn

    fed_roles = _Federation()
    client, server = fed_roles.client, fed_roles.server
    everyone = set(physical_names(fed_roles.plan))
    turn = next(iter(client.turns))
    mutate, envelope = JsonMutator(seed=13), Mutator(seed=17)
    figures = {k: {"cases": 0, "accepted": 0, "harmful": 0, "leaked": 0} for k in ("command", "weights", "ack")}
    harmful, leaked = [], []
    start = time.perf_counter()
    own, fed_state = state_of(client.setup.modules), {k: v.clone() for k, v in server.global_state.items()}

    def run(kind: str, work) -> None:
        figures[kind]["cases"] += 1
        try:
            found, took = work()
        except REFUSALS:
            return
        except Exception as e:  # noqa: BLE001 - anything else leaked
            leaked.append((kind, repr(e)[:300]))
            figures[kind]["leaked"] += 1
            return
        figures[kind]["accepted"] += took
        if found:
            harmful.append((kind, found))
            figures[kind]["harmful"] += 1

    def commands():
        honest = [TakeTurn(turn, "hospital-1"), TakeTurn(turn, "hospital-1", "hospital-2"),
                  LoadWeights("server", evaluation=True), SendWeights("server"), Collect(("hospital-1",), (3,))]
        inbox = []
        for k in range(mutate.r.randint(1, 4)):
            msg = m.command("server", "hospital-1", mutate.r.choice(honest), k + 1, time.time() + 60)
            inbox.append(("server", mutate(msg, json.loads(msg.text), COMMAND_KEYS, ["server", "hospital-2", "x"])))
        inbox.append(("server", encode(m.command("server", "hospital-1", Stop(), 99, time.time() + 60))))
        fed_roles.turns.clear()
        rec = fed_roles.feed(client, inbox)
        try:
            client.follow()
        except TransportTimeout:
            pass  # a mutant stop ended the loop before the honest one, or a wait found the inbox empty
        finally:
            load_state_dict(client, own)
        found = [f"a turn with {c!r}, model {mdl!r}" for _, c, mdl in fed_roles.turns
                 if c not in client.clients or mdl is not None and mdl not in client.clients]
        found += [f"weights sent to {dst!r}" for dst, d in rec.out if kind_of(d) == Kind.WEIGHTS and dst not in everyone]
        return found, bool(fed_roles.turns) or any(kind_of(d) == Kind.WEIGHTS for _, d in rec.out)

    def weights_at(role, state: dict, senders: list[str], take):
        inbox = []
        for s in senders:
            data = encode(m.weights(s, role.name, state, 7))
            inbox.append((s, envelope(data, 7) if mutate.r.random() < 0.8 else data))
        fed_roles.feed(role, inbox)
        before = {k: v.clone() for k, v in state.items()}
        after = take()
        return _weights_problems(before, after), any(not torch.equal(after[k], before[k]) for k in before
                                                             if k in after and after[k].shape == before[k].shape)

    def client_weights():
        try:
            return weights_at(client, own, ["server"],
                              lambda: (client.load_weights("server", 7), state_of(client.setup.modules))[1])
        finally:
            load_state_dict(client, own)

    def federation_weights():
        server.global_state = {k: v.clone() for k, v in fed_state.items()}
        return weights_at(server, fed_state, ["hospital-1", "hospital-2"],
                          lambda: (server.collect(["hospital-1", "hospital-2"], [3, 5], 7), server.global_state)[1])

    def acks():
        inbox = []
        for s in ("hospital-1", "hospital-2"):
            msg = m.reply(s, "server", 3, CensusAnswer(10, 2, {}))
            inbox.append((s, mutate(msg, json.loads(msg.text), ["reply", "request", "train", "test", "schema"],
                                    ["server", "x"]) if mutate.r.random() < 0.8 else encode(msg)))
        fed_roles.feed(server, inbox)
        got = server.replies(["hospital-1", "hospital-2"], 5.0, 3, CensusAnswer)
        found = []
        for s, answer in got.items():
            ok = [b for p, d in inbox if p == s for _, b in [_body_of(d)] if isinstance(b, dict)
                  and set(b) == {"reply", "request", "train", "test", "schema"} and b["reply"] == "census"
                  and _strict_int(b["request"]) and b["request"] == 3 and _strict_int(b["train"], 0)
                  and _strict_int(b["test"], 0) and isinstance(b["schema"], dict)
                  and (b["train"], b["test"], b["schema"]) == (answer.train, answer.test, answer.schema)]
            if not ok:
                found.append(f"took {str(answer)[:80]} from {s}")
        return found, bool(got)

    for case in range(_cases("command")):
        run("command", commands)
    for case in range(_cases("weights")):
        run("weights", client_weights if case % 2 else federation_weights)
    for case in range(_cases("ack")):
        run("ack", acks)
    for kind, f in figures.items():
        tally[kind] = {**f, "seconds": round(time.perf_counter() - start, 1)}
    assert leaked == [], leaked[:5]
    assert harmful == [], harmful[:5]
    assert all(f["accepted"] > 0.02 * f["cases"] for f in figures.values()), figures


def load_state_dict(role, state: dict) -> None:
    """Put a client's weights back as they were before a case."""
    from splitlearn.clients.weights import load_state

    load_state(role.setup.modules, state)
