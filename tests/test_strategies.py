"""A schedule defined in this file only: "train the two largest clients each round, then average",
registered in the core's registry and trained from a TOML plan without editing any package file.
It is written from the typed actions alone (it never calls back into the coordinator)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from splitlearn.clients.actions import Average, Download, Evaluate, RoundResult, Train
from splitlearn.clients.context import Context
from splitlearn.clients.schedule import Round, Turn, averaging_rounds
from splitlearn.clients.strategies import Strategy
from splitlearn.clients.weights import average
from splitlearn.core.load import load_plan
from splitlearn.core.plan import Plan
from splitlearn.core.specs import PlanError
from splitlearn.core.strategy import STRATEGIES
from splitlearn.launch.results import build_result
from splitlearn.launch.threads import run_local
from splitlearn.run.setup import prepare, setup_party
from splitlearn.wire.control import SendWeights

from .support import max_diff, split_mlp, toml


class LargestClients(Strategy):
    """Each round the ``take`` clients (default 2) with the most rows download the average, train
    and are averaged; the average is evaluated by the first of them."""

    name = "largest_two"

    def check_options(self, options: dict[str, Any]) -> None:
        take = options.get("take", 2)
        if set(options) - {"take"} or type(take) is not int or take < 1:
            raise ValueError(f"largest_two takes one option, take (a positive integer), got {options}")

    def rounds(self, plan: Plan, shares: list[np.ndarray], test_rows: np.ndarray,
               sites: list[int] | None = None) -> list[Round]:
        return averaging_rounds(plan, shares, test_rows, sites)

    def configure_train(self, plan: Plan, rnd: Round, clients: list[str]) -> list:
        names, take = plan.clients.names(), plan.clients.options.get("take", 2)
        largest = sorted(clients, key=lambda c: rnd.samples[names.index(c)], reverse=True)[:take]
        return [Download(tuple(largest)), *(Train(t, names[t.client]) for t in rnd.train if names[t.client] in largest)]

    def aggregate_train(self, plan: Plan, rnd: Round, result: RoundResult) -> list:
        return [Average(result.trained)]

    def configure_evaluate(self, plan: Plan, rnd: Round, turn: Turn, result: RoundResult,
                           holder: str | None) -> list:
        return [Evaluate(turn, result.trained, federation_weights=True)] if result.trained else []


@pytest.fixture(autouse=True)
def largest_two():
    """The strategy is registered for this file's tests only (the registry is process-wide)."""
    STRATEGIES.register("largest_two", LargestClients())
    yield
    STRATEGIES.unregister("largest_two")

PLAN = toml(split_mlp("largest", [64, 16, 10], lr=0.1, data={"dataset": "digits"},
                      train={"epochs": 1, "batch_size": 32, "seed": 3},
                      clients={"template": "hospital", "count": 4, "schedule": "largest_two",
                               "partition": {"kind": "dirichlet", "alpha": 0.3}}))


def _plan(tmp_path, text: str = PLAN) -> Plan:
    path = tmp_path / "largest.toml"
    path.write_text(text)
    return load_plan(path)


def _payload(table: list, wire: str) -> int:
    return sum(r["payload"] for r in table if r["wire"] == wire)


def test_a_strategy_defined_in_a_test_trains_only_the_two_largest_clients_and_averages_them(tmp_path):
    plan = _plan(tmp_path)
    sizes = [len(s) for s in Context.from_setup(plan, setup_party(plan, "hospital")).shares]
    assert len(set(sizes)) == 4  # uneven: "largest" is well defined, and a plain mean differs from FedAvg's
    largest = sorted(plan.clients.names(), key=lambda c: sizes[plan.clients.names().index(c)])[-2:]
    local = {}

    def capture(role, request, ins):  # a client's own weights just before it sends them to be averaged
        if isinstance(ins, SendWeights) and ins.to == role.federation:
            local[role.name] = {k: v.clone() for k, v in role.client_state().items()}

    p, setups, shapes = prepare(plan)
    reports = run_local(p, setups, shapes, faults={c: capture for c in plan.clients.names()})
    result = build_result(p, reports)
    assert result["skipped"] == []
    trained = {c for c in plan.clients.names() if any(r["mode"] == "train" for r in reports[c].records)}
    assert trained == set(largest) == set(local)
    bottom_bytes = (64 * 16 + 16) * 4
    for c in plan.clients.names():
        party = result["parties"][c]
        if c in largest:  # the average down, its weights up, and the activations of its rows
            assert _payload(party["sent"], "weights") == bottom_bytes and _payload(party["received"], "weights") >= \
                bottom_bytes
            assert _payload(party["sent"], "bottom->top") > 0
        else:  # it took no part at all
            assert _payload(party["sent"], "weights") == _payload(party["received"], "weights") == 0
            assert not reports[c].records and party["bytes_sent"] == 0
    # the federation's model: the sample-weighted average of the two, evaluated by the first of them
    evaluator = next(c for c in largest if any(r["mode"] == "eval" for r in reports[c].records))
    got = {f"{seg}.{k}": v for seg, mod in reports[evaluator].modules.items() for k, v in mod.state_dict().items()}
    states = [local[c] for c in largest]
    weights = [sizes[plan.clients.names().index(c)] for c in largest]
    assert max_diff(got, average(states, weights)) < 1e-6
    assert max_diff(got, average(states, [1, 1])) > 1e-5
    assert result["metrics"]["test_accuracy"] > 0.3


def test_a_strategy_checks_its_own_options(tmp_path):
    take_one = _plan(tmp_path, PLAN + "[clients.options]\ntake = 1\n")
    assert take_one.clients.options == {"take": 1}
    with pytest.raises(PlanError) as e:
        _plan(tmp_path, PLAN + "[clients.options]\ntake = \"two\"\n")
    assert e.value.entry == "clients.options" and "take (a positive integer)" in e.value.message
    with pytest.raises(PlanError) as e:
        _plan(tmp_path, PLAN.replace('"largest_two"', '"sequential"') + "[clients.options]\ntake = 1\n")
    assert e.value.entry == "clients.options" and "takes no options" in e.value.message


def test_an_unknown_schedule_is_refused_naming_the_registered_ones(tmp_path):
    with pytest.raises(PlanError) as e:
        _plan(tmp_path, PLAN.replace('"largest_two"', '"largest_three"'))
    assert e.value.entry == "clients.schedule"
    assert "unknown schedule 'largest_three'" in e.value.message
    assert all(name in e.value.message for name in ("sequential", "splitfed_v2", "fedavg", "largest_two"))


def test_a_registered_name_is_never_replaced_silently():
    """A built-in (or a strategy registered before) keeps its meaning unless the user asks to replace it."""
    builtin = STRATEGIES.get("sequential")
    with pytest.raises(ValueError, match=r"a schedule named 'sequential' is registered already; pass replace=True"):
        STRATEGIES.register("sequential", LargestClients())
    assert STRATEGIES.get("sequential") is builtin
    STRATEGIES.register("sequential", LargestClients(), replace=True)
    try:
        assert isinstance(STRATEGIES.get("sequential"), LargestClients)
    finally:
        STRATEGIES.register("sequential", builtin, replace=True)
