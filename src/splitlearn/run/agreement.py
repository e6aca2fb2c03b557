"""What a handshake fixed, kept from one turn of a ``[clients]`` schedule to the next with the same peer.

A handshake (:mod:`~splitlearn.run.session`) agrees each wire's dtype and row shape and, at a head's party, its
classes. Two parties that take turns together again in the same run agree the same: a client's turn with the
server, every round of SplitFed. Each keeps the :class:`Agreement` of its last handshake with that peer, under the
tag of the turn that made it, and tells the tag in its hello; where both tell the same one, the session takes it
instead of the handshake (the messages that follow are checked against it, as after a handshake). A party that
holds none (a new process, a first turn) tells none, and both handshake. A participant's checkpoint keeps them, so
a run resumed from one agrees (and meters) as the run did. Only a session of two parties (in a chain a party would
not know whether a neighbour's other neighbour still holds it), and never where a defense acts at the handshake (it
sizes its layers there, in that turn's modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.defense import Defense, active

__all__ = ["Agreement"]


@dataclass
class Agreement:
    """The wires' (dtype, row shape) and the heads' classes a handshake fixed, and the tag of the turn it was in
    (None: no handshake yet)."""

    tag: str | None = None
    shapes: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)

    def told(self) -> dict[str, str]:
        """What the hello says of it."""
        return {} if self.tag is None else {"agreed": self.tag}

    def held(self, party: Any, heard: dict[str, dict]) -> bool:
        """Whether this session may take it: two parties, no defense that acts at the handshake (one sizes its
        layers there, in the modules of that turn), and the neighbour's hello tells the same tag."""
        return (self.tag is not None and len(party.graph.plan.parties) == 2 and len(heard) == 1
                and all(h.get("agreed") == self.tag for h in heard.values())
                and not any(type(d).handshake is not Defense.handshake
                            for w in party.graph.wires for d, _ in active(w.spec)))

    def take(self, party: Any) -> None:
        """Put it in ``party`` as its handshake would have."""
        party.wire_shapes.update(self.shapes)  # (the dict the party's flow control reads too)
        party.classes.update(self.classes)

    def keep(self, party: Any, tag: str) -> None:
        """What ``party``'s handshake in the turn ``tag`` fixed."""
        self.tag, self.shapes, self.classes = tag, dict(party.wire_shapes), dict(party.classes)

    def state(self) -> list:
        """As JSON (a participant's checkpoint keeps it: a run resumed from it agrees as the run did)."""
        return [self.tag, {w: [d, list(shape)] for w, (d, shape) in self.shapes.items()}, dict(self.classes)]

    @classmethod
    def loaded(cls, value: Any) -> "Agreement":
        """One from :meth:`state`; none held (a handshake at the next turn) where ``value`` is not such a state."""
        try:
            tag, shapes, classes = value
            out = cls(tag, {str(w): (str(d), tuple(int(n) for n in shape)) for w, (d, shape) in shapes.items()},
                      {str(k): int(v) for k, v in classes.items()})
        except (TypeError, ValueError, AttributeError):
            return cls()
        return out if isinstance(tag, str) else cls()
