"""A peer with a valid identity cannot poison, crash, stall or bloat a party.

Each test plays one party of the vanilla plan by hand (the transport authenticates it, as mutual
TLS would) and sends what an adversarial or broken hospital or server could send.
"""

import json
import math
import threading
import time
import tomllib

import pytest
import torch

import splitlearn
from splitlearn.tools.audit.run import AuditError, audit_run
from splitlearn.wire.codec import Encoded, get_codec
from splitlearn.core.engine import Party
from splitlearn.wire.link import Link
from splitlearn.wire.messages import PROTOCOL_VERSION, Kind, Limits, Message, decode, encode, parse_json
from splitlearn.core.plan import plan_hash
from splitlearn.core.specs import PlanError
from splitlearn.core.load import load_plan
from splitlearn.wire.codec import WireError
from splitlearn.run.setup import prepare, schedule
from splitlearn.run.session import run_party
from splitlearn.wire.transport import InProcessHub, TransportClosed

from .conftest import EXAMPLES
from .support import ACT, LABEL, Server, f32

pytestmark = pytest.mark.timeout(120)


def vanilla(**wire):
    body = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    if wire:
        body["wires"] = {"bottom": wire}
    return body


def clean_weights(plan=None):
    srv = Server(plan)
    srv.greet()
    srv.finish()
    srv.done()
    return srv.weights()


@pytest.mark.parametrize("value, why", [(math.nan, "non-finite"), (math.inf, "non-finite"), (-math.inf, "non-finite"),
                                        (3e38, "max_abs")])
def test_a_poisoned_activation_is_refused_and_training_stays_clean(value, why):
    clean = clean_weights()
    srv = Server()
    srv.greet()
    act, lab = srv.good()
    t = torch.frombuffer(bytearray(act["t"].data), dtype=torch.float32)
    t[7] = value
    srv.h.send(Kind.ACTIVATION, 0, ACT, {"t": Encoded("float32", "float32", act["t"].shape, t.numpy().tobytes())})
    srv.finish()
    report = srv.done()
    assert len(report.refused) == 1 and why in report.refused[0] and ACT in report.refused[0]
    after = srv.weights()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(after[k], clean[k]) for k in clean)  # the poisoned tensor left no trace


def test_nonfinite_values_are_taken_where_the_plan_allows_them():
    srv = Server(load_plan(vanilla(allow_nonfinite=True, max_abs=math.inf)))
    srv.greet()
    act, lab = srv.good()
    t = torch.frombuffer(bytearray(act["t"].data), dtype=torch.float32)
    t[7] = math.nan
    srv.h.send(Kind.ACTIVATION, 0, ACT, {"t": Encoded("float32", "float32", act["t"].shape, t.numpy().tobytes())})
    srv.h.send(Kind.ACTIVATION, 0, LABEL, lab)
    report = srv.done()
    assert report.refused == []
    assert not all(torch.isfinite(v).all() for v in srv.weights().values())  # what the plan asked for


def test_a_nan_gradient_is_refused_at_the_hospital():
    """The hospital's side: a server returning NaN in the gradient of the activations."""
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    step0 = next(schedule(plan, setups["hospital"].splits))
    hub = InProcessHub(["hospital", "server"])
    hs = setups["hospital"]
    before = {k: v.clone() for k, v in hs.modules["bottom"].state_dict().items()}
    hospital = Party(hs.graph, "hospital", Link(hub.transport("hospital")), hs.modules, hs.optimizer, hs.inputs, {},
                     timeout=10)
    box = {}

    def work():
        try:
            box["report"] = run_party(hospital, iter([step0]), ids_hash=hs.ids_hash)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    srv = hub.transport("server")

    def send(kind, step, wire, tensors, text=""):
        srv.send("hospital", encode(Message(kind, "server", "hospital", step, wire, tensors, text)))

    def recv():
        return decode(srv.recv(10)[1])

    send(Kind.HELLO, 0, "", {}, json.dumps({"protocol": PROTOCOL_VERSION, "plan_hash": plan_hash(plan), "ids_hash": hs.ids_hash}))
    kinds = [recv().kind for _ in range(3)]  # its hello and the handshake's two tensors
    assert kinds == [Kind.HELLO, Kind.ACTIVATION, Kind.ACTIVATION]
    act = recv()
    assert act.kind == Kind.ACTIVATION and act.step == 0
    recv()  # the labels
    b = len(step0.rows)
    nan = torch.zeros(b, 128)
    nan[3, 5] = math.nan
    send(Kind.GRADIENT, 0, ACT, {"t": f32(nan)})
    err = recv()
    assert err.kind == Kind.ERROR and "non-finite" in err.text and ACT in err.text and "gradient" in err.text
    send(Kind.GRADIENT, 0, ACT, {"t": f32(torch.zeros(b, 128))})  # the honest answer completes the step
    send(Kind.STOP, 0, "", {}, "done")
    th.join(10)
    assert "error" not in box, box.get("error")
    after = hs.modules["bottom"].state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # a zero gradient: unchanged, and finite


@pytest.mark.parametrize("codec", ["int8", "topk:0.5"])
def test_a_nan_in_a_codec_buffer_is_refused(codec):
    plan = load_plan(vanilla(codec=codec))
    srv = Server(plan)
    srv.greet()
    act, lab = srv.good()
    e = act["t"]
    if codec == "int8":
        poisoned = Encoded(e.codec, e.dtype, e.shape, e.data, {"affine": torch.tensor([[0.0, math.nan]]).numpy().tobytes()})
    else:
        vals = torch.frombuffer(bytearray(e.data), dtype=torch.float32)
        vals[0] = math.nan
        poisoned = Encoded(e.codec, e.dtype, e.shape, vals.numpy().tobytes(), e.extra)
    srv.h.send(Kind.ACTIVATION, 0, ACT, {"t": poisoned})
    srv.finish()
    report = srv.done()
    assert len(report.refused) == 1 and "non-finite" in report.refused[0]
    assert all(torch.isfinite(v).all() for v in srv.weights().values())


@pytest.mark.parametrize("label", [10**12, 10, -1])
def test_a_label_outside_the_heads_classes_is_refused_not_a_crash(label):
    srv = Server()
    srv.greet()
    act, lab = srv.good()
    y = srv.setups["hospital"].inputs["hospital.y"][srv.steps[0].rows].clone()
    y[0] = label
    srv.h.send(Kind.ACTIVATION, 0, LABEL, {"t": get_codec("raw").encode(y)})
    srv.finish()
    report = srv.done()
    assert len(report.refused) == 1
    assert f"holds label {label}, outside the head's 10 classes" in report.refused[0] and LABEL in report.refused[0]


def test_local_labels_outside_the_heads_classes_are_a_plan_error():
    body = vanilla()
    body["networks"]["mlp"]["args"]["sizes"] = [64, 128, 64, 6]  # digits has 10 classes
    with pytest.raises(PlanError, match=r"labels 'hospital.y' take values 0..9, but the head 'top' gives 6"):
        splitlearn.train(body, epochs=1)


def test_a_slow_drip_does_not_stretch_the_step_past_its_deadline():
    """A message every 0.2 s (refused or stale) used to reset the wait: now the step has one deadline."""
    srv = Server(timeout=1.0)
    srv.greet()
    dripped = 0
    while srv.thread.is_alive() and dripped < 100:  # 20 s of drip at most
        srv.h.send(Kind.ACTIVATION, -5 if dripped % 2 else 0, ACT, {"t": f32(torch.zeros(2, 2))})
        dripped += 1
        time.sleep(0.2)
    srv.thread.join(5)
    assert "not done within its deadline of 1.0 s" in str(srv.box.get("error"))
    assert dripped < 15  # it gave up while the drip went on (10 s of drip per second of deadline otherwise)


def test_early_messages_are_checked_before_they_are_kept_and_bounded_per_peer():
    limits = Limits(early_bytes=100_000, early_messages=64)
    srv = Server(steps=2, limits=limits)
    srv.greet()
    b = len(srv.steps[0].rows)
    big = Encoded("float32", "float32", (b, 60 * 2**20 // (4 * b)), bytes(60 * 2**20))  # 60 MiB of the wrong shape
    for _ in range(4):
        srv.h.send(Kind.ACTIVATION, 1, ACT, {"t": big})
    fits = f32(torch.zeros(b, 128))  # 16 KiB each: six fit under 100,000 bytes
    for _ in range(16):
        srv.h.send(Kind.ACTIVATION, 1, ACT, {"t": fits})
    deadline = time.monotonic() + 10
    while srv.link.refused_count < 14 and time.monotonic() < deadline:
        time.sleep(0.01)
    held = srv.party.held_early
    assert held == {"hospital": (6, 6 * b * 128 * 4)}
    assert held["hospital"][1] <= limits.early_bytes
    assert srv.link.refused_count == 4 + 10
    assert sum("was agreed" in r for r in srv.link.refused) == 4
    assert sum("Limits.early_bytes" in r for r in srv.link.refused) == 10
    srv.finish(0)
    srv.finish(1)  # step 1 takes the first early message, which is zeros of the agreed shape
    srv.done()
    assert srv.party.held_early == {}  # released when their step was done


def test_far_ahead_step_ids_leave_no_state_behind():
    srv = Server(steps=41)
    srv.greet()
    srv.h.send(Kind.ACTIVATION, srv.steps[40].id, ACT, {"t": f32(torch.zeros(len(srv.steps[40].rows), 128))})
    deadline = time.monotonic() + 10
    while not srv.party.held_early and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.party.held_early["hospital"][0] == 1  # 40 steps ahead: an honest sender of eval steps may be
    for i in range(10_000):
        srv.h.send(Kind.ACTIVATION, 1000 + i, ACT, {"t": f32(torch.zeros(1, 128))})
    for i in range(41):
        srv.finish(i)
    srv.done()
    assert srv.link.refused_count == 10_000
    assert srv.party.held_early == {} and srv.party.kept_early == {}


@pytest.mark.parametrize("dims", [240, 40_000])
def test_a_shape_of_many_dimensions_is_refused_at_once(dims):
    """2 KB of dimensions used to crash decode (a 4300-digit integer in an f-string) or take seconds."""
    data = encode(Message(Kind.ACTIVATION, "hospital", "server", 0, ACT,
                          {"t": Encoded("float32", "float32", (2**62,) * dims, b"")}))
    t0 = time.process_time()
    with pytest.raises(WireError, match=f"has {dims} dimensions, more than 16"):
        decode(data)
    assert time.process_time() - t0 < 0.5  # CPU time of one refusal, far from the 6 s it took


def test_a_peer_cannot_fill_the_grpc_inbox_faster_than_the_party_reads(tmp_path):
    from splitlearn.wire.transport.grpc import GrpcTransport
    from splitlearn.wire.transport.tls import load_credentials, make_certs

    make_certs(["a", "b"], tmp_path)
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(tmp_path, "a"),
                      max_message_bytes=2**16)
    a.start()
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{a.port}"}, credentials=load_credentials(tmp_path, "b"))
    b.start()
    try:
        a.wait_connected(20)
        b.wait_connected(20)
        for _ in range(40):  # 4 MB, while a reads nothing
            b.send("a", b"\x01" * 100_000)
        deadline = time.monotonic() + 3
        while a.queued_bytes("b") < a.hard_limit - 100_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = a.queued_bytes("b")
        assert 0 < held <= a.hard_limit < 40 * 100_000
        got = sum(len(a.recv(10)[1]) for _ in range(40))  # reading lets the rest come
        assert got == 40 * 100_000 and a.queued_bytes("b") == 0
    finally:
        b.close()
        a.close()


def test_a_huge_sender_string_is_quoted_short():
    srv = Server()
    srv.greet()
    for what in ("sender", "wire", "text"):
        msg = Message(Kind.ACTIVATION, "hospital", "server", 0, ACT, {"t": f32(torch.zeros(1, 128))})
        setattr(msg, what, "x" * (20 * 2**20))
        srv.h.t.send("server", encode(msg))
    srv.finish()
    report = srv.done()
    assert len(report.refused) == 3
    assert all(len(r) < 700 for r in report.refused), [len(r) for r in report.refused]
    assert "(20971520 characters)" in report.refused[0]
    sent_back = srv.link.meter.summary()["bytes_sent"]
    assert sent_back < 100_000  # three short ERROR replies and one gradient, not 3 x 20 MiB


def test_a_deeply_nested_hello_is_refused_and_the_real_hello_still_works():
    srv = Server()
    srv.h.send(Kind.HELLO, 0, "", {}, "[" * 100_000 + "]" * 100_000)
    srv.greet()
    srv.finish()
    report = srv.done()
    assert len(report.refused) == 1 and "nested deeper than 32" in report.refused[0]


def test_parse_json_refuses_depth_and_size_and_reads_the_rest():
    assert parse_json('{"a": [1, {"b": "[[[["}]}') == {"a": [1, {"b": "[[[["}]}
    with pytest.raises(WireError, match="nested deeper"):
        parse_json('{"x":' * 40 + "1" + "}" * 40)
    with pytest.raises(WireError, match="exceeds the limit"):
        parse_json(" " * (2 << 20))
    with pytest.raises(WireError, match="not valid JSON"):
        parse_json("{'not': json}")


def test_a_deeply_nested_schedule_command_is_refused_by_a_follower():
    from splitlearn.clients.roles import coordinator_of
    from splitlearn.clients.follower import Follower
    from .support import tiny

    plan = tiny(count=2, schedule="sequential")
    coord = coordinator_of(plan)
    hub = InProcessHub(["server", "hospital-1", "hospital-2"])
    role = Follower(plan, "hospital-1", hub.transport("hospital-1"))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("ok", role.follow() or True), daemon=True)
    th.start()
    c = hub.transport(coord)
    c.send("hospital-1", encode(Message(Kind.COMMAND, coord, "hospital-1", text='{"do": "turn", "request": 1, "x": '
                                        + "[" * 100_000 + "]" * 100_000 + "}")))
    c.send("hospital-1", encode(Message(Kind.COMMAND, coord, "hospital-1", text='{"do": "turn", "request": 2, '
                                        '"deadline": "soon"}')))
    stop = json.dumps({"do": "stop", "request": 3, "deadline": time.time() + 60})
    c.send("hospital-1", encode(Message(Kind.COMMAND, coord, "hospital-1", text=stop)))
    th.join(10)
    assert box.get("ok") is True
    assert any("nested deeper than 32" in r for r in role.link.refused)
    assert any("'turn' command whose deadline is not a number" in r for r in role.link.refused)


def test_an_oversized_envelope_is_named_as_such(tmp_path):
    """Over the limit: refused by name and the stream goes on; far over it: the broken stream names the limit."""
    from splitlearn.wire.transport.grpc import GrpcTransport
    from splitlearn.wire.transport.tls import load_credentials, make_certs

    make_certs(["a", "b"], tmp_path)
    a = GrpcTransport("a", listen="127.0.0.1:0", accept=["b"], credentials=load_credentials(tmp_path, "a"),
                      max_message_bytes=2**20)
    a.start()
    b = GrpcTransport("b", dial={"a": f"127.0.0.1:{a.port}"}, credentials=load_credentials(tmp_path, "b"),
                      max_message_bytes=8 * 2**20)
    b.start()
    link = Link(a, limits=Limits(message_bytes=2**20))
    try:
        a.wait_connected(20)
        b.wait_connected(20)
        b.send("a", b"\x01" * (3 * 2**19))
        b.send("a", encode(Message(Kind.STOP, "b", "a", text="done")))
        assert link.recv(20).kind == Kind.STOP  # the stream went on
        assert link.refused == [f"a refused a message from 'b': message of {3 * 2**19} bytes exceeds the limit of "
                                "1048576 (Limits.message_bytes)"]
        b.send("a", b"\x01" * (4 * 2**20))
        with pytest.raises(TransportClosed, match=r"hard limit of 3145728 bytes \(twice max_message_bytes"):
            a.recv(20)
    finally:
        b.close()
        a.close()


def test_audit_and_predict_refuse_a_poisoned_run(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, out=out)
    observed = out / "parties" / "server" / "observed.safetensors"
    seen = load_file(str(observed))
    key = next(k for k, v in seen.items() if v.is_floating_point())
    seen[key][0] = math.nan
    save_file(seen, str(observed))
    with pytest.raises(AuditError, match="NaN or infinite"):
        audit_run(out)
    weights = out / "parties" / "server" / "weights.safetensors"
    w = load_file(str(weights))
    w[next(iter(w))].view(-1)[0] = math.inf
    save_file(w, str(weights))
    with pytest.raises(PlanError, match="hold NaN or infinite values"):
        splitlearn.predict(out)
