"""A party process asked to stop (SIGTERM: ``splitlearn stop``, ``systemctl stop``, ``kill``) stops as on Ctrl-C.

Inside :func:`stop_on_sigterm` (a party process's run, in its main thread), SIGTERM raises :class:`Stopped`, a
``KeyboardInterrupt``: the party's session tells its neighbours why, a coordinator tells every follower, and its
connections close with a goodbye, instead of the process dying where it stood (its neighbours then wait out
``reconnect_timeout`` for a link that broke). A second SIGTERM ends the process at once.

Inside :func:`shielded` (a party closing its connections, telling its neighbours why it cannot start, writing its
report), a SIGTERM is noted, not raised: what it finishes is not cut short, and an error already on its way is not
replaced. The process ends right after anyway.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Stopped", "stop_on_sigterm", "shielded"]

_STATE = {"armed": False}  # raise Stopped now (else: a SIGTERM is noted, and the next ends the process)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM)."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    if _STATE["armed"]:
        raise Stopped("SIGTERM")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM raises :class:`Stopped` in the main thread (outside :func:`shielded`); the handler before is
    put back after. Elsewhere than in the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before, _STATE["armed"] = signal.signal(signal.SIGTERM, _on_sigterm), True
    try:
        yield
    finally:
        _STATE["armed"] = False
        signal.signal(signal.SIGTERM, before)


@contextmanager
def shielded() -> Iterator[None]:
    """Inside, a SIGTERM does not interrupt (see the module's docstring)."""
    was, _STATE["armed"] = _STATE["armed"], False
    try:
        yield
    finally:
        _STATE["armed"] = was
