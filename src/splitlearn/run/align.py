"""Private id alignment (``[data] align = "psi"``): the ids every data holder has, by ECDH
private set intersection (the ``openmined-psi`` package), over the parties' own links.

The data holders, in plan order ``h1 ... hk``, form a chain: ``h2`` learns ``h1 ∩ h2`` as the
client of a PSI with ``h1``, then serves that set to ``h3``, ... and ``hk`` learns the
intersection of all, which it sends to the other holders. A PSI server sends only its elements
hashed and blinded by its secret key, as a raw sorted set (exact: the library's Bloom filter, whatever
false positive rate it is given, kept about one in 10,000 ids the server does not hold when it held a
few hundred, its double hashing repeating the same few bits for some ids); a client, its own blinded
elements: no raw id leaves a party except those of the final intersection. With three or more holders,
a holder in the middle of the chain also learns the intersection of its ids with those before it (the
price of a pairwise protocol). Holders that are not neighbours talk through a neighbour both have (the
plan's server), which forwards messages it cannot read (blinded elements) and so sees their
sizes and, when it forwards the final intersection, those ids: it is trusted to forward them
faithfully (the semi-honest model of the PSI literature).

Every message is an ``ALIGN`` envelope on the party's :class:`~splitlearn.wire.link.Link`, so it
is authenticated, bounded and metered like every other (under the wire ``align``).

What a peer can make a party do is bounded. Each holder tells in its first hello how many ids it
holds; each alignment message is checked before it is kept or forwarded: it must be one the
protocol expects on that route (at most one of each), its fields well formed and its bytes within
what its ids can take (a request of at most as many ids as its sender holds, and at most
:data:`MAX_ELEMENTS`). What a peer makes a party hold during the alignment is kept within a byte
budget per peer (:class:`Budget`); the PSI library is called on :data:`CHUNK` ids at a time, so the
alignment's deadline interrupts it. A message refused is answered with an ERROR naming the reason,
and the alignment stops with an error naming the peer (told to every neighbour by the session).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

import numpy as np

from ..core.graph import Graph
from ..core.specs import PlanError
from ..wire.codec import Encoded, WireError
from ..wire.link import Link
from ..wire.messages import Kind, Message, parse_json, quote
from ..wire.transport import TransportTimeout

__all__ = ["align_psi", "Alignment", "check_arrangement", "psi_route", "PSI_EXTRA", "Budget", "MAX_ELEMENTS",
           "peer_budgets", "CHUNK", "ELEMENT_BYTES", "OTHER_BYTES", "PHASES", "TEXT_BYTES", "WIRE", "holders_of",
           "message_bytes"]

PSI_EXTRA = "pip install --no-deps openmined-psi  (its wheel pins an older protobuf; splitlearn's works with it)"
WIRE = "align"
MAX_ELEMENTS = 1 << 20  # ids in one PSI request (or result), whatever a hello says
ELEMENT_BYTES = 35  # a blinded id in a request, response or setup: a 33-byte curve point and 2 bytes of framing
TEXT_BYTES = 512  # the JSON of an alignment message other than the result
CHUNK = 4096  # ids per call into the PSI library (about 0.4 s): the deadline is checked between calls
OTHER_BYTES = 1 << 20  # other session messages (a later hello) kept per peer during the alignment
PHASES = ("request", "setup", "response", "result")


def _psi():
    try:
        import private_set_intersection.python as psi
    except ImportError:
        raise PlanError('[data] align = "psi" needs the openmined-psi package', entry="data.align",
                        hint=PSI_EXTRA) from None
    return psi


def holders_of(graph: Graph) -> list[str]:
    plan = graph.plan
    return [p for p in plan.parties if plan.parties[p].holds]


def psi_route(graph: Graph, a: str, b: str) -> list[str]:
    """The parties a message from ``a`` to ``b`` passes: [b], or [relay, b] through a common neighbour."""
    if b in graph.neighbours(a):
        return [b]
    common = [p for p in graph.plan.parties if p in graph.neighbours(a) and p in graph.neighbours(b)]
    if not common:
        raise PlanError(f'align = "psi": data holders {a!r} and {b!r} neither exchange messages nor share a '
                        "neighbour to pass their alignment through", entry="data.align",
                        hint='use align = "exact" with files of the same ids')
    return [common[0], b]


def _expected(holders: list[str]) -> set[tuple[str, str, str]]:
    """Every (from, to, phase) of the protocol: each holder requests from the one before it, which
    answers with a setup and a response; the last holder sends the result to every other."""
    out = set()
    for a, b in zip(holders, holders[1:]):
        out |= {(b, a, "request"), (a, b, "setup"), (a, b, "response")}
    return out | {(holders[-1], h, "result") for h in holders[:-1]}


def message_bytes(phase: str, n_from: int, n_to: int, text_bytes: int) -> int:
    """The most bytes (text and data) an honest ``phase`` message takes between holders of
    ``n_from`` and ``n_to`` ids."""
    if phase in ("request", "setup"):  # the sender's ids, blinded (a setup: its raw set)
        return TEXT_BYTES + ELEMENT_BYTES * n_from + 16
    if phase == "response":
        return TEXT_BYTES + ELEMENT_BYTES * n_to + 16
    return text_bytes  # the result: ids in the text


def peer_budgets(graph: Graph, me: str, counts: dict[str, int], text_bytes: int,
                 cap: int = MAX_ELEMENTS) -> dict[str, int]:
    """Bytes each neighbour may make ``me`` hold during the alignment: the alignment messages that
    reach ``me`` through it (each at most :func:`message_bytes`, for ids ``counts`` says, at most
    ``cap``; a holder not counted: ``cap``), and :data:`OTHER_BYTES` of other messages."""
    budget = {p: OTHER_BYTES for p in graph.neighbours(me)}
    holders = holders_of(graph)
    if len(holders) < 2:
        return budget
    for origin, to, phase in _expected(holders):
        path = [origin, *psi_route(graph, origin, to)]
        if me in path[1:]:
            hop = path[path.index(me) - 1]
            n = [min(cap, counts.get(p, cap)) for p in (origin, to)]
            budget[hop] = budget.get(hop, OTHER_BYTES) + message_bytes(phase, *n, text_bytes)
    return budget


def _size(msg: Message) -> int:
    return len(msg.text) + msg.payload_bytes


class Budget:
    """What each peer has made this party hold during the alignment, in bytes, within
    :func:`peer_budgets`; a message past its sender's budget is refused and the alignment stops,
    naming the peer. The session holds early messages of the first hello with it too."""

    def __init__(self, link: Link, graph: Graph, me: str, counts: dict[str, int] | None = None):
        self.link, self.me = link, me
        self.limits = peer_budgets(graph, me, counts or {}, link.limits.text_bytes)
        self.held: dict[str, int] = {}

    def hold(self, msg: Message) -> None:
        """Count ``msg`` against its sender's budget (PlanError past it, after refusing it)."""
        peer, n = msg.sender, _size(msg)
        have, limit = self.held.get(peer, 0), self.limits.get(peer, OTHER_BYTES)
        if have + n > limit:
            why = (f"{have} bytes of its messages are held during the id alignment and {n} more would pass its "
                   f"budget of {limit} (align.peer_budgets)")
            self.link.refuse(peer, why, msg.step, WIRE)
            raise PlanError(f"{self.me}: {quote(peer)} sent past its budget: {why}", entry="data.align")
        self.held[peer] = have + n

    def release(self, peer: str, n: int) -> None:
        self.held[peer] = max(0, self.held.get(peer, 0) - n)


def _counts(me: str, link: Link, hellos: dict[str, dict]) -> dict[str, int]:
    """The ids each neighbouring holder said it holds in its hello (``id_count``)."""
    out = {}
    for peer, hello in hellos.items():
        n = hello.get("id_count")
        if n is None:
            continue
        if type(n) is not int or n < 0:
            why = f"a hello with id_count {quote(n)}: expected the count of ids it holds"
            link.refuse(peer, why, wire=WIRE)
            raise PlanError(f"{me}: {quote(peer)} sent {why}", entry="data.align")
        out[peer] = n
    return out


def _blob(data: bytes) -> dict[str, Encoded]:
    return {"data": Encoded(codec="raw", dtype="uint8", shape=(len(data),), data=data)}


def _key(ids: np.ndarray) -> list[str]:
    return [str(v) for v in ids.tolist()]


class Alignment:
    """One party's part in the alignment: receives, checks, holds or forwards alignment messages."""

    def __init__(self, link: Link, graph: Graph, me: str, n_ids: int | None, timeout: float | None,
                 keep: Callable[[Message], None], hellos: dict[str, dict], cap: int):
        self.link, self.graph, self.me, self.keep, self.timeout, self.cap = link, graph, me, keep, timeout, cap
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.holders = holders_of(graph)
        self.expected = _expected(self.holders) if len(self.holders) > 1 else set()
        self.counts = _counts(me, link, hellos)
        if n_ids is not None:
            self.counts[me] = n_ids
        self.budget = Budget(link, graph, me, self.counts)
        self.inbox: dict[tuple[str, str], tuple[dict, bytes, str, int]] = {}  # (from, phase) -> body, data, hop, bytes
        self.seen: set[tuple[str, str, str]] = set()
        self.relayed: set[str] = set()  # holders whose result this party forwarded
        self.pending: list[Message] = []

    # -- messages ---------------------------------------------------------------------------
    def send(self, to: str, body: dict, data: bytes = b"") -> None:
        hop = psi_route(self.graph, self.me, to)[0]
        text = json.dumps({**body, "from": self.me, "to": to})
        self.link.send(Message(Kind.ALIGN, self.me, hop, wire=WIRE, text=text, tensors=_blob(data) if data else {}))

    def receive(self, origin: str, phase: str) -> tuple[dict, bytes]:
        """The alignment message of ``phase`` from ``origin``, forwarding others' meanwhile."""
        while (origin, phase) not in self.inbox:
            self.pump()
        body, data, hop, n = self.inbox.pop((origin, phase))
        self.budget.release(hop, n)
        return body, data

    def check_deadline(self, doing: str = "") -> float | None:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise PlanError(f"{self.me}: the id alignment did not finish within {self.timeout} s"
                            + (f" ({doing})" if doing else ""), entry="data.align")
        return left

    def pump(self) -> None:
        """Take the next message: keep the session's (within budget), hold or forward an alignment one."""
        if self.pending:
            msg = self.pending.pop(0)
        else:
            left = self.check_deadline()
            try:
                msg = self.link.recv(timeout=left)
            except TransportTimeout:
                self.check_deadline()
                raise
        if msg.kind == Kind.ERROR or (msg.kind == Kind.STOP and msg.text != "done"):
            reason = msg.text[:500] + ("..." if len(msg.text) > 500 else "") if msg.text else "no reason given"
            raise PlanError(f"{self.me}: party {quote(msg.sender)} stopped during the id alignment: {reason}",
                            entry="data.align")
        if msg.kind != Kind.ALIGN:
            self.budget.hold(msg)
            self.keep(msg)
            return
        body, data = self.admit(msg)
        origin, to, phase = body["from"], body["to"], body["phase"]
        if to == self.me:
            self.budget.hold(msg)
            self.inbox[(origin, phase)] = (body, data, msg.sender, _size(msg))
            return
        # a relay: forward, unread (blinded elements, or the final intersection); nothing is held
        self.link.send(Message(Kind.ALIGN, self.me, to, wire=WIRE, text=msg.text, tensors=msg.tensors))
        if phase == "result":
            self.relayed.add(to)

    def admit(self, msg: Message) -> tuple[dict, bytes]:
        """The body and data of an alignment message the protocol expects on this route, checked;
        otherwise it is refused and the alignment stops, naming the peer."""
        try:
            body = parse_json(msg.text, self.link.limits)
            if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("from", "to", "phase")):
                raise WireError("an alignment message without from, to and phase")
            origin, to, phase = body["from"], body["to"], body["phase"]
            if (origin, to, phase) not in self.expected:
                raise WireError(f"an alignment message {quote(phase)} from {quote(origin)} to {quote(to)}, "
                                "which the protocol never sends")
            path = [origin, *psi_route(self.graph, origin, to)]
            at = path.index(self.me) if self.me in path else -1
            if at < 1 or path[at - 1] != msg.sender:
                raise WireError(f"an alignment message from {quote(origin)} to {quote(to)} cannot come this way")
            if (origin, to, phase) in self.seen:
                raise WireError(f"a second {phase} from {quote(origin)} to {quote(to)}")
            if set(msg.tensors) - {"data"}:
                raise WireError(f"an alignment message with tensors {quote(sorted(msg.tensors))}")
            data = msg.tensors["data"].data if "data" in msg.tensors else b""
            self._check_fields(body, len(data) + len(msg.text), origin, to, phase)
        except (WireError, PlanError) as e:
            self.refuse(msg.sender, str(e))
        self.seen.add((origin, to, phase))
        return body, data

    def refuse(self, peer: str, why: str) -> None:
        """Refuse what ``peer`` sent (an ERROR tells it why) and stop the alignment, naming it."""
        self.link.refuse(peer, why, wire=WIRE)
        raise PlanError(f"{self.me}: the id alignment refused a message from {quote(peer)}: {why}",
                        entry="data.align")

    def bound(self, party: str) -> tuple[int, str]:
        """The most ids ``party`` can align, and why."""
        n = self.counts.get(party)
        if n is not None and n <= self.cap:
            return n, f"the ids {party} said it holds"
        return self.cap, "align.MAX_ELEMENTS"

    def _check_fields(self, body: dict, nbytes: int, origin: str, to: str, phase: str) -> None:
        (n_from, why_from), (n_to, _) = self.bound(origin), self.bound(to)
        if phase == "request":
            size = body.get("size")
            if type(size) is not int or not 0 <= size <= n_from:
                raise WireError(f"a request of size {quote(size)}: expected a count of ids from 0 to {n_from} "
                                f"({why_from})")
            n_from = size
        if phase == "result":
            ids = body.get("ids")
            most = min(n_from, n_to)
            if not isinstance(ids, list) or len(ids) > most or not all(isinstance(v, str) for v in ids):
                raise WireError(f"a result whose ids are not a list of at most {most} strings")
        limit = message_bytes(phase, n_from, n_to, self.link.limits.text_bytes)
        if nbytes > limit:
            raise WireError(f"a {phase} of {nbytes} bytes, more than the {limit} its ids can take")

    # -- the library, a chunk at a time ---------------------------------------------------------
    def chunked(self, items: list, work: Callable[[int, list], Iterable], doing: str) -> list:
        """``work(offset, chunk)`` on ``items`` CHUNK at a time, the deadline checked before each."""
        out: list = []
        for k in range(0, len(items), CHUNK):
            self.check_deadline(doing)
            out.extend(work(k, items[k:k + CHUNK]))
        return out

    def learn(self, psi: Any, prev: str, current: list[str]) -> list[str]:
        """As the client of ``prev``: our ids in ``current`` that it (and those before it) hold."""
        client = psi.client.CreateWithNewKey(True)
        request = psi.Request(reveal_intersection=True)
        request.encrypted_elements.extend(
            self.chunked(current, lambda _, c: client.CreateRequest(c).encrypted_elements, "blinding our ids"))
        self.send(prev, {"phase": "request", "size": len(current)}, request.SerializeToString())
        _, setup_bytes = self.receive(prev, "setup")
        _, response_bytes = self.receive(prev, "response")
        setup, response = psi.ServerSetup(), psi.Response()
        try:
            setup.ParseFromString(bytes(setup_bytes))
            response.ParseFromString(bytes(response_bytes))
        except Exception as e:  # noqa: BLE001 - a malformed protocol message from the peer
            self.refuse(psi_route(self.graph, self.me, prev)[0], f"a setup or response that cannot be read ({e})")
        hop = psi_route(self.graph, self.me, prev)[0]
        kind, n, most = setup.WhichOneof("data_structure"), len(setup.raw.encrypted_elements), self.bound(prev)[0]
        if kind != "raw" or n > most:  # (a Bloom filter would keep ids that prev does not hold)
            self.refuse(hop, f"a setup from {quote(prev)} that is not a raw set of at most {most} blinded ids "
                             f"({kind or 'none'}, {n} ids)")
        got = list(response.encrypted_elements)
        if len(got) != len(current):
            self.refuse(hop, f"a response from {quote(prev)} of {len(got)} ids to a request of {len(current)}")

        def intersect(offset: int, chunk: list) -> list[int]:
            part = psi.Response()
            part.encrypted_elements.extend(chunk)
            return [offset + i for i in client.GetIntersection(setup, part)]

        try:
            found = self.chunked(got, intersect, f"reading {prev}'s answer")
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001
            self.refuse(hop, f"a response from {quote(prev)} that cannot be read ({e})")
        return [current[k] for k in sorted(found)]

    def serve(self, psi: Any, nxt: str, current: list[str]) -> None:
        """As the server of ``nxt``: answer its request against ``current``."""
        body, request_bytes = self.receive(nxt, "request")
        hop = psi_route(self.graph, self.me, nxt)[0]
        size = body["size"]  # checked by admit
        request = psi.Request()
        try:
            request.ParseFromString(bytes(request_bytes))
        except Exception as e:  # noqa: BLE001
            self.refuse(hop, f"a request from {quote(nxt)} that cannot be read ({e})")
        elements = list(request.encrypted_elements)
        if len(elements) != size:
            self.refuse(hop, f"a request from {quote(nxt)} of {len(elements)} ids, not its size {size}")
        server = psi.server.CreateWithNewKey(True)

        def answer(_: int, chunk: list) -> Iterable[bytes]:
            part = psi.Request(reveal_intersection=True)
            part.encrypted_elements.extend(chunk)
            return server.ProcessRequest(part).encrypted_elements

        response = psi.Response()
        try:
            response.encrypted_elements.extend(self.chunked(elements, answer, f"answering {nxt}'s request"))
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed element
            self.refuse(hop, f"a request from {quote(nxt)} that cannot be answered ({e})")
        # a raw set, sorted by the library: exact, unlike its Bloom filter (module docstring); fpr: unused by it
        setup = server.CreateSetupMessage(0.5, max(1, size), current, psi.DataStructure.RAW)
        self.send(nxt, {"phase": "setup"}, setup.SerializeToString())
        self.send(nxt, {"phase": "response"}, response.SerializeToString())


def _routes(graph: Graph, me: str) -> tuple[list[str], set[str], set[str]]:
    """The holders in chain order, the parties that relay between two of them, and the holders whose final
    result passes through ``me``. Raises PlanError for an arrangement the chain cannot serve."""
    holders = holders_of(graph)
    last = holders[-1]
    pairs = [(holders[k], holders[k + 1]) for k in range(len(holders) - 1)]
    pairs += [(b, a) for a, b in pairs] + [(last, h) for h in holders[:-1]]
    relays = {psi_route(graph, a, b)[0] for a, b in pairs if len(psi_route(graph, a, b)) == 2}
    # whose final result passes through this party: it forwards until each has gone by
    served = {h for h in holders[:-1] if psi_route(graph, last, h)[:-1] == [me]}
    if me in relays and not served:
        raise PlanError(f'align = "psi": {me!r} would pass alignment messages between data holders but not '
                        "their result; this arrangement of parties is not supported", entry="data.align",
                        hint="let the data holders exchange messages with one common party (the server) that "
                             "holds no data of its own")
    return holders, relays, served


def check_arrangement(graph: Graph) -> None:
    """Whether private alignment can run between this plan's parties (every party's part); a PlanError
    naming the party that cannot play it otherwise. ``prepare`` calls it, so ``inspect`` refuses such a plan."""
    if len(holders_of(graph)) > 1:
        for party in graph.plan.parties:
            _routes(graph, party)


def align_psi(link: Link, graph: Graph, me: str, ids: np.ndarray | None, *, timeout: float | None,
              keep: Callable[[Message], None], first: Iterable[Message] = (), hellos: dict[str, dict] | None = None,
              max_elements: int = MAX_ELEMENTS) -> np.ndarray | None:
    """Take part in the alignment: a holder (``ids`` given) gets the ids every holder has; a party
    without data only forwards messages between holders that are not neighbours (None). ``keep``
    takes messages of the session that come meanwhile; ``first``: messages that came before the
    alignment began (during the hello), taken first; ``hellos``: the neighbours' first hellos (a
    holder's tells how many ids it holds, ``id_count``); ``max_elements``: the most ids of a request."""
    holders, relays, served = _routes(graph, me)
    first = list(first)
    if ids is None and me not in relays:
        for msg in first:
            keep(msg)
        return None  # nothing to do here
    run = Alignment(link, graph, me, None if ids is None else len(ids), timeout, keep, hellos or {}, max_elements)
    run.pending = first
    if ids is None:  # a relay without data: forward until every holder it serves has its result
        while not served <= run.relayed:
            run.pump()
        return None
    mine = _key(ids)
    final = _take_part(run, _psi(), holders, mine)
    # back to this party's own ids (integers stay integers)
    index = {k: v for k, v in zip(mine, ids.tolist())}
    out = np.asarray([index[k] for k in final], dtype=ids.dtype) if final else ids[:0]
    while not served <= run.relayed:  # a holder that also passes others' messages (a server with data)
        run.pump()
    return np.sort(out)


def _take_part(run: Alignment, psi: Any, holders: list[str], mine: list[str]) -> list[str]:
    """A holder's part of the chain; the ids of the final intersection (as keys)."""
    me, last = run.me, holders[-1]
    i = holders.index(me)
    current = mine
    if i > 0:
        current = run.learn(psi, holders[i - 1], current)
    if i < len(holders) - 1:
        run.serve(psi, holders[i + 1], current)
    if me == last:
        final = sorted(current)
        for p in holders[:-1]:
            run.send(p, {"phase": "result", "ids": final})
        return final
    body, _ = run.receive(last, "result")
    got = body["ids"]  # a list of strings, checked by admit
    if not set(got) <= set(mine):
        raise PlanError(f"{me}: the id alignment from {last!r} names ids we do not hold", entry="data.align")
    return sorted(got)
