"""Feature-space hijacking (FSHA, Pasquini et al. CCS 2021) as an active attack, and the client-side hijack guard
(``[wires.X] hijack_guard``) that stops it.

The FSHA plan: sklearn's digits scaled to [-1, 1] (pixels / 8 - 1), the even rows (899) the hospital's own (its
training and test rows), the odd rows (898) the malicious server's public data; vanilla's networks and optimizers
(SGD lr 0.05 momentum 0.9, batch 32, the cut after the first ReLU: 128 values a row); 4 epochs = 92 training steps.
"""

from __future__ import annotations

import re
import tomllib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from splitlearn.core.load import load_plan
from splitlearn.core.specs import PlanError
from splitlearn.models.build import build_segment
from splitlearn.privacy.hijack import label_dependence
from splitlearn.run.report import RunError
from splitlearn.tools.audit.active.fsha import FshaConfig, Hijacker, hijack, reconstruction
from splitlearn.tools.audit.active.harness import run_against

from .conftest import EXAMPLES
from .support import stop_after

STEPS = 92  # 4 epochs of 23 training steps (719 training rows, batch 32)
GUARD_STEPS = 10  # the guard's window: it fires at the first full one


def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data / 8.0 - 1.0).astype(np.float32), d.target.astype(np.int64)


def _fsha_plan(tmp_path, guard: bool = False):
    x, y = _digits()
    own = np.arange(len(x)) % 2 == 0
    np.savez(tmp_path / "hospital.npz", x=x[own], y=y[own], ids=np.flatnonzero(own).astype(np.int64))
    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["data"] = {"dataset": "npz", "path": str(tmp_path / "hospital.npz")}
    if guard:
        plan["wires"] = {"bottom": {"hijack_guard": True}}
    return plan, torch.from_numpy(x[~own])


def _with_guard(example: str, wire: str) -> dict:
    plan = tomllib.loads((EXAMPLES / example).read_text())
    plan.setdefault("wires", {}).setdefault(wire, {})["hijack_guard"] = True
    return plan


def test_fsha_reconstructs_the_clients_digits_below_0_03(tmp_path):
    plan, public = _fsha_plan(tmp_path)
    result = hijack(plan, public, epochs=4)
    got = reconstruction(result)  # every one of the hospital's 899 rows, from its trained encoder's activations
    assert got["attacker_steps"] == STEPS
    assert got["mse"] <= 0.03, got  # measured 0.022 (Pasquini et al.: 0.019 on MNIST after 10,000 iterations)
    assert got["baseline"] >= 0.25 and got["ratio"] <= 0.12, got  # the public rows' mean image: 0.293


def test_the_hijack_guard_stops_the_client_at_its_first_full_window(tmp_path):
    plan, public = _fsha_plan(tmp_path, guard=True)
    hijacker = Hijacker(build_segment(load_plan(plan), "bottom"), public, FshaConfig(pretrain=100))
    with pytest.raises(RunError, match=r"party 'hospital' failed: hospital: the gradients returned on wire "
                                       r"'bottom->top' look hijacked at step 9 \(.* is 0\.[0-3]\d*, below the "
                                       r"hijack_guard threshold 0\.45.*this party stops training"):
        run_against(plan, "server", lambda p: hijacker.install(p.party.modules["top"]), epochs=4)
    assert hijacker.steps == GUARD_STEPS  # the hospital sent no batch after the one whose gradients fired it


def test_the_hijack_guard_stops_a_hijack_that_begins_after_two_epochs(tmp_path):
    plan, public = _fsha_plan(tmp_path, guard=True)
    hijacker = Hijacker(build_segment(load_plan(plan), "bottom"), public, FshaConfig(pretrain=100, start=46))
    with pytest.raises(RunError, match=r"look hijacked at step (\d+) .* below the hijack_guard threshold 0\.45 and "
                                       r"below 0\.55 times its mean 20 to 30 micro-batches before") as caught:
        run_against(plan, "server", lambda p: hijacker.install(p.party.modules["top"]), epochs=6)
    step = int(re.search(r"at step (\d+)", str(caught.value)).group(1))
    assert 46 <= step <= 46 + 2 * GUARD_STEPS and hijacker.steps <= 2 * GUARD_STEPS  # measured: step 56, 9 hijacked


@pytest.mark.parametrize("example, wire, loss_party, accuracy", [
    ("vanilla.toml", "bottom", "server", 0.9),
    ("u_shaped.toml", "bottom", "hospital", 0.9),
    ("multi_hop.toml", "first", "server", 0.65),
    ("vertical_u_shaped.toml", "bottom_a", "clinic_a", 0.9),
    ("resnet.toml", "bottom", "server", 0.9),  # its head fits the rows: the dependence falls to 0.15 by epoch 3
])
def test_the_guard_never_fires_on_honest_runs(example, wire, loss_party, accuracy, tmp_path):
    plan = _with_guard(example, wire)
    if example == "resnet.toml":  # its network's factory is found next to the plan file, under a name of its own
        (tmp_path / "fsha_resnet.py").write_text((EXAMPLES / "my_resnet.py").read_text())  # (one module name: one
        text = (EXAMPLES / example).read_text()  # module in a process, and test_examples imports my_resnet)
        assert '"my_resnet:' in text
        (tmp_path / "plan.toml").write_text(text.replace('"my_resnet:', '"fsha_resnet:')
                                            + "\n[wires.bottom]\nhijack_guard = true\n")
        plan = tmp_path / "plan.toml"
    run = run_against(plan, "server", lambda p: None, epochs=3)
    (metrics,) = run.reports[loss_party].metrics.values()
    assert metrics["test_accuracy"][-1] >= accuracy  # trained to the end: 3 epochs, every step watched


def test_an_honest_run_with_the_guard_is_bit_identical_to_one_without():
    plain = run_against(EXAMPLES / "vanilla.toml", "server", lambda p: None, epochs=2)
    guarded = run_against(_with_guard("vanilla.toml", "bottom"), "server", lambda p: None, epochs=2)
    for party, segment in (("hospital", "bottom"), ("server", "top")):
        a = plain.participants[party].party.modules[segment].state_dict()
        b = guarded.participants[party].party.modules[segment].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), (party, segment)


def test_label_dependence_is_near_0_for_gradients_blind_to_the_labels_and_near_1_for_honest_ones():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 10
    blind = [label_dependence(torch.randn(32, 128, generator=gen), labels) for _ in range(100)]
    assert abs(float(np.mean(blind))) <= 0.02  # chance-adjusted: 0 in expectation
    directions = torch.randn(10, 128, generator=gen)
    honest = label_dependence(directions[labels] + 0.3 * torch.randn(32, 128, generator=gen), labels)
    assert honest >= 0.9
    assert label_dependence(torch.randn(4, 8, generator=gen), torch.zeros(4, dtype=torch.long)) is None


def test_the_guard_is_refused_where_the_sender_holds_no_labels():
    plan = tomllib.loads((EXAMPLES / "vertical.toml").read_text())
    plan["wires"] = {"bottom_a": {"hijack_guard": True}}
    with pytest.raises(PlanError, match=r"entry 'wires\.bottom_a\.hijack_guard': hijack_guard on 'bottom_a': party "
                                        r"'clinic_a' holds the labels of no classification loss downstream"):
        load_plan(plan)
    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["wires"] = {"hospital.y": {"hijack_guard": {"window": 5}}}
    with pytest.raises(PlanError, match=r"hijack_guard on 'hospital\.y': it watches the gradients an activation "
                                        r"wire brings back, and this is a label wire"):
        load_plan(plan)
    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["wires"] = {"bottom": {"hijack_guard": True, "label_protection": {"kind": "max_norm"}}}
    with pytest.raises(PlanError, match=r"hijack_guard and label_protection on 'bottom': the noise"):
        load_plan(plan)
    plan = tomllib.loads((EXAMPLES / "sequential.toml").read_text())
    plan["wires"] = {"bottom": {"hijack_guard": True}}
    with pytest.raises(PlanError, match=r"hijack_guard on 'bottom' with \[clients\] is not supported yet"):
        load_plan(plan)
    from splitlearn.api.stage import Stage  # a user's own loop: refused, not left silently unguarded
    from splitlearn.wire.transport import InProcessHub

    with pytest.raises(PlanError, match=r"hijack_guard watches the gradients in a plan's sessions; a stage does not"):
        Stage(torch.nn.Linear(4, 4), InProcessHub(["a", "b"]).transport("a"), next="b", send={"hijack_guard": True})


def test_audit_runs_fsha_on_a_run_and_the_guard_makes_it_fail(tmp_path):
    import splitlearn
    import splitlearn.tools.audit.active.fsha  # noqa: F401 - registers the active attack (no production path does)
    from splitlearn.tools.audit import audit_run

    x, y = _digits()
    np.savez(tmp_path / "digits.npz", x=x, y=y, ids=np.arange(len(x)))
    verdicts = {}
    for guard in (False, True):
        plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
        plan["data"] = {"dataset": "npz", "path": str(tmp_path / "digits.npz")}
        if guard:
            plan["wires"] = {"bottom": {"hijack_guard": True}}
        splitlearn.train(plan, epochs=2, out=tmp_path / f"run{guard}")  # the honest run: the guard stays silent
        (got,) = audit_run(tmp_path / f"run{guard}", attacks=["fsha"])["attacks"]["fsha"]["results"]
        verdicts[guard] = got
    assert verdicts[False]["verdict"] == "leaks" and verdicts[False]["mse"] <= 0.04, verdicts[False]  # measured 0.028
    assert verdicts[True]["verdict"] == "mild" and "look hijacked at step 9" in verdicts[True]["stopped"]  # (what
    # the server got before the stop is exposed: the guard stops the hijack going on, not those batches)


def test_a_resumed_run_is_watched_as_the_run_never_stopped(tmp_path):
    """The guard's watch (its figures and count) is checkpointed with the party's learnt bounds: after a resume its
    windows go on where they were (restarted, an honest ResNet run whose figure falls over training was judged by
    the rule of a session's first window, and stopped: measured at step 56)."""
    import json

    import splitlearn

    body = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    body["wires"] = {"bottom": {"hijack_guard": True}}
    body["train"].update(epochs=2, checkpoint_every=7)
    splitlearn.train(body, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped"):
        splitlearn.train(body, out=tmp_path / "b", on_step=stop_after(30))
    splitlearn.train(body, out=tmp_path / "b", resume=True)
    watched = []
    for run in ("a", "b"):
        folder = tmp_path / run / "parties" / "hospital" / "checkpoints"
        last = sorted(p for p in folder.iterdir() if p.name.startswith("round-"))[-1]
        watched.append(json.loads((last / "manifest.json").read_text())["learnt_bounds"]["guards"]["bottom->top"])
    assert watched[0] == watched[1] and watched[0]["taken"] == 90  # every training step of 2 epochs, once
