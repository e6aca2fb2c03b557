"""Machine settings of a run: the C library's allocator tuned for messages of megabytes, the
number of math threads every party uses, and Python's cyclic collector kept off the heap that was
there before the run (no heavy imports: the CLI calls this first)."""

from __future__ import annotations

import gc
import os
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["tune_allocator", "math_threads", "frozen_heap", "SINGLE_RUN"]


def math_threads(parties: int) -> int:
    """Intra-op threads of each party, the same in-process and in party processes (results of
    some kernels depend on the thread count): with more parties than cores, ``cores // parties``
    (at least one), else torch's own default here. ``OMP_NUM_THREADS`` set by the user wins."""
    import torch

    cores = os.cpu_count() or 1
    if parties > cores and "OMP_NUM_THREADS" not in os.environ:
        return max(1, cores // parties)
    return torch.get_num_threads()


def tune_allocator() -> bool:
    """Keep large buffers on the heap (glibc): messages of megabytes are otherwise mapped and unmapped
    for every copy, and their pages faulted in each time (measured: encoding a 2 MB activation took
    5 ms instead of 0.23 ms). Freed memory is returned to the system only above 256 MB. A no-op
    (False) where the C library is not glibc; the party processes and the CLI call it."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 256 * 2**20))
    except (OSError, AttributeError):
        return False


_FREEZING = threading.Lock()
_freeze = {"depth": 0, "ours": False}
SINGLE_RUN = {"process": False}  # a forked party process: one run, then it exits (launch/forker.py sets it)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Inside, the objects that existed before are left out of Python's cyclic collections (``gc.freeze``): a full
    collection walks every object of the process, torch's and scikit-learn's modules included (0.15-0.2 s each on a
    2-core machine), and a run of a small model triggers several, every party thread waiting on it. Runs at once in
    this process share one freeze, undone (``gc.unfreeze``) when the last one ends; a heap frozen by something else
    (a server framework) is left as it is.

    Before freezing, a single-run process (:data:`SINGLE_RUN`, which stays frozen) collects fully: nothing it
    freezes is garbage. Any other process collects its young generations only (under a millisecond): older garbage,
    a previous run's among it, is frozen with the rest for this run's length and left to Python's own full
    collections afterwards, as in a plain loop, instead of every run in a process (a sweep, a test suite) paying a
    full collection first."""
    with _FREEZING:
        if _freeze["depth"] == 0:
            _freeze["ours"] = SINGLE_RUN["process"] or gc.get_freeze_count() == 0
            if _freeze["ours"]:
                gc.collect(2 if SINGLE_RUN["process"] else 1)
                gc.freeze()
        _freeze["depth"] += 1
    try:
        yield
    finally:
        with _FREEZING:
            _freeze["depth"] -= 1
            if _freeze["depth"] == 0 and _freeze["ours"] and not SINGLE_RUN["process"]:
                gc.unfreeze()
