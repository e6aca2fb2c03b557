"""Private id alignment (``[data] align = "psi"``): the ids every data holder has, by ECDH
private set intersection (the ``openmined-psi`` package), over the parties' own links.

The data holders, in plan order ``h1 ... hk``, form a chain: ``h2`` learns ``h1 ∩ h2`` as the
client of a PSI with ``h1``, then serves that set to ``h3``, ... and ``hk`` learns the
intersection of all, which it sends to the other holders. A PSI server sends only its elements
hashed and blinded by its secret key; a client, its own blinded elements: no raw id leaves a
party except those of the final intersection. With three or more holders, a holder in the middle
of the chain also learns the intersection of its ids with those before it (the price of a
pairwise protocol). Holders that are not neighbours talk through a neighbour both have (the
plan's server), which forwards messages it cannot read (blinded elements) and so sees their
sizes and, when it forwards the final intersection, those ids: it is trusted to forward them
faithfully (the semi-honest model of the PSI literature).

Every message is an ``ALIGN`` envelope on the party's :class:`~splitlearn.wire.link.Link`, so it
is authenticated, bounded and metered like every other (under the wire ``align``).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np

from ..core.graph import Graph
from ..core.plan import PlanError
from ..wire.codec import Encoded, WireError
from ..wire.link import Link
from ..wire.messages import Kind, Message, parse_json, quote

__all__ = ["align_psi", "psi_route", "PSI_EXTRA"]

PSI_EXTRA = "pip install --no-deps openmined-psi  (its wheel pins an older protobuf; splitlearn's works with it)"
FPR = 1e-9  # false positive rate of the server's set encoding: about one in 10^9 ids wrongly kept
WIRE = "align"


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


def _key(ids: np.ndarray) -> list[str]:
    return [str(v) for v in ids.tolist()]


def _blob(data: bytes) -> dict[str, Encoded]:
    return {"data": Encoded(codec="raw", dtype="uint8", shape=(len(data),), data=data)}


def align_psi(link: Link, graph: Graph, me: str, ids: np.ndarray | None, *, timeout: float | None,
              keep: Callable[[Message], None]) -> np.ndarray | None:
    """Take part in the alignment: a holder (``ids`` given) gets the ids every holder has; a party
    without data only forwards messages between holders that are not neighbours (None). ``keep``
    takes messages of the session that come meanwhile."""
    holders = holders_of(graph)
    deadline = None if timeout is None else time.monotonic() + timeout
    inbox: list[tuple[dict, bytes]] = []
    last = holders[-1]
    pairs = [(holders[k], holders[k + 1]) for k in range(len(holders) - 1)]
    pairs += [(b, a) for a, b in pairs] + [(last, h) for h in holders[:-1]]
    relays = {psi_route(graph, a, b)[0] for a, b in pairs if len(psi_route(graph, a, b)) == 2}
    # whose final result passes through this party: it forwards until each has gone by
    served = {h for h in holders[:-1] if psi_route(graph, last, h)[:-1] == [me]}
    if me in relays and not served:
        raise PlanError(f'align = "psi": {me!r} would pass alignment messages between data holders but not '
                        "their result; this arrangement of parties is not supported", entry="data.align",
                        hint="let the data holders exchange messages with one common party (the server)")
    if ids is None and me not in relays:
        return None  # nothing to do here

    def send(to: str, body: dict, data: bytes = b"") -> None:
        hop = psi_route(graph, me, to)[0]
        link.send(Message(Kind.ALIGN, me, hop, wire=WIRE, text=json.dumps({**body, "from": me, "to": to}),
                          tensors=_blob(data) if data else {}))

    def receive(sender: str, phase: str) -> tuple[dict, bytes]:
        """The next alignment message of ``phase`` from ``sender``, forwarding others' meanwhile."""
        while True:
            for i, (b, data) in enumerate(inbox):
                if b["from"] == sender and b["phase"] == phase:
                    inbox.pop(i)
                    return b, data
            _pump()

    done_relaying: set[str] = set()

    def _pump() -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise PlanError(f"{me}: the id alignment did not finish within {timeout} s", entry="data.align")
        msg = link.recv(timeout=left)
        if msg.kind != Kind.ALIGN:
            keep(msg)
            return
        try:
            body = parse_json(msg.text, link.limits)
            if not isinstance(body, dict) or not {"from", "to", "phase"} <= set(body):
                raise WireError("an alignment message without from, to and phase")
            origin, to = str(body["from"]), str(body["to"])
            if origin not in graph.plan.parties or to not in graph.plan.parties or origin == to:
                raise WireError(f"an alignment message from {quote(origin)} to {quote(to)}")
            path = [origin, *psi_route(graph, origin, to)]
            at = path.index(me) if me in path else -1
            if at < 1 or path[at - 1] != msg.sender:
                raise WireError(f"an alignment message from {quote(origin)} to {quote(to)} cannot come this way")
        except (WireError, PlanError) as e:
            link.refuse(msg.sender, str(e), wire=WIRE)
            return
        data = msg.tensors["data"].data if "data" in msg.tensors else b""
        if to == me:
            inbox.append((body, data))
        else:  # a relay: forward, unread (blinded elements, or the final intersection)
            link.send(Message(Kind.ALIGN, me, to, wire=WIRE, text=msg.text, tensors=msg.tensors))
            if body["phase"] == "result":
                done_relaying.add(to)

    if ids is None:  # a relay without data: forward until every holder it serves has its result
        while not served <= done_relaying:
            _pump()
        return None

    psi = _psi()
    mine = _key(ids)
    i = holders.index(me)
    current = mine
    if i > 0:  # a client of the previous holder: learn our ids that it (and those before it) hold
        prev = holders[i - 1]
        client = psi.client.CreateWithNewKey(True)
        send(prev, {"phase": "request", "size": len(current)}, client.CreateRequest(current).SerializeToString())
        _, setup_bytes = receive(prev, "setup")
        _, response_bytes = receive(prev, "response")
        setup, response = psi.ServerSetup(), psi.Response()
        try:
            setup.ParseFromString(setup_bytes)
            response.ParseFromString(response_bytes)
            found = client.GetIntersection(setup, response)
        except Exception as e:  # noqa: BLE001 - a malformed protocol message from the peer
            raise PlanError(f"{me}: the id alignment with {prev!r} failed ({e})", entry="data.align") from None
        current = [current[k] for k in sorted(found)]
    if i < len(holders) - 1:  # a server for the next holder, with the ids we know so far
        nxt = holders[i + 1]
        body, request_bytes = receive(nxt, "request")
        size = int(body.get("size", 0))
        server = psi.server.CreateWithNewKey(True)
        request = psi.Request()
        try:
            request.ParseFromString(request_bytes)
            setup = server.CreateSetupMessage(FPR, max(1, size), current, psi.DataStructure.BLOOM_FILTER)
            response = server.ProcessRequest(request)
        except Exception as e:  # noqa: BLE001
            raise PlanError(f"{me}: the id alignment with {nxt!r} failed ({e})", entry="data.align") from None
        send(nxt, {"phase": "setup"}, setup.SerializeToString())
        send(nxt, {"phase": "response"}, response.SerializeToString())
    if me == last:
        final = sorted(current)
        for p in holders[:-1]:
            send(p, {"phase": "result", "ids": final})
    else:
        body, _ = receive(last, "result")
        got = body.get("ids")
        if not isinstance(got, list) or not set(map(str, got)) <= set(mine):
            raise PlanError(f"{me}: the id alignment from {last!r} names ids we do not hold", entry="data.align")
        final = sorted(map(str, got))
    # back to this party's own ids (integers stay integers)
    index = {k: v for k, v in zip(mine, ids.tolist())}
    out = np.asarray([index[k] for k in final], dtype=ids.dtype) if final else ids[:0]
    while not served <= done_relaying:  # a holder that also passes others' messages (a server with data)
        _pump()
    return np.sort(out)
