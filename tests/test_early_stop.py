"""Validation and early stopping (issue #24, item 6): ``[data] validation_fraction`` scores validation rows every
epoch, ``[train] early_stop`` stops when the watched figure stops improving, and every party keeps the best epoch's
weights, agreed over the wire (:mod:`splitlearn.core.stopping`): the test figures, the saved weights and ``predict``
are the best epoch's."""

from __future__ import annotations

import json

import pytest
import torch

import splitlearn
from splitlearn.core.graph import build_graph
from splitlearn.core.load import load_plan
from splitlearn.core.plan import plan_hash
from splitlearn.core.specs import PlanError
from splitlearn.core.stopping import EpochAgreement
from splitlearn.run.rows import counted_splits
from splitlearn.run.setup import prepare, schedule
from splitlearn.wire.messages import Kind, Message

from .support import FakeLink, same_run, split_mlp, stop_after, toml, weights

# digits through a 64-32-10 MLP at a learning rate high enough that the validation loss turns up after epoch 2:
# measured, val_loss [1.70, 1.12, 0.72, 0.95]: best epoch 2, stopped after epoch 3 with patience 1
VALIDATION = {"dataset": "digits", "validation_fraction": 0.2}
STOP = {"metric": "val_loss", "patience": 1}


def body(epochs: int = 6, early_stop: dict | None = STOP, **train) -> dict:
    return split_mlp("stopping", [64, 32, 10], lr=1.0, data=VALIDATION,
                     train={"epochs": epochs, "batch_size": 128, "seed": 1,
                            **({"early_stop": early_stop} if early_stop else {}), **train})


def steps_run(run) -> dict[str, int]:
    """Each party's training steps, from its own report."""
    return {p: json.loads((run / "parties" / p / "report.json").read_text())["meter"]["train_steps"]
            for p in ("hospital", "server")}


def test_early_stopping_stops_at_the_same_epoch_everywhere_and_predict_uses_the_best_epoch(tmp_path):
    run = splitlearn.train(load_plan(body()), out=tmp_path / "stopped")
    m = run["metrics"]
    assert (m["best_epoch"], m["stopped_at"]) == (2, 3)  # the figure turned up after epoch 2; patience 1
    val = m["validation"]["per_epoch"]["val_loss"]
    assert len(val) == 4 and val.index(min(val)) == 2 and len(m["train_loss"]) == 4
    for p in ("hospital", "server"):  # every party agreed, and ran the same steps
        said = json.loads((tmp_path / "stopped" / "parties" / p / "report.json").read_text())["stopping"]
        assert said == {"best_epoch": 2, "stopped_at": 3, "metric": "val_loss", "loss": "digit"}
    plan, setups, _ = prepare(load_plan(body()))
    batches = sum(1 for s in schedule(plan, setups["hospital"].splits, 1) if s.mode == "train")
    assert steps_run(tmp_path / "stopped") == {"hospital": 4 * batches, "server": 4 * batches}  # epochs 0-3 of 6

    # the same plan trained for best_epoch + 1 epochs, no early stop: its weights are those the run kept, bit for bit
    reference = splitlearn.train(load_plan(body(epochs=3, early_stop=None)), out=tmp_path / "reference")
    kept, ref = weights(tmp_path / "stopped"), weights(tmp_path / "reference")
    assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in kept)
    assert reference["metrics"]["best_epoch"] == 2 and reference["metrics"]["stopped_at"] is None
    assert m["test_accuracy"] == reference["metrics"]["test_accuracy"]  # the test figures are the best epoch's
    assert m["test_accuracy_per_epoch"] == [m["test_accuracy"]]  # scored once, after the last epoch
    ours = splitlearn.predict(tmp_path / "stopped", write=False)["digit"]
    theirs = splitlearn.predict(tmp_path / "reference", write=False)["digit"]
    assert torch.equal(torch.as_tensor(ours["outputs"]), torch.as_tensor(theirs["outputs"]))


def chain(**train) -> dict:
    """The hospital's features through a relay (which holds no rows) to the server, which holds the labels and
    computes the loss: the figure two hops from the hospital."""
    sgd = {"optimizer": {"name": "sgd", "lr": 1.0}}
    return {"name": "chain", "data": VALIDATION,
            "train": {"epochs": 6, "batch_size": 128, "seed": 1, "early_stop": STOP, **train},
            "parties": {"hospital": {"holds": {"x": "x"}, **sgd}, "relay": sgd,
                        "server": {"holds": {"y": "y"}, **sgd}},
            "networks": {"mlp": {"zoo": "mlp", "args": {"sizes": [64, 32, 16, 10]}}},
            "segments": {"bottom": {"party": "hospital", "inputs": ["hospital.x"], "network": "mlp", "layers": [0, 2]},
                         "middle": {"party": "relay", "inputs": ["bottom"], "network": "mlp", "layers": [2, 4]},
                         "top": {"party": "server", "inputs": ["middle"], "network": "mlp", "layers": [4, 5]}},
            "losses": {"digit": {"input": "top", "target": "server.y"}}}


def test_a_chain_stops_together_with_the_figure_two_hops_away(tmp_path):
    plan = load_plan(chain())
    agreement = EpochAgreement(build_graph(plan), "hospital", None, [0], RuntimeError)
    assert agreement.place.children == ("relay",) and agreement.toward == "relay"  # the server is below the relay
    run = splitlearn.train(plan, out=tmp_path / "chain")
    m = run["metrics"]
    assert m["stopped_at"] is not None and m["stopped_at"] < 5 and m["best_epoch"] < m["stopped_at"]
    said = {p: json.loads((tmp_path / "chain" / "parties" / p / "report.json").read_text()) for p in plan.parties}
    assert {json.dumps(s["stopping"]) for s in said.values()} == {json.dumps(said["server"]["stopping"])}
    assert len({s["meter"]["train_steps"] for s in said.values()}) == 1
    assert len(m["train_loss"]) == m["stopped_at"] + 1


def test_party_processes_stop_at_the_epoch_of_threads(tmp_path):
    file = tmp_path / "plan.toml"
    file.write_text(toml(body(epochs=5)))
    threads = splitlearn.train(file, out=tmp_path / "threads")
    processes = splitlearn.train(file, launcher="processes", out=tmp_path / "processes")
    assert processes["transport"] == "grpc+mtls"
    for key in ("best_epoch", "stopped_at", "test_accuracy", "validation", "train_loss"):
        assert processes["metrics"][key] == threads["metrics"][key], key
    assert steps_run(tmp_path / "processes") == steps_run(tmp_path / "threads")
    a, b = weights(tmp_path / "threads"), weights(tmp_path / "processes")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The plan with checkpoints, run never stopped: (its folder, how many steps it ran)."""
    out, done = tmp_path_factory.mktemp("whole") / "run", []
    splitlearn.train(load_plan(body()), out=out, on_step=done.append)
    return out, len(done)  # the training and validation steps of epochs 0-3, then the test steps


def test_a_run_stopped_after_its_early_stop_resumes_bit_identical(tmp_path, whole):
    plan, (a, total) = load_plan(body()), whole
    # stopped at its last test step: its last checkpoint holds the early stop (stopped_at, the best epoch's weights),
    # and the steps after it are the test steps numbered on from the stop
    with pytest.raises(Exception, match=f"stopped after {total - 1} steps"):
        splitlearn.train(plan, out=tmp_path / "b", on_step=stop_after(total - 1))
    splitlearn.train(plan, out=tmp_path / "b", resume=True)
    same_run(a, tmp_path / "b")
    ra, rb = (json.loads((r / "result.json").read_text())["metrics"] for r in (a, tmp_path / "b"))
    assert (rb["best_epoch"], rb["stopped_at"]) == (ra["best_epoch"], ra["stopped_at"]) == (2, 3)
    assert rb["validation"] == ra["validation"]


def test_a_run_stopped_before_its_best_epoch_resumes_bit_identical(tmp_path, whole):
    """Stopped in epoch 1: the rule's state (the best figure so far, at the server) and the kept weights come back
    from the checkpoint, so the same epochs are kept and stopped at."""
    plan, (a, _) = load_plan(body()), whole
    with pytest.raises(Exception, match="stopped after 20 steps"):
        splitlearn.train(plan, out=tmp_path / "c", on_step=stop_after(20))
    splitlearn.train(plan, out=tmp_path / "c", resume=True)
    same_run(a, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "result.json").read_text())["metrics"]["best_epoch"] == 2


# -- the plan entries --------------------------------------------------------------------------------------------

def test_without_validation_the_plan_and_its_steps_are_as_before():
    plain = load_plan(split_mlp("plain", [64, 32, 10], lr=1.0, data={"dataset": "digits"}))
    assert "validation_fraction" not in json.dumps(plain.model_dump()) and "early_stop" not in json.dumps(
        plain.model_dump())
    assert plan_hash(load_plan("examples/vanilla.toml")) == "fc2c724f88c0bd59"
    with_val = load_plan(body())
    assert plan_hash(with_val) != plan_hash(load_plan(body(early_stop=None)))
    # a party without rows carves the validation rows from the count its neighbours tell, as the holders do
    plan, setups, _ = prepare(with_val)
    held = setups["hospital"].splits
    counted = counted_splits(*held.counts, 0.2)
    assert (len(counted.train), len(counted.validation), len(counted.test)) == \
        (len(held.train), len(held.validation), len(held.test))
    assert not set(held.validation) & set(held.train) and not set(held.validation) & set(held.test)


@pytest.mark.parametrize("change, says", [
    ({"train": {"early_stop": {"metric": "val_auc"}}},
     r"entry 'train.early_stop.metric'.*unknown metric 'val_auc'.*'val_loss'.*'val_roc_auc'"),
    ({"train": {"early_stop": {"metric": "val_loss"}}}, r"needs validation rows.*validation_fraction"),
    ({"data": {"validation_fraction": 1.5}}, r"entry 'data.validation_fraction'"),
    ({"data": {"validation_fraction": 0.2}, "train": {"early_stop": {"metric": "val_mae"}}},
     r"val_mae.*loss 'digit' \(cross_entropy\) gives none.*'val_roc_auc'"),
    ({"data": {"validation_fraction": 0.2}, "train": {"early_stop": {"loss": "nothing"}}},
     r"early_stop.loss 'nothing' is no loss"),
    ({"data": {"validation_fraction": 0.2}, "train": {"early_stop": {"metric": "val_balanced_accuracy"}}},
     r'extra metric: say whether.*mode = "max" or "min"'),
    ({"data": {"validation_fraction": 0.2}, "train": {"early_stop": {"patience": 0}}}, r"patience"),
])
def test_a_wrong_validation_or_early_stop_entry_is_refused_naming_it(change, says):
    plain = split_mlp("entries", [64, 32, 10], lr=1.0, data={"dataset": "digits"}, train={"epochs": 2})
    for key, value in change.items():
        plain[key] = {**plain[key], **value}
    with pytest.raises(PlanError, match=f"(?s){says}"):
        load_plan(plain)


def test_a_clients_plan_refuses_validation_and_early_stop():
    plain = split_mlp("entries", [64, 32, 10], lr=1.0, data=VALIDATION, train={"epochs": 2})
    plain["clients"] = {"template": "hospital", "count": 2}
    with pytest.raises(PlanError, match=r"(?s)data.validation_fraction is for plain plans"):
        load_plan(plain)


# -- the verdicts, one party at a time ---------------------------------------------------------------------------



def agreement(name: str) -> tuple[EpochAgreement, FakeLink]:
    link = FakeLink()
    return EpochAgreement(build_graph(load_plan(body())), name, link, [10, 21, 32], RuntimeError), link


def fed(agreement, inbox: list[Message]):
    """``wait(done)`` as the engine's: each message of ``inbox`` handed to the agreement until ``done()``."""
    def wait(done) -> None:
        while not done():
            agreement.take(inbox.pop(0))
    return wait


def test_a_forged_epoch_verdict_is_refused_naming_the_peer():
    root, link = agreement("hospital")  # the root; the server (with the figure) is its child
    assert (root.place.parent, root.place.children, root.toward) == (None, ("server",), "server")
    wire = root.place.edges["server"]

    def verdict(text: str, step: int = 10, sender: str = "server", on: str = wire) -> Message:
        return Message(Kind.CREDIT, sender, "hospital", step, on, text=text)

    for msg, says in [(verdict("best 7"), "server: best epoch 7 is out of range after epoch 0"),
                      (verdict("best -1"), "server: an epoch verdict is 'best <epoch>' or 'stop <epoch>'"),
                      (verdict("best 99999999999"), "'best <epoch>' or 'stop <epoch>'"),
                      (verdict("stop 0"), "server: 'stop 0' after epoch 0: the run stops exactly when 1 epochs"),
                      (verdict("best 0", step=21), "server: an epoch verdict for step 21, which ends no epoch"),
                      (verdict("best 0", sender="mallory"), "mallory: no epoch verdict is expected from it"),
                      (verdict("best 0", on="x"), "a verdict names wire")]:
        root.take(msg)
        assert says in link.refused[-1], (msg.text, link.refused[-1])
    refused = len(link.refused)
    inbox = [verdict("best 0")]
    assert root.settle(0, lambda: pytest.fail("the root has no figure"), fed(root, inbox)) == (0, False)
    assert [(m.receiver, m.step, m.text) for m in link.sent] == [("server", 10, "best 0")]
    root.take(verdict("best 0"))  # a late duplicate of a settled epoch's: dropped
    assert len(link.refused) == refused
    for text, says in [("best 0", "'best 0' after epoch 1: the run stops exactly when 1 epochs have passed"),
                       ("best 2", "out of range after epoch 1: it is 0 or 1"), ("stop 1", "'stop 1' after epoch 1"),
                       ("best 1", None)]:
        root.take(verdict(text, step=21))
        assert (says in link.refused[-1]) if says else len(link.refused) == refused + 3
    assert root.heard == "best 1"  # the one taken
    root.take(verdict("stop 0", step=21))
    assert "a second epoch verdict for step 21" in link.refused[-1]

    server, link = agreement("server")
    hospital = Message(Kind.CREDIT, "hospital", "server", 10, server.place.edges["hospital"], text="best 0")
    server.take(hospital)
    assert "hospital: a decision before this party told its own verdict" in link.refused[-1]
    inbox = [Message(Kind.CREDIT, "hospital", "server", 10, server.place.edges["hospital"], text="stop 0"), hospital]
    # its figure is the first: epoch 0 is the best so far; the hospital's "stop 0" is not what it told
    assert server.settle(0, lambda: 0.5, fed(server, inbox)) == (0, False)
    assert [(m.receiver, m.text) for m in link.sent] == [("hospital", "best 0")]
    assert "'stop 0' after epoch 0" in link.refused[-1]


def test_split_takes_validation_and_early_stop_and_refuses_fractions_out_of_range():
    """``split_plan``'s keywords write the plan's entries (the same run as the plan file's), and every fraction is
    validated as a plan file's would be (``test_fraction=2.0`` was taken as it came)."""
    from splitlearn.api.splitting import split_plan

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    plan = split_plan(model, cut=0, parties=["hospital", "server"], validation_fraction=0.2, early_stop=STOP,
                      epochs=6)
    assert plan.data.validation_fraction == 0.2 and plan.train.early_stop.patience == 1
    for kwargs, entry in [({"test_fraction": 2.0}, "test_fraction"), ({"validation_fraction": 1.5},
                                                                       "validation_fraction"),
                          ({"early_stop": {"metric": "val_nope"}}, "train.early_stop.metric")]:
        with pytest.raises(PlanError, match=f"entry '{entry}'"):
            split_plan(model, cut=0, **({"validation_fraction": 0.2} if "early_stop" in kwargs else {}), **kwargs)
    with pytest.raises(PlanError, match="needs validation rows"):
        split_plan(model, cut=0, early_stop=STOP)


def test_a_party_no_wire_links_to_the_watched_figure_is_refused_before_any_party_starts():
    """Two networks trained apart in one plan: the second pair could never hear the first's epoch verdicts (it once
    failed at the run's start, as a party error); ``prepare`` names the parties and the entry."""
    import tomllib

    from .conftest import EXAMPLES

    plan = tomllib.loads((EXAMPLES / "vanilla.toml").read_text())
    plan["data"]["validation_fraction"] = 0.2
    plan["parties"]["clinic"] = {"holds": {"x": "x", "y": "y"}, "optimizer": {"name": "sgd", "lr": 0.05}}
    plan["parties"]["lab"] = {"optimizer": {"name": "sgd", "lr": 0.05}}
    plan["networks"]["other"] = plan["networks"]["mlp"]
    plan["segments"]["b2"] = {**plan["segments"]["bottom"], "party": "clinic", "inputs": ["clinic.x"], "network": "other"}
    plan["segments"]["t2"] = {**plan["segments"]["top"], "party": "lab", "inputs": ["b2"], "network": "other"}
    plan["losses"]["second"] = {"input": "t2", "target": "clinic.y", "kind": "cross_entropy"}
    with pytest.raises(PlanError, match=r"entry 'data.validation_fraction': no wire links \['clinic', 'lab'\] to "
                                        r"'server'"):
        prepare(plan)


def test_a_session_begun_again_mid_run_with_validation_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """A neighbour that comes back mid-run restarts the session from the last common checkpoint (every 2 steps here);
    the second session agrees its epochs again and the run ends as one never restarted."""
    from splitlearn.core.engine import Party
    from splitlearn.wire.transport import PeerRestarted

    plan = body(epochs=3, early_stop=None, checkpoint_every=2, step_timeout=10)
    splitlearn.train(load_plan(plan), out=tmp_path / "once")
    step, fired = Party.step, []

    def server_back_once(self, s, rows, mode, *args, **kwargs):
        if self.name == "hospital" and mode == "train" and s == 3 and not fired:
            fired.append(s)
            raise PeerRestarted("server", "server came back as a new process (simulated)")
        return step(self, s, rows, mode, *args, **kwargs)

    monkeypatch.setattr(Party, "step", server_back_once)
    splitlearn.train(load_plan(plan), out=tmp_path / "again")
    assert fired == [3]
    same_run(tmp_path / "once", tmp_path / "again", count_bytes=False)
