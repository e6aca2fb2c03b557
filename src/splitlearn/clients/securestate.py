"""A participant's secure aggregation state that no rewind restores (:mod:`~splitlearn.clients.secure`):
the journal of the survivors each of a client's updates was unmasked with, its certificate kit, and
the latest request it finished."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.specs import PlanError
from ..privacy.secagg_certs import Certified

__all__ = ["JOURNAL_FILE", "Journal", "SecureState"]

JOURNAL_FILE = "secagg-journal.json"  # in parties/NAME/ of a run folder


class Journal:
    """Which survivors each of this client's updates (by SHA-256 of its values) was unmasked with,
    kept apart from the state a rewind restores: in memory and, with a run folder, in ``path``
    (``parties/NAME/`` :data:`JOURNAL_FILE`), never cleared, so a party that comes back as a new
    process, or a later run in that folder that trains the same update bit for bit, is held to the
    same survivors."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, tuple[str, ...]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list) and
                                                         all(isinstance(n, str) for n in v) for k, v in data.items()):
                    raise ValueError("not an object of update digests to lists of client names")
            except (OSError, ValueError) as e:
                raise PlanError(f"the secure aggregation journal {path} cannot be read: {e}", entry="--out",
                                hint="restore it from a copy; remove it only if no round of this folder's runs may be "
                                     "trained again (it keeps the survivors each update was unmasked with)") from None
            self.entries = {k: tuple(v) for k, v in data.items()}

    def bound(self, update: str) -> tuple[str, ...] | None:
        """The survivors ``update`` was unmasked with before (None: never)."""
        return self.entries.get(update)

    def record(self, update: str, survivors: tuple[str, ...]) -> None:
        """Remember ``survivors`` for ``update`` (written to the file first, then answered)."""
        self.entries[update] = tuple(sorted(survivors))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: list(v) for k, v in self.entries.items()}))
            os.replace(tmp, self.path)


@dataclass
class SecureState:
    """A participant's secure aggregation: its journal, its certificate kit (None: no certificates),
    the latest request it finished (later messages of that request or before are stale), the size of
    a masked vector's parts."""

    journal: Journal
    certified: Certified | None = None
    last: int = 0
    part_bytes: int = 64 * 2**20  # a masked vector travels in parts of at most this (and half a message's limit)
    warned: bool = field(default=False, repr=False)

    @classmethod
    def of(cls, name: str, credentials: Any, out: Path | None) -> "SecureState":
        path = Path(out) / "parties" / name / JOURNAL_FILE if out is not None else None
        return cls(Journal(path), Certified(credentials) if credentials is not None else None)
