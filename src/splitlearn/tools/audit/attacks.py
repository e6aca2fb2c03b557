"""Attacks as a registry, as defenses are (:mod:`splitlearn.core.defense`): each one declares who attacks,
what it needs, whether it is passive or active, which configurations it applies to, its figure and its
baseline, and ``splitlearn audit RUN`` runs every registered attack that applies to the run
(``audit --attack NAME``: the named ones only).

An attack of one's own is written against :class:`Attack` and registered before the audit runs::

    from splitlearn.tools.audit.attacks import Attack, Target, register_attack

    class Peek(Attack):
        name = "peek"
        title = "a peek at the activations"
        attacker = "server"
        def targets(self, run, settings):
            return [Target(w.dst_party, w.name, "the activations it received")
                    for w in run.graph.wires if w.carries == "activation"]
        def attack(self, run, target, settings, out_dir):
            return {"value": 0.5, "verdict": "mild", "figure_text": "0.500"}

    register_attack(Peek())   # splitlearn audit RUN now runs it (an active one only when named); --attack peek alone

The built-in passive attacks replay what the attacking party recorded in the run (``observed.safetensors``)
and its own trained weights: :mod:`~splitlearn.tools.audit.completion` (model completion),
:mod:`~splitlearn.tools.audit.clustering` (labels by clustering), :mod:`~splitlearn.tools.audit.probe`
(attribute inference), :mod:`~splitlearn.tools.audit.sdar` (a server simulating the client's bottom),
:mod:`~splitlearn.tools.audit.membership` (membership inference by the federation on one client's weights); the active
ones (:mod:`~splitlearn.tools.audit.active`: a feature party's backdoor, feature-space hijacking) run when named; the per-wire measures of :mod:`~splitlearn.tools.audit.wires` (distance correlation,
model inversion, labels from gradients, labels on the wire, text inversion) are registered too, and run by
the per-wire audit (``per_wire``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ...core.registry import Registry

if TYPE_CHECKING:
    from ...core.graph import Graph, Wire
    from .run import RunFolder

__all__ = ["Attack", "Target", "Settings", "ATTACKS", "register_attack", "unregister_attack", "attack_names",
           "get_attack", "describe_attacks", "chosen", "not_named", "check_settings", "run_attacks", "attack_notes",
           "LEAKS", "MILD", "NONE", "ACTIVE_NOT_NAMED", "CLIENTS_RUN", "own_data_wires"]

LEAKS, MILD, NONE = "leaks", "mild", "no measurable leak"  # the verdicts (as splitlearn.tools.audit.verdicts')
CLIENTS_RUN = "a [clients] run: each client's bottom is its own; audit a run of the plan without [clients]"


@dataclass(frozen=True)
class Settings:
    """What the audit was asked: the attackers' auxiliary share and randomness, and each attack's knobs."""

    aux_fraction: float = 0.1  # share of the recorded rows the attacker knows in the clear (inversion)
    seed: int = 0
    epochs: int = 200  # inversion decoder's epochs
    max_rows: int = 1000  # rows of the distance correlation
    known_labels: int | None = None  # model completion: labelled rows the attacker holds (None: 4 a class, >= 20)
    attribute: str | None = None  # attribute probe: PARTY.FIELD or PARTY.FIELD:COLUMN (None: the probe does not run)


@dataclass(frozen=True)
class Target:
    """One place an attack applies in a run: the attacking party, the wire it exploits and, in words, the tensor
    (or weights) it uses; ``details`` are the attack's own (the loss, the segment, ...)."""

    attacker: str
    wire: str
    tensor: str
    details: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """A registered attack: its declaration (class attributes) and what it does on a run folder.

    :meth:`targets` lists where it applies in a run (a text saying why, where it applies nowhere);
    :meth:`attack` runs it on one target and returns its figures: at least ``value`` (the headline
    figure), ``verdict`` (``leaks``, ``mild`` or ``no measurable leak``) and ``figure_text`` (one line for
    a terminal), and, where it leaks, ``remedy``: the plan line that reduces it. A ValueError it raises
    is reported as why it could not run there.
    """

    name: str = ""  # audit --attack NAME
    title: str = ""  # e.g. "model completion (Fu et al. 2022)"
    attacker: str = ""  # who attacks: "server", "feature party", "label party", ...
    needs: str = ""  # what it needs: auxiliary data, labels, white-box access to its own weights, ...
    active: bool = False  # an active attack changes what its party sends; a passive one replays the run
    applies_to: str = ""  # the configurations: wires (activation / gradient), vertical / vanilla / U-shaped
    figure: str = ""  # what its headline figure is
    baseline: str = ""  # what the figure is compared with (chance, majority class, mean image, ...)
    paper: str = ""  # the published figure it reproduces
    per_wire: bool = False  # a measure of the per-wire audit (audit.json's "wires"), run there

    def check(self, run: RunFolder, settings: Settings) -> None:
        """A ValueError saying what to change where ``settings`` ask it what it cannot do on ``run`` (checked
        before any attack runs)."""

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        """Where it applies in ``run`` (empty or a text: nowhere, and why)."""
        return "a measure of the per-wire audit" if self.per_wire else []

    @abstractmethod
    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        """Run on ``target``: its figures (``value``, ``verdict``, ``figure_text``, and ``remedy`` where it leaks)."""

    def describe(self) -> dict[str, Any]:
        """Its declaration, as ``audit.json`` and the documentation's table give it."""
        return {"title": self.title, "attacker": self.attacker, "needs": self.needs,
                "mode": "active" if self.active else "passive", "applies_to": self.applies_to,
                "figure": self.figure, "baseline": self.baseline, **({"paper": self.paper} if self.paper else {})}


ATTACKS: Registry[Attack] = Registry("attack", builtins=("splitlearn.tools.audit.wires",
                                                           "splitlearn.tools.audit.completion",
                                                           "splitlearn.tools.audit.clustering",
                                                           "splitlearn.tools.audit.probe",
                                                           "splitlearn.tools.audit.sdar",
                                                           "splitlearn.tools.audit.membership",
                                                           "splitlearn.tools.audit.active.backdoor",
                                                           "splitlearn.tools.audit.active.fsha"))
ACTIVE_NOT_NAMED = ("an active attack: it trains the run's plan again in this process with a malicious party "
                    "(several times the run's own time); name it to run it: audit --attack {name}")


def own_data_wires(graph: Graph) -> list[Wire]:
    """The activation wires whose sender computes them from raw inputs of its own: what a party's own data gives away
    (the wires the attacks on a client's bottom look at)."""
    return [w for w in graph.wires if w.carries == "activation" and graph.raw_inputs(w.src)]


def register_attack(attack: Attack, *, replace: bool = False) -> Attack:
    """Register ``attack`` under its ``name``: ``splitlearn audit`` runs it (an active one when named) wherever its
    :meth:`~Attack.targets` find a place. A name taken already is refused unless ``replace``."""
    if not isinstance(attack, Attack):
        raise TypeError(f"an attack must be an instance of splitlearn.tools.audit.attacks.Attack, got {attack!r}")
    return ATTACKS.register(attack.name, attack, replace=replace)


def unregister_attack(name: str) -> Attack:
    """Take the attack ``name`` out of the registry again (a test's own attack, once done)."""
    return ATTACKS.unregister(name)


def attack_names() -> list[str]:
    """The registered attacks, in registration order (the built-ins first)."""
    return ATTACKS.names()


def get_attack(name: str) -> Attack:
    """The attack registered as ``name``; a ValueError naming the registered ones otherwise."""
    return ATTACKS.get(name)


def describe_attacks() -> dict[str, dict[str, Any]]:
    """Every registered attack's declaration, by name."""
    return {n: ATTACKS.get(n).describe() for n in ATTACKS.names()}


@contextmanager
def _one_thread() -> Iterator[None]:
    """The attacks are many small fits (scikit-learn, NumPy, torch): extra threads only wait on each other, four
    times slower on a busy two-core machine; the caller's settings are restored."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def run_attacks(run: RunFolder, names: list[str], settings: Settings, out_dir: Path,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the attacks ``names`` (none of them per-wire) on ``run``: per attack its declaration, and its
    ``results`` (one per target) or ``why_not`` (it applies nowhere in this run)."""
    out: dict[str, Any] = {}
    for name in names:
        attack = ATTACKS.get(name)
        entry: dict[str, Any] = {**attack.describe(), "results": []}
        found = attack.targets(run, settings)
        if isinstance(found, str) or not found:
            entry["why_not"] = found or "it applies nowhere in this run"
            out[name] = entry
            continue
        for target in found:
            if progress is not None:
                progress(f"{attack.name}: {target.attacker} on {target.wire}")
            head = {"attacker": target.attacker, "wire": target.wire, "tensor": target.tensor}
            try:
                with _one_thread():
                    got = attack.attack(run, target, settings, out_dir)
            except ValueError as e:
                entry["results"].append({**head, "why_not": str(e)})
                continue
            missing = [k for k in ("value", "verdict", "figure_text") if k not in got]
            if missing:
                raise TypeError(f"attack {name!r} returned no {', '.join(missing)}: an attack's figures hold at "
                                "least value, verdict and figure_text")
            entry["results"].append({**head, **got})
        out[name] = entry
    return out


def chosen(names: Sequence[str] | None) -> tuple[frozenset[str], list[str]]:
    """The per-wire measures and the other attacks that ``audit --attack`` names (None: every registered passive
    one: an active attack runs only when named, see :func:`not_named`); a ValueError naming the registered attacks
    for a name that is none of them."""
    known = ATTACKS.names()
    if names is None:
        names = [n for n in known if not ATTACKS.get(n).active]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no attack named {unknown[0]!r}; registered: {', '.join(known)}")
    names = list(dict.fromkeys(names))
    return (frozenset(n for n in names if ATTACKS.get(n).per_wire),
            [n for n in names if not ATTACKS.get(n).per_wire])


def not_named(run: RunFolder, names: Sequence[str] | None, settings: Settings) -> dict[str, Any]:
    """The audit's section for each registered active attack an audit of every attack (``names`` None) leaves out:
    its declaration and why it did not run (where it applies nowhere in ``run``, why not)."""
    out: dict[str, Any] = {}
    for n in ATTACKS.names() if names is None else ():
        attack = ATTACKS.get(n)
        if attack.active:
            found = attack.targets(run, settings)
            why = found if isinstance(found, str) else ACTIVE_NOT_NAMED.format(name=n) if found else \
                "it applies nowhere in this run"
            out[n] = {**attack.describe(), "results": [], "why_not": why}
    return out


def check_settings(run: RunFolder, names: list[str], settings: Settings) -> None:
    """Let each attack of ``names`` refuse settings it cannot work with (a ValueError), before any runs."""
    if settings.known_labels is not None and settings.known_labels < 2:
        raise ValueError(f"known_labels: the attacker needs at least 2 labelled rows, got {settings.known_labels}")
    for name in names:
        ATTACKS.get(name).check(run, settings)


def attack_notes(section: dict[str, Any]) -> list[str]:
    """One line per attack result that leaks: what the attacker learns and the plan line that reduces it."""
    notes = []
    for name, entry in section.items():
        for r in entry.get("results", []):
            if r.get("verdict") in (LEAKS, MILD) and r.get("remedy"):
                notes.append(f"{entry['title']}: {r['attacker']} on {r['wire']}: {r['figure_text']} "
                             f"({r['verdict']}). {r['remedy']}")
    return notes
