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
