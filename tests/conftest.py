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
