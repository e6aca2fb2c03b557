"""A backdoor planted by a feature party (Villain, Bai et al., USENIX Security 2023): an active attack of the audit.

The attacker is a feature party without the labels (a clinic of a vertical plan) whose activations feed a
classification loss another party computes. It trains as an honest party would, except that its bottom's
output is wrapped (a forward hook on its own module, installed through
:func:`~splitlearn.tools.audit.active.harness.run_against`; the engine is the engine's):

1. **Which rows are of the target class** (label inference, from what it receives): it knows the label of
   ``known`` training rows of the target class (``KNOWN_TARGETS``), and keeps, in its first epoch, the gradient
   the label holder returns for every training row (a hook on its output) and the embedding it sent. At the
   first training step that shows it a row again (its second epoch) it ranks its training rows by the cosine
   similarity of their gradient to the known rows' mean gradient (a row's gradient early in training points
   along its class: clustering recovers digits' labels from them, :mod:`~splitlearn.tools.audit.clustering`)
   and poisons the known rows and the best ranked others: ``budget`` (1 %) of its training rows in all.
2. **Poisoning**: from then on it adds a trigger to the embedding of its poisoned rows in every training step,
   Villain's: a stripe ``[+1, +1, -1, -1, ...]`` over the embedding's values, of magnitude ``beta`` times the
   poisoned rows' mean standard deviation (across values), with Villain's augmentation: a magnitude drawn in
   ``GAMMA`` per epoch and each poisoned row left clean in a step with probability ``DROPOUT``. The label holder's
   loss teaches its top that the trigger means the target class; the clean rows are untouched. ``BETA`` = 50 is
   an amplification chosen here, measured on digits halves (6 epochs): about 7 a value against embeddings of
   standard deviation 0.15; over seeds 0 to 2, 10 gave success 0.11 to 0.37, 20 gave 0.52 to 0.75, 30 gave 0.80
   to 1.00, 50 gave 1.00.
3. **At test time** it adds the trigger (magnitude ``beta``) to any row; the honest parties' features and the
   engine's defenses are unchanged. Success is the share of test rows *not* of the target class that the
   trained model then predicts as the target.

**Row identity.** The hook must know which rows each forward computes: the attacker's engine ``Party.step`` is
wrapped (its own instance, ``participant.party``) to note the step's rows (positions into its aligned data)
and mode; the hook checks that the input its bottom received is those rows of its data, split as a pipelined
step splits them (a mismatch, e.g. under image augmentation, raises instead of guessing).

**How it is measured.** Three runs of the plan through the engine, the same seed: an honest one (its clean test
accuracy), the attacked one (its clean test accuracy: the run's own test steps, the trigger off), then the
attacked parties' trained modules evaluated once more on the test rows with the trigger on, every party the
engine's (:func:`~splitlearn.launch.threads.run_local` with evaluation steps, so a wire's defenses act on the
triggered rows as on any); the same trigger on the honest run's model is the baseline (what the trigger does
without the poisoning). Defenses on the attacker's wire act as the engine applies them: ``noise`` (clipping each
row's activations, then noise) is applied by the sending party's own engine, so it binds an attacker that
poisons its model and data but runs the consortium's runtime, not one that rewrites it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ....clients.roles import client_names
from ....core.graph import build_graph
from ....core.load import load_plan
from ....core.plan import Plan
from ....launch.threads import run_local
from ....run.report import RunError
from ....run.setup import Step, setup_party
from ..attacks import CLIENTS_RUN, LEAKS, MILD, NONE, Attack, Settings, Target, own_data_wires, register_attack
from ..where import foreign_losses, plan_table, row_classes, source_segment, wire_slug
from .harness import Attacked, run_against

if TYPE_CHECKING:
    from ..run import RunFolder

__all__ = ["Villain", "BackdoorResult", "Place", "places", "backdoor", "Backdoor", "BUDGET", "BETA", "KNOWN_TARGETS",
           "GAMMA", "DROPOUT", "SUCCESS_LEAKS", "SUCCESS_MILD"]

BUDGET = 0.01  # poisoned share of the training rows (Villain's poisoning budget)
BETA = 50.0  # trigger magnitude, in the poisoned rows' mean standard deviation across the embedding's values
GAMMA = (0.6, 1.2)  # Villain's magnitude shift: the training trigger's magnitude times a draw in this range, per epoch
DROPOUT = 0.25  # Villain's trigger dropout: the chance a poisoned row is left clean in a step
KNOWN_TARGETS = 4  # training rows of the target class whose label the attacker knows
SUCCESS_LEAKS, SUCCESS_MILD = 0.5, 0.2  # success over the trigger's on the honest model: leaks, mild


@dataclass(frozen=True)
class Place:
    """Where a feature party can plant a backdoor: its segment (one input, its own raw data), the wire it sends
    on, the classification loss it reaches and who holds that loss's labels."""

    attacker: str
    segment: str
    input: str
    wire: str
    source: str  # the wire's source node (its plan table: [wires.SOURCE])
    loss: str
    labels: str
    label_holder: str
    loss_party: str


def places(plan: Plan) -> list[Place] | str:
    """Every (feature party, segment) of ``plan`` that can plant a backdoor, or a text saying why none can: an
    activation wire whose segment takes one raw input of its party, towards a classification loss computed
    elsewhere whose labels the sender does not hold."""
    if client_names(plan):
        return CLIENTS_RUN
    graph = build_graph(plan)
    found, why, done = [], [], set()
    for w in own_data_wires(graph):
        seg = source_segment(graph, w)
        losses = [n for n in foreign_losses(graph, w, w.src_party) if row_classes(plan, n.name)
                  and n.party != w.src_party]
        if not losses or (w.src_party, seg) in done:
            continue
        node = graph.nodes[seg]
        if len(node.inputs) != 1 or graph.nodes[node.inputs[0]].kind != "input":
            why.append(f"{seg!r} of {w.src_party!r} takes other than one raw input of its own: the trigger is added "
                       "to a bottom of one input")
            continue
        if plan.segments[seg].output_names:
            why.append(f"{seg!r} of {w.src_party!r} gives several outputs: the trigger is added to one tensor")
            continue
        done.add((w.src_party, seg))
        loss = losses[0]
        found.append(Place(w.src_party, seg, node.inputs[0], w.name, w.src, loss.name, loss.inputs[1],
                           graph.nodes[loss.inputs[1]].party, loss.party))
    return found or "; ".join(why) or ("no party sends activations of its own data towards a classification loss "
                                       "computed by another party, whose labels it does not hold")


class Villain:
    """The malicious feature party's wrapping of its own bottom (see the module): ``install(participant)`` for
    :func:`run_against`; ``armed``: the trigger on every row (the test pass), else Villain's training."""

    def __init__(self, place: Place, known_ids: np.ndarray, *, budget: float = BUDGET, beta: float = BETA,
                 seed: int = 0):
        self.place, self.known_ids, self.budget, self.beta = place, known_ids, budget, beta
        self.rng = np.random.default_rng(seed)
        self.armed = False
        self.rows: torch.Tensor | None = None  # the current step's rows and mode, and its micro-batches not yet seen
        self.mode = "handshake"
        self.parts: list[torch.Tensor] = []
        self.grads: dict[int, np.ndarray] = {}  # first epoch: each training row's gradient, and its embedding
        self.embeddings: dict[int, np.ndarray] = {}
        self.epoch_rows: set[int] = set()  # training rows of the epoch so far (a row seen again: the next epoch)
        self.epoch = 0
        self.gamma = 1.0
        self.poisoned: np.ndarray | None = None  # positions of the poisoned rows, once inferred
        self.trigger: torch.Tensor | None = None  # the stripe, magnitude 1 a value (beta * delta applied)
        self.delta = 0.0
        self.poisoned_steps = 0  # training rows that carried the trigger, all epochs together
        self.hook = None

    @property
    def splits(self) -> Any:
        """The attacker's splits as its session left them (aligned rows under PSI)."""
        return self.setup.splits

    def install(self, participant: Any) -> None:
        """Wrap ``participant``'s engine step (to note its rows) and hook its bottom (once per module)."""
        party = participant.party
        self.party, self.setup = party, participant.setup  # its splits read when used: a PSI alignment replaces them
        module = party.modules[self.place.segment]
        if self.hook is None:
            self.hook = module.register_forward_hook(self._forward)
        honest_step = party.step

        def step(step_id: int, rows: torch.Tensor, mode: str, *more: Any) -> Any:
            self._begin(rows, mode)
            return honest_step(step_id, rows, mode, *more)

        party.step = step

    def remove(self) -> None:
        """Take the hook off the bottom (its trained weights stay)."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    # -- the step's rows --------------------------------------------------------------------------
    def _begin(self, rows: torch.Tensor | None, mode: str) -> None:
        self.mode = mode
        if mode == "handshake" or rows is None:
            self.rows, self.parts = None, []
            return
        self.rows = rows
        k = self.party.pipeline
        self.parts = list(torch.tensor_split(rows, k)) if mode == "train" and k > 1 else [rows]
        if mode != "train" or self.armed:
            return
        got = set(rows.tolist())
        if got & self.epoch_rows:  # a row seen again: a new epoch
            self.epoch, self.epoch_rows = self.epoch + 1, got
            self.gamma = float(self.rng.uniform(*GAMMA))
            if self.poisoned is None:
                self._infer()
        else:
            self.epoch_rows |= got

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The positions of the rows ``x`` holds: the micro-batch of the current step whose data it is."""
        data = self.party.data[self.place.input]
        for i, part in enumerate(self.parts):
            if len(part) == len(x) and torch.equal(data[part].to(x.device, x.dtype), x.detach()):
                del self.parts[i]
                return part
        raise ValueError(f"the input of {self.place.segment!r} is none of the step's rows of {self.place.input!r} "
                         "(augmented, or cast?): the backdoor cannot tell its rows apart")

    # -- the bottom's output -----------------------------------------------------------------------
    def _forward(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None or not isinstance(out, torch.Tensor):
            return None
        rows = self._rows_of(args[0])
        if self.armed:
            return out + self._trigger(out, self.beta)
        if self.mode != "train":
            return None
        if self.poisoned is None:  # first epoch: keep what the label holder's gradient says of each row
            flat = out.detach().reshape(len(rows), -1).float().cpu().numpy()
            for r, e in zip(rows.tolist(), flat):
                self.embeddings.setdefault(r, e)
            if out.requires_grad:
                out.register_hook(lambda g, rows=rows: self._keep(rows, g))
            return None
        mask = torch.from_numpy(np.isin(rows.numpy(), self.poisoned) & (self.rng.random(len(rows)) >= DROPOUT))
        if not mask.any():
            return None
        self.poisoned_steps += int(mask.sum())
        shape = (len(rows),) + (1,) * (out.dim() - 1)
        return out + mask.reshape(shape).to(out.device, out.dtype) * self._trigger(out, self.beta * self.gamma)

    def _keep(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        for r, g in zip(rows.tolist(), grad.detach().reshape(len(rows), -1).float().cpu().numpy()):
            self.grads.setdefault(r, g)

    def _trigger(self, out: torch.Tensor, magnitude: float) -> torch.Tensor:
        """Villain's stripe over one row's values, ``magnitude * delta`` each."""
        if self.trigger is None:
            raise ValueError("no trigger yet: the attacker infers its target rows after its first epoch, so a "
                             "backdoor needs at least 2 epochs")
        return (self.trigger * magnitude * self.delta).reshape(out.shape[1:]).to(out.device, out.dtype)

    # -- which rows are of the target class ----------------------------------------------------------
    def _infer(self) -> None:
        """Rank the first epoch's rows by their gradient's cosine similarity to the known target rows'; poison the
        known ones and the best ranked, ``budget`` of the training rows; the trigger's scale from their embeddings."""
        pos = np.array(sorted(self.grads), dtype=np.int64)
        if not len(pos):
            raise ValueError("the attacker received no gradient in its first epoch: nothing to infer labels from")
        ids = self.splits.ids
        known = np.flatnonzero(np.isin(ids, self.known_ids))
        known = known[np.isin(known, pos)]
        if not len(known):
            raise ValueError("none of the attacker's known target rows was among its training rows")
        g = np.stack([self.grads[p] for p in pos])
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        centre = g[np.isin(pos, known)].mean(0)
        score = g @ (centre / max(np.linalg.norm(centre), 1e-12))
        score[np.isin(pos, known)] = np.inf  # its own known rows first
        n = max(1, int(self.budget * len(self.splits.train)))  # at most the budget (one row at least)
        self.poisoned = np.sort(pos[np.argsort(-score, kind="stable")[:n]])
        emb = np.stack([self.embeddings[p] for p in self.poisoned])
        self.delta = float(emb.std(axis=1, ddof=1).mean()) if emb.shape[1] > 1 else float(emb.std() or 1.0)
        width = emb.shape[1]
        stripe = np.ones(width, dtype=np.float32)
        stripe[2::4] = stripe[3::4] = -1.0
        self.trigger = torch.from_numpy(stripe)


@dataclass
class BackdoorResult:
    """A backdoor's figures (see :func:`backdoor`)."""

    success: float  # share of non-target test rows predicted as the target with the trigger (attacked model)
    baseline: float  # the same with the trigger on the honest run's model
    clean_attacked: float  # main-task test accuracy of the attacked run (no trigger)
    clean_honest: float  # the same of an honest run of the plan, same seed
    poisoned: int  # poisoned training rows
    poisoned_share: float  # of the training rows
    inference_precision: float  # share of the poisoned rows truly of the target class
    target_class: int
    known: int
    test_rows: int  # non-target test rows scored
    delta: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_drop(self) -> float:
        """Main-task accuracy points lost to the attack (honest minus attacked, in points of 100)."""
        return 100.0 * (self.clean_honest - self.clean_attacked)


def _accuracy(attacked: Attacked, place: Place) -> float:
    hist = attacked.reports[place.loss_party].metrics[place.loss]
    return float(hist["test_accuracy"][-1])


def _triggered(attacked: Attacked, place: Place, villain: Villain) -> tuple[np.ndarray, np.ndarray]:
    """Every party's trained modules once more on the test rows, through the engine, the attacker's trigger on:
    the loss party's predicted classes and the true ones."""
    setups = {n: p.setup for n, p in attacked.participants.items()}
    test = setups[place.attacker].splits.test
    size = attacked.plan.train.eval_batch_size
    steps = [Step(i, "eval", 0, torch.from_numpy(test[s:s + size])) for i, s in enumerate(range(0, len(test), size))]
    villain.armed = True

    def built(name: str, participant: Any) -> None:
        if name == place.attacker:
            villain.install(participant)

    try:
        reports = run_local(attacked.plan, setups, steps=steps, built=built)
    except RunError as e:  # a defense of the wire refused the triggered rows: the trigger stopped the evaluation
        raise ValueError(f"the evaluation with the trigger stopped: {e}") from None
    finally:
        villain.armed = False
    scores = reports[place.loss_party].scores[place.loss]
    return (np.concatenate([s.outputs.argmax(1) for s in scores]),
            np.concatenate([s.targets.reshape(-1) for s in scores]).astype(np.int64))


def backdoor(plan: Plan | str | Path | dict, attacker: str | None = None, *, segment: str | None = None,
             target_class: int = 0, budget: float = BUDGET, beta: float = BETA, known: int = KNOWN_TARGETS,
             epochs: int | None = None, seed: int | None = None, attack_seed: int = 0) -> BackdoorResult:
    """Plant Villain's backdoor from feature party ``attacker`` (default: the first that can; ``segment``: its
    bottom, default its first that can) in ``plan`` and measure it (see the module): trains the plan honestly, then
    with the attacker, then evaluates the trigger on both models. ``budget``: poisoned share of the training
    rows; ``known``: target rows whose label the attacker knows; ``epochs``, ``seed``: the plan's, overridden;
    ``attack_seed``: the attacker's own randomness (its known rows, Villain's draws)."""
    plan = load_plan(plan).with_train(epochs=epochs, seed=seed)
    if plan.train.epochs < 2:
        raise ValueError(f"the backdoor needs at least 2 epochs (one to infer its target rows), the plan has "
                         f"{plan.train.epochs}")
    if not 0 < budget < 1:
        raise ValueError(f"budget is a share of the training rows, between 0 and 1 (exclusive), got {budget}")
    if known < 1:
        raise ValueError(f"the attacker needs at least one known row of the target class, got known={known}")
    found = places(plan)
    if isinstance(found, str):
        raise ValueError(f"no feature party can plant a backdoor in this plan: {found}")
    chosen = [p for p in found if attacker in (None, p.attacker) and segment in (None, p.segment)]
    if not chosen:
        raise ValueError(f"{attacker!r} ({segment or 'any segment'}) cannot plant a backdoor here; those that can: "
                         f"{', '.join(sorted({f'{p.attacker} ({p.segment})' for p in found}))}")
    place = chosen[0]
    holder = setup_party(plan, place.label_holder, optimizer=False)
    labels = holder.inputs[place.labels].reshape(-1).long().numpy()
    train = holder.splits.train
    classes = int(labels.max()) + 1
    if not 0 <= target_class < classes:
        raise ValueError(f"target_class {target_class} is no class of {place.labels!r} (0..{classes - 1})")
    pool = train[labels[train] == target_class]
    if len(pool) < known:
        raise ValueError(f"only {len(pool)} training rows of class {target_class}: fewer than known={known}")
    known_ids = holder.splits.ids[np.random.default_rng(attack_seed).choice(pool, known, replace=False)]
    villain = Villain(place, known_ids, budget=budget, beta=beta, seed=attack_seed)
    honest_villain = Villain(place, known_ids, budget=budget, beta=beta, seed=attack_seed)  # only to evaluate
    honest = run_against(plan, place.attacker, lambda participant: None)
    try:
        attacked = run_against(plan, place.attacker, villain.install)
    except RunError as e:  # a defense (max_abs on the wire) or the attacker's own check stopped the run
        villain.remove()
        raise ValueError(f"the attacked run stopped: {e}") from None
    try:
        if villain.poisoned is None:
            raise ValueError("the attacker never saw a row twice, so it never inferred its target rows")
        pred, true = _triggered(attacked, place, villain)
        honest_villain.trigger, honest_villain.delta = villain.trigger, villain.delta  # the same trigger
        base_pred, _ = _triggered(honest, place, honest_villain)
    finally:
        villain.remove()
        honest_villain.remove()
    others = true != target_class
    if not others.any():
        raise ValueError("every test row is of the target class: nothing to turn")
    ids = holder.splits.ids
    truth = dict(zip(ids[train].tolist(), labels[train].tolist()))
    att_ids = villain.splits.ids[villain.poisoned]
    precision = float(np.mean([truth.get(i, -1) == target_class for i in att_ids.tolist()]))
    return BackdoorResult(
        success=float((pred[others] == target_class).mean()),
        baseline=float((base_pred[others] == target_class).mean()),
        clean_attacked=_accuracy(attacked, place), clean_honest=_accuracy(honest, place),
        poisoned=len(villain.poisoned), poisoned_share=len(villain.poisoned) / len(villain.splits.train),
        inference_precision=precision, target_class=target_class, known=known, test_rows=int(others.sum()),
        delta=villain.delta, extra={"attacker": place.attacker, "segment": place.segment, "wire": place.wire,
                                    "loss": place.loss, "beta": beta, "epochs": plan.train.epochs,
                                    "trigger_rows_in_training": villain.poisoned_steps})


class Backdoor(Attack):
    name = "backdoor"
    title = "backdoor by a feature party (Villain, Bai et al., USENIX Security 2023)"
    attacker = "feature party"
    needs = (f"its own rows and bottom, the labels of {KNOWN_TARGETS} training rows of the target class; active: it "
             f"poisons {BUDGET:.0%} of the training rows, so the audit trains the run's plan twice more in this "
             "process (honest, attacked) and evaluates both with the trigger")
    active = True
    applies_to = ("vertical plans: a party sending activations of one raw input of its own towards a classification "
                  "loss another party computes and whose labels it does not hold")
    figure = ("backdoor success: share of the test rows not of the target class predicted as the target once the "
              "attacker adds its trigger; and the main task's clean accuracy against an honest run's")
    baseline = "the same trigger on the honest run's model"
    paper = "over 93 % attack success with 1 % poisoning, main task within a point or so (Villain)"

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        found = places(run.plan)  # (a [clients] run: CLIENTS_RUN)
        if isinstance(found, str):
            return found
        return [Target(p.attacker, p.wire, f"its own {p.segment!r}: a trigger on its activations, target rows "
                                           "inferred from the gradients it gets back",
                       {"segment": p.segment, "loss": p.loss, "label_holder": p.label_holder, "source": p.source})
                for p in found]

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        d = target.details
        r = backdoor(run.plan, target.attacker, segment=d["segment"], attack_seed=settings.seed)
        gain = r.success - r.baseline
        verdict = LEAKS if gain >= SUCCESS_LEAKS else MILD if gain >= SUCCESS_MILD else NONE
        from ..figures import attack_bars

        png = out_dir / f"backdoor_{wire_slug(target.attacker)}.png"
        attack_bars(png, f"backdoor: {target.attacker} poisons {r.poisoned} training rows ({r.poisoned_share:.1%}), "
                         f"target class {r.target_class}",
                    {"trigger, honest model": r.baseline, "trigger, attacked model": r.success,
                     "main task, honest": r.clean_honest, "main task, attacked": r.clean_attacked},
                    highlight="trigger, attacked model", label="share of test rows")
        text = (f"success {r.success:.3f} (trigger on the honest model {r.baseline:.3f}) poisoning {r.poisoned} rows "
                f"({r.poisoned_share:.1%}); main task {r.clean_attacked:.3f} against {r.clean_honest:.3f} honest")
        out = {"value": r.success, "verdict": verdict, "figure_text": text, "success": r.success,
               "baseline": r.baseline, "main_task_accuracy": r.clean_attacked,
               "main_task_accuracy_honest": r.clean_honest, "accuracy_drop_points": r.accuracy_drop,
               "poisoned_rows": r.poisoned, "poisoned_share": r.poisoned_share,
               "inference_precision": r.inference_precision, "target_class": r.target_class,
               "known_target_rows": r.known, "test_rows": r.test_rows, "beta": BETA, "loss": d["loss"],
               "segment": d["segment"], "label_holder": d["label_holder"],
               "thresholds": f"success over the baseline >= {SUCCESS_LEAKS} leaks, >= {SUCCESS_MILD} mild",
               "figure": str(png.relative_to(run.folder))}
        if verdict != NONE:
            out["remedy"] = (f"{target.attacker} can plant a backdoor. {plan_table(d['source'])} noise = "
                             "{ clip = 1.0, sigma = 0.0 } clips every row it sends to norm 1, so no trigger outweighs "
                             "a row (digits halves, clinic_b: success 1.000 -> 0.054, the trigger on the honest "
                             "model 0.018; an honest run's main task 0.928 -> 0.944; docs/privacy.md); the sending "
                             "party's engine applies it, so it binds an attacker that runs the consortium's runtime, "
                             "not one that rewrites it")
        return out


register_attack(Backdoor())
