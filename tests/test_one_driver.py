"""One driver for every plan: a plain plan is the trivial schedule, run by the same participant
type, laid out by the same functions, with no coordinator and no link its graph lacks."""

from __future__ import annotations

import pytest
import torch

from splitlearn.clients.coordinator import Coordinator
from splitlearn.clients.follower import Follower
from splitlearn.clients.layout import Topology, connections
from splitlearn.clients.parties import physical_party
from splitlearn.clients.participant import Participant
from splitlearn.clients.peer import Peer
from splitlearn.clients.roles import Duty, coordinator_of, duties_of, federation_of, physical_names
from splitlearn.clients.strategies import strategy_of
from splitlearn.core.graph import build_graph
from splitlearn.core.load import load_plan
from splitlearn.core.specs import PlanError
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.transport import InProcessHub

from .conftest import EXAMPLES


@pytest.mark.parametrize("example", ["vanilla.toml", "multi_hop.toml", "vertical_three.toml", "u_shaped.toml"])
def test_a_plain_plan_is_the_trivial_schedule_of_peers(example):
    plan = load_plan(EXAMPLES / example)
    strategy = strategy_of(plan)
    assert strategy.name == "trivial" and not strategy.coordinated
    assert physical_names(plan) == list(plan.parties)
    assert coordinator_of(plan) is None and federation_of(plan) is None
    assert all(duties_of(plan, p) == Duty.FIXED for p in plan.parties)
    # nobody coordinates, so the layout links only neighbours in the graph (multi-hop needs no other link)
    graph = build_graph(plan)
    assert all(b in graph.neighbours(a) for a, b in connections(plan))
    assert {frozenset(pair) for pair in connections(plan)} == {
        frozenset((a, b)) for a in plan.parties for b in graph.neighbours(a)}
    topo = Topology.of(plan)
    assert topo.coordinator is None and topo.droppable == frozenset() and topo.grace_s == 0.0
    assert topo.lead == next(n.party for n in graph.losses())


def test_the_trivial_round_is_every_step_of_the_plan_in_order():
    """One round, one turn: every epoch's training batches (each training row once per epoch, shuffled per
    epoch), then its evaluation batches (the test rows in order), numbered 0, 1, 2 ... as every party numbers
    them; nothing to instruct."""
    plan = load_plan(EXAMPLES / "vanilla.toml").with_train(epochs=2)
    splits = prepare(plan)[1]["hospital"].splits
    (rnd,) = strategy_of(plan).rounds(plan, [splits.train], splits.test)
    (turn,) = rnd.train
    t = plan.train
    per_epoch = -(-len(splits.train) // t.batch_size), -(-len(splits.test) // t.eval_batch_size)
    assert (rnd.index, turn.index, turn.mode, turn.round) == (0, 0, "plan", 0)
    assert [s.id for s in turn.steps] == list(range(t.epochs * sum(per_epoch)))
    for epoch in range(t.epochs):
        train = [s for s in turn.steps if s.epoch == epoch and s.mode == "train"]
        evals = [s for s in turn.steps if s.epoch == epoch and s.mode == "eval"]
        assert (len(train), len(evals)) == per_epoch and max(s.id for s in train) < min(s.id for s in evals)
        rows = torch.cat([s.rows for s in train]).numpy()
        assert sorted(rows.tolist()) == sorted(splits.train.tolist()) and rows.tolist() != splits.train.tolist()
        assert torch.cat([s.rows for s in evals]).tolist() == splits.test.tolist()
    assert [(s.id, s.rows.tolist()) for s in turn.steps] == [(s.id, s.rows.tolist()) for s in schedule(plan, splits)]
    assert strategy_of(plan).configure_train(plan, rnd, []) == []  # nothing to instruct


def test_a_clients_plan_refuses_a_step_cadence_of_checkpoints():
    """A coordinated schedule checkpoints at round boundaries, the cursors (r + 1, -1): a plan asking for a
    checkpoint every N steps is refused, never silently ignored."""
    body = load_plan(EXAMPLES / "sequential.toml").model_dump(mode="json", exclude_none=True)
    body["train"]["checkpoint_every"] = 3
    with pytest.raises(PlanError, match="checkpoints at the end of every round"):
        load_plan(body)


def test_every_physical_party_of_every_plan_is_a_participant():
    plain = load_plan(EXAMPLES / "vanilla.toml")
    _, setups, _ = prepare(plain)
    hub = InProcessHub(list(plain.parties))
    parts = {n: physical_party(plain, n, setups[n], hub.transport(n)) for n in plain.parties}
    assert all(type(p) is Peer for p in parts.values())
    clients = load_plan(EXAMPLES / "sequential.toml")
    names = physical_names(clients)
    hub = InProcessHub(names)
    roles = {n: physical_party(clients, n, None, hub.transport(n)) for n in names}
    assert all(isinstance(p, Participant) for p in [*parts.values(), *roles.values()])
    assert [n for n, p in roles.items() if type(p) is Coordinator] == [coordinator_of(clients)]
    assert all(type(p) is Follower for n, p in roles.items() if n != coordinator_of(clients))


def test_a_peer_reports_through_the_report_every_participant_gives():
    """A plain plan's party reports as every participant does (``Participant.report``): its training counted
    as a turn's is (what its noise spent), what it recorded, its per-epoch metrics, and no evaluation meter
    of its own (a plain plan meters evaluation with training)."""
    import threading

    plan, setups, shapes = prepare(EXAMPLES / "vanilla.toml", epochs=1)
    hub = InProcessHub(list(plan.parties))
    parts = {n: physical_party(plan, n, setups[n], hub.transport(n), shapes=shapes, record=True)
             for n in plan.parties}
    reports = {}
    threads = [threading.Thread(target=lambda n=n: reports.update({n: parts[n].run()})) for n in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and set(reports) == set(parts)
    (turn,) = parts["server"].turns.values()
    trained = sum(s.mode == "train" for s in turn.steps)
    for n, part in parts.items():
        r = reports[n]
        assert r.meter["train_steps"] == part.train_work["steps"] == trained
        assert r.records == [] and r.skipped == [] and r.eval_meter == {}
        assert set(r.observed) == set(part.party.observer.tensors()) and r.observed
    loss = next(iter(plan.losses))
    assert len(reports["server"].metrics[loss]["test_accuracy"]) == 1 and reports["hospital"].metrics == {}
