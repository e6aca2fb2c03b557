"""Secure aggregation (``[clients] secure_aggregation``): the primitives' properties, the protocol with
dropouts, and SplitFed v2 / FedAvg runs whose federation recovers only the weighted average, equal to
the plain runs' within the stated fixed-point bound."""

import hashlib
import json
import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlearn.clients.baselines import method_plan
from splitlearn.clients.secure import SECAGG_WIRE, SecurePhase, round_context
from splitlearn.clients.securestate import SecureState
from splitlearn.clients.weights import average, flatten
from splitlearn.core.specs import PlanError
from splitlearn.launch.results import build_result
from splitlearn.launch.threads import run_local
from splitlearn.privacy.secagg import (MAX_ABS, Roster, SecAggClient, SecAggError, SecAggServer, decode, encode,
                                       error_bound, mask_stream, seeded_bytes)
from splitlearn.privacy.shamir import ShamirError, reconstruct, share_from_bytes, split
from splitlearn.run.setup import prepare
from splitlearn.wire.codec import Encoded
from splitlearn.wire.control import SendWeights
from splitlearn.wire.messages import Kind, Message
from splitlearn.wire.transport.tls import load_credentials, make_certs
from splitlearn.wire.transport.turns import wait_until

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


def _run(plan, faults=None, out=None, also=None):
    """Every party in this process, each client's secure aggregation seeded; the reports, the participants, what
    the federation received (its schedule's messages) and each client's weights as it was told to send them.
    ``out``: the run folder; ``also(name, participant)``: more set-up of each party once built."""
    parts, seen, sent = {}, [], {}

    def built(name, part):
        parts[name] = part
        if also is not None:
            also(name, part)
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
    reports = run_local(plan, setups, shapes, built=built, faults={c: capture for c in plan.clients.names()}, out=out)
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
    assert ours["skipped"] == [] and ours["schedule"]["secure_aggregation"] == {
        "threshold": 2, "rule": "ceil(2n/3) of the n clients a round draws"}
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

    # a federation of its own (told to Collect); it would wait clients.timeout (a minute) for the dead client's masked
    # vector, but the client's connection closed with its process: the phase goes on at once without it
    plan = _plan("splitfed_v2", True, timeout=60.0, federation="fed").with_train(step_timeout=60)
    reports, parts, seen, sent = _run(plan, {"hospital-2": dies})
    fed = _federation(parts)
    survivors = ["hospital-1", "hospital-3"]
    expected, counts, total = _expected(parts, sent, survivors)
    bound = error_bound(counts, total, max(float(v.abs().max()) for c in survivors for v in sent[c].values()))
    assert _within(fed.global_state, expected, bound) <= 0
    res = build_result(fed.plan, reports)
    assert [(s["client"], s["during"]) for s in res["skipped"]] == [("hospital-2", "averaging")]
    assert "hospital-2 closed its connection before its masked message" in res["skipped"][0]["reason"], res["skipped"]
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


# -- withdrawals, dropouts, rewinds, certificates, late clients, wrong shares ----------------------------------

def _nan_at_send(role, request, ins):
    """Its weights turn NaN as it is told to send them (after the capture of what it would send)."""
    if isinstance(ins, SendWeights) and not ins.evaluation:
        with torch.no_grad():
            for m in role.setup.modules.values():
                for p in m.parameters():
                    p.fill_(math.nan)


def _abort(role, request, why):
    role.link.send(Message(Kind.WEIGHTS, role.name, role.federation, request, SECAGG_WIRE, {},
                           json.dumps({"phase": "abort", "why": why})))


def _phases(seen, sender):
    return [json.loads(m.text)["phase"] for m in seen if m.sender == sender and m.wire == SECAGG_WIRE]


def _bound_for(parts, sent, survivors, total=None):
    expected, counts, round_total = _expected(parts, sent, survivors)
    top = max(float(v.abs().max()) for c in survivors for v in sent[c].values())
    return expected, error_bound(counts, round_total if total is None else total, top)


@pytest.fixture(scope="module")
def withdrawn(tmp_path_factory):
    """A SplitFed v2 run whose hospital-3 cannot encode its weights (NaN), in a run folder of its own (the clients'
    journals: hospital-1's and -2's update unmasked with the two of them)."""
    folder = tmp_path_factory.mktemp("withdrawn")
    return folder, _run(_plan("splitfed_v2", True, federation="fed"), {"hospital-3": _nan_at_send}, out=folder)


def test_a_client_whose_weights_cannot_be_encoded_withdraws_at_once_and_the_others_are_averaged(withdrawn):
    # the default clients.timeout (30 s) is never waited for: hospital-3 says why before it sends any key
    _, (reports, parts, seen, sent) = withdrawn
    fed = _federation(parts)
    (skip,) = build_result(fed.plan, reports)["skipped"]
    assert skip["client"] == "hospital-3" and skip["during"] == "averaging"
    assert skip["reason"].startswith("left out of secure aggregation: ")
    assert "hospital-3 withdrew: its weights 'bottom." in skip["reason"]
    assert "are not finite (NaN or infinite) and cannot be encoded" in skip["reason"]
    assert _phases(seen, "hospital-3") == ["abort"]  # nothing of its weights, no key
    survivors = ["hospital-1", "hospital-2"]
    expected, bound = _bound_for(parts, sent, survivors, total=sum(_expected(parts, sent, survivors)[1]))
    assert _within(fed.global_state, expected, bound) <= 0
    with pytest.raises(SecAggError, match=r"a value of magnitude 2.15e\+09 is beyond"):
        encode(np.array([0.5, -2.0 ** 31]), 1.0)


def test_fedavg_with_a_client_gone_after_sharing_its_keys_averages_the_survivors_within_the_bound():
    def gone(role, request, ins):  # hospital-1 shared its keys' shares, then leaves instead of masking
        if isinstance(ins, SecurePhase) and ins.phase == "masked":
            _abort(role, request, "gone")
            raise SecAggError("gone (the test's fault)")

    reports, parts, seen, sent = _run(_plan("fedavg", True), {"hospital-1": gone})
    fed = _federation(parts)
    survivors = ["hospital-2", "hospital-3"]
    expected, bound = _bound_for(parts, sent, survivors)
    assert _within(fed.global_state, expected, bound) <= 0
    assert [(s["client"], s["reason"]) for s in build_result(fed.plan, reports)["skipped"]] == [
        ("hospital-1", "left out of secure aggregation: 'gone'")]
    unmask = [m for m in seen if m.wire == SECAGG_WIRE and json.loads(m.text)["phase"] == "unmask"]
    assert {m.sender for m in unmask} == set(survivors)  # its mask key rebuilt, never its seed
    assert all(set(m.tensors) == {"b/hospital-2", "b/hospital-3", "s/hospital-1"} for m in unmask)


def test_a_round_done_again_after_a_rewind_is_unmasked_with_the_same_survivors(withdrawn):
    """Each client's journal (in the run folder) holds the survivors its update was unmasked with; a round trained
    again bit for bit (a rewind; here a second run in the folder) is unmasked with them only: the same average, no
    second sum to subtract from the first."""
    folder, (_, first, _, sent) = withdrawn
    reports, again, seen, sent_again = _run(_plan("splitfed_v2", True, federation="fed"), out=folder)  # all fine now
    assert all(torch.equal(sent[c][k], sent_again[c][k]) for c in ("hospital-1", "hospital-2") for k in sent[c])
    before, after = _federation(first).global_state, _federation(again).global_state
    assert all(torch.equal(before[k], after[k]) for k in before)  # the very same sum
    (skip,) = build_result(_federation(again).plan, reports)["skipped"]
    assert skip["client"] == "hospital-3" and "done again after a rewind" in skip["reason"]
    assert _phases(seen, "hospital-3") == ["keys"]  # told at once: in no roster, nothing of it unmasked
    assert all(set(m.tensors) == {"b/hospital-1", "b/hospital-2"} for m in seen
               if m.wire == SECAGG_WIRE and json.loads(m.text)["phase"] == "unmask")
    fresh = SecAggClient("a", b"r", 2, seeded_bytes(0), bound=("a", "b"))  # a client holds to them too
    with pytest.raises(SecAggError, match=r"unmasked before .* \['a', 'b'\]; asked now for \['a', 'b', 'c'\]"):
        _answer_for(fresh, ("a", "b", "c"), ())


def test_a_round_done_again_without_one_of_its_survivors_is_not_unmasked(withdrawn):
    folder, _ = withdrawn
    initial = {}

    def keep_initial(name, part):
        if part.is_federation:
            initial.update({k: v.clone() for k, v in part.global_state.items()})

    plan = _plan("splitfed_v2", True, federation="fed")
    reports, parts, seen, _ = _run(plan, {"hospital-2": _nan_at_send}, out=folder, also=keep_initial)
    fed = _federation(parts)  # hospital-2 cannot come now: no average, nothing unmasked
    assert all(torch.equal(fed.global_state[k], v) for k, v in initial.items())
    skipped = {s["client"]: s["reason"] for s in build_result(fed.plan, reports)["skipped"]}
    assert sorted(skipped) == ["hospital-1", "hospital-2", "hospital-3"] and "withdrew" in skipped["hospital-2"]
    assert all("unmasked before with ['hospital-1', 'hospital-2'], and ['hospital-2'] sent no keys this time"
               in skipped[c] for c in ("hospital-1", "hospital-3"))
    assert not any(json.loads(m.text)["phase"] in ("shares", "masked", "unmask") for m in seen if m.wire == SECAGG_WIRE)


def _answer_for(client, survivors, dropped):
    """``client``'s answer to an unmask request, in a round of ``survivors`` and ``dropped`` (other clients made here)."""
    names = sorted({client.name, *survivors, *dropped})
    others = {n: SecAggClient(n, client.context, client.required, seeded_bytes(i + 10)) for i, n in enumerate(names)
              if n != client.name}
    everyone = {client.name: client, **others}
    server = SecAggServer(names, client.required or 2, 4, client.context)
    for n in names:
        server.add_keys(n, everyone[n].advertise())
    roster = server.close_keys()
    for n in names:
        server.add_shares(n, everyone[n].share(roster))
    client.mask(server.close_shares()[client.name], np.zeros(4, dtype=np.uint64))
    return client.unmask(survivors, dropped)


def test_a_client_answers_no_unmask_request_that_drops_it_names_too_few_or_splits_the_clients_wrongly():
    def client(t=3):
        return SecAggClient("a", b"r", t, seeded_bytes(1))

    with pytest.raises(SecAggError, match="counts a itself as dropped"):
        _answer_for(client(), ("b", "c", "d"), ("a",))
    with pytest.raises(SecAggError, match="2 survivors, fewer than the threshold 3"):
        _answer_for(client(), ("a", "b"), ("c", "d"))
    with pytest.raises(SecAggError, match="do not split the clients whose masks it added"):
        _answer_for(client(), ("a", "b", "c"), ("b",))
    assert set(_answer_for(client(), ("a", "b", "c"), ("d",))) == {"b/a", "b/b", "b/c", "s/d"}
    # the least threshold is ceil(2n/3): 3 of 5 lets a lying federation with one colluding client unmask one
    five = {n: SecAggClient(n, b"r", None, seeded_bytes(i)) for i, n in enumerate("abcde")}
    with pytest.raises(SecAggError, match="a threshold of 3 for 5 clients: a accepts 4 to 5"):
        five["a"].share(Roster(tuple("abcde"), {n: c.advertise() for n, c in five.items()}, 3))
    # the plan's threshold holds whatever the roster's size: 3 required, a roster of 3 with t = 2 refused
    three = {n: SecAggClient(n, b"r", 3, seeded_bytes(i)) for i, n in enumerate("abc")}
    with pytest.raises(SecAggError, match="a threshold of 2 for 3 clients: a accepts 3 to 3"):
        three["a"].share(Roster(tuple("abc"), {n: c.advertise() for n, c in three.items()}, 2))


def test_a_wrong_share_is_outvoted_and_its_sender_named():
    names = ["a", "b", "c", "d", "e"]
    xs = [np.random.default_rng(k).normal(size=50) for k in range(5)]
    clients, server = _protocol(names, [1] * 5, xs, threshold=4)
    survivors, dropped = server.close_masked()
    answers = {n: clients[n].unmask(survivors, dropped) for n in survivors}
    lie = dict(answers["a"])
    lie["b/c"] = (int.from_bytes(lie["b/c"], "big") ^ 1).to_bytes(66, "big")
    server.add_unmask("a", lie)
    for n in "bcde":
        server.add_unmask(n, answers[n])
    mean = decode(server.total(), 1.0)
    assert np.abs(mean - sum(xs) / 5).max() <= error_bound([1] * 5, 5, max(np.abs(x).max() for x in xs))
    assert server.misfits == {"a": "its share of c's seed does not fit the other survivors' shares"}


def test_a_late_client_is_told_the_round_went_on_and_its_late_vector_is_dropped():
    unmasking = threading.Event()
    got = {}

    def also(name, part):
        if part.is_federation:
            send = part.link.send

            def watch(msg):
                send(msg)
                if msg.wire == SECAGG_WIRE and json.loads(msg.text)["phase"] == "unmask":
                    unmasking.set()

            part.link.send = watch
        if name == "hospital-3":
            admit = part.link.admit
            part.link.admit = lambda peer, data: got.setdefault(len(got), admit(peer, data))

    def late(role, request, ins):  # hospital-3 masks only once the federation asked the others to unmask
        if isinstance(ins, SecurePhase) and ins.phase == "masked":
            assert wait_until(unmasking.is_set, 60)  # (the parties take turns on one thread: they run meanwhile)

    # the federation waits clients.timeout (1 s) for the late vector, which the others send in milliseconds
    plan = _plan("splitfed_v2", True, timeout=1.0, federation="fed").with_train(step_timeout=30)
    reports, parts, seen, sent = _run(plan, {"hospital-3": late}, also=also)
    fed = _federation(parts)
    expected, bound = _bound_for(parts, sent, ["hospital-1", "hospital-2"])
    assert _within(fed.global_state, expected, bound) <= 0
    told = [json.loads(m.text) for m in got.values() if m is not None and m.wire == SECAGG_WIRE]
    assert told[-1] == {"phase": "abort", "why": "its masked message did not come within 1 s: the round goes on "
                                                 "without it"}
    assert _phases(seen, "hospital-3")[-1] == "masked"  # it came, after the round had gone on: dropped
    assert reports[fed.name].refused == [] and fed.early_weights == [] and reports["hospital-3"].refused == []
    (skip,) = build_result(fed.plan, reports)["skipped"]
    assert skip["client"] == "hospital-3" and "its masked message did not come within 1 s" in skip["reason"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_certs(["server", "fed", "hospital-1", "hospital-2", "hospital-3"], folder)
    return folder


def _certified(folder, more=None):
    """Each party's secure aggregation signs with its own certificate's key, as a party process's does."""
    def also(name, part):
        part.secure = SecureState.of(name, load_credentials(folder, name), None)
        if more is not None:
            more(name, part)

    return also


def test_splitfed_v1_with_certificates_every_client_signs_and_masked_vectors_go_in_parts(certs):
    def small(name, part):  # the masked vector (1,040 words) goes in parts of 256 words
        if part.is_client:
            part.secure.part_bytes = 2048

    reports, parts, seen, sent = _run(_plan("splitfed_v1", True, federation="fed"), also=_certified(certs, small))
    fed = _federation(parts)
    expected, bound = _bound_for(parts, sent, fed.clients)
    assert _within(fed.global_state, expected, bound) <= 0
    assert build_result(fed.plan, reports)["skipped"] == []
    for c in fed.clients:
        assert _phases(seen, c) == ["keys", "sign", "shares"] + ["masked"] * 5 + ["unmask"]
        assert [json.loads(m.text)["offset"] for m in seen if m.sender == c and m.wire == SECAGG_WIRE
                and json.loads(m.text)["phase"] == "masked"] == [0, 256, 512, 768, 1024]
    assert all("x" in m.tensors for m in seen if m.wire == SECAGG_WIRE and json.loads(m.text)["phase"] == "keys")


def test_a_federation_that_puts_keys_of_its_own_under_a_clients_name_is_refused_by_every_client(certs):
    fake = SecAggClient("hospital-2", b"the federation's own", None, seeded_bytes(99)).advertise()

    def hostile(name, part):  # the roster hospital-1 and -3 get holds the federation's keys for hospital-2
        if part.is_federation:
            part.secure.certified.check = lambda *args: None  # it relays every signature unchecked
            send = part.link.send

            def swap(msg):
                if msg.wire == SECAGG_WIRE and json.loads(msg.text)["phase"] == "roster" and \
                        msg.receiver != "hospital-2":
                    t = dict(msg.tensors)
                    t.update({f"{k}/hospital-2": Encoded("raw", "uint8", (32,), v)
                              for k, v in (("c", fake.c), ("s", fake.s), ("h", fake.commitment))})
                    msg = Message(msg.kind, msg.sender, msg.receiver, msg.step, msg.wire, t, msg.text)
                send(msg)

            part.link.send = swap

    reports, parts, seen, _ = _run(_plan("splitfed_v2", True, federation="fed"), also=_certified(certs, hostile))
    for c in ("hospital-1", "hospital-3"):  # hospital-2 signed the roster with its own keys: not theirs
        assert any("the signature of 'hospital-2' over the roster does not check out" in r
                   for r in reports[c].refused), reports[c].refused
    assert any("does not check out" in r for r in reports["hospital-2"].refused)
    assert not any(json.loads(m.text)["phase"] in ("shares", "masked", "unmask") for m in seen if m.wire == SECAGG_WIRE)
    res = build_result(_federation(parts).plan, reports)
    assert sorted(s["client"] for s in res["skipped"]) == ["hospital-1", "hospital-2", "hospital-3"]
