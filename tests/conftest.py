import os
from pathlib import Path

# The suite's figures are CPU figures (bit-identical comparisons with plain PyTorch on the CPU):
# plans default to device = "auto", so CUDA is hidden from this process and the party processes
# it starts. A GPU check is bench/device.py.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Test workers (pytest -n, pytest-xdist) share the cores: each gets its share of math threads, and
# so do the party processes it starts (OMP_NUM_THREADS), so that in-process and party-process
# runs of one test use the same thread count (some kernels' results depend on it).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

torch.set_num_threads(THREADS)


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
