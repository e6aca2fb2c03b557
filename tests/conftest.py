import os
from pathlib import Path

# The suite's figures are CPU figures (bit-identical comparisons with plain PyTorch on the CPU):
# plans default to device = "auto", so CUDA is hidden from this process and the party processes
# it starts. A GPU check is bench/device.py.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Test workers (pytest -n, pytest-xdist) share the cores: each gets its share of math threads, and
# so do the party processes it starts (OMP_NUM_THREADS), so that in-process and party-process
# runs of one test use the same thread count (some kernels' results depend on it).
# A user's OMP_NUM_THREADS wins; the one set here is marked, since xdist's controller imports this file first (as
# one worker) and its workers inherit its environment: each sets its own share again (with 2 workers on 2 cores,
# 1 each: two workers' math teams of 2 would spin against each other, the in-process parties now computing on
# one thread and so one team).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("SPLITLEARN_SUITE_THREADS") == os.environ["OMP_NUM_THREADS"]:
    os.environ["OMP_NUM_THREADS"] = os.environ["SPLITLEARN_SUITE_THREADS"] = str(
        max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
THREADS = int(os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

torch.set_num_threads(THREADS)


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


# Each test file runs on one worker (``--dist loadfile``). xdist hands files out by their number of tests, so a file of
# a few long tests (the deployment's) could start last and keep one worker busy while the other idled: a suite run
# measured 1,543 s of tests on 2 workers ending at 812 s, its last 60 s one file alone. The longest files go first
# (measured with ``--durations=0``, seconds on 2 cores); the rest follow in their order, short ones filling the end.
LONGEST_FIRST = ("test_plan_space.py",  # 105-132
                 "test_resume_moments.py",  # 92-102
                 "test_faults.py", "test_network.py", "test_ray.py", "test_deployment.py",  # 45-91
                 "test_observability.py", "test_align_hostile.py", "test_notes_example.py", "test_real_studies.py",
                 "test_pipeline.py", "test_hostile_processes.py", "test_audit_fsha.py", "test_clients.py",  # 35-57
                 "test_clients_grpc.py", "test_flow_control.py", "test_audit_sdar.py", "test_lying_client.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # (xdist's option: keep the order pytest_collection_modifyitems gives)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # (stable: each file's order kept)
