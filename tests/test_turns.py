"""Parties of one process taking turns on one thread (wire/transport/turns.py): what each task sees of torch's
per-thread state, messages from other threads, timeouts, and ending tasks that still wait."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import splitlearn
from splitlearn.wire.transport.turns import Empty, Mailbox, TaskExit, Turns, pause, settled, wait_until

from .conftest import EXAMPLES


def test_each_task_keeps_its_own_grad_mode_autocast_and_dispatch_modes_across_turns():
    """A task that waits inside ``no_grad``, autocast or a FLOP counter leaves none of them to the task that runs
    meanwhile, finds them again when it resumes, and the caller's own are set back at the end."""
    turns, ping, pong = Turns(), Mailbox(), Mailbox()
    seen: dict[str, list] = {"a": [], "b": []}
    x = torch.randn(8, 8)

    def a() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False) as flops:
            for _ in range(3):
                ping.put(x @ x)
                pong.get()
                seen["a"].append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), (x @ x).dtype))
        seen["a"].append(flops.get_total_flops())

    def b() -> None:
        for _ in range(3):
            got = ping.get()
            seen["b"].append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), (x @ x).dtype, got.dtype))
            pong.put(None)

    turns.spawn("a", a)
    turns.spawn("b", b)
    with torch.no_grad():  # the caller's: a task starts as a fresh thread does, whatever the caller's mode
        assert turns.run() is True
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert seen["a"][:3] == [(False, True, torch.bfloat16)] * 3
    assert seen["b"] == [(True, False, torch.float32, torch.bfloat16)] * 3
    assert seen["a"][3] == 2 * 8 * 8 * 8 * 6  # a's six products (3 sent, 3 checked), none of b's three


def test_a_message_put_by_another_thread_wakes_the_task_that_waits_and_a_timeout_ends_a_wait():
    turns, box = Turns(), Mailbox()
    got: list = []

    def reader() -> None:
        got.append(box.get(timeout=30))
        t0 = time.monotonic()
        with pytest.raises(Empty):
            box.get(timeout=0.05)
        got.append(time.monotonic() - t0)

    turns.spawn("reader", reader)
    threading.Timer(0.05, box.put, args=("late",)).start()
    assert turns.run() is True
    assert got[0] == "late" and 0.05 <= got[1] < 5


def test_a_task_pausing_lets_the_others_run_and_settled_says_when_only_waits_are_left():
    turns, box = Turns(), Mailbox()
    order: list[str] = []

    def waiter() -> None:
        order.append("waiter waits")
        order.append(f"waiter got {box.get()}")

    def poller() -> None:
        assert wait_until(lambda: "waiter waits" in order, 5)  # the waiter ran while the poller paused
        assert settled()  # the waiter waits for a message nobody sent yet
        box.put("hi")
        assert not settled()  # now it is ready
        pause(0.0)
        order.append("poller done")

    turns.spawn("poller", poller)
    turns.spawn("waiter", waiter)
    turns.run()
    assert order == ["waiter waits", "waiter got hi", "poller done"]


def test_run_stops_at_its_deadline_and_close_ends_the_tasks_still_waiting_running_their_finally_blocks():
    turns, box = Turns(), Mailbox()
    ended: list[str] = []

    def stuck() -> None:
        try:
            box.get()
        finally:
            ended.append("stuck")

    turns.spawn("stuck", stuck)
    t0 = time.monotonic()
    assert turns.run(deadline=t0 + 0.05) is False
    assert time.monotonic() - t0 >= 0.05 and turns.alive() == ["stuck"]
    turns.close()
    assert ended == ["stuck"] and turns.alive() == []
    assert TaskExit is not Exception  # (a task's `except Exception` does not swallow it)


def test_the_thread_launchers_parties_run_on_the_callers_thread_and_train_bit_for_bit_as_before():
    """Every party of an in-process run is a task of the calling thread (no thread is started), and the
    result is the one party processes give (tests/test_equivalence.py compares them byte for byte)."""
    threads_before = threading.active_count()
    seen: set[int] = set()
    splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1, on_step=lambda pr: seen.add(threading.get_ident()))
    assert seen == {threading.get_ident()}
    assert threading.active_count() == threads_before


def test_a_wait_whose_deadline_passed_while_another_task_kept_the_thread_ends_as_a_timeout():
    """A task's deadline is looked at when it has the thread again; what was put after the deadline (by the task
    that kept the thread) does not count as in time, so a party stalled past a peer's step timeout is still
    reported as one, as with threads."""
    turns, box = Turns(), Mailbox()
    got: list = []

    def waiter() -> None:
        got.append(time.monotonic() + 0.05)  # its deadline
        try:
            got.append(box.get(timeout=0.05))
        except Empty:
            got.append("timed out")
        got.append(box.get(timeout=1))  # the late item is still there for the next read

    def staller() -> None:
        x = torch.ones(64, 64)
        while time.monotonic() <= got[0]:  # a long computation: it keeps the thread past the waiter's deadline
            x = (x @ x).clamp(-1, 1)
        box.put("late")

    turns.spawn("waiter", waiter)
    turns.spawn("staller", staller)
    turns.run()
    assert got[1:] == ["timed out", "late"]


def test_a_task_waiting_inside_autocast_leaves_no_cached_cast_to_the_next_task():
    """Autocast caches the casts of leaf tensors per thread until its outermost block ends: a task that waits
    inside autocast must not keep another task's cast weights alive across that task's optimizer step."""

    def run(with_waiter: bool) -> float:
        turns, box = Turns(), Mailbox()
        w, x, out = torch.nn.Parameter(torch.ones(4, 4)), torch.ones(2, 4), {}

        def waiter() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                box.get()

        def trainer() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                (x @ w).sum()
            with torch.no_grad():
                w.add_(1.0)  # an optimizer step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["y"] = float((x @ w).float().sum().detach())
            box.put(None)

        if with_waiter:
            turns.spawn("waiter", waiter)
        turns.spawn("trainer", trainer)
        turns.run()
        return out["y"]

    assert run(True) == run(False) == 64.0


def test_tasks_start_outside_the_callers_inference_mode_and_saved_tensor_hooks():
    turns, seen = Turns(), []

    def task() -> None:
        w = torch.ones(3, requires_grad=True)
        (w * 2).sum().backward()  # fails under inference mode
        seen.append((torch.is_inference_mode_enabled(), float(w.grad.sum())))

    packed = []
    turns.spawn("task", task)
    with torch.inference_mode(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t,
                                                                          lambda t: t):
        turns.run()
        assert torch.is_inference_mode_enabled()
    assert seen == [(False, 6.0)] and packed == []


def test_close_ends_every_task_even_when_one_fails_on_its_way_out():
    turns, box, ended = Turns(), Mailbox(), []

    def failing() -> None:
        try:
            box.get()
        finally:
            raise ValueError("its cleanup failed")

    def plain() -> None:
        try:
            box.get()
        finally:
            ended.append("plain")

    turns.spawn("failing", failing)
    turns.spawn("plain", plain)
    turns.run(deadline=time.monotonic() + 0.01)
    with pytest.raises(ValueError, match="its cleanup failed"):
        turns.close()
    assert ended == ["plain"] and turns.alive() == []


def test_close_resumes_a_waiting_task_so_a_torch_error_in_its_cleanup_is_an_error_not_a_crash():
    """Thrown into from a shallower stack than the loop ran it on, a task whose cleanup raised a torch error took
    the process down (torch walks the stack to build the error); close() resumes it as the loop does."""
    turns, box, caught = Turns(), Mailbox(), []

    def task() -> None:
        try:
            box.get()
        finally:
            try:
                torch.ones(2) @ torch.ones(3)
            except RuntimeError as e:
                caught.append(str(e)[:40])

    turns.spawn("task", task)

    def deeper(n: int) -> None:  # the loop runs it a few frames deeper than close() is called from
        if n:
            return deeper(n - 1)
        turns.run(deadline=time.monotonic() + 0.05)  # it runs at once and waits for the box

    deeper(8)
    assert turns.alive() == ["task"]
    turns.close()
    assert len(caught) == 1 and turns.alive() == []


def test_autocast_dtype_and_saved_tensor_hooks_are_each_tasks_own_and_inference_mode_is_refused_across_a_wait():
    turns, box, seen = Turns(), Mailbox(), {}

    def holder() -> None:
        with torch.autocast("cpu", dtype=torch.float16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: seen.setdefault("packed by", "holder") and t,
                                                         lambda t: t):
            box.get()

    def other() -> None:
        with torch.autocast("cpu"):  # the default dtype of a fresh thread: bfloat16
            seen["dtype"] = torch.get_autocast_dtype("cpu")
        w = torch.ones(3, requires_grad=True)
        (w * w).sum().backward()  # saves tensors: no hook of the holder's runs
        box.put(None)

    turns.spawn("holder", holder)
    turns.spawn("other", other)
    turns.run()
    assert seen == {"dtype": torch.bfloat16}

    def inferring() -> None:
        with torch.inference_mode():
            box.get(timeout=1)

    turns = Turns()
    turns.spawn("inferring", inferring)
    with pytest.raises(RuntimeError, match="waits inside torch.inference_mode"):
        turns.run()
    assert not torch.is_inference_mode_enabled()
