"""Every configuration of the seed trains on embedded data to its target accuracy."""

import pytest

import splitlearn

from .conftest import EXAMPLES
from .support import TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_example_reaches_target(name):
    result = splitlearn.train(EXAMPLES / f"{name}.toml")
    m = result["metrics"]
    assert m["test_accuracy"] >= TARGETS[name], m
    assert len(m["train_loss"]) == result["epochs"]
    assert m["train_loss"][-1] < m["train_loss"][0]
    for party, p in result["parties"].items():
        assert p["bytes_sent"] > 0 and p["bytes_received"] > 0, party
        assert p["flops"] > 0 and p["flops_backward"] > 0, party
        assert p["refused"] == [] and p["refused_jumps"] == {}, party  # no learnt bound refuses an honest run


def test_multi_task_reports_each_task():
    result = splitlearn.train(EXAMPLES / "multi_task.toml")
    tasks = result["metrics"]["tasks"]
    assert set(tasks) == {"digit", "parity"}
    assert tasks["digit"]["test_accuracy"] >= 0.90
    assert tasks["parity"]["test_accuracy"] >= 0.90
    assert (tasks["digit"]["party"], tasks["parity"]["party"]) == ("digit_lab", "parity_lab")
    assert result["metrics"]["test_accuracy"] == tasks["digit"]["test_accuracy"]


def test_u_shaped_server_never_sees_labels_or_predictions():
    result = splitlearn.train(EXAMPLES / "u_shaped.toml", epochs=1)
    assert all(w["carries"] == "activation" for w in result["wires"])
    server_in = {r["wire"] for r in result["parties"]["server"]["received"]}
    assert server_in == {"bottom->middle", "middle->head", ""}  # activations, their gradients, control
