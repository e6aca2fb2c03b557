"""Split training equals training the composed, unsplit model (Opacus's "compare to vanilla").

For each configuration, a few steps of split training through the engine (in-process
transport, identity codec) must give the same parameters as plain PyTorch training of the
composed model, built by hand here, on the same batches in the same order.
"""

from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from splitlearn.models import build_segment
from splitlearn.run.setup import prepare, schedule
from splitlearn.launch.threads import run_local

from .conftest import EXAMPLES

STEPS = 6


def composed(name, m, x):
    """The unsplit model of each example plan, written out in plain PyTorch: (task, output, target-field)."""
    if name == "vanilla":
        return [("digit", m["top"](m["bottom"](x["hospital.x"])), "hospital.y")]
    if name == "u_shaped":
        return [("digit", m["head"](m["middle"](m["bottom"](x["hospital.x"]))), "hospital.y")]
    if name == "multi_hop":
        return [("digit", m["last"](m["third"](m["second"](m["first"](x["client.x"])))), "client.y")]
    if name == "vertical":
        h = torch.cat([m["bottom_a"](x["clinic_a.x"]), m["bottom_b"](x["clinic_b.x"])], dim=1)
        return [("malignant", m["top"](h), "server.y")]
    if name == "multi_task":
        t = m["trunk"](x["hospital.x"])
        return [("digit", m["digit_head"](t), "digit_lab.y"), ("parity", m["parity_head"](t), "parity_lab.parity")]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["vanilla", "u_shaped", "multi_hop", "vertical", "multi_task"])
def test_split_training_equals_unsplit(name):
    plan, setups, shapes = prepare(EXAMPLES / f"{name}.toml", epochs=1)
    first = next(iter(setups.values()))
    train_steps = [s for s in islice(schedule(plan, first.splits), STEPS)]
    assert all(s.mode == "train" for s in train_steps)

    # the unsplit reference: the same networks, one optimizer, plain autograd
    ref = {seg: build_segment(plan, seg) for seg in plan.segments}
    data = {k: v for s in setups.values() for k, v in s.inputs.items()}
    opt_spec = next(iter(plan.parties.values())).optimizer
    assert all(p.optimizer == opt_spec for p in plan.parties.values())  # one optimizer is then equivalent
    params = [p for mod in ref.values() for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=opt_spec.lr, momentum=opt_spec.momentum)
    for s in train_steps:
        x = {k: v[s.rows] for k, v in data.items()}
        opt.zero_grad()
        loss = sum(plan.losses[task].weight * F.cross_entropy(out, x[target]) for task, out, target in composed(name, ref, x))
        loss.backward()
        opt.step()

    # before: the split modules start from the very same weights
    for party in setups.values():
        for seg, mod in party.modules.items():
            for (k, a), b in zip(mod.state_dict().items(), build_segment(plan, seg).state_dict().values()):
                assert torch.equal(a, b), (seg, k)

    run_local(plan, setups, shapes, steps=list(train_steps))

    worst = 0.0
    for party in setups.values():
        for seg, mod in party.modules.items():
            for (k, a), b in zip(mod.state_dict().items(), ref[seg].state_dict().values()):
                worst = max(worst, (a - b).abs().max().item())
    assert worst <= 1e-6, f"{name}: split and unsplit parameters differ by {worst}"
    # and training did move them (the comparison is not vacuous)
    moved = max((a - b).abs().max().item() for seg in plan.segments
                for a, b in zip(ref[seg].state_dict().values(), build_segment(plan, seg).state_dict().values()))
    assert moved > 1e-3
