"""splitlearn on a Ray cluster: party processes as actors (mutual TLS between them, as in a
deployment), compare methods and sweep settings as tasks. On a local Ray instance started here
(two CPUs, loopback only)."""

from __future__ import annotations

import json
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'splitlearn[ray]'); .ci/run installs it")

import splitlearn  # noqa: E402
from splitlearn.core.load import load_plan  # noqa: E402
from splitlearn.launch.onray import launch_ray  # noqa: E402
from splitlearn.run.report import RunError  # noqa: E402

from .conftest import EXAMPLES  # noqa: E402
from .support import weights  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_the_vanilla_plan_through_ray_equals_the_local_run(cluster, tmp_path):
    # the in-process run is the reference every local party-process run equals exactly (weights,
    # metrics, bytes: test_network.py), and costs no process start-up
    local = splitlearn.train(EXAMPLES / "vanilla.toml", epochs=2, out=tmp_path / "local")
    on_ray = launch_ray(EXAMPLES / "vanilla.toml", tmp_path / "ray", epochs=2)
    assert on_ray["transport"] == "grpc+mtls+ray"
    a, b = weights(tmp_path / "local"), weights(tmp_path / "ray")
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert on_ray["metrics"] == local["metrics"]
    for p in local["parties"]:
        assert on_ray["parties"][p]["flops"] == local["parties"][p]["flops"]
        assert on_ray["parties"][p]["bytes_sent"] == local["parties"][p]["bytes_sent"]


def test_every_client_as_an_actor_completes_with_the_in_process_accuracy(cluster, tmp_path):
    plan_file = tmp_path / "sequential.toml"  # two hospitals: an actor each, and the server's, on two CPUs
    plan_file.write_text((EXAMPLES / "sequential.toml").read_text().replace("count = 10", "count = 2", 1))
    plan = load_plan(plan_file).with_train(epochs=1)
    on_ray = launch_ray(plan_file, tmp_path / "ray", epochs=1)
    same = splitlearn.train(plan, out=tmp_path / "in-process")
    assert on_ray["schedule"]["clients"] == 2 and not on_ray["skipped"]
    assert on_ray["metrics"]["test_accuracy"] == same["metrics"]["test_accuracy"] > 0.5


def test_a_killed_actor_is_reported_by_its_party_name(cluster, tmp_path):
    plan = tmp_path / "long.toml"
    plan.write_text((EXAMPLES / "vanilla.toml").read_text().replace("seed = 0", "seed = 0\nreconnect_timeout = 5", 1))
    failure: dict = {}

    def run() -> None:
        try:
            launch_ray(plan, tmp_path / "ray", epochs=500)  # long enough never to finish before the kill
        except RunError as e:
            failure["errors"] = e.errors

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)] \
            if hasattr(ray.util, "list_named_actors") else []
        victim = next((n for n in names if n.endswith("-server")), None)
        time.sleep(0.5)
    assert victim is not None
    ray.kill(ray.get_actor(victim))  # whenever that is (starting, dialling or training), the party is named
    t.join(timeout=120)
    assert not t.is_alive()
    assert "server" in failure["errors"] and "Ray actor died" in failure["errors"]["server"]


def test_a_sweep_runs_as_one_task_a_setting_and_writes_the_same_table(cluster, tmp_path):
    """Each setting of a sweep is a Ray task (every combination of a grid: tests/test_audit.py, in process)."""
    from splitlearn.tools.audit import sweep

    kw = dict(epochs=1, decoder_epochs=1)  # the tables are compared, not how well the decoder inverts
    grid = {"nopeek.alpha": [0.5], "noise.sigma": [0.0, 0.2]}
    here = sweep(EXAMPLES / "nopeek.toml", grid, None, tmp_path / "here", **kw)
    there = sweep(EXAMPLES / "nopeek.toml", grid, None, tmp_path / "there", ray="local", **kw)
    assert len(there["rows"]) == 2 and not any(r.get("failed") for r in there["rows"])
    # the same table, except where noise is drawn: each party draws it from a secret of its own, new
    # every run (with or without Ray), so there only the settings and the accounted epsilon agree (the DCS, last,
    # follows the figures)
    a, b = ([line.split(" | ") for line in (tmp_path / d / "sweep.md").read_text().splitlines()] for d in ("here", "there"))
    assert len(a) == len(b) and a[:-2] == b[:-2]  # title, description, header
    for ra, rb, row in zip(a[-2:], b[-2:], here["rows"]):
        assert ra == rb if row["values"]["noise.sigma"] == 0 else (ra[:2] == rb[:2] and ra[-2] == rb[-2])
    for sigma in ("0", "0.2"):  # each setting's run folder came back from its task
        folder = tmp_path / "there" / f"nopeek.alpha=0.5,noise.sigma={sigma}"
        assert json.loads((folder / "result.json").read_text())["metrics"]


def _fails_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("setting 2 cannot be trained")
    return x * 10


def test_a_failing_task_is_data_and_the_others_finish(cluster):
    from splitlearn.launch.onray import TaskFailure, run_tasks

    got = run_tasks(_fails_on_two, [(1,), (2,), (3,)], use_ray=True)
    assert got[0] == 10 and got[2] == 30
    assert isinstance(got[1], TaskFailure) and "setting 2 cannot be trained" in got[1].error
