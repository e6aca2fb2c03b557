"""Random layers draw from each party's own stream, seeded by the plan: the same plan and seed
give bit-identical weights in-process and over gRPC, however many parties use Dropout at once,
and torch's global generator is neither used nor changed."""

from pathlib import Path

import torch
from safetensors.torch import load_file

import splitlearn
from splitlearn.launch.processes import launch

from .conftest import EXAMPLES
from .support import DROPOUT, PLAN


def _plan(tmp_path: Path) -> Path:
    (tmp_path / "dropout_nets.py").write_text(DROPOUT)
    (tmp_path / "dropout.toml").write_text(PLAN)
    return tmp_path / "dropout.toml"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for party in ("clinic_a", "clinic_b", "server"):
        out.update({f"{party}/{k}": v for k, v in load_file(str(run / "parties" / party / "weights.safetensors")).items()})
    return out


def _same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_dropout_is_reproducible_in_process_over_grpc_and_between_them(tmp_path):
    plan = _plan(tmp_path)
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    splitlearn.train(plan, out=tmp_path / "local-1")
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was not drawn from
    torch.manual_seed(999)  # nor does its state matter
    splitlearn.train(plan, out=tmp_path / "local-2")
    # one party-process run: a mask drawn from anything but the plan's seed (a pid, the clock, a fresh
    # process's generator) would part it from the in-process runs, so a second one would add nothing
    launch(plan, tmp_path / "grpc")
    runs = {n: _weights(tmp_path / n) for n in ("local-1", "local-2", "grpc")}
    assert _same(runs["local-1"], runs["local-2"]) == 0.0
    assert _same(runs["local-2"], runs["grpc"]) == 0.0  # three parties on this machine, threads or processes
    other = splitlearn.train(plan, seed=8, out=tmp_path / "seed-8")
    assert _same(runs["local-1"], _weights(tmp_path / "seed-8")) > 1e-3  # the seed does reach the dropout masks
    assert other["metrics"]["test_accuracy"] > 0.85


def test_each_party_has_a_stream_of_its_own():
    from splitlearn.core.randomness import PartyRandom, party_seed

    a, b = PartyRandom(party_seed(0, "clinic_a")), PartyRandom(party_seed(0, "clinic_b"))
    with a.scope():
        xa = torch.rand(4)
    with b.scope():
        xb = torch.rand(4)
    with a.scope():
        xa2 = torch.rand(4)
    assert not torch.equal(xa, xb) and not torch.equal(xa, xa2)  # different streams; a stream moves on
    again = PartyRandom(party_seed(0, "clinic_a"))
    with again.scope():
        assert torch.equal(torch.rand(4), xa)


def test_parties_sharing_the_cores_get_the_same_thread_count_in_process_and_as_processes(monkeypatch):
    """The rule both run paths use (launch/threads.py sets it, launch/processes.py hands it to party processes):
    more parties than cores share them; a user's OMP_NUM_THREADS wins."""
    import torch

    from splitlearn.run.allocator import math_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # torch's own count, told apart from the rule's 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert [math_threads(n) for n in (3, 100)] == [1, 1]  # more parties than cores: one each
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert math_threads(65) == 1
    assert math_threads(20) == torch.get_num_threads()  # no more parties than cores: torch's own
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert math_threads(100) == torch.get_num_threads()


def test_the_heap_before_a_run_is_left_out_of_cyclic_collections_during_it_and_only_then():
    """``run/allocator.frozen_heap`` (the threads launcher and every party process train inside it): the objects
    there before are frozen while the parties train, so no full collection walks torch's modules on every party's
    time; afterwards they are collected again. Runs at once share one freeze (undone when the last ends), and a
    heap that something else froze is left exactly as it was."""
    import gc

    from splitlearn.run.allocator import frozen_heap

    gc.unfreeze()
    gc.collect()
    before, seen = len(gc.get_objects()), []
    try:
        splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, on_step=lambda progress: seen.append(gc.get_freeze_count()))
        assert seen and min(seen) >= before * 0.9  # the process's objects, frozen at every step
        assert gc.get_freeze_count() == 0  # and collected as before once the run ended
        with frozen_heap():
            outer = gc.get_freeze_count()
            with frozen_heap():  # a second run at once: the same freeze
                assert gc.get_freeze_count() == outer > 0
            assert gc.get_freeze_count() == outer  # still frozen for the first
        assert gc.get_freeze_count() == 0
        started: list[int] = []  # the generation of every collection while a run begins

        def note(phase: str, info: dict) -> None:
            if phase == "start":
                started.append(info["generation"])

        gc.callbacks.append(note)
        try:
            with frozen_heap():  # a run in a process that runs several: no full collection to begin
                assert gc.get_freeze_count() > 0
        finally:
            gc.callbacks.remove(note)
        assert started and max(started) < 2
        gc.freeze()  # frozen by something else (a server framework does it): left exactly as it is
        theirs = gc.get_freeze_count()
        junk = [[] for _ in range(1000)]  # objects made after their freeze stay out of it
        with frozen_heap():
            assert gc.get_freeze_count() == theirs
        assert gc.get_freeze_count() == theirs and junk
    finally:
        gc.unfreeze()
