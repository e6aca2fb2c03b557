"""The plan as a graph: nodes, wires (edges that cross parties) and stages.

Four kinds of node:
- input ``party.field``: a field of one party's local data;
- segment: a module run by one party on one or more inputs;
- output ``segment:name``: one element of a segment's tuple or dict output (``SegmentSpec.outputs``), at the
  segment's party, so each element travels on a wire of its own;
- loss: computed at the party of its input segment, against a target input.

An edge between nodes of two parties is a *wire*. It carries the source tensor forward and,
for activations, its gradient backward. A loss target held by another party travels on a
``label`` wire. Raw features never travel: an input feeds segments of its own party only.

A *stage* is a connected piece of one party's nodes (received tensors are leaves, so they
separate stages; the nodes that read one received tensor are in one stage, which sends its gradient
back once). A U-shaped client owns two stages: the bottom and the head.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .defense import validate as validate_defenses
from .plan import Plan
from .specs import PlanError
from .wirespec import WireSpec

__all__ = ["Graph", "Node", "Wire", "Stage", "PartyView", "build_graph"]


@dataclass(frozen=True)
class Node:
    name: str
    party: str
    kind: Literal["input", "segment", "output", "loss"]
    inputs: tuple[str, ...] = ()  # segment: its inputs; output: (its segment,); loss: (input segment, target)
    merge: str = ""  # segment: how it takes its inputs, where not its spec's ("module": a tuple output's elements)
    element: int = -1  # output: its position in the segment's outputs

    def pick(self, value: object) -> object:
        """An output node's element of its segment's tuple (by position) or dict (by name)."""
        return value[self.name.split(":", 1)[1]] if isinstance(value, dict) else value[self.element]  # type: ignore


@dataclass(frozen=True)
class Wire:
    name: str
    src: str  # source node
    src_party: str
    dst_party: str
    carries: Literal["activation", "label"]
    consumers: tuple[str, ...]  # nodes at dst_party that read it
    spec: WireSpec = field(default_factory=WireSpec)  # codecs and defenses as the plan gives them
    vary: tuple[tuple[int, int], ...] = ()  # (dimension, largest size) of a shape that varies per batch
    masked: bool = False  # into a secure sum (core/securesum.py): masked int64 forward, the sum's gradient back

    @property
    def codec(self) -> str:
        """Forward codec; labels always travel exactly."""
        return "raw" if self.carries == "label" else self.spec.codec

    @property
    def grad_codec(self) -> str:
        return self.spec.grad_codec


@dataclass(frozen=True)
class Stage:
    party: str
    index: int
    nodes: tuple[str, ...]  # in topological order
    receives: tuple[str, ...]  # wires whose tensors enter this stage
    sends: tuple[str, ...]  # wires leaving this stage
    losses: tuple[str, ...]


@dataclass(frozen=True)
class PartyView:
    """One party's part of a graph: its nodes in order, its stages, its wires (by name) and those leaving each
    node, its input nodes that are only loss targets, each node's stage, and the raw inputs each sent value is
    computed from (NoPeek compares them)."""

    order: list[str]
    stages: list[Stage]
    wires: dict[str, Wire]
    sends_from: dict[str, list[Wire]]
    label_only: set[str]
    stage_of: dict[str, int]
    raw_inputs: dict[str, list[str]]


@dataclass
class Graph:
    plan: Plan
    nodes: dict[str, Node]
    order: list[str]  # topological
    wires: list[Wire]
    stages: list[Stage] = field(default_factory=list)
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # what is derived from it: see derived()

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, made once per graph under ``key`` (a graph does not change once built; a [clients]
        schedule's parties derive the same things from it every turn). Callers copy what they may change."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    @property
    def parties(self) -> list[str]:
        return list(self.plan.parties)

    def party_view(self, party: str) -> "PartyView":
        """What ``party`` runs and where it sends (derived once: shared, not to be changed)."""
        def make() -> PartyView:
            order = self.local_order(party)
            stages = self.stages_of(party)
            wires = {w.name: w for w in self.wires if party in (w.src_party, w.dst_party)}
            sends_from: dict[str, list[Wire]] = {}
            for w in wires.values():
                if w.src_party == party:
                    sends_from.setdefault(w.src, []).append(w)
            return PartyView(order, stages, wires, sends_from, self.label_inputs() & set(order),
                             {n: s.index for s in stages for n in s.nodes},
                             {w.src: self.raw_inputs(w.src) for w in wires.values() if w.src_party == party})
        return self.derived(("party_view", party), make)

    def wire_between(self, src: str, dst_party: str) -> Wire | None:
        return next((w for w in self.wires if w.src == src and w.dst_party == dst_party), None)

    def local_order(self, party: str) -> list[str]:
        return [n for n in self.order if self.nodes[n].party == party]

    def stages_of(self, party: str) -> list[Stage]:
        return [s for s in self.stages if s.party == party]

    def label_wires(self) -> list[Wire]:
        return [w for w in self.wires if w.carries == "label"]

    def losses(self) -> list[Node]:
        return [self.nodes[n] for n in self.order if self.nodes[n].kind == "loss"]

    def raw_inputs(self, node: str) -> list[str]:
        """The input nodes (raw data) of ``node``'s party that ``node`` is computed from there."""
        party, out, todo = self.nodes[node].party, [], [node]
        while todo:
            n = todo.pop()
            if self.nodes[n].kind == "input":
                out += [] if n in out else [n]
            todo += [d for d in self.nodes[n].inputs if self.nodes[d].party == party]
        return sorted(out)

    def label_inputs(self) -> set[str]:
        """Input nodes used only as loss targets: prediction does without them."""
        users: dict[str, list[Node]] = {}
        for n in self.nodes.values():
            for d in n.inputs:
                users.setdefault(d, []).append(n)
        return {n for n, node in self.nodes.items() if node.kind == "input"
                and all(u.kind == "loss" and u.inputs[1] == n for u in users.get(n, []))}

    def receiver_computes_loss(self, wire: Wire) -> bool:
        """Whether the receiver of ``wire`` computes a loss from it (so holds the labels of its gradients)."""
        return any(self.nodes[u].kind == "loss" or _feeds_local_loss(self.nodes, u, wire.dst_party)
                   for u in wire.consumers)

    def neighbours(self, party: str) -> list[str]:
        """Parties this party exchanges messages with."""
        out = {w.dst_party for w in self.wires if w.src_party == party}
        out |= {w.src_party for w in self.wires if w.dst_party == party}
        return sorted(out)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _element(plan: Plan, ref: str, entry: str, nodes: dict[str, Node]) -> str:
    """Check a reference ``segment:name`` to one element of a segment's outputs; return its node."""
    seg, name = ref.split(":", 1)
    if seg not in plan.segments:
        raise PlanError(f"{ref!r} names unknown segment {seg!r}", entry=entry,
                        hint=_suggest(seg, list(plan.segments)) + f"segments are {sorted(plan.segments)}")
    known = plan.segments[seg].output_names
    if not known:
        raise PlanError(f"{ref!r} names an element of segment {seg!r}, which gives one tensor", entry=entry,
                        hint=f"name the segment {seg!r} itself, or list its elements in segments.{seg}.outputs")
    if name not in known:
        raise PlanError(f"segment {seg!r} has no output {name!r}", entry=entry,
                        hint=_suggest(name, known) + f"its outputs are {known}")
    spec = plan.segments[seg]
    nodes.setdefault(ref, Node(ref, spec.party, "output", (seg,), element=known.index(name)))
    return ref


def _resolve(plan: Plan, ref: str, entry: str, nodes: dict[str, Node], role: str = "input") -> str:
    """Check a reference to a data field (``party.field``), a segment or one of its outputs (``segment:name``);
    return the node name."""
    if ":" in ref:
        return _element(plan, ref, entry, nodes)
    if "." in ref:
        party, fld = ref.split(".", 1)
        if party not in plan.parties:
            raise PlanError(f"{ref!r} names unknown party {party!r}", entry=entry,
                            hint=_suggest(party, list(plan.parties)) + f"known parties: {sorted(plan.parties)}")
        if fld not in plan.parties[party].holds:
            holds = sorted(plan.parties[party].holds)
            what = (f"the loss target {ref!r} is held by nobody" if role == "target"
                    else f"nothing produces input {ref!r}")
            raise PlanError(f"{what}: party {party!r} holds no field {fld!r}", entry=entry,
                            hint=f"add {fld!r} to parties.{party}.holds, or use one of {holds}")
        nodes.setdefault(ref, Node(ref, party, "input"))
        return ref
    if ref not in plan.segments:
        raise PlanError(f"unknown segment {ref!r}", entry=entry,
                        hint=_suggest(ref, list(plan.segments)) + f"segments are {sorted(plan.segments)}; "
                        "a data field is written 'party.field'")
    return ref


def _toposort(nodes: dict[str, Node]) -> list[str]:
    indeg = {n: 0 for n in nodes}
    users: dict[str, list[str]] = {n: [] for n in nodes}
    for n in nodes.values():
        for d in n.inputs:
            indeg[n.name] += 1
            users[d].append(n.name)
    ready = [n for n in nodes if indeg[n] == 0]
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) < len(nodes):
        cyc = sorted(n for n in nodes if indeg[n] > 0 and nodes[n].kind == "segment")
        raise PlanError(f"the segments {cyc} form a cycle", entry=f"segments.{cyc[0]}.inputs",
                        hint="a plan must be acyclic: remove one of the inputs that closes the loop")
    return order


def _stages(g: Graph) -> list[Stage]:
    stages: list[Stage] = []
    for party in g.parties:
        local = g.local_order(party)
        parent = {n: n for n in local}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        read: set[str] = set()
        for n in local:
            for d in g.nodes[n].inputs:  # data joins the stage of its first reader only: no gradient goes back to
                if d in parent and not (g.nodes[d].kind == "input" and d in read):  # it, and two readers of it
                    parent[find(n)] = find(d)  # may wait on each other through other parties (a U-shape's mask)
                read.add(d)
        for w in g.wires:  # nodes that read one received tensor are one stage: its gradient is sent back once,
            if w.dst_party == party:  # the sum over all of them (two heads on one received activation)
                for c in w.consumers[1:]:
                    parent[find(c)] = find(w.consumers[0])
        groups: dict[str, list[str]] = {}
        for n in local:
            groups.setdefault(find(n), []).append(n)
        for i, members in enumerate(groups.values()):
            member_set = set(members)
            receives = tuple(w.name for w in g.wires if w.dst_party == party and set(w.consumers) & member_set)
            sends = tuple(w.name for w in g.wires if w.src in member_set)
            losses = tuple(n for n in members if g.nodes[n].kind == "loss")
            stages.append(Stage(party, i, tuple(members), receives, sends, losses))
    return stages


def _feeds_local_loss(nodes: dict[str, Node], start: str, party: str) -> bool:
    """Whether ``start`` leads, inside ``party``, to a loss."""
    users = [n for n in nodes.values() if start in n.inputs and n.party == party]
    return any(u.kind == "loss" or _feeds_local_loss(nodes, u.name, party) for u in users)


def _loss_kind(kind: str):  # noqa: ANN202 - the loss kinds need torch, which `splitlearn --help` does not import
    from .losses import get

    return get(kind)


def _token_bound(plan: Plan, field: str) -> tuple[tuple[int, int], ...]:
    """A token loss's labels (``party.field``) vary in length per batch, up to the text data's ``max_length`` or the
    width of the rows given in Python; a PlanError where neither says it."""
    party, _, local = field.partition(".")
    spec = plan.parties[party].data or plan.data
    bound = spec.options.get("max_length") if spec.dataset == "text" else None
    if spec.dataset == "arrays" and spec._table is not None and plan.parties[party].holds.get(local) is not None:
        values = spec._table.fields.get(plan.parties[party].holds[local].field)
        bound = values.shape[1] if values is not None and values.ndim == 2 else None
    if not isinstance(bound, int) or bound < 1:
        raise PlanError(f"{field!r} (a language model's labels, one per token) travels to another party, and its "
                        f"longest sequence is not known from dataset {spec.dataset!r}", entry="losses",
                        hint="read the notes with dataset = \"text\" (its max_length bounds them), or compute the loss "
                        "where the labels are (a U-shaped plan)")
    return ((1, bound),)


def build_graph(plan: Plan) -> Graph:
    """Check the plan's structure and derive its wires and stages. Raises :class:`PlanError`."""
    nodes: dict[str, Node] = {}
    for name, seg in plan.segments.items():
        entry = f"segments.{name}"
        if seg.party not in plan.parties:
            raise PlanError(f"segment {name!r} belongs to unknown party {seg.party!r}", entry=f"{entry}.party",
                            hint=_suggest(seg.party, list(plan.parties)) + f"known parties: {sorted(plan.parties)}")
        if seg.network not in plan.networks:
            raise PlanError(f"unknown network {seg.network!r}", entry=f"{entry}.network",
                            hint=_suggest(seg.network, list(plan.networks)) + f"networks are {sorted(plan.networks)}")
        inputs: tuple[str, ...] = ()
        expanded = False
        for ref in seg.inputs:
            node = _resolve(plan, ref, f"{entry}.inputs", nodes)
            if ":" not in node and "." not in node and plan.segments[node].outputs:  # all its elements, in order
                inputs += tuple(_element(plan, f"{node}:{o}", f"{entry}.inputs", nodes)
                                for o in plan.segments[node].output_names)
                expanded = True
            else:
                inputs += (node,)
        if expanded and "merge" in seg.model_fields_set and seg.merge != "module":
            raise PlanError(f"segment {name!r} takes every output of a segment as its arguments, so it cannot "
                            f"merge them by {seg.merge!r}", entry=f"{entry}.merge",
                            hint="leave merge out, or name one element as 'segment:name'")
        for ref in inputs:
            if "." in ref and nodes[ref].party != seg.party:
                raise PlanError(f"raw data {ref!r} of party {nodes[ref].party!r} would be sent to {seg.party!r}",
                                entry=f"{entry}.inputs",
                                hint=f"raw features never leave their party: add a segment at {nodes[ref].party!r} first")
        nodes[name] = Node(name, seg.party, "segment", inputs, merge="module" if expanded else "")
    for name, loss in plan.losses.items():
        entry = f"losses.{name}"
        src = _resolve(plan, loss.input, f"{entry}.input", nodes)
        if "." in src:
            raise PlanError(f"a loss takes the output of a segment, not the data field {src!r}", entry=f"{entry}.input",
                            hint=f"name one of the segments {sorted(plan.segments)}")
        if ":" not in src and plan.segments[src].outputs:
            known = plan.segments[src].output_names
            raise PlanError(f"segment {src!r} gives several outputs {known}: a loss takes one", entry=f"{entry}.input",
                            hint=f"name one as {src + ':' + known[0]!r}")
        if "." not in loss.target:
            raise PlanError(f"the loss target {loss.target!r} is not held by anybody", entry=f"{entry}.target",
                            hint="name the field holding the labels as 'party.field', e.g. 'hospital.y'")
        target = _resolve(plan, loss.target, f"{entry}.target", nodes, role="target")
        for what in ("pipeline", "accumulate"):  # micro-batches and batches of a group count by rows, not tokens
            if getattr(plan.train, what) > 1 and _loss_kind(loss.kind).tokens:
                raise PlanError(f"loss {name!r} ({loss.kind}) is a mean over tokens, and {what} = "
                                f"{getattr(plan.train, what)} would weigh its parts by their rows: not the gradient "
                                "of the whole's token mean", entry=f"train.{what}",
                                hint=f"leave {what} at 1 for a language model's loss (a larger batch_size instead)")
        nodes[name] = Node(name, nodes[src].party, "loss", (src, target))

    order = _toposort(nodes)

    # wires: one per (source node, destination party)
    consumers: dict[tuple[str, str], list[str]] = {}
    for n in order:
        for d in nodes[n].inputs:
            if nodes[d].party != nodes[n].party:
                consumers.setdefault((d, nodes[n].party), []).append(n)
    wires = []
    for (src, dst_party), users in consumers.items():
        segment = nodes[src].inputs[0] if nodes[src].kind == "output" else src  # an element: its own or its segment's
        spec = plan.wires.get(src) or plan.wires.get(segment) or WireSpec()
        carries = "label" if nodes[src].kind == "input" else "activation"
        if carries == "label" and spec.codec != "float32":
            raise PlanError(f"{src!r} is a label wire: labels travel exactly, so codec {spec.codec!r} does not apply "
                            "to it", entry=f"wires.{src}.codec", hint="put codecs on activation wires")
        vary = ()
        if nodes[src].kind == "output":
            vary = tuple(sorted(plan.segments[segment].outputs[nodes[src].element].vary.items()))
        elif any(nodes[u].kind == "loss" and _loss_kind(plan.losses[u].kind).tokens for u in users):
            vary = _token_bound(plan, src)  # a language model's labels: a sequence per row
        wires.append(Wire(name=f"{src}->{'+'.join(users)}", src=src, src_party=nodes[src].party, dst_party=dst_party,
                          carries=carries, consumers=tuple(users), spec=spec, vary=vary,
                          masked=any(nodes[u].kind == "segment" and plan.segments[u].merge == "secure_sum" for u in users)))
    g = Graph(plan, nodes, order, wires)
    for w in wires:
        validate_defenses(g, w)  # each defense's own structural checks
    from .securesum import check_secure_sums  # here: it needs torch, which a plan read for --help does not

    check_secure_sums(g)
    for key in plan.wires:
        if not any(w.src == key or w.src.split(":")[0] == key for w in wires):
            raise PlanError(f"no wire leaves {key!r}", entry=f"wires.{key}",
                            hint=f"wire settings are keyed by their source; wires leave {sorted({w.src for w in wires})}")

    # every segment must lead to a loss, every party must have something to do
    feeds_loss = {n for n in nodes if nodes[n].kind == "loss"}
    for n in reversed(order):
        if any(n in nodes[u].inputs for u in feeds_loss):
            feeds_loss.add(n)
    for name in plan.segments:
        if name not in feeds_loss:
            raise PlanError(f"segment {name!r} feeds no loss, so it would never train", entry=f"segments.{name}",
                            hint="use it as an input of a later segment or a loss, or remove it")
    busy = {node.party for node in nodes.values()}
    for party in plan.parties:
        if party not in busy:
            raise PlanError(f"party {party!r} has nothing to do: it runs no segment and none of its data is used",
                            entry=f"parties.{party}", hint="remove the party or give it a segment or a field that is used")
        unused = [f for f in plan.parties[party].holds if f"{party}.{f}" not in nodes]
        if unused:
            raise PlanError(f"party {party!r} holds {unused} but nothing uses it", entry=f"parties.{party}.holds",
                            hint="remove the field or use it as a segment input or loss target")

    g.stages = _stages(g)
    return g
