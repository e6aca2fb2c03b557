"""Nothing received is unpickled or given to torch.load; bad tensors are refused, the party goes on."""

import ast
import threading
from pathlib import Path

import torch

import splitlearn
from splitlearn.wire.codec import Encoded, get_codec
from splitlearn.core.engine import Party
from splitlearn.wire.link import Link
from splitlearn.wire.messages import Kind, Message, encode
from splitlearn.core.plan import plan_hash
from splitlearn.run.setup import prepare, schedule
from splitlearn.run.session import run_party
from splitlearn.wire.transport import InProcessHub

from .conftest import EXAMPLES
from .support import FakeHospital, f32

PACKAGE = Path(splitlearn.__file__).parent
FORBIDDEN_CALLS = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("marshal", "loads"), ("dill", "loads"),
                   ("cloudpickle", "loads"), ("pickle", "Unpickler")}
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def test_package_never_unpickles_or_torch_loads():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name.endswith("_pb2.py"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name.split(".")[0] for a in node.names] + ([node.module.split(".")[0]] if getattr(node, "module", None) else [])
                offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in FORBIDDEN_IMPORTS]
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in FORBIDDEN_CALLS:
                    offenders.append(f"{path.name}:{node.lineno} calls {f.value.id}.{f.attr}")
                if isinstance(f, ast.Name) and f.id in {"eval", "exec"}:
                    offenders.append(f"{path.name}:{node.lineno} calls {f.id}")
                if isinstance(f, ast.Attribute) and f.attr == "load" and any(
                        k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno} loads with allow_pickle")
    assert offenders == []


def test_the_scan_would_catch_a_torch_load(tmp_path):
    bad = "import torch\nx = torch.load(data)\n"
    tree = ast.parse(bad)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and (n.func.value.id, n.func.attr) in FORBIDDEN_CALLS]
    assert len(calls) == 1


def start_server(hub, plan, setups, shapes, steps):
    s = setups["server"]
    party = Party(s.graph, "server", Link(hub.transport("server")), s.modules, s.optimizer, s.inputs, {}, timeout=10)
    box = {}

    def work():
        try:
            box["report"] = run_party(party, iter(steps), ids_hash=s.ids_hash)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    return party, th, box


def test_bad_tensors_are_refused_and_the_server_keeps_running():
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    step0 = next(schedule(plan, setups["server"].splits))
    hub = InProcessHub(["hospital", "server"])
    server, th, box = start_server(hub, plan, setups, shapes, [step0])
    h = FakeHospital(hub, plan, setups["hospital"])
    h.hello(plan_hash(plan))
    assert h.recv().kind == Kind.HELLO
    # handshake: one row of zeros on each wire fixes the shapes
    h.send(Kind.ACTIVATION, -1, "bottom->top", {"t": f32(torch.zeros(1, 128))})
    h.send(Kind.ACTIVATION, -1, "hospital.y->digit", {"t": get_codec("raw").encode(torch.zeros(1, dtype=torch.long))})
    b = len(step0.rows)
    bad = [
        ({"t": Encoded("float32", "int32", (b, 128), bytes(4 * b * 128))}, "dtype int32 where float32 was agreed"),
        ({"t": f32(torch.zeros(b, 64))}, f"shape [{b}, 64] where [{b}, 128] was expected"),
        ({"t": Encoded("float32", "float32", (1 << 16, 1 << 14), b"")}, "exceed the limit"),
        ({"t": Encoded("float32", "float32", (b, 128), bytes(10))}, "bytes for shape"),
        ({"t": f32(torch.zeros(b, 128)), "u": f32(torch.zeros(1))}, "expected one tensor"),
    ]
    for tensors, _ in bad:
        h.send(Kind.ACTIVATION, 0, "bottom->top", tensors)
    for _, why in bad:
        err = h.recv()
        assert err.kind == Kind.ERROR and why in err.text and "bottom->top" in err.text and "'hospital'" in err.text
    h.t.send("server", b"\x07random bytes, not a message")
    assert h.recv().kind == Kind.ERROR
    # the server is still in its step: a good activation and the labels complete it
    x = setups["hospital"].inputs["hospital.x"][step0.rows]
    act = setups["hospital"].modules["bottom"](x).detach()
    h.send(Kind.ACTIVATION, 0, "bottom->top", {"t": f32(act)})
    h.send(Kind.ACTIVATION, 0, "hospital.y->digit", {"t": get_codec("raw").encode(setups["hospital"].inputs["hospital.y"][step0.rows])})
    grad = h.recv()
    assert grad.kind == Kind.GRADIENT and grad.tensors["t"].shape == (b, 128)
    h.send(Kind.STOP, 0, "", {}, "done")
    th.join(10)
    assert "error" not in box, box.get("error")
    assert len(box["report"].refused) == len(bad) + 1


def test_plan_hash_mismatch_stops_with_both_values():
    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    hub = InProcessHub(["hospital", "server"])
    server, th, box = start_server(hub, plan, setups, shapes, [])
    h = FakeHospital(hub, plan, setups["hospital"])
    h.hello("0123456789abcdef")
    th.join(10)
    assert "plan_hash differs" in str(box["error"])
    assert plan_hash(plan) in str(box["error"]) and "0123456789abcdef" in str(box["error"])
    # the server told the hospital why before stopping
    msgs = [h.recv(), h.recv()]
    assert msgs[1].kind == Kind.ERROR and "0123456789abcdef" in msgs[1].text


def test_other_seed_means_other_plan_hash():
    plan, _, _ = prepare(EXAMPLES / "vanilla.toml")
    assert plan_hash(plan) != plan_hash(plan.with_train(seed=1))
    assert plan_hash(plan) == plan_hash(plan.model_copy())


def test_a_flooding_peer_is_counted_but_not_answered_forever():
    hub = InProcessHub(["a", "b"])
    link = Link(hub.transport("b"))
    a = hub.transport("a")
    for _ in range(150):
        a.send("b", b"\x07garbage")
    a.send("b", encode(Message(Kind.STOP, "a", "b", 0, "", {}, "done")))
    assert link.recv(5).kind == Kind.STOP
    assert link.refused_count == 150 and len(link.refused) == 100
    answers = 0
    while True:
        try:
            a.recv(0.1)
            answers += 1
        except Exception:  # noqa: BLE001 - TransportTimeout once drained
            break
    assert answers == 100


def test_defense_noise_cannot_be_regenerated_from_the_plan():
    """The noise comes from each party's secret: two runs of the same plan and seed differ."""
    import tomllib

    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["wires"] = {"bottom": {"noise": {"clip": 5.0, "sigma": 0.1}}}
    a = splitlearn.train(plan, epochs=1)
    b = splitlearn.train(plan, epochs=1)
    assert a["metrics"]["train_loss"] != b["metrics"]["train_loss"]
    plan["wires"] = {}
    assert splitlearn.train(plan, epochs=1)["metrics"] == splitlearn.train(plan, epochs=1)["metrics"]
