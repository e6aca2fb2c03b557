"""The cost model: exact FLOP and byte counts on tiny models, and the seed table's shape on CIFAR."""

import json
import time

import pytest
import torch
from torch import nn

from splitlearn.tools.costmodel import (Cost, compare, count_flops, fedavg_cost, format_table, large_batch_sgd_cost,
                                  seed_table, split_cost)
from splitlearn.models.cifar import resnet50, vgg16
from splitlearn.models.zoo import ZOO, mlp

SHAPE = (3, 32, 32)


def test_count_flops_linear_by_hand():
    b = 8
    fwd, bwd = count_flops(nn.Linear(64, 128), (64,), batch=b)
    assert fwd == 2 * b * 64 * 128
    assert bwd == 2 * b * 64 * 128  # weight gradient only: the input needs none (bias grad is a sum)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    fwd, bwd = count_flops(net, (64,), batch=b)
    assert fwd == 2 * b * (64 * 128 + 128 * 10)
    assert bwd == 2 * b * 64 * 128 + 2 * (2 * b * 128 * 10)  # second layer: grad-weight and grad-input


def test_count_flops_conv_and_model_untouched():
    conv = nn.Conv2d(3, 64, 3, padding=1)
    before = conv.weight.detach().clone()
    fwd, bwd = count_flops(conv, SHAPE, batch=2)
    assert fwd == bwd == 2 * 2 * 64 * 32 * 32 * 3 * 9
    assert conv.weight.device.type == "cpu" and torch.equal(conv.weight, before) and conv.weight.grad is None
    net = vgg16()
    net.eval()
    count_flops(net, SHAPE)
    assert not net.training  # mode restored


def test_split_bytes_tiny_plan_exact():
    net = mlp([64, 32, 10])  # Linear(64,32), ReLU, Linear(32,10); cut 2 = after the ReLU, width 32
    c = split_cost(net, (64,), cut=2, samples=1000, clients=1, epochs=3)
    assert c.bytes_per_client == 1000 * 32 * 4 * 2 * 3  # a single client hands nothing off
    assert c.flops_per_client == 1000 * 3 * (2 * 64 * 32 + 2 * 64 * 32)
    c4 = split_cost(net, (64,), cut=2, samples=1000, clients=4, epochs=3)
    handoff = 2 * (64 * 32 + 32) * 4 * 3
    assert c4.bytes_per_client == 250 * 32 * 4 * 2 * 3 + handoff
    assert c4.details["handoff_bytes"] == handoff
    assert split_cost(net, (64,), 2, 1000, 4, 3, handoff=False).bytes_per_client == 250 * 32 * 4 * 2 * 3
    with pytest.raises(ValueError):
        split_cost(net, (64,), cut=3, samples=1000, clients=1, epochs=1)


def test_fedavg_and_large_batch_tiny_exact():
    net = mlp([64, 32, 10])
    p = 64 * 32 + 32 + 32 * 10 + 10
    per_sample = 2 * (64 * 32 + 32 * 10) + 2 * 64 * 32 + 2 * 2 * 32 * 10
    f = fedavg_cost(net, (64,), samples=1000, clients=10, epochs=4, rounds=2)
    assert f.flops_per_client == per_sample * 100 * 4
    assert f.bytes_per_client == 2 * p * 4 * 2
    assert fedavg_cost(net, (64,), 1000, 10, 4).details["rounds"] == 4  # one local epoch per round
    s = large_batch_sgd_cost(net, (64,), samples=1000, clients=10, epochs=4, batch=25)
    assert s.flops_per_client == f.flops_per_client
    assert s.details["steps"] == 4 * 1000 / (10 * 25)
    assert s.bytes_per_client == 2 * p * 4 * 16
    assert isinstance(s, Cost) and s.assumptions


def test_zoo_cifar_networks():
    assert ZOO["vgg16"] is vgg16 and ZOO["resnet50"] is resnet50
    with torch.device("meta"):
        v, r, v_plain = vgg16(), resnet50(), vgg16(classes=100, batch_norm=False)
    x = torch.empty(2, *SHAPE, device="meta")
    assert v(x).shape == (2, 10) and r(x).shape == (2, 100) and v_plain(x).shape == (2, 100)
    for net in (v, r, v_plain):
        assert isinstance(net, nn.Sequential) and isinstance(net[0], nn.Conv2d)
        assert net[:1](x).shape == (2, 64, 32, 32)  # cut = 1: after the first convolution
    assert len(v) == 52 and len(r) == 22 and len(v_plain) == 39
    assert sum(isinstance(m, nn.Conv2d) for m in v) == 13
    assert [i for i, m in enumerate(v) if isinstance(m, nn.MaxPool2d)] == [6, 13, 23, 33, 43]
    assert r[:19](x).shape == (2, 2048, 4, 4)


def test_resnet50_count_is_fast():
    with torch.device("meta"):
        net = resnet50()
    t0 = time.perf_counter()
    fwd, bwd = count_flops(net, SHAPE, batch=128)
    assert time.perf_counter() - t0 < 30
    assert 2.4e9 < fwd / 128 < 2.8e9  # ~1.3 GMACs per 32x32 image with the stride-1 stem
    assert bwd == pytest.approx(2 * fwd, rel=0.01)


def test_vgg_split_over_fedavg_ratio_near_seed():
    with torch.device("meta"):
        net = vgg16()
    seed = seed_table()["vgg16"]["cifar10"]["clients"]
    seed_ratio = seed[100]["split"]["tflops"] / seed[100]["fedavg"]["tflops"]  # 0.00527
    for k in (100, 500):
        s = split_cost(net, SHAPE, cut=1, samples=50000, clients=k, epochs=31)
        f = fedavg_cost(net, SHAPE, samples=50000, clients=k, epochs=31)
        ratio = s.flops_per_client / f.flops_per_client
        assert seed_ratio / 1.5 < ratio < seed_ratio * 1.5, ratio


def test_split_bytes_fall_fivefold():
    for model, dataset in (("resnet50", "cifar100"), ("vgg16", "cifar10")):
        result = compare(model, dataset, [100, 500], cut=1)
        gb = {r["clients"]: r["gb"] for r in result["rows"] if r["method"] == "split"}
        assert gb[100] / gb[500] == pytest.approx(5, rel=0.01)
    result = compare("resnet50", "cifar100", [100, 500])
    seed = {r["clients"]: r for r in result["rows"] if r["method"] == "split"}
    assert seed[100]["seed_gb"] == 6 and seed[500]["seed_gb"] == 1.2
    for k in (100, 500):  # 23 fitted epochs land on the seed's absolute figure
        assert seed[k]["gb"] == pytest.approx(seed[k]["seed_gb"], rel=0.05)


def test_compare_and_table():
    result = compare("vgg16", "cifar10", [100, 500], cut=1)
    json.dumps(result)  # the CLI's --json
    rows = {(r["method"], r["clients"]): r for r in result["rows"]}
    assert len(rows) == 6
    for k in (100, 500):
        assert rows["fedavg", k]["tflops"] == rows["large_batch_sgd", k]["tflops"]
        assert rows["fedavg", k]["tflops"] == pytest.approx(rows["fedavg", k]["seed_tflops"], rel=0.05)
    assert rows["fedavg", 100]["tflops"] == pytest.approx(5 * rows["fedavg", 500]["tflops"])
    assert result["assumptions"] and result["notes"]
    text = format_table(result)
    assert "seed TFLOPs" in text and "29.4" in text and "0.1548" in text and "assumptions:" in text
    other = compare("vgg16", "cifar100", [10], cut=3, epochs=1)
    assert other["seed"] is None and all(r["seed_tflops"] is None for r in other["rows"])
    assert "ours/seed" in format_table(other)
    with pytest.raises(ValueError):
        compare("alexnet", "cifar10", [100], cut=1)
