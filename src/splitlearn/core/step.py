"""What a party holds during one step, and what the step gives back (:meth:`~splitlearn.core.engine.Party.step`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .graph import Stage

__all__ = ["Mode", "Modes", "StepOutput", "StepState", "WRITTEN_AFTER_SENDING", "CPU", "placed"]

Mode = Literal["train", "eval", "predict", "handshake"]
WRITTEN_AFTER_SENDING = ("was written to in place afterwards by a segment of its own reading it (an in-place first "
                         "layer, such as ReLU(inplace=True)): backward would run through that write and give a wrong "
                         "gradient (PyTorch refuses such a write to a tensor it saved); make that layer not in place")

CPU = torch.device("cpu")


def placed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself where it is there (no call into torch for nothing; a step makes a few)."""
    return t if t.device == device else t.to(device)


@dataclass
class StepOutput:
    losses: dict[str, float] = field(default_factory=dict)  # loss name -> value (unweighted)
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # loss name -> outputs of its head
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # loss name -> targets (eval)


@dataclass
class StepState:
    """What a party holds during one step (see :meth:`~splitlearn.core.engine.Party.begin`)."""

    step: int
    rows: torch.Tensor
    mode: Mode
    skip_labels: bool = False
    deadline: float | None = None  # time.monotonic() by which the step must be done
    todo: list[str] = field(default_factory=list)
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # node -> tensor (local or received)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # wire -> gradient of what we sent on it
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    sent: dict[str, torch.Tensor] = field(default_factory=dict)  # wire -> the tensor sent on it (after defenses)
    sent_as: dict[str, int] = field(default_factory=dict)  # wire -> that tensor's autograd version when it was sent
    masked: dict[str, torch.Tensor] = field(default_factory=dict)  # node -> its masked tensor, into a secure sum
    extra: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # stage -> extra loss terms (NoPeek)
    notes: dict[tuple[str, str], object] = field(default_factory=dict)  # (defense, wire) -> its values of the step
    out: StepOutput = field(default_factory=StepOutput)
    share: float = 1.0  # this micro-batch's share of the step's rows (1: the whole batch)
    stages: list[Stage] = field(default_factory=list)  # stages still to run backward

    def written_after_sending(self) -> list[str]:
        """The wires whose tensor was written to in place here after it was sent (a local segment reading it, with an
        in-place first layer): its receiver computed on what was sent, while backward would run from the changed
        tensor, through the write: a wrong gradient."""
        return [w for w, version in self.sent_as.items() if self.sent[w]._version != version]


class Modes:
    """A party's modules in a step's mode (batch norm and dropout behave as in training only when training): each
    module's whole tree set when the mode differs from the one this party set last, or from the module's own flag
    (something else set it), not at every step (``train()`` walks every submodule)."""

    def __init__(self) -> None:
        self.set_as: dict[str, bool] = {}  # module -> the mode this party last set on its tree

    def apply(self, modules: dict[str, nn.Module], train: bool) -> None:
        for key, m in modules.items():
            if self.set_as.get(key) is not train or m.training is not train:
                m.train(train)
                self.set_as[key] = train
