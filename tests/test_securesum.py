"""The secure-sum merge (``merge = "secure_sum"``, core/securesum.py): the server receives each clinic's activation as
masked fixed point and holds only their sum. Training equals the plain ``sum`` merge's within the stated bound, in-process
and over gRPC, and a resumed run the run never stopped; what the server received is uniform; a malformed masked tensor
is refused and its sender named; with certificates a server relaying a key of its own as a clinic's is refused; the plan
refuses what a secure sum cannot serve; the audit attacks the sum."""

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import splitlearn
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.securesum import MAX_ABS, decode, encode, error_bound, key_statement
from splitlearn.core.specs import PlanError
from splitlearn.launch.threads import run_local
from splitlearn.privacy.secagg_certs import Certified
from splitlearn.run.report import RunError
from splitlearn.run.setup import prepare
from splitlearn.tools.audit import audit_run
from splitlearn.wire.codec import Encoded
from splitlearn.wire.messages import Kind, Message
from splitlearn.wire.transport.tls import load_credentials, make_certs

from .conftest import EXAMPLES
from .support import same_run, stop_after, toml, weights

CHI2_LIMIT = 414.5  # chi-square of 256 byte values (255 degrees of freedom) at p = 1e-9: uniform bytes stay below
# One epoch's weights: each step's merge is within error_bound (about 2^-23 of the sum, checked step by step below),
# and that rounding, carried through one epoch of SGD, moves the weights by a few 1e-8 (measured 3e-8): 1e-6 leaves
# room while still telling apart any other sum (one row's activation left out moves them by 1e-3).
WEIGHTS_TOLERANCE = 1e-6


def _chi2(words: np.ndarray) -> float:
    """Pearson's chi-square of the bytes of ``words`` against the uniform distribution."""
    counts = np.bincount(np.ascontiguousarray(words).ravel().view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _body(example: str, merge: str, **train) -> dict:
    """An example's plan, one epoch, merging the clinics' embeddings by ``merge`` (vertical.toml concatenates them:
    its top takes 16 features, as for a sum)."""
    body = tomllib.loads((EXAMPLES / f"{example}.toml").read_text())
    body["segments"]["top"]["merge"] = merge
    body["networks"]["top"]["args"]["sizes"][0] = 16
    body["train"].update(epochs=1, **train)
    return body


def _run(body: dict, built=None, record: bool = False):
    """Every party in this process: (setups, participants, reports); ``built(name, participant)`` first."""
    plan, setups, shapes = prepare(load_plan(body))
    parts = {}

    def keep(name, part):
        parts[name] = part
        if built is not None:
            built(name, part)

    reports = run_local(plan, setups, shapes, built=keep, record=record)
    return setups, parts, reports


def _weights(setups) -> dict[str, torch.Tensor]:
    return {f"{p}/{seg}.{k}": v.detach().clone() for p, s in setups.items() for seg, m in s.modules.items()
            for k, v in m.state_dict().items()}


def _spy(sent: dict, sums: dict):
    """A ``built`` hook keeping each clinic's activation as it goes into the mask (by wire and message step) and the
    server's decoded sum (by message step)."""
    def built(name, part):
        secure = part.party.secure
        if secure.joins:
            mask = secure.mask

            def masking(wire, kind, st, t):
                if kind == Kind.ACTIVATION and wire.name in secure.joins:
                    sent[(wire.name, st.step)] = t.detach().double().clone()
                return mask(wire, kind, st, t)

            secure.mask = masking
        if secure.merges:
            merged = secure.merged

            def merging(node, st, xs, observer=None):
                out = merged(node, st, xs, observer)
                sums[st.step] = out[0].detach().double().clone()
                return out

            secure.merged = merging
    return built


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2 ** 32 - 1), st.floats(1e-6, MAX_ABS))
def test_fixed_point_sums_decode_within_the_bound(k, seed, scale):
    rng = np.random.default_rng(seed)
    xs = [torch.from_numpy(rng.uniform(-scale, scale, size=64)).float() for _ in range(k)]
    total = np.zeros(64, dtype=np.uint64)
    for x in xs:
        total += encode(x)
    exact = sum(x.double() for x in xs)
    got = torch.from_numpy(decode(total)).float().double()
    assert bool(((got - exact).abs() <= error_bound(k, exact.abs())).all())


@pytest.mark.parametrize("example", ["vertical", "vertical_three"])
def test_secure_sum_trains_as_the_plain_sum_within_the_bound(example):
    sent, sums = {}, {}
    setups, parts, reports = _run(_body(example, "secure_sum"), _spy(sent, sums), record=True)
    plain_setups, _, plain_reports = _run(_body(example, "sum"))
    members = {w for w, _ in sent}
    k = len(members)
    # every step: the handshake, 15 training steps, 1 evaluation step
    assert k == (2 if example == "vertical" else 3) and len(sums) == 17
    for step, s in sums.items():  # each merge: the exact sum of what the clinics sent, within the stated bound
        exact = sum(sent[(w, step)] for w in members)
        assert bool(((s - exact).abs() <= error_bound(k, exact.abs())).all()), step
    ours, theirs = _weights(setups), _weights(plain_setups)
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= WEIGHTS_TOLERANCE
    assert all(not r.refused for r in reports.values())
    # the masked tensors travel as int64 (twice the bytes of float32), the gradients back as float32, as plain
    for wire in members:
        def payload(rep, direction):
            return sum(r["payload"] for r in rep.meter["received"] if r["wire"] == wire and r["direction"] == direction)
        assert payload(reports["server"], "forward") == 2 * payload(plain_reports["server"], "forward") > 0
        clinic = wire.split("->")[0].replace("bottom", "clinic")
        assert payload(reports[clinic], "backward") == payload(plain_reports[clinic], "backward") > 0
    # what the server received of each clinic is uniform modulo 2^64; what it recorded as held is the sum
    seen = parts["server"].party.observer.tensors()
    for wire in members:
        masked = seen[f"{wire}|forward|first|values"]
        assert masked.dtype == torch.int64 and _chi2(masked.numpy()) < CHI2_LIMIT, wire
        own = torch.cat([sent[(wire, s)] for s in sorted(sums) if s >= 0 and (wire, s) in sent])[:len(masked)]
        assert _chi2(encode(own.float())) > 50 * CHI2_LIMIT  # the activation itself is far from uniform
        assert seen[f"{wire}|sum|first|values"].dtype == torch.float32


@pytest.fixture(scope="module")
def few_rows_of(tmp_path_factory):
    """Per example: the plan with a secure sum on few rows (test_fraction 0.8, batches of 64: 2 training steps), its
    file, and the plain sum's weights trained in this process; made once each."""
    made = {}

    def few(example: str) -> tuple[Path, dict]:
        if example not in made:
            folder = tmp_path_factory.mktemp(f"few_{example}")
            path = folder / "secure.toml"
            small = dict(batch_size=64, checkpoint_every=1)
            body = _body(example, "secure_sum", **small)
            body["data"]["test_fraction"] = 0.8
            path.write_text(toml(body))
            plain = _body(example, "sum", **small)
            plain["data"]["test_fraction"] = 0.8
            plain_setups, _, _ = _run(plain)
            made[example] = path, _weights(plain_setups)
        return made[example]

    return few


@pytest.fixture(scope="module")
def few_rows(few_rows_of):
    """vertical_three's (three clinics) few-rows plan."""
    return few_rows_of("vertical_three")


@pytest.mark.parametrize("example", ["vertical", "vertical_three"])
def test_secure_sum_over_grpc_equals_the_in_process_run_and_the_plain_sum(tmp_path, few_rows_of, example):
    path, plain = few_rows_of(example)
    net = splitlearn.train(path, launcher="processes", out=tmp_path / "grpc")
    local = splitlearn.train(path, out=tmp_path / "local")
    same_run(tmp_path / "local", tmp_path / "grpc", count_bytes=False)  # the masks cancel exactly: bit for bit
    # under mutual TLS each clinic's key hello also carries its certificate and its signature of its key (hex, about
    # 1 kB), and the server's roster relays all three to each clinic (named without the "secure_" of the hellos)
    extra = {p: net["parties"][p]["bytes_sent"] - local["parties"][p]["bytes_sent"] for p in local["parties"]}
    clinics = [p for p in extra if p != "server"]
    assert all(800 < extra[c] < 1300 for c in clinics), extra
    assert extra["server"] == len(clinics) * sum(extra[c] - 2 * len("secure_") for c in clinics), extra
    assert all(net["parties"][p]["flops"] == local["parties"][p]["flops"] for p in extra)
    got = weights(tmp_path / "grpc")
    assert max(float((got[n] - v).abs().max()) for n, v in plain.items()) <= WEIGHTS_TOLERANCE
    assert all(p["refused"] == [] for p in net["parties"].values()) and net["metrics"] == local["metrics"]


def test_a_resumed_secure_sum_run_ends_as_the_run_never_stopped(tmp_path, few_rows):
    """Every session agrees new keys; the masks follow the keys and the step id only, so nothing is checkpointed."""
    path, _ = few_rows
    splitlearn.train(path, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 2 steps"):
        splitlearn.train(path, out=tmp_path / "b", on_step=stop_after(2))
    splitlearn.train(path, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_certs(["server", "clinic_a", "clinic_b", "clinic_c"], folder)
    return folder


@pytest.mark.parametrize("server", ["honest", "own key", "own key and certificate"])
def test_with_certificates_a_server_relaying_a_key_of_its_own_as_a_clinics_is_refused(certs, few_rows, server):
    """Each clinic signs its key with its certificate (as party processes under mutual TLS do); a server that puts a
    key of its own under clinic_b's name in the roster it relays to the others (with clinic_b's signature, or one of
    its own certificate) is refused by clinic_a and clinic_c before any key is agreed, naming clinic_b."""
    path, plain = few_rows
    fake = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes_raw()

    def built(name, part):
        part.link.transport.credentials = load_credentials(certs, name)
        if name != "server" or server == "honest":
            return
        send, own = part.link.send, Certified(load_credentials(certs, "server"))

        def swap(msg):
            body = json.loads(msg.text) if msg.kind == Kind.HELLO else {}
            if "secure_roster" in body and msg.receiver != "clinic_b":
                entry = body["secure_roster"]["top"]["clinic_b"]
                entry["key"] = fake.hex()
                if server == "own key and certificate":
                    entry.update(certificate=own.certificate.hex(), signature=own.sign(
                        key_statement(plan_hash(part.party.graph.plan), "clinic_b", fake)).hex())
                msg = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, msg.tensors, json.dumps(body))
            send(msg)

        part.link.send = swap

    sent, sums = {}, {}
    spy = _spy(sent, sums)
    body = tomllib.loads(path.read_text())
    if server == "honest":  # signed and checked: the masks cancel as without certificates
        setups, _, reports = _run(body, lambda n, p: (built(n, p), spy(n, p)))
        ours = _weights(setups)
        assert max(float((ours[n] - v).abs().max()) for n, v in plain.items()) <= WEIGHTS_TOLERANCE
        assert len(sums) == 5 and all(not r.refused for r in reports.values())  # handshake, 2 train, 2 eval steps
        return
    with pytest.raises(RunError) as failed:
        _run(body, lambda n, p: (built(n, p), spy(n, p)))
    why = ("the signature of 'clinic_b' over the roster does not check out" if server == "own key" else
           r"the certificate given for 'clinic_b' is for \['server'\]")
    ((clinic, error),) = failed.value.errors.items()  # the run stops at the first clinic that refuses
    assert clinic in ("clinic_a", "clinic_c") and re.search(
        rf"{clinic}: the key 'server' relayed for party 'clinic_b' in the secure sum of segment 'top' is not "
        rf"vouched for by the certificate of 'clinic_b' \({why}.*\); no key is agreed", error), error
    # only clinic_b, relayed the true roster, masked (its handshake tensor, under keys the server does not hold)
    assert {w for w, _ in sent} <= {"bottom_b->top"} and sums == {}


@pytest.mark.parametrize("lie", ["float32", "narrower"])
def test_a_malformed_masked_tensor_is_refused_and_its_sender_named(lie):
    def built(name, part):
        if name != "clinic_b":
            return
        send = part.link.send

        def lying(msg):
            enc = msg.tensors.get("t")
            if msg.kind == Kind.ACTIVATION and msg.step >= 0 and enc is not None:  # a training step's masked tensor
                rows, width = enc.shape
                enc = (Encoded("raw", "float32", (rows, width), bytes(4 * rows * width)) if lie == "float32" else
                       Encoded("raw", "int64", (rows, width - 1), bytes(8 * rows * (width - 1))))
                msg = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, {"t": enc}, msg.text)
            send(msg)

        part.link.send = lying

    parts = {}
    with pytest.raises(RunError) as failed:
        _run(_body("vertical_three", "secure_sum"), lambda n, p: (parts.setdefault(n, p), built(n, p)))
    # refused in its step, or before it if it came early (kept only if it is what the step will take)
    why = (r"(dtype float32 where a secure sum's masked int64 tensor is due|float32\[32, 16\] where int64 with rows "
           r"of \[16\] was agreed)" if lie == "float32" else
           r"(shape \[32, 15\] where \[32, 16\] was expected|int64\[32, 15\] where int64 with rows of \[16\])")
    named = r"server refused a message from 'clinic_b' on wire 'bottom_b->top': " + why
    assert any(re.search(named, r) for r in parts["server"].link.refused)
    assert re.search(r"party 'clinic_b' failed: .*" + named, str(failed.value))


def test_the_plan_refuses_what_a_secure_sum_cannot_serve():
    body = _body("vertical_three", "secure_sum")
    body["wires"] = {"bottom_a": {"codec": "float16"}}
    with pytest.raises(PlanError, match=r"wires\.bottom_a\.codec.*masked integers.*exactly"):
        load_plan(body)
    body = _body("vertical_three", "secure_sum")
    body["parties"]["clinic_b"]["precision"] = "bf16"
    with pytest.raises(PlanError, match=r"parties\.clinic_b\.precision.*bf16"):
        load_plan(body)
    body = _body("vertical_three", "secure_sum")
    body["networks"]["peek"] = {"zoo": "mlp", "args": {"sizes": [16, 2]}}
    body["segments"]["peek"] = {"party": "server", "inputs": ["bottom_a"], "network": "peek"}
    body["losses"]["peeked"] = {"input": "peek", "target": "server.y"}
    with pytest.raises(PlanError, match=r"segments\.top\.merge.*'bottom_a' feeds \['peek'\] at 'server'"):
        load_plan(body)
    body = _body("vertical_three", "secure_sum")
    body["segments"]["top"]["inputs"] = ["bottom_a"]
    with pytest.raises(PlanError, match=r"segments\.top\.merge.*one input"):
        load_plan(body)
    body = _body("vertical_three", "secure_sum")
    body["segments"]["again"] = {"party": "clinic_a", "inputs": ["clinic_a.x"], "network": "bottom_a"}
    body["segments"]["top"]["inputs"].append("again")
    with pytest.raises(PlanError, match=r"segments\.top\.merge.*'clinic_a', 'clinic_b', 'clinic_c', 'clinic_a'.*one "
                                        r"input per party"):
        load_plan(body)
    body = _body("vertical_three", "secure_sum")
    body["clients"] = {"template": "clinic_a", "count": 2}
    with pytest.raises(PlanError, match=r"segments\.top\.merge.*\[clients\] plan's turns are not supported"):
        load_plan(body)


def test_the_audit_attacks_the_sum_and_says_why_not_each_clinics_own(tmp_path, few_rows):
    path, _ = few_rows
    splitlearn.train(path, out=tmp_path)
    # the per-wire audit (its other measures too) and the attribute probe of a column clinic_a holds
    audit = audit_run(tmp_path, epochs=5, attacks=["inversion", "attribute_probe"], attribute="clinic_a.x:0")
    (probe,) = audit["attacks"]["attribute_probe"]["results"]  # on the sum the server recorded, not the masks
    assert probe["wire"] == "bottom_a->top" and "server holds only the sum" in probe["note"], probe
    assert "right from the sum of the activations" in probe["figure_text"] and probe["rows"] > 0
    for clinic in "abc":
        entry = audit["wires"][f"bottom_{clinic}->top"]
        assert "holds only the sum" in entry["why_not"]["attack_on_its_own_activation"]
        # the decoder learns from the sum (from the uniform masked tensors it could not beat the mean guess)
        assert entry["inversion"]["relative_mse"] < 0.9, entry["inversion"]
