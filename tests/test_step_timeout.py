"""One step timeout, ``[train] step_timeout``: the plan model resolves it (:meth:`Plan.step_timeout_s`)
and it reaches every driver: a plain plan's party in process, a party process (``run_one_party``)
and a ``[clients]`` participant. A neighbour that goes silent makes a party give up within it,
naming it."""

import threading
import time

import pytest

from splitlearn.clients.parties import physical_party
from splitlearn.core.load import load_plan
from splitlearn.clients.parties import make_role
from splitlearn.core.engine import PartyError
from splitlearn.core.plan import STEP_TIMEOUT_S, parse_plan
from splitlearn.core.specs import PlanError
from splitlearn.launch.oneparty import run_one_party
from splitlearn.run.allocator import frozen_heap
from splitlearn.run.setup import prepare
from splitlearn.wire.messages import Kind, kind_of
from splitlearn.wire.transport import InProcessHub
from splitlearn.wire.transport.grpc import GrpcTransport

from .support import free_port, tiny, toml


def test_the_plan_model_resolves_the_one_step_timeout():
    """Given (``train(timeout=)``, ``--step-timeout``), else ``[train] step_timeout``, else 120 s, whatever
    the schedule: ``clients.timeout`` bounds answers, never a step."""
    plain, clients = tiny(), load_plan({**tiny().model_dump(mode="json", exclude_none=True),
                                        "clients": {"template": "hospital", "count": 2, "timeout": 7.0}})
    assert STEP_TIMEOUT_S == 120.0
    assert plain.train.step_timeout is None and plain.step_timeout_s() == 120.0
    assert clients.train.step_timeout is None and clients.step_timeout_s() == 120.0
    assert plain.with_train(step_timeout=3.0).step_timeout_s() == 3.0
    assert clients.with_train(step_timeout=3.0).step_timeout_s() == 3.0
    assert plain.with_train(step_timeout=3.0).step_timeout_s(2.0) == 2.0
    with pytest.raises(PlanError, match=r"(?s)entry 'train.step_timeout'.*greater than 0"):
        parse_plan({**plain.model_dump(mode="json"), "train": {"step_timeout": 0}})


class _Mute:
    """A transport that never sends a gradient: the neighbour answers the hello and the handshake,
    then goes silent in the first training step."""

    def __init__(self, inner):
        self.inner, self.party = inner, inner.party

    def send(self, dst: str, data: bytes) -> None:
        if kind_of(data) != Kind.GRADIENT:
            self.inner.send(dst, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_a_plain_in_process_party_gives_up_on_a_silent_neighbour_within_the_plans_step_timeout():
    """Without any timeout given, the hospital's step has the plan's deadline (2 s, not 120 s): its server
    never sends the gradient of the first training step, and the hospital fails within about that,
    naming the deadline and what it waited for.

    The same deadline bounds the hellos before it, so the parties run as ``splitlearn`` runs them, with the
    heap frozen (:func:`~splitlearn.run.allocator.frozen_heap`): a full collection of a test worker's heap
    (torch, transformers, scikit-learn loaded) on a loaded 2-core machine once held the server's hello past
    a 1 s deadline."""
    plan, setups, shapes = prepare(tiny().with_train(step_timeout=2.0, epochs=1))
    hub = InProcessHub(["hospital", "server"])
    hospital = physical_party(plan, "hospital", setups["hospital"], hub.transport("hospital"), shapes=shapes)
    server = physical_party(plan, "server", setups["server"], _Mute(hub.transport("server")), shapes=shapes)
    assert hospital.party.timeout == 2.0 and server.party.timeout == 2.0
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - it fails once the hospital has given up
            failed.append(e)

    with frozen_heap():
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        start = time.monotonic()
        with pytest.raises(PartyError, match=r"hospital: step 0 not done within its deadline of 2\.0 s .*bottom"):
            hospital.run()
        took = time.monotonic() - start
        hub.close()
        t.join(10)
    assert 2.0 <= took < 12.0, took  # the plan's deadline, far below the 120 s default


def test_a_party_process_gives_up_on_a_neighbour_that_never_answers_within_the_plans_step_timeout(tmp_path):
    """``run_one_party`` (what ``splitlearn party`` runs) with no ``--step-timeout``: the server connects and
    never says a word; the hospital stops waiting for its hello after the plan's 1 s, naming the server."""
    body = tiny().with_train(step_timeout=1.0, epochs=1).model_dump(mode="json", exclude_none=True)
    plan = tmp_path / "tiny.toml"
    plan.write_text(toml(body))
    port = free_port()
    silent = GrpcTransport("server", listen=f"127.0.0.1:{port}", accept=["hospital"], connect_timeout=30)
    silent.start()
    try:
        start = time.monotonic()
        with pytest.raises(PartyError, match=r"no hello from \['server'\] within 1\.0 s"):
            run_one_party(plan, "hospital", certs=None, peers={"server": f"127.0.0.1:{port}"}, connect_timeout=30)
        took = time.monotonic() - start
    finally:
        silent.close()
    assert took < 20.0, took  # connecting, then the plan's 1 s (not the 120 s default)


def test_a_clients_participant_takes_the_plans_step_timeout_not_the_clients_timeout():
    """A ``[clients]`` participant's steps have ``[train] step_timeout`` (120 s unless set), never
    ``clients.timeout``, which bounds its answers only."""
    hub = InProcessHub(["server", "hospital-1", "hospital-2"])
    plan = load_plan({**tiny().model_dump(mode="json", exclude_none=True),
                      "clients": {"template": "hospital", "count": 2, "schedule": "fedavg", "timeout": 7.0}})
    client = make_role(plan, "hospital-1", hub.transport("hospital-1"))
    assert (client.step_timeout, client.timeout) == (120.0, 7.0)
    coordinator = make_role(plan.with_train(step_timeout=2.5), "server", hub.transport("server"))
    assert coordinator.step_timeout == 2.5 and coordinator.timeout == 7.0
