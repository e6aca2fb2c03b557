"""Image augmentation per party (issue #24, item 8): ``[parties.NAME.augment]`` steps applied to training batches only,
drawn per row from the party's own seeded stream (``core/augment.py``), so runs and resumes are reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import splitlearn
from splitlearn.core.augment import augment, crop, flip, jitter
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.randomness import PartyRandom, party_seed
from splitlearn.core.augspec import ColorJitterStep, FlipStep, RandomCropStep
from splitlearn.core.specs import PlanError
from splitlearn.launch.threads import run_local
from splitlearn.run.setup import Step, prepare, schedule

from .support import same_run, stop_after

AUG = [{"kind": "random_crop", "padding": 1}, {"kind": "hflip", "p": 0.5},
       {"kind": "color_jitter", "brightness": 0.2, "contrast": 0.2}]


def body(aug: list | None = AUG, seed: int = 3, **train) -> dict:
    """Digits' 1x8x8 images through a small CNN (zoo ``cnn``: conv, relu, pool | flatten, linear, relu, linear), the
    bottom at the hospital (images and labels), the top and the loss at the server; the hospital augments ``aug``.
    On the CPU, where the rows compared below are computed."""
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    hospital = {"holds": {"x": "image", "y": "y"}, "optimizer": sgd, "device": "cpu",
                **({"augment": {"x": aug}} if aug else {})}
    return {"name": "augment", "data": {"dataset": "digits"},
            "train": {"epochs": 1, "batch_size": 64, "seed": seed, **train},
            "parties": {"hospital": hospital, "server": {"optimizer": sgd, "device": "cpu"}},
            "networks": {"net": {"zoo": "cnn", "args": {"channels": [4], "hidden": 16}}},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "net", "layers": [0, 3]},
                         "top": {"party": "server", "inputs": ["bottom"], "network": "net", "layers": [3, 7]}},
            "losses": {"digit": {"input": "top", "target": "hospital.y"}}}


def trained(plan_body: dict, steps: int = 8) -> dict[str, torch.Tensor]:
    """Every party's weights after the plan's first ``steps`` training steps (in-process, no run folder)."""
    plan, setups, shapes = prepare(load_plan(plan_body))
    run_local(plan, setups, shapes, steps=list(schedule(plan, setups["hospital"].splits))[:steps])
    return {f"{p}/{k}": v.detach().clone() for p, s in setups.items() for m in s.modules.values()
            for k, v in m.state_dict().items()}


def differ(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- reproducible runs -----------------------------------------------------------------------------------------------

def test_the_same_plan_and_seed_train_the_same_weights_and_the_augmentation_changes_them():
    first, again = trained(body()), trained(body())
    assert differ(first, again) == 0.0
    assert differ(first, trained(body(aug=None))) > 1e-4  # the augmentation took part in training
    assert differ(first, trained(body(seed=4))) > 1e-4


def test_training_batches_are_the_rows_augmented_from_the_partys_stream_and_eval_and_predict_see_them_as_they_are():
    plan, setups, shapes = prepare(load_plan(body()))
    steps = list(schedule(plan, setups["hospital"].splits))
    train, evals = [s for s in steps if s.mode == "train"], [s for s in steps if s.mode == "eval"]  # one epoch's
    seen: list[tuple[bool, torch.Tensor]] = []
    setups["hospital"].modules["bottom"].register_forward_pre_hook(
        lambda m, args: seen.append((m.training, args[0].detach().clone())))
    run_local(plan, setups, shapes)
    x = setups["hospital"].inputs["hospital.x"]
    rng = PartyRandom(party_seed(plan.train.seed, "hospital"))  # the hospital's stream, from its start
    expected = []
    for s in train:
        with rng.scope():
            expected.append((True, augment(plan.parties["hospital"].augment["x"], x[s.rows])))
    expected += [(False, x[s.rows]) for s in evals]
    assert seen[0][1].shape[0] == 1 and not seen[0][1].any()  # the handshake: one row of zeros, untouched
    assert len(seen[1:]) == len(expected)
    for (mode, got), (want_mode, want) in zip(seen[1:], expected):
        assert mode == want_mode and torch.equal(got, want)
    assert not torch.equal(seen[1][1], x[train[0].rows])  # training rows did change

    seen.clear()
    predict = [Step(0, "predict", 0, evals[0].rows)]
    plan, setups, shapes = prepare(load_plan(body()))
    setups["hospital"].modules["bottom"].register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0])))
    run_local(plan, setups, shapes, steps=predict, predicting=True)
    assert len(seen) == 2 and torch.equal(seen[1][1], x[evals[0].rows])  # the handshake's row, then the rows


def test_a_run_stopped_mid_epoch_resumes_bit_identical_with_augmentation(tmp_path):
    plan = load_plan(body(epochs=2, batch_size=128, checkpoint_every=5))  # 12 training steps an epoch
    splitlearn.train(plan, out=tmp_path / "a")
    with pytest.raises(Exception, match="stopped after 18 steps"):  # step 17: its last checkpoint is step 16,
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(18))
    splitlearn.train(plan, out=tmp_path / "b", resume=True)  # mid-epoch 2 (epoch 1: training 0-11, evaluation 12-14)
    same_run(tmp_path / "a", tmp_path / "b")


# -- each step's semantics -------------------------------------------------------------------------------------------

def rows(n: int = 32, c: int = 1, size: int = 6) -> torch.Tensor:
    """Images with no symmetry (a flip or a shift of one is never itself)."""
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0))


def test_hflip_and_vflip_flip_exactly_the_rows_whose_coin_came_up():
    x = rows()
    for kind, dim in (("hflip", -1), ("vflip", -2)):
        torch.manual_seed(5)
        out = flip(FlipStep(kind=kind, p=0.5), x)
        torch.manual_seed(5)
        coin = torch.rand(len(x)) < 0.5
        assert 0 < int(coin.sum()) < len(x)
        assert torch.equal(out[coin], x[coin].flip(dim)) and torch.equal(out[~coin], x[~coin])
    assert torch.equal(flip(FlipStep(kind="hflip", p=0.0), x), x)
    assert torch.equal(flip(FlipStep(kind="hflip", p=1.0), x), x.flip(-1))


def shifted(x: torch.Tensor, dy: int, dx: int, p: int, fill: float) -> torch.Tensor:
    """``x`` (C, H, W) moved by (dy, dx) within a border of ``p`` filled with ``fill``: the crop at (p + dy, p + dx)."""
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p), value=fill)[:, p + dy:p + dy + h, p + dx:p + dx + w]


def test_random_crop_keeps_the_shape_and_shifts_each_row_by_at_most_the_padding():
    x, p = rows(), 2
    torch.manual_seed(1)
    out = crop(RandomCropStep(kind="random_crop", padding=p, fill=-9.0), x)
    assert out.shape == x.shape
    shifts = []
    for a, b in zip(x, out):
        found = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                 if torch.equal(b, shifted(a, dy, dx, p, -9.0))]
        assert len(found) == 1  # each row is its image moved by at most the padding each way
        shifts.append(found[0])
    assert len(set(shifts)) > 5  # each row its own offset


def test_replicate_padding_repeats_the_border():
    x = rows(4)
    torch.manual_seed(2)
    out = crop(RandomCropStep(kind="random_crop", padding=1, padding_mode="replicate"), x)
    torch.manual_seed(2)
    dy, dx = torch.randint(0, 3, (2, 4))
    for i in range(4):
        want = F.pad(x[i:i + 1], (1, 1, 1, 1), mode="replicate")[0, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 6]
        assert torch.equal(out[i], want)


def test_color_jitter_draws_each_rows_factors_within_their_range():
    x = rows().abs() + 0.1  # positive values: a brightness factor is out / x
    torch.manual_seed(3)
    bright = jitter(ColorJitterStep(kind="color_jitter", brightness=0.2), x)
    f = (bright / x).flatten(1)
    assert torch.allclose(f, f[:, :1].expand_as(f), rtol=1e-5)  # one factor a row
    assert f.min() >= 0.8 - 1e-6 and f.max() <= 1.2 + 1e-6 and len(set(f[:, 0].tolist())) == len(x)

    torch.manual_seed(3)
    contrast = jitter(ColorJitterStep(kind="color_jitter", contrast=0.5), x)
    mean = x.mean((1, 2, 3), keepdim=True)
    g = ((contrast - mean) / (x - mean)).flatten(1)  # the blend with the row's mean grey
    assert torch.allclose(g, g[:, :1].expand_as(g), rtol=1e-3, atol=1e-4)
    assert g.min() >= 0.5 - 1e-4 and g.max() <= 1.5 + 1e-4
    assert torch.allclose(contrast.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)  # the mean stays

    bright_up = ColorJitterStep(kind="color_jitter", brightness=0.9, clamp=(0.0, 1.0))
    clamped = jitter(bright_up, torch.rand(64, 1, 4, 4) + 0.5)
    assert clamped.min() >= 0.0 and clamped.max() <= 1.0 and (clamped == 1.0).any()


def test_saturation_keeps_each_pixels_grey_and_moves_its_colour():
    x = rows(8, c=3).abs()
    out = jitter(ColorJitterStep(kind="color_jitter", saturation=0.5), x)
    w = torch.tensor([0.2989, 0.587, 0.114])[None, :, None, None]
    # (torchvision's weights add up to 0.9999, so the grey moves by at most 1e-4 of itself)
    assert torch.allclose((out * w).sum(1), (x * w).sum(1), rtol=2e-4) and not torch.allclose(out, x, atol=1e-2)


# -- the plan entry --------------------------------------------------------------------------------------------------

def test_augment_is_written_and_hashed_only_where_given():
    plain, aug = load_plan(body(aug=None)), load_plan(body())
    assert "augment" not in plain.model_dump()["parties"]["hospital"]  # plans without it hash as before it existed
    assert aug.model_dump()["parties"]["hospital"]["augment"]["x"][0] == {
        "kind": "random_crop", "padding": 1, "padding_mode": "constant", "fill": 0.0}
    assert plan_hash(plain) != plan_hash(aug)  # a party's training batches depend on it


@pytest.mark.parametrize("aug,entry,says", [
    ([{"kind": "rotate"}], "parties.hospital.augment.x.0",
     "unknown augmentation kind 'rotate'; accepted: random_crop (padding, padding_mode, fill); hflip (p); vflip (p); "
     "color_jitter (brightness, contrast, saturation, clamp)"),
    ([{"kind": "hflip"}, {"kind": "hflip", "prob": 0.3}], "parties.hospital.augment.x.1",
     "hflip takes no 'prob'; it takes p"),
    ([{"kind": "hflip", "p": 1.5}], "parties.hospital.augment.x.0", "less than or equal to 1"),
    ([{"kind": "random_crop"}], "parties.hospital.augment.x.0", "required entry is missing"),
    ([{"kind": "random_crop", "padding": 0}], "parties.hospital.augment.x.0", "greater than or equal to 1"),
    ([{"kind": "random_crop", "padding": 1, "padding_mode": "wrap"}], "parties.hospital.augment.x.0",
     "'constant', 'reflect' or 'replicate'"),
    ([{"kind": "random_crop", "padding": 1, "padding_mode": "reflect", "fill": 1.0}], "parties.hospital.augment.x.0",
     "random_crop fill is the value of constant padding"),
    ([{"kind": "color_jitter"}], "parties.hospital.augment.x.0", "color_jitter changes nothing"),
    ([{"kind": "color_jitter", "brightness": float("inf")}], "parties.hospital.augment.x.0", "finite number"),
    (["hflip"], "parties.hospital.augment.x.0", 'a table such as { kind = "hflip", p = 0.5 }'),
])
def test_a_wrong_step_is_refused_naming_the_entry_and_what_is_accepted(aug, entry, says):
    with pytest.raises(PlanError) as e:
        load_plan(body(aug))
    assert f"entry '{entry}" in str(e.value) and says in str(e.value)


def test_a_field_the_party_does_not_hold_or_no_steps_are_refused():
    plan = body()
    plan["parties"]["hospital"]["augment"] = {"image": AUG}
    with pytest.raises(PlanError, match=r"entry 'parties.hospital.augment'.*augment names field 'image', which this "
                                        r"party does not hold; it holds \['x', 'y'\]"):
        load_plan(plan)
    plan["parties"]["hospital"]["augment"] = {"x": []}
    with pytest.raises(PlanError, match="augment.x is an empty list of steps"):
        load_plan(plan)


@pytest.mark.parametrize("change,entry,says", [
    ({"field": "x"}, "parties.hospital.augment.x'", "augmentation needs floating images (N, C, H, W), but the field's "
                                                    "rows are torch.float32 with shape [64]"),
    ({"aug": [{"kind": "color_jitter", "saturation": 0.2}]}, "parties.hospital.augment.x.0'",
     "saturation needs three colour channels, but the images have 1"),
    ({"aug": [{"kind": "random_crop", "padding": 8, "padding_mode": "reflect"}]}, "parties.hospital.augment.x.0'",
     "padding below the image's size (8x8), got 8"),
])
def test_rows_that_are_not_images_the_steps_can_take_are_refused_before_any_party_starts(change, entry, says):
    plan = body(change.get("aug", AUG))
    if "field" in change:  # digits' flat rows (64 values) through an MLP
        plan["parties"]["hospital"]["holds"]["x"] = change["field"]
        plan["networks"]["net"] = {"zoo": "mlp", "args": {"sizes": [64, 16, 10]}}
        plan["segments"]["bottom"]["layers"], plan["segments"]["top"]["layers"] = [0, 2], [2, 3]
    with pytest.raises(PlanError) as e:  # the end-to-end check of prepare(), not a party failing mid-run
        splitlearn.train(load_plan(plan))
    assert f"entry '{entry}" in str(e.value) and says in str(e.value)
