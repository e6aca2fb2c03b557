"""One driver for every plan: a plain plan is the trivial schedule, run by the same participant
type, laid out by the same functions, with no coordinator and no link its graph lacks."""

from __future__ import annotations

import pytest

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
    plan = load_plan(EXAMPLES / "vanilla.toml").with_train(epochs=2)
    splits = prepare(plan)[1]["hospital"].splits
    (rnd,) = strategy_of(plan).rounds(plan, [splits.train], splits.test)
    (turn,) = rnd.train
    expected = list(schedule(plan, splits))
    assert (rnd.index, turn.index, turn.mode, len(turn.steps)) == (0, 0, "plan", len(expected))
    assert [(s.id, s.mode, s.epoch, s.rows.tolist()) for s in turn.steps] == \
        [(s.id, s.mode, s.epoch, s.rows.tolist()) for s in expected]
    assert strategy_of(plan).configure_train(plan, rnd, []) == []  # nothing to instruct


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
