"""Secure aggregation (``[clients] secure_aggregation``): the primitives' properties, the protocol with
dropouts, and SplitFed v2 / FedAvg runs whose federation recovers only the weighted average, equal to
the plain runs' within the stated fixed-point bound."""

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlearn.clients.baselines import method_plan
from splitlearn.clients.secure import SECAGG_WIRE, SecurePhase, round_context
from splitlearn.clients.weights import average, flatten
from splitlearn.core.specs import PlanError
from splitlearn.launch.results import build_result
from splitlearn.launch.threads import run_local
from splitlearn.privacy.secagg import (MAX_ABS, SecAggClient, SecAggError, SecAggServer, decode, encode, error_bound,
                                       mask_stream, seeded_bytes)
from splitlearn.privacy.shamir import ShamirError, reconstruct, share_from_bytes, split
from splitlearn.run.setup import prepare
from splitlearn.wire.codec import Encoded
from splitlearn.wire.control import SendWeights
from splitlearn.wire.messages import Kind, Message

from .support import tiny

CHI2_LIMIT = 414.5  # chi-square of 256 byte values (255 degrees of freedom) at p = 1e-9: uniform bytes stay below


def _chi2(words: np.ndarray) -> float:
    """Pearson's chi-square of the bytes of ``words`` against the uniform distribution."""
    counts = np.bincount(np.asarray(words, dtype=np.uint64).view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _within(secure: dict, plain: dict, bound: float) -> float:
    """The largest excess of |secure - plain| over the bound plus one float32 rounding of each (<= 0: within)."""
    worst = -np.inf
    for k, p in plain.items():
        s, p = secure[k].double().numpy(), p.double().numpy()
        ulp = np.spacing(np.maximum(np.abs(s), np.abs(p)).astype(np.float32)).astype(np.float64)
        worst = max(worst, float((np.abs(s - p) - bound - ulp).max()))
    return worst


# -- the primitives ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=6), st.integers(0, 2 ** 32), st.floats(1e-3, MAX_ABS))
def test_fixed_point_sums_decode_within_the_bound(samples, seed, scale):
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-scale, scale, size=50) for _ in samples]
    total = sum(samples)
    summed = np.zeros(50, dtype=np.uint64)
    for x, n in zip(xs, samples):
        summed += encode(x, n / total)
    exact = sum(x * n for x, n in zip(xs, samples)) / total
    bound = error_bound(samples, total, max(np.abs(x).max() for x in xs))
    assert np.abs(decode(summed, 1.0) - exact).max() <= bound


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 256 - 1), st.integers(2, 8), st.data())
def test_shamir_any_t_of_n_shares_give_the_secret_and_t_minus_one_do_not(secret, n, data):
    t = data.draw(st.integers(2, n))
    shares = split(secret, n, t, seeded_bytes(data.draw(st.integers(0, 2 ** 32))))
    chosen = data.draw(st.permutations(shares))
    assert reconstruct(chosen[:t], t) == secret
    assert reconstruct(chosen[:t - 1], t - 1) != secret  # one short: another polynomial, another constant
    with pytest.raises(ShamirError, match="needed"):
        reconstruct(chosen[:t - 1], t)


def _protocol(names, samples, xs, drop_after_shares=(), threshold=2):
    """One round in this process; the server and the clients."""
    ctx, length = b"test round", len(xs[0])
    clients = {n: SecAggClient(n, ctx, threshold, seeded_bytes(i)) for i, n in enumerate(names)}
    server = SecAggServer(names, threshold, length, ctx)
    for n in names:
        server.add_keys(n, clients[n].advertise())
    roster = server.close_keys()
    for n in names:
        server.add_shares(n, clients[n].share(roster))
    routed = server.close_shares()
    total = sum(samples)
    for n, x, s in zip(names, xs, samples):
        if n not in drop_after_shares:
            server.add_masked(n, clients[n].mask(routed[n], encode(x, s / total)))
    return clients, server


def test_a_round_with_a_client_dropped_after_sharing_gives_the_survivors_mean_and_nothing_below_threshold():
    names, samples = ["a", "b", "c", "d"], [10, 20, 30, 40]
    xs = [np.random.default_rng(k).normal(size=300) for k in range(4)]
    clients, server = _protocol(names, samples, xs, drop_after_shares=("c",), threshold=3)
    survivors, dropped = server.close_masked()
    assert survivors == ("a", "b", "d") and dropped == ("c",)
    answers = {n: clients[n].unmask(survivors, dropped) for n in survivors}
    assert all(set(a) == {"b/a", "b/b", "b/d", "s/c"} for a in answers.values())  # never both shares of one client
    server.add_unmask("a", answers["a"])
    server.add_unmask("b", answers["b"])
    with pytest.raises(SecAggError, match="2 of 4 clients sent shares for unmasking, 3 needed"):
        server.total()
    server.add_unmask("d", answers["d"])
    kept = [0, 1, 3]
    mean = decode(server.total(), sum(samples[k] for k in kept) / sum(samples))
    exact = sum(xs[k] * samples[k] for k in kept) / sum(samples[k] for k in kept)
    bound = error_bound([samples[k] for k in kept], sum(samples), max(np.abs(xs[k]).max() for k in kept))
    assert np.abs(mean - exact).max() <= bound
    with pytest.raises(SecAggError, match="second request"):  # asked again (say, naming a survivor as dropped)
        clients["a"].unmask(("a", "c", "d"), ("b",))


def test_clients_refuse_a_roster_whose_threshold_is_too_low_and_the_server_a_vector_that_does_not_fit():
    clients = {n: SecAggClient(n, b"r", None, seeded_bytes(i)) for i, n in enumerate("abcd")}
    server = SecAggServer(list("abcd"), 2, 10, b"r")  # 2 of 4: a federation could ask both halves for different shares
    for n, c in clients.items():
        server.add_keys(n, c.advertise())
    with pytest.raises(SecAggError, match="a threshold of 2 for 4 clients: a accepts 3 to 4"):
        clients["a"].share(server.close_keys())
    _, honest = _protocol(["a", "b", "c"], [1, 1, 1], [np.zeros(10)] * 3, drop_after_shares=("c",))
    with pytest.raises(SecAggError, match=r"int64\[9\], expected uint64\[10\]"):
        honest.add_masked("c", np.zeros(9, dtype=np.int64))


def test_plan_entries_refuse_what_secure_aggregation_cannot_serve():
    with pytest.raises(PlanError, match="clients.secure_aggregation.*'sequential' does not average"):
        tiny(count=3, schedule="sequential", secure_aggregation=True)
    with pytest.raises(PlanError, match="clients.secure_threshold.*4 with 3 clients a round.*2 to 3"):
        tiny(count=3, schedule="splitfed_v2", secure_aggregation=True, secure_threshold=4)
    with pytest.raises(PlanError, match="clients.secure_threshold.*2 with 4 clients a round.*3 to 4"):
        tiny(count=4, schedule="fedavg", secure_aggregation=True, secure_threshold=2)
    with pytest.raises(PlanError, match="clients.secure_aggregation.*draws 1 client"):
        tiny(count=3, schedule="splitfed_v2", secure_aggregation=True, fraction=0.3)
    with pytest.raises(PlanError, match="clients.secure_threshold.*for secure_aggregation = true"):
        tiny(count=3, schedule="splitfed_v2", secure_threshold=2)


# -- runs ----------------------------------------------------------------------------------------

def _plan(schedule: str, secure: bool, **more):
    if schedule == "fedavg":
        plan = method_plan(tiny().with_train(epochs=1, batch_size=128), "fedavg", 3)
        return plan.with_clients(secure_aggregation=True, **more) if secure else plan
    return tiny(count=3, schedule=schedule, **({"secure_aggregation": True} if secure else {}), **more).with_train(
        epochs=1, batch_size=128)


def _run(plan, faults=None):
    """Every party in this process, each client's secure aggregation seeded; the reports, the participants, what
    the federation received (its schedule's messages) and each client's weights as it was told to send them."""
    parts, seen, sent = {}, [], {}

    def built(name, part):
        parts[name] = part
        if part.is_client:
            part.secure_random = seeded_bytes(int(name.rsplit("-", 1)[1]))
        if part.is_federation:
            admit = part.link.admit

            def keep(peer, data):
                msg = admit(peer, data)
                if msg is not None:
                    seen.append(msg)
                return msg

            part.link.admit = keep

    def capture(role, request, ins):
        if isinstance(ins, SendWeights) and not ins.evaluation:
            sent[role.name] = {k: v.clone() for k, v in role.client_state().items()}
        if faults and role.name in faults:
            faults[role.name](role, request, ins)

    plan, setups, shapes = prepare(plan)
    reports = run_local(plan, setups, shapes, built=built, faults={c: capture for c in plan.clients.names()})
    return reports, parts, seen, sent


def _federation(parts):
    return next(p for p in parts.values() if p.is_federation)


def _expected(parts, sent, survivors):
    """The plain sample-weighted average over ``survivors``, their samples, and the round's samples (what each
    client's weight was divided by)."""
    coord = next(p for p in parts.values() if p.name == p.coordinator)
    samples = {coord.clients[k]: n for k, n in coord.rounds[0].samples.items()}
    states, counts = [sent[c] for c in survivors], [samples[c] for c in survivors]
    return average(states, counts), counts, sum(samples.values())


@pytest.fixture(scope="module")
def secure_splitfed():
    return _run(_plan("splitfed_v2", True))


@pytest.mark.parametrize("schedule", ["splitfed_v2", "fedavg"])
def test_secure_aggregation_equals_the_plain_run_within_the_fixed_point_bound(schedule, secure_splitfed):
    plain_reports, plain_parts, _, _ = _run(_plan(schedule, False))
    reports, parts, seen, sent = secure_splitfed if schedule == "splitfed_v2" else _run(_plan(schedule, True))
    fed, plain_fed = _federation(parts), _federation(plain_parts)
    clients = fed.clients
    expected, counts, total = _expected(parts, sent, clients)
    bound = error_bound(counts, total, max(float(v.abs().max()) for s in sent.values() for v in s.values()))
    assert bound < 4e-10  # 3 clients: 3 * 2^-33 and float64's part
    assert _within(fed.global_state, plain_fed.global_state, bound) <= 0
    assert _within(fed.global_state, expected, bound) <= 0
    assert max(float((fed.global_state[k] - plain_fed.global_state[k]).abs().max()) for k in expected) > 0  # not a copy
    ours, theirs = build_result(fed.plan, reports), build_result(plain_fed.plan, plain_reports)
    assert ours["metrics"]["train_loss"] == theirs["metrics"]["train_loss"]  # training before the average: the same
    # scored with weights a float32 rounding apart: one test row may fall the other way at most
    rows = ours["metrics"]["test_rows"]
    assert ours["metrics"]["test_accuracy"] == pytest.approx(theirs["metrics"]["test_accuracy"], abs=1.5 / rows)
    assert ours["skipped"] == [] and ours["schedule"]["secure_aggregation"] == {"threshold": None}
    # the federation received the protocol's messages only: no client's weights in the clear
    received = reports[fed.name].meter["received"]
    assert any(r["wire"] == SECAGG_WIRE for r in received) and not any(r["wire"] == "weights" for r in received)
    assert {m.sender for m in seen if m.kind == Kind.WEIGHTS} == set(clients)
    assert all(m.wire == SECAGG_WIRE for m in seen if m.kind == Kind.WEIGHTS)


def test_the_federation_cannot_recover_one_clients_weights_from_what_it_received(secure_splitfed):
    """Everything the federation received: each masked vector's bytes are uniform (chi-square below the p = 1e-9
    limit; the fixed-point weights themselves are far above it); it holds shares of every survivor's self-mask
    seed and of no survivor's pairwise key, so removing the self mask leaves a uniform vector still; and one share
    fewer than the threshold rebuilds another seed."""
    reports, parts, seen, sent = secure_splitfed
    fed = _federation(parts)
    phase = {(m.sender, json.loads(m.text)["phase"]): m for m in seen if m.wire == SECAGG_WIRE}
    request = next(m.step for m in seen if m.wire == SECAGG_WIRE)
    length = sum(v.numel() for v in fed.global_state.values())
    _, counts, total = _expected(parts, sent, ["hospital-1"])
    plain = encode(flatten(sent["hospital-1"]), counts[0] / total)
    assert _chi2(plain) > 50 * CHI2_LIMIT  # the weights themselves are far from uniform
    masked = {c: np.frombuffer(phase[(c, "masked")].tensors["y"].data, dtype="<i8").view(np.uint64)
              for c in fed.clients}
    for c, y in masked.items():
        assert y.size == length and _chi2(y) < CHI2_LIMIT, c
    unmask = {c: phase[(c, "unmask")].tensors for c in fed.clients}
    assert all(set(t) == {f"b/{s}" for s in fed.clients} for t in unmask.values())  # no pairwise key's share
    points = [(fed.clients.index(c) + 1, share_from_bytes(bytes(unmask[c]["b/hospital-1"].data))) for c in fed.clients]
    commitment = bytes(phase[("hospital-1", "keys")].tensors["h"].data)
    t = 2  # ceil(2 * 3 / 3)
    seed = reconstruct(points, t).to_bytes(32, "big")
    assert hashlib.sha256(seed).digest() == commitment
    below = reconstruct(points[:t - 1], t - 1).to_bytes(66, "big")[-32:]
    assert hashlib.sha256(below).digest() != commitment
    unmasked = masked["hospital-1"] - mask_stream(seed, length, b"self|" + round_context(fed.name, request))
    assert _chi2(unmasked) < CHI2_LIMIT  # the pairwise masks with the two others remain
    apart = unmasked - plain  # modulo 2^64: how far each word is from the client's own value, either way
    assert np.minimum(apart, -apart).min() > 2 ** 40


def test_a_client_killed_mid_round_leaves_the_average_of_the_survivors_within_the_bound():
    def dies(role, request, ins):  # hospital-2 shared its keys' shares, then its process is gone
        if isinstance(ins, SecurePhase) and ins.phase == "masked":
            raise SystemExit("killed")

    plan = _plan("splitfed_v2", True, timeout=1.5, federation="fed")  # a federation of its own: told to Collect
    reports, parts, seen, sent = _run(plan, {"hospital-2": dies})
    fed = _federation(parts)
    survivors = ["hospital-1", "hospital-3"]
    expected, counts, total = _expected(parts, sent, survivors)
    bound = error_bound(counts, total, max(float(v.abs().max()) for c in survivors for v in sent[c].values()))
    assert _within(fed.global_state, expected, bound) <= 0
    res = build_result(fed.plan, reports)
    assert [(s["client"], s["during"]) for s in res["skipped"]] == [("hospital-2", "averaging")]
    assert len(res["metrics"]["test_accuracy_per_epoch"]) == 1
    unmask = [m for m in seen if m.wire == SECAGG_WIRE and json.loads(m.text)["phase"] == "unmask"]
    assert {m.sender for m in unmask} == set(survivors)
    assert all(set(m.tensors) == {"b/hospital-1", "b/hospital-3", "s/hospital-2"} for m in unmask)


def test_a_malformed_masked_vector_is_refused_and_its_client_named():
    def lies(role, request, ins):  # hospital-3's masked vector goes out as 7 int32 values
        if isinstance(ins, SecurePhase) and ins.phase == "masked":
            send = role.link.send

            def bad(msg):
                if msg.wire == SECAGG_WIRE and "y" in msg.tensors:
                    msg = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire,
                                  {"y": Encoded("raw", "int32", (7,), bytes(28))}, msg.text)
                send(msg)

            role.link.send = bad

    reports, parts, _, sent = _run(_plan("splitfed_v2", True, timeout=1.5), {"hospital-3": lies})
    fed = _federation(parts)
    length = sum(v.numel() for v in fed.global_state.values())
    why = f"its masked vector is int32[7], expected int64[{length}]"
    res = build_result(fed.plan, reports)
    (skip,) = res["skipped"]
    assert skip["client"] == "hospital-3" and why in skip["reason"] and "refused by server" in skip["reason"]
    assert any("from 'hospital-3' on wire 'secagg'" in r and why in r for r in reports["server"].refused)
    expected, counts, total = _expected(parts, sent, ["hospital-1", "hospital-2"])
    bound = error_bound(counts, total, max(float(v.abs().max()) for s in sent.values() for v in s.values()))
    assert _within(fed.global_state, expected, bound) <= 0
