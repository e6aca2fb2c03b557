import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
