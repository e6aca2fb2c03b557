"""User factories for plans built in Python (``factory = "tests.factories:NAME"``)."""

from torch import nn


def tiny_mlp(width: int = 32, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, classes))


class TwoInputs(nn.Module):
    """A head that takes its two inputs as separate arguments (merge = "module")."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.a, self.b = nn.Linear(width, 2), nn.Linear(width, 2)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


def two_inputs(width: int = 16) -> nn.Module:
    return TwoInputs(width)


def not_a_module():
    return "nope"


def bn_mlp(width: int = 64) -> nn.Sequential:
    """Batch norm and dropout: they must act as in training only when training."""
    return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 10))
