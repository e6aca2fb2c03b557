"""The training recipe of a PyTorch user (issue #24, items 1 to 4): any torch.optim optimizer and
learning-rate schedule by name, parameters without weight decay, per-party gradient clipping and
gradient accumulation. Each is compared with plain PyTorch training the same composed model on the
same rows (test_equivalence's method: weights within 1e-6 on the CPU), resumes bit for bit, and every
new entry refuses a mistake with one error naming the entry and what it accepts."""

from __future__ import annotations

import functools
import re
import json

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import splitlearn
from splitlearn.api.splitting import split_plan
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.specs import PlanError
from splitlearn.run.checkpoint import Checkpoints
from splitlearn.run.setup import prepare, schedule

from .support import run_steps, same_run, stop_after, unsplit_segments, worst_difference

SGD = {"name": "SGD", "lr": 0.05, "momentum": 0.9}


def body(hospital: dict, server: dict | None = None, **train) -> dict:
    """Digits through ``support.norm_mlp`` (Linear, LayerNorm, ReLU | Linear), cut after the ReLU: the bottom at
    the hospital (features and labels), the top at the server; each party's optimizer table as given."""
    return {"name": "recipe", "data": {"dataset": "digits"},
            "train": {"epochs": 1, "batch_size": 32, "seed": 3, **train},
            "parties": {"hospital": {"holds": {"x": "x", "y": "y"}, "optimizer": hospital},
                        "server": {"optimizer": server if server is not None else hospital}},
            "networks": {"net": {"factory": "tests.support:norm_mlp"}},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "net", "layers": [0, 3]},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "net", "layers": [3, 4]}},
            "losses": {"digit": {"input": "top", "target": "hospital.y"}}}


def plain_pytorch(plan, setups, batches, optimizers, after_backward=lambda ref: None) -> dict:
    """Train the unsplit model (the plan's segments, as built) on ``batches`` (rows) with plain autograd:
    ``optimizers(bottom, top)`` gives [(optimizer, schedule or None)] stepped in order after each backward;
    ``after_backward`` runs between backward and the steps. The trained segments."""
    ref = unsplit_segments(plan)
    x, y = setups["hospital"].inputs["hospital.x"], setups["hospital"].inputs["hospital.y"]
    pairs = optimizers(ref["bottom"], ref["top"])
    for rows in batches:
        for opt, _ in pairs:
            opt.zero_grad()
        F.cross_entropy(ref["top"](ref["bottom"](x[rows])), y[rows]).backward()
        after_backward(ref)
        for opt, sched in pairs:
            opt.step()
            if sched is not None:
                sched.step()
    return ref


def test_adamw_without_decay_on_biases_and_norms_and_a_cosine_schedule_with_warmup_equals_plain_pytorch():
    opt = {"name": "AdamW", "lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.1, "no_decay": ["bias", "norm"],
           "schedule": {"name": "CosineAnnealingLR", "T_max": 6, "warmup_steps": 3}}
    plan, setups, steps = run_steps(load_plan(body(opt)), 10)

    def adamw(decay, plain):
        o = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95),
                              weight_decay=0.1)
        return o, SequentialLR(o, [LinearLR(o, start_factor=1 / 4, total_iters=3), CosineAnnealingLR(o, T_max=6)],
                               milestones=[3])

    def optimizers(bottom, top):  # no decay on the biases and the LayerNorm's weight (named "1.weight")
        return [adamw([bottom[0].weight], [bottom[0].bias, bottom[1].weight, bottom[1].bias]),
                adamw([top[0].weight], [top[0].bias])]

    ref = plain_pytorch(plan, setups, [s.rows for s in steps], optimizers)
    assert worst_difference(setups, ref) <= 1e-6
    # what no_decay took out of weight decay, per party; the learning rate where the schedule left it
    hospital, server = setups["hospital"].optimizer, setups["server"].optimizer
    assert [len(g["params"]) for g in hospital.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in server.param_groups] == [0.1, 0.0]
    expected = 0.01 * (1 + torch.cos(torch.tensor(7 / 6 * torch.pi, dtype=torch.float64)).item()) / 2  # 3 + 7 steps
    assert server.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    start = unsplit_segments(plan)["top"]
    assert max((a - b).abs().max().item() for a, b in zip(ref["top"].parameters(), start.parameters())) > 1e-3


def test_each_party_clips_its_own_gradients_before_its_step():
    plan, setups, steps = run_steps(load_plan(body({"name": "SGD", "lr": 0.5, "clip_grad_norm": 0.05},
                                                   {"name": "SGD", "lr": 0.5, "momentum": 0.9, "clip_grad_norm": 0.2})), 8)
    norms = []

    def clip(ref):
        norms.append((torch.nn.utils.clip_grad_norm_(list(ref["bottom"].parameters()), 0.05).item(),
                      torch.nn.utils.clip_grad_norm_(list(ref["top"].parameters()), 0.2).item()))

    def optimizers(bottom, top):
        return [(torch.optim.SGD(bottom.parameters(), lr=0.5), None),
                (torch.optim.SGD(top.parameters(), lr=0.5, momentum=0.9), None)]

    ref = plain_pytorch(plan, setups, [s.rows for s in steps], optimizers, clip)
    assert worst_difference(setups, ref) <= 1e-6
    assert min(b for b, _ in norms) > 0.05 and min(t for _, t in norms) > 0.2  # the clipping acted at every step


@pytest.mark.parametrize("accumulate,pipeline", [(4, 1), (7, 2)])  # 180 batches of 8: 7 leaves a shorter last group
def test_accumulating_batches_equals_one_batch_that_many_times_larger(accumulate, pipeline):
    opt = {"name": "Adam", "lr": 0.01}
    plan, setups, steps = run_steps(load_plan(body(opt, batch_size=8, accumulate=accumulate, pipeline=pipeline)))
    large = load_plan(body(opt, batch_size=8 * accumulate))  # one batch `accumulate` times larger
    big = [s.rows for s in schedule(large, setups["hospital"].splits) if s.mode == "train"]
    small = [s.rows for s in steps if s.mode == "train"]
    assert len(small) == 180 and len(big) == -(-180 // accumulate)  # with 7: a last group of 5 batches
    assert torch.equal(torch.cat(small), torch.cat(big))  # the same rows, in the same order
    ref = plain_pytorch(plan, setups, big, lambda b, t: [(torch.optim.Adam(b.parameters(), lr=0.01), None),
                                                           (torch.optim.Adam(t.parameters(), lr=0.01), None)])
    assert worst_difference(setups, ref) <= 1e-6
    for party in setups.values():  # one optimizer step per group of `accumulate` batches
        assert {int(s["step"]) for s in party.optimizer.optimizer.state.values()} == {len(big)}


def test_a_run_with_schedules_and_accumulation_stopped_inside_a_group_resumes_bit_identical(tmp_path):
    """The hospital's schedule steps per step after a warmup, the server's per epoch; two batches per step. The
    checkpoints fall on group boundaries (every 5 training steps: at the end of the group that step is in)."""
    plan = load_plan(body({**SGD, "schedule": {"name": "CosineAnnealingLR", "T_max": 40, "warmup_steps": 5}},
                          {"name": "AdamW", "lr": 0.01, "schedule": {"name": "StepLR", "step_size": 1, "gamma": 0.5,
                                                                     "every": "epoch"}},
                          epochs=2, accumulate=2, checkpoint_every=5))
    splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 29 steps"):  # the first of the group (29, 30)
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(29))
    held = Checkpoints(tmp_path / "b" / "parties" / "server" / "checkpoints", plan_hash=plan_hash(plan)).cursors()
    assert [c.step for c in held] == [19, 25]  # after training steps 20 and 26: each the end of its group
    splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b")


def test_a_clients_run_with_a_schedule_on_the_server_copies_resumes_bit_identical(tmp_path):
    """independent: each client trains its own bottom, and the server a copy of the top per client, each with its
    optimizer and schedule; all of them go in the checkpoint of each round, and resume after a round ends as the
    run never stopped."""
    plan = load_plan({**body({**SGD, "schedule": {"name": "ExponentialLR", "gamma": 0.9}},
                             {**SGD, "schedule": {"name": "StepLR", "step_size": 3, "gamma": 0.5}}, epochs=2,
                             batch_size=64),
                      "data": {"dataset": "digits", "test_fraction": 0.05},  # (few rows to score: a quick test)
                      "clients": {"template": "hospital", "count": 2, "schedule": "independent"}})
    reference = splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 1 steps"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(1))
    resumed = splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(tmp_path / "a", tmp_path / "b", count_bytes=False)  # (a resume's commands add bytes)
    assert resumed["metrics"]["train_loss"] == reference["metrics"]["train_loss"]


def test_an_optimizer_factory_and_python_objects_make_the_same_plan_as_its_name():
    by_name = run_steps(load_plan(body(SGD)), 6)[1]
    by_factory = run_steps(load_plan(body({"factory": "tests.support:recipe_sgd"})), 6)[1]
    assert worst_difference(by_factory, {seg: m for s in by_name.values() for seg, m in s.modules.items()}) == 0.0
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    given = split_plan(model, 1, optimizer=functools.partial(torch.optim.AdamW, betas=(0.9, 0.95)), lr=3e-4,
                       optimizer_options={"weight_decay": 0.1, "no_decay": ["bias"],
                                          "schedule": {"name": "cosineannealinglr", "T_max": 100}})
    table = {"name": "AdamW", "lr": 3e-4, "momentum": 0.0, "weight_decay": 0.1, "betas": [0.9, 0.95],
             "no_decay": ["bias"], "schedule": {"name": "cosineannealinglr", "every": "step", "warmup_steps": 0,
                                                "T_max": 100}}
    assert given.parties["server"].optimizer.model_dump(mode="json") == table  # as a plan file writes it
    again = load_plan(json.loads(json.dumps(given.model_dump(mode="json"))))  # plan.json, read by a party process
    assert plan_hash(again) == plan_hash(given)
    assert split_plan(model, 1, optimizer="tests.support:recipe_sgd").parties["client"].optimizer.factory \
        == "tests.support:recipe_sgd"


@pytest.mark.parametrize("table,entry,says", [
    ({"name": "AdamZ"}, "parties.server.optimizer",
     ["unknown optimizer 'AdamZ'", "accepted (any case): Adadelta", "AdamW", "RMSprop", "SGD", "factory"]),
    ({"name": "AdamW", "betaz": [0.9, 0.95]}, "parties.server.optimizer",
     ["optimizer AdamW takes no argument 'betaz'", "its arguments: lr, betas, eps, weight_decay, amsgrad"]),
    ({"name": "Adam", "momentum": 0.9}, "parties.server.optimizer", ["optimizer Adam takes no argument 'momentum'"]),
    ({"name": "Adam", "betas": [1.5, 0.9]}, "parties.server.optimizer",
     ["optimizer Adam refused its arguments", "Invalid beta parameter"]),
    ({**SGD, "schedule": {"name": "CosineLR", "T_max": 10}}, "parties.server.optimizer.schedule",
     ["unknown schedule 'CosineLR'", "accepted (any case): ConstantLR, CosineAnnealingLR", "StepLR"]),
    ({**SGD, "schedule": {"name": "StepLR", "step": 3}}, "parties.server.optimizer.schedule",
     ["schedule StepLR takes no argument 'step'; its arguments: step_size, gamma"]),
    ({**SGD, "schedule": {"name": "CosineAnnealingLR"}}, "parties.server.optimizer.schedule",
     ["schedule CosineAnnealingLR needs T_max"]),
    ({**SGD, "schedule": {"name": "ReduceLROnPlateau"}}, "parties.server.optimizer.schedule",
     ["ReduceLROnPlateau cannot be used"]),
    ({**SGD, "clip": "global"}, "parties.server.optimizer", ['clip = "global"', "is not available yet", "clip_grad_norm"]),
    ({"factory": "torch.optim:SGD"}, "parties.server.optimizer.factory", ["is not an optimizer factory"]),
])
def test_a_wrong_optimizer_entry_is_one_error_naming_it_and_what_it_accepts(table, entry, says):
    with pytest.raises(PlanError) as e:
        prepare(body(SGD, table))
    assert e.value.entry == entry
    assert all(s in str(e.value) for s in says), str(e.value)


def test_an_optimizer_given_in_python_that_no_process_can_rebuild_is_refused_saying_what_to_give():
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with pytest.raises(PlanError) as e:
        split_plan(model, 1, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert e.value.entry == "optimizer" and "cannot be written in the plan" in str(e.value)
    assert "functools.partial" in e.value.hint and "'module:function'" in e.value.hint


def test_a_per_epoch_schedule_first_used_in_a_later_epoch_catches_up():
    """A client first drawn in epoch 2 trains at epoch 2's rate (the schedule stepped twice), as one that
    trained in every epoch does; each later epoch steps it once more."""
    from splitlearn.core.optimizing import PartyOptimizer, schedule_maker

    def fresh() -> PartyOptimizer:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return PartyOptimizer(opt, schedule_maker("StepLR", {"step_size": 1, "gamma": 0.5}), every="epoch")

    late, always = fresh(), fresh()
    for epoch in range(3):
        always.begin_epoch(epoch)
    late.begin_epoch(2)
    assert late.param_groups[0]["lr"] == always.param_groups[0]["lr"] == 0.25
    late.begin_epoch(3)
    assert late.param_groups[0]["lr"] == 0.125


@pytest.mark.parametrize("change, says", [
    (lambda b: b["losses"]["digit"].update(class_weights=[1.0] * 10) or b["train"].update(accumulate=2),
     "losses.digit.class_weights with train.accumulate = 2"),
    (lambda b: b["losses"]["digit"].update(class_weights=[1.0] * 10) or b["train"].update(pipeline=2),
     "losses.digit.class_weights with train.pipeline = 2"),
    (lambda b: b["losses"]["digit"].update(class_weights=[0.0] + [1.0] * 9), "class_weights must be finite and above 0"),
    (lambda b: b["parties"]["server"]["optimizer"].update(arguments={"lr": 5.0}), "arguments names ['lr']"),
    (lambda b: b["parties"]["server"]["optimizer"].update(name="SparseAdam"), "sparse gradients only"),
], ids=["weights-accumulate", "weights-pipeline", "zero-weight", "argument-over-a-setting", "sparseadam"])
def test_recipes_that_would_train_other_than_they_say_are_refused(change, says):
    from .support import tiny

    body = tiny().model_dump(mode="json", exclude_none=True)
    change(body)
    with pytest.raises(PlanError, match=re.escape(says)):
        load_plan(body)


@pytest.mark.parametrize("clients, party, schedule, says", [
    ({"schedule": "splitfed_v1"}, "server", {"name": "StepLR", "step_size": 1},
     "under splitfed_v1 server's copies are made anew every round"),
    ({"schedule": "fedavg", "local_epochs": 2}, "hospital", {"name": "StepLR", "step_size": 1, "every": "epoch"},
     'every = "epoch" with clients.local_epochs = 2 would step once per round'),
], ids=["splitfed_v1-server", "local-epochs"])
def test_schedules_the_rounds_would_bend_are_refused(clients, party, schedule, says):
    from .support import tiny

    body = tiny(count=2, **clients).model_dump(mode="json", exclude_none=True)
    body["train"]["epochs"] = 2
    body["parties"][party]["optimizer"]["schedule"] = schedule
    with pytest.raises(PlanError, match=re.escape(says)):
        load_plan(body)
