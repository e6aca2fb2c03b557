"""Issue #28, item 3: what the federation of an averaging schedule receives, recorded for the audit, and the
membership inference it can run on one client's weights (loss threshold, Yeom et al. 2018); with secure
aggregation nothing of one client's is kept and the attack runs on the average.

Runs (examples/sequential.toml made an averaging schedule of 4 hospitals, seed 0, trained in-process unless
said): SplitFed v2, 2 rounds of one local epoch; FedAvg with one round of 100 local epochs on 5 % of the rows
(about 22 a client: the clients overfit them), plain and with secure_aggregation; FedAvg in party processes.
"""

import json
import tomllib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

import splitlearn
from splitlearn.clients.results import federation_received
from splitlearn.clients.schedule import client_shares
from splitlearn.clients.weights import average
from splitlearn.core.load import load_plan
from splitlearn.models import build_segment
from splitlearn.run.setup import setup_party
from splitlearn.tools.audit import audit_run

from .conftest import EXAMPLES
from .support import max_diff, toml

NAMES = [f"hospital-{k}" for k in range(1, 5)]


def _body(schedule: str, *, epochs: int, local_epochs: int, test_fraction: float, secure: bool = False) -> dict:
    body = tomllib.loads((EXAMPLES / "sequential.toml").read_text())
    body["train"]["epochs"] = epochs
    body["data"]["test_fraction"] = test_fraction
    body["clients"] = {"template": "hospital", "count": 4, "schedule": schedule, "local_epochs": local_epochs,
                       "timeout": 30, **({"secure_aggregation": True} if secure else {})}
    if schedule == "fedavg":  # the whole network at the clients: the federation is a role of its own
        body["segments"]["top"]["party"] = "hospital"
        del body["parties"]["server"]
    return body


def _leaky(secure: bool = False) -> dict:
    return _body("fedavg", epochs=100, local_epochs=100, test_fraction=0.95, secure=secure)


@pytest.fixture(scope="module")
def membership():
    """The attack registered (a built-in once splitlearn.tools.audit.attacks lists it; else registered here and
    taken out again afterwards, so that other files' audits see the registry as they expect)."""
    from splitlearn.tools.audit.attacks import attack_names, register_attack, unregister_attack

    built_in = "membership" in attack_names()
    from splitlearn.tools.audit.membership import MembershipInference

    if not built_in:
        register_attack(MembershipInference(), replace=True)
    yield
    if not built_in:
        unregister_attack("membership")


def _train(body: dict, out):
    plan = load_plan(body)
    splitlearn.train(plan, out=out)
    return plan


def _recorded(out, plan, federation: str):
    return federation_received(plan, load_file(str(out / "parties" / federation / "observed.safetensors")))


def _check_recorded(out, plan, federation: str, local_epochs: int) -> None:
    """What the federation recorded is what each client sent in the last round: a client that did not evaluate
    afterwards still holds those weights (bit for bit); the samples are the rows it trained on in that round; their
    sample-weighted average is the model the run saved (the federation's average, within float rounding)."""
    got = _recorded(out, plan, federation)
    assert list(got.clients) == NAMES
    setup = setup_party(plan, "hospital", optimizer=False)
    shares = client_shares(plan, setup.splits.train, None)
    assert got.samples == {c: local_epochs * len(s) for c, s in zip(NAMES, shares)}
    final = json.loads((out / "result.json").read_text())["final_client"]  # it loaded the average to evaluate it
    for c in NAMES:
        if c != final:
            assert max_diff(got.clients[c], load_file(str(out / "parties" / c / "weights.safetensors"))) == 0.0, c
    saved = load_file(str(out / "parties" / "hospital" / "weights.safetensors"))  # the run's model
    recomputed = average([got.clients[c] for c in NAMES], [got.samples[c] for c in NAMES])
    assert max_diff(recomputed, saved) <= 1e-6 and max_diff(got.average, saved) <= 1e-6
    assert min(max_diff(got.clients[c], saved) for c in NAMES) > 1e-3  # each client's own, not the average


def test_the_federation_records_what_each_client_sent_in_the_last_round(tmp_path):
    out = tmp_path / "run"
    plan = _train(_body("splitfed_v2", epochs=2, local_epochs=1, test_fraction=0.5), out)
    _check_recorded(out, plan, "server", local_epochs=1)


def test_party_processes_record_it_too(tmp_path):
    body = _body("fedavg", epochs=2, local_epochs=2, test_fraction=0.8)
    (tmp_path / "plan.toml").write_text(toml(body))
    out = tmp_path / "run"
    splitlearn.train(tmp_path / "plan.toml", launcher="processes", out=out)
    _check_recorded(out, load_plan(body), "federation", local_epochs=2)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory, membership):
    out = tmp_path_factory.mktemp("leaky") / "run"
    plan = _train(_leaky(), out)
    return plan, out, audit_run(out, attacks=["membership"])


def _auc(state: dict, plan, members: np.ndarray, others: np.ndarray) -> float:
    """The loss threshold's AUC recomputed here: the network from ``state``, each row's cross-entropy."""
    setup = setup_party(plan, "hospital", optimizer=False)
    net = {s: build_segment(plan, s) for s in ("bottom", "top")}
    for s, m in net.items():
        m.load_state_dict({k[len(s) + 1:]: v for k, v in state.items() if k.startswith(f"{s}.")})
        m.eval()
    rows = torch.from_numpy(np.concatenate([members, others]))
    with torch.no_grad():
        loss = F.cross_entropy(net["top"](net["bottom"](setup.inputs["hospital.x"][rows])),
                               setup.inputs["hospital.y"][rows], reduction="none").numpy()
    return float(roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(others))], -loss))


def test_membership_on_one_clients_weights_is_the_recomputed_auc_and_overfitting_lifts_it_above_the_average(leaky):
    plan, out, audit = leaky
    entry = audit["attacks"]["membership"]
    average_result, *per_client = entry["results"]
    assert [r["client"] for r in per_client] == NAMES  # the first 5 at most: 4 here
    got = _recorded(out, plan, "federation")
    setup = setup_party(plan, "hospital", optimizer=False)
    shares = client_shares(plan, setup.splits.train, None)
    test = setup.splits.test
    assert len(test) < 2000  # every test row scored (none drawn out)
    for c, share, r in zip(NAMES, shares, per_client):
        assert r["value"] == pytest.approx(_auc(got.clients[c], plan, share, test), abs=1e-6), c
        assert r["averaged_model_auc"] == pytest.approx(_auc(got.average, plan, share, test), abs=1e-6), c
        # 100 local epochs on ~22 rows: one client's weights tell its rows apart, the average far less
        assert r["value"] >= 0.8 and r["verdict"] == "leaks", r
        assert r["value"] - r["averaged_model_auc"] >= 0.15, r
        assert r["remedy"].startswith("[clients] secure_aggregation = true")
    assert average_result["value"] == pytest.approx(_auc(got.average, plan, np.concatenate(shares), test), abs=1e-6)
    assert average_result["value"] < 0.7 and "note" not in average_result


def test_with_secure_aggregation_nothing_of_one_client_is_kept_and_the_attack_runs_on_the_average(
        tmp_path, leaky):
    plan, plain_out, plain_audit = leaky
    out = tmp_path / "run"
    secure_plan = _train(_leaky(secure=True), out)
    got = _recorded(out, secure_plan, "federation")
    assert got.clients == {} and got.samples == {}  # the average alone
    keys = load_file(str(out / "parties" / "federation" / "observed.safetensors"))
    assert all(k.startswith("federation|average|") for k in keys)
    plain = _recorded(plain_out, plan, "federation")
    assert max_diff(got.average, plain.average) <= 1e-6  # the same average, through the fixed point
    audit = audit_run(out, attacks=["membership"])
    on_average, one_client = audit["attacks"]["membership"]["results"]
    says = "the federation holds only the weighted sum of the clients' weights (secure_aggregation)"
    assert says in one_client["why_not"] and "does not apply to one client" in one_client["why_not"]
    assert says in on_average["note"] and "value" not in one_client
    assert on_average["value"] == pytest.approx(plain_audit["attacks"]["membership"]["results"][0]["value"], abs=1e-3)


def test_the_attack_says_why_not_where_no_federation_averages(tmp_path, membership):
    out = tmp_path / "run"
    _train(_body("sequential", epochs=1, local_epochs=1, test_fraction=0.5), out)
    entry = audit_run(out, attacks=["membership"])["attacks"]["membership"]
    assert entry["results"] == [] and entry["why_not"].startswith("schedule 'sequential' does not average")
