"""Parties of one process taking turns on one thread.

A simulation's parties are sequential by nature: in a synchronous split step the hospital's forward
waits for nothing, the server's waits for the hospital's activation, the hospital's backward for the
server's gradient. Run as OS threads they hand the step over through the kernel twice a step, take
turns on the interpreter lock, and each becomes an OpenMP master with a math team of its own (with
more OpenMP threads than cores libgomp stops spinning, so every parallel region wakes its workers from
sleep). Run as greenlets on one thread, a party that waits for a message lets the next ready party run:
one math team, no lock handed over, a switch of a few microseconds.

- :class:`Turns` runs functions as *tasks* (greenlets) on the calling thread until a condition holds.
- :class:`Mailbox` is a party's inbox: a task that reads an empty one yields its turn until something
  arrives (or its deadline passes); a plain thread blocks on it as on a queue. Anything may put into it,
  from any thread.
- :func:`pause` is a wait for hooks and tests: in a task it yields (other parties run meanwhile); in a
  thread it sleeps.

Torch keeps grad mode, autocast (its dtypes, nesting and cache), its dispatch and function modes and the
saved-tensor hooks per thread. Tasks share a thread, so each task's are kept when it yields and set again
when it resumes; a task starts with a fresh thread's (grad enabled, no autocast, no modes, no hooks),
whatever its caller's are, and the caller's are set back at the end. Inference mode cannot be carried so:
the caller's is off inside :meth:`Turns.run`, and a task that would wait inside one is refused.
A task must not block its thread on anything another task would release (a lock held across a wait, an
event another party sets): that would stop every party. Messages, timeouts and :func:`pause` are how
tasks wait. A task's deadline is looked at when it has the thread again: a party that keeps the thread
longer than another's timeout (a stall in its step) ends that wait late, but as a timeout still, since a
message put after the deadline does not count as in time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import greenlet

__all__ = ["Turns", "Mailbox", "Empty", "TaskExit", "pause", "wait_until", "settled"]

TaskExit = greenlet.GreenletExit  # raised in a task that :meth:`Turns.close` ends

_DEVICES = ("cpu", "cuda")  # autocast's state is kept per device type


class Empty(Exception):
    """Nothing arrived within the timeout."""


# ---- torch's per-thread state, kept per task ---------------------------------------------------------------
# (torch is imported on first use: the transports' other modules, certificates and TLS, need none of it)

# a new thread's: grad enabled, autocast off with torch's default dtypes (none nested), no modes, no saved-tensor
# hooks, the autocast cache on (set at the first use, with torch)
_FRESH: tuple = ()
_torch: Any = None


def _take_torch_state() -> tuple:
    """This thread's torch state, left as a fresh thread's (an autocast's cache emptied: it is the thread's)."""
    global _torch, _FRESH
    if _torch is None:
        import torch as _torch
        defaults = tuple((d, _torch.bfloat16 if d == "cpu" else _torch.float16) for d in _DEVICES)
        _FRESH = (True, (), defaults, 0, (), (), (), True)
    t, c, a = _torch, _torch._C, _torch._C._autograd
    grad = t.is_grad_enabled()
    autocast = tuple(d for d in _DEVICES if t.is_autocast_enabled(d))
    dtypes = tuple((d, t.get_autocast_dtype(d)) for d in _DEVICES)
    nested = t.autocast_increment_nesting() - 1
    t.autocast_decrement_nesting()
    if nested:
        for _ in range(nested):
            t.autocast_decrement_nesting()
        t.clear_autocast_cache()
    dispatch = _drain(c._len_torch_dispatch_stack, lambda: c._pop_torch_dispatch_stack(None))
    function = _drain(c._len_torch_function_stack, c._pop_torch_function_stack)
    hooks = _drain(lambda: a._top_saved_tensors_default_hooks(False) is not None,
                   lambda: (a._top_saved_tensors_default_hooks(False), a._pop_saved_tensors_default_hooks())[0])
    state = (grad, autocast, dtypes, nested, dispatch, function, hooks, t.is_autocast_cache_enabled())
    if state != _FRESH:
        _set_torch_state(_FRESH)
    return state


def _drain(left: Callable[[], Any], pop: Callable[[], Any]) -> tuple:
    """A per-thread stack emptied: its entries, bottom first (what pushing them again in order restores)."""
    out = []
    while left():
        out.append(pop())
    return tuple(reversed(out))


def _set_torch_state(state: tuple) -> None:
    """Set ``state`` (from :func:`_take_torch_state`) on a thread whose state is a fresh thread's."""
    t, c, a = _torch, _torch._C, _torch._C._autograd
    grad, autocast, dtypes, nested, dispatch, function, hooks, cache = state
    if t.is_grad_enabled() != grad:
        c._set_grad_enabled(grad)
    for d, dtype in dtypes:
        if t.is_autocast_enabled(d) != (d in autocast):
            t.set_autocast_enabled(d, d in autocast)
        if t.get_autocast_dtype(d) != dtype:
            t.set_autocast_dtype(d, dtype)
    for _ in range(nested):
        t.autocast_increment_nesting()
    if t.is_autocast_cache_enabled() != cache:
        t.set_autocast_cache_enabled(cache)
    for mode in dispatch:
        c._push_on_torch_dispatch_stack(mode)
    for mode in function:
        c._push_on_torch_function_stack(mode)
    for pack, unpack in hooks:
        a._push_saved_tensors_default_hooks(pack, unpack)


@contextmanager
def _as_a_fresh_thread() -> Iterator[tuple]:
    """Inside, this thread's torch state is a fresh thread's (no inference mode either); the caller's is set back on
    the way out."""
    caller = _take_torch_state()
    try:
        with _torch.inference_mode(False):
            yield caller
    finally:
        _take_torch_state()  # (whatever a task left)
        _set_torch_state(caller)


# ---- tasks ---------------------------------------------------------------------------------------------------


class _Task(greenlet.greenlet):
    def __init__(self, turns: "Turns", name: str, fn: Callable[[], Any]):
        super().__init__(fn, parent=turns._loop)
        self.turns, self.name = turns, name
        self.torch_state: tuple | None = None  # its torch state while it waits (None: a fresh thread's)
        self.waiting: "Mailbox | None" = None  # the inbox it waits on
        self.woken = False  # set by what it waited for (a put, its deadline)
        self.wait_id = 0  # which of its waits a timer belongs to
        self.ending = False  # set by Turns.close: its wait raises TaskExit


def _current() -> _Task | None:
    g = greenlet.getcurrent()
    return g if isinstance(g, _Task) else None


class Turns:
    """Tasks on the calling thread: :meth:`spawn` them, then :meth:`run` until a condition holds. A task
    runs until it waits (an empty :class:`Mailbox`, :func:`pause`) or ends; the ready tasks run in the order
    they became ready. Tasks' exceptions end :meth:`run` (catch them in the task to report them)."""

    def __init__(self) -> None:
        self._loop = greenlet.getcurrent()
        self._thread = threading.get_ident()
        self._tasks: list[_Task] = []
        self._ready: deque[_Task] = deque()
        self._timers: list[tuple[float, int, _Task]] = []  # (deadline, order, task): waits with a deadline
        self._order = itertools.count(1)  # wait ids (0: no wait)
        self._stale = 0  # timers of waits that ended otherwise, still in the heap
        self._wake = threading.Condition()  # a put from another thread, while no task is ready
        self._running = 0  # tasks not ended
        self._sleeping = False  # the loop waits on _wake (under it: set and read with _wake held)

    def spawn(self, name: str, fn: Callable[[], Any]) -> greenlet.greenlet:
        """A task running ``fn()``, ready to start."""
        def body() -> Any:
            try:
                return fn()
            finally:
                self._running -= 1

        task = _Task(self, name, body)
        self._tasks.append(task)
        self._running += 1
        self._ready.append(task)
        return task

    def run(self, until: Callable[[], bool] | None = None, deadline: float | None = None) -> bool:
        """Run ready tasks until ``until()`` holds (checked between turns), every task has ended, or
        ``time.monotonic()`` reaches ``deadline``; whether ``until()`` holds (or every task ended, without it)."""
        if threading.get_ident() != self._thread or greenlet.getcurrent() is not self._loop:
            raise RuntimeError("Turns.run is called from the thread (and greenlet) that made it")
        with _as_a_fresh_thread():
            while True:
                if until is not None and until():
                    return True
                if not self._running:
                    return until is None or until()
                task = self._next(deadline)
                if task is None:
                    return False
                task.woken = False
                if task.torch_state is not None:  # (None: a fresh thread's, which the loop's is between tasks)
                    _set_torch_state(task.torch_state)
                try:
                    task.switch()  # until it waits or ends
                finally:
                    state = _take_torch_state()  # (an ended task's is dropped)
                    task.torch_state = None if task.dead or state == _FRESH else state

    def _next(self, deadline: float | None) -> _Task | None:
        """The next task to run: a ready one, else the first whose wait ends (a put from another thread,
        its deadline); None once ``deadline`` has passed."""
        while True:
            now = time.monotonic()
            with self._wake:
                while self._timers and self._timers[0][0] <= now:
                    _, wait_id, task = heapq.heappop(self._timers)
                    if task.wait_id == wait_id:
                        self._wakeup(task)
                    else:  # a wait that ended otherwise
                        self._stale = max(0, self._stale - 1)
                while self._ready:
                    task = self._ready.popleft()
                    if not task.dead:
                        return task
                if deadline is not None and now >= deadline:
                    return None
                ends = ([self._timers[0][0]] if self._timers else []) + ([deadline] if deadline is not None else [])
                until = min(ends, default=None)
                self._sleeping = True
                try:
                    self._wake.wait(None if until is None else max(0.0, until - now))
                finally:
                    self._sleeping = False

    def _wakeup(self, task: _Task) -> None:
        """Make ``task`` ready (under ``self._wake``), once per wait."""
        if not task.woken and not task.dead:
            task.woken = True
            if task.waiting is not None:
                task.waiting._waiter = None
                task.waiting = None
            self._ready.append(task)
            if self._sleeping:  # (the loop waits in _next for a put from another thread, or a timer)
                self._wake.notify()

    def _park(self, task: _Task, deadline: float | None) -> None:
        """``task`` waits (for its ``waiting`` mailbox to get something, or ``deadline``): the loop runs others
        meanwhile."""
        if _torch is not None and _torch.is_inference_mode_enabled():  # (a thread-wide mode no task could leave)
            raise RuntimeError(f"{task.name} waits inside torch.inference_mode(), which the tasks taking turns on this "
                               "thread cannot each have: leave it before waiting (torch.no_grad() is kept per task)")
        task.wait_id = wait_id = next(self._order)
        if deadline is not None:
            with self._wake:
                heapq.heappush(self._timers, (deadline, wait_id, task))
        self._loop.switch()
        task.wait_id = 0  # its timer, if still pending, is stale
        if task.ending:
            raise TaskExit
        if deadline is not None and deadline > time.monotonic():
            with self._wake:
                self._stale += 1
                if self._stale > 64 and self._stale > len(self._timers) // 2:  # (a step timeout is minutes)
                    self._timers = [t for t in self._timers if t[2].wait_id == t[1]]
                    heapq.heapify(self._timers)
                    self._stale = 0

    def alive(self) -> list[str]:
        """The tasks that have not ended, by name."""
        return [t.name for t in self._tasks if not t.dead]

    def close(self) -> None:
        """End the tasks that have not ended: :data:`TaskExit` is raised where each waits (its ``finally``
        blocks run; a task that catches it and waits again is left). Each is resumed as the loop resumes it (not
        thrown into: an error torch builds while the task unwinds walks its stack, which a throw from a shallower
        stack than the loop's broke)."""
        if threading.get_ident() != self._thread:
            raise RuntimeError("Turns.close is called from the thread that made the tasks")
        first: BaseException | None = None
        with _as_a_fresh_thread():
            for task in self._tasks:
                if task:  # started and not ended
                    _set_torch_state(task.torch_state or _FRESH)
                    task.ending = True
                    try:
                        task.switch()  # its wait raises TaskExit; it ends, or waits again (and is left)
                    except BaseException as e:  # noqa: BLE001 - the others are ended all the same; raised after
                        first = first or e
                    finally:
                        _take_torch_state()
        if first is not None:
            raise first


def pause(seconds: float) -> None:
    """Wait ``seconds``: a task yields its turn meanwhile (other tasks run), a thread sleeps."""
    task = _current()
    if task is None:
        time.sleep(seconds)
        return
    task.turns._park(task, time.monotonic() + seconds)


def settled() -> bool:
    """Whether every other task of the caller's :class:`Turns` waits for a message that has not come (none is
    ready, none sleeps in :func:`pause`): nothing more happens until the caller acts, a wait's timeout ends or
    another thread puts something into a mailbox. False in a thread."""
    task = _current()
    if task is None:
        return False
    turns = task.turns
    with turns._wake:
        return not turns._ready and all(t is task or t.dead or not t or (t.waiting is not None and not t.woken)
                                        for t in turns._tasks)


def wait_until(done: Callable[[], bool], timeout: float, every: float = 0.002) -> bool:
    """Whether ``done()`` holds within ``timeout`` seconds, checked every ``every`` seconds with :func:`pause` in
    between (a task lets the others run meanwhile): what a hook waiting for another party of the process uses."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        pause(every)
    return True


class Mailbox:
    """A FIFO inbox with one reader: a task waits for it by yielding its turn, a thread by blocking."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiter: _Task | None = None
        self._blocked = 0  # threads blocked in get (not tasks)

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append((time.monotonic(), item))
            waiter = self._waiter
            if self._blocked:  # (a thread waits on it: notify is a Python call, and a task never waits so)
                self._cond.notify()
        if waiter is not None:
            with waiter.turns._wake:
                if waiter.waiting is self:
                    waiter.turns._wakeup(waiter)

    def qsize(self) -> int:
        return len(self._items)

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; raises :class:`Empty` if none arrives within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        task = _current()
        while True:
            if task is None:
                with self._cond:
                    if self._in_time(deadline):
                        return self._items.popleft()[1]
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Empty
                    self._blocked += 1
                    try:
                        self._cond.wait(left)
                    finally:
                        self._blocked -= 1
                continue
            with task.turns._wake, self._cond:  # (a put from another thread sees both set, or the item is here)
                if self._in_time(deadline):
                    return self._items.popleft()[1]
                if self._items or (deadline is not None and deadline <= time.monotonic()):
                    raise Empty
                self._waiter, task.waiting = task, self
            task.turns._park(task, deadline)

    def _in_time(self, deadline: float | None) -> bool:
        """Whether the oldest item came by ``deadline``: a task's deadline is looked at only when it has the thread
        again, and what came after it (while another task kept the thread) must not end the wait as if in time."""
        return bool(self._items) and (deadline is None or self._items[0][0] <= deadline)
