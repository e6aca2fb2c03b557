import os
from pathlib import Path

# The suite's figures are CPU figures (bit-identical comparisons with plain PyTorch on the CPU):
# plans default to device = "auto", so CUDA is hidden from this process and the party processes
# it starts. A GPU check is bench/device.py.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
