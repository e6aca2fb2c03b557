"""The harness of the audit's active attacks: one party's behaviour replaced before any step, every other party
the engine's own; and no production entry point loads a malicious implementation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from splitlearn.tools.audit.active.harness import run_against

from .conftest import EXAMPLES


def test_the_attacker_is_installed_before_the_first_step():
    seen: dict[str, dict] = {}

    def capture(name: str, double: bool):
        def install(participant) -> None:  # a "malicious" hospital that doubles its bottom's output
            bottom = participant.party.modules["bottom"]
            seen[name] = {k: v.clone() for k, v in bottom.state_dict().items()}
            if double:
                bottom.register_forward_hook(lambda module, args, out: out * 2)
        return install

    honest = run_against(EXAMPLES / "vanilla.toml", "hospital", capture("honest", False), epochs=1)
    attacked = run_against(EXAMPLES / "vanilla.toml", "hospital", capture("attacked", True), epochs=1)
    trained = honest.participants["hospital"].party.modules["bottom"].state_dict()
    for k, v in seen["honest"].items():  # installed on the untrained bottom, the same in both runs (same seed)
        assert torch.equal(v, seen["attacked"][k]) and not torch.equal(v, trained[k]), k
    h, a = (r.reports["server"].metrics["digit"]["train_loss_steps"] for r in (honest, attacked))
    assert h[0][1] != a[0][1]  # the server's first step already saw the doubled activations
    assert sorted(attacked.participants) == ["hospital", "server"]


def test_an_attacker_that_is_no_party_of_the_plan_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"no party 'nobody' in this plan: its parties are hospital, server"):
        run_against(EXAMPLES / "vanilla.toml", "nobody", lambda p: None, epochs=1)


def test_no_production_entry_point_loads_an_active_attack():
    code = ("import sys, json, splitlearn, splitlearn.api, splitlearn.launch.party, splitlearn.launch.processes, "
            "splitlearn.launch.service, splitlearn.cli.training; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('splitlearn.tools'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not [m for m in json.loads(out.stdout) if m.startswith("splitlearn.tools.audit.active")]
