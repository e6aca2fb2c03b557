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


def test_every_step_runs_the_modules_in_its_mode_which_is_set_when_it_changes(monkeypatch):
    """A training step runs every module and submodule in training mode, an evaluation (and the handshake) in eval
    mode; the engine sets a module's tree when the mode changes or something else set the module's own mode (a
    callback's ``eval()`` mid-training), not at every step (it walks every submodule)."""
    import splitlearn
    from splitlearn.core.engine import Party

    mode_of, seen, set_by_engine, steps, outside = {}, [], [], [], []
    step, train = Party.step, torch.nn.Module.train

    def stepping(self, sid, rows, mode, *a, **k):
        for m in self.modules.values():
            if id(m) not in mode_of:
                m.register_forward_pre_hook(lambda mod, args, party=self.name: seen.append(
                    (mode_of[party], {s.training for s in mod.modules()})))
            mode_of[id(m)] = mode
        if mode == "train" and steps.count((self.name, "train")) == 4:
            outside.append(self.name)
            for m in self.modules.values():
                m.eval()  # something else sets the module's mode between two training steps
            outside.clear()
        mode_of[self.name] = mode
        steps.append((self.name, mode))
        return step(self, sid, rows, mode, *a, **k)

    def training(self, mode=True):
        if id(self) in mode_of and not outside:
            set_by_engine.append(mode)
        return train(self, mode)

    monkeypatch.setattr(Party, "step", stepping)
    monkeypatch.setattr(torch.nn.Module, "train", training)
    splitlearn.train(EXAMPLES / "vanilla.toml", epochs=2)
    assert {m for m, _ in seen} == {"handshake", "train", "eval"}
    wrong = [(i, m, flags) for i, (m, flags) in enumerate(seen) if flags != {m == "train"}]
    assert not wrong, wrong[:5]  # every submodule, in every forward
    changes = {p: sum(a != b for a, b in zip(modes, modes[1:]))
               for p in ("hospital", "server") for modes in [[m for q, m in steps if q == p]]}
    # set at each party's first step, at each change of mode (the handshake counts as eval), after the eval() above:
    # a few times, against more than a hundred steps
    assert len(steps) > 100 and len(set_by_engine) <= sum(changes.values()) + 2 + 2


def _fanout_plan(folder, inplace: bool, epochs: int, module: str):
    """A hospital's trunk feeding the server's head and its own auxiliary head, whose first layer is a ReLU (in place
    or not): a plan file, the auxiliary head a factory beside it in ``module`` (party processes read the plan from its
    file; a module of one name is imported once a process)."""
    (folder / f"{module}.py").write_text("import torch\n\n\ndef aux(inplace):\n    return torch.nn.Sequential("
                                    "torch.nn.ReLU(inplace=inplace), torch.nn.Linear(32, 10))\n")
    segments = {"trunk": ("hospital", "hospital.x"), "aux": ("hospital", "trunk"), "head": ("server", "trunk")}
    (folder / "plan.toml").write_text("\n".join([
        'name = "fanout"', "[data]", 'dataset = "digits"', "[train]", f"epochs = {epochs}", "batch_size = 32",
        "seed = 0", "[parties.hospital]", 'holds = { x = "x", y = "y" }', 'optimizer = { name = "sgd", lr = 0.05 }',
        "[parties.server]", 'optimizer = { name = "sgd", lr = 0.05 }',
        "[networks.trunk]", 'zoo = "mlp"', "args = { sizes = [64, 32] }",
        "[networks.aux]", f'factory = "{module}:aux"', f"args = {{ inplace = {str(inplace).lower()} }}",
        "[networks.head]", 'zoo = "mlp"', "args = { sizes = [32, 10] }",
        *[line for name, (party, src) in segments.items()
          for line in (f"[segments.{name}]", f'party = "{party}"', f'inputs = ["{src}"]', f'network = "{name}"')],
        "[losses.a]", 'input = "aux"', 'target = "hospital.y"', "[losses.b]", 'input = "head"', 'target = "hospital.y"',
        ""]))
    return folder / "plan.toml"


@pytest.mark.parametrize("launcher", ["threads", "processes"])
def test_a_sent_tensor_written_to_in_place_by_a_local_segment_is_refused_not_trained_wrong(launcher, tmp_path):
    """The auxiliary head's in-place ReLU writes into the tensor the hospital already sent. The server computed on
    what was sent, while the hospital's backward would run from the changed tensor through the ReLU: a wrong gradient
    (unsplit PyTorch refuses such a write to a tensor it saved; before this check a gRPC run trained so, silently).
    The run stops naming the wire and the remedy, in one process and in party processes (the engine's check, before
    the party waits for the gradient); out of place, the same plan trains."""
    import splitlearn
    from splitlearn.run.report import RunError

    with pytest.raises(RunError, match=r"hospital: the tensor it sent on \['trunk->head'\] was written to in place "
                                       r"afterwards .* make that layer not in place"):
        splitlearn.train(_fanout_plan(tmp_path, True, 1, f"fanout_{launcher}"), launcher=launcher, out=tmp_path / "a")
    if launcher == "threads":
        result = splitlearn.train(_fanout_plan(tmp_path, False, 3, f"fanout_{launcher}"))
        assert result["metrics"]["test_accuracy"] > 0.5  # ten digits: chance is 0.1
