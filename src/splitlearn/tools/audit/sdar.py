"""SDAR (Zhu et al., "Passive inference attacks on split learning via adversarial regularization", NDSS 2025): an
honest-but-curious server with same-domain auxiliary data rebuilds a client's inputs (and, U-shaped, its labels)
from the activations it received.

Replayed over a finished run. The server holds what it recorded (``observed.safetensors``: the activations of
the client's training rows, each sample's last: the trained model), its own trained segment (white box on its
own part, ``parties/P/weights.safetensors``), the plan every party holds (the client's bottom architecture and,
as splitlearn derives every initial weight from the plan seed, its initial weights) and auxiliary rows of the
same domain with their labels that the client never trained on: the run's **test rows**, which no party trains
on and whose activations were never recorded (the audit checks that no auxiliary row is among the recorded
ones and refuses where fewer than :data:`MIN_AUX` are left). A plan with ``[data] test_fraction = 0.5`` gives
the server a disjoint half.

On those rows it trains (:func:`simulate`, :func:`train_decoder`):

- a **simulator** of the client's bottom, started from the client's initial weights (:data:`INIT`), so that its
  own trained segment (frozen) applied to the simulator's output fits the auxiliary labels (U-shaped, where the
  client keeps the head and the labels: through a **simulated head** trained alongside), while a
  **discriminator** learns to tell the simulator's outputs from the recorded activations and the simulator learns
  to fool it (SDAR's adversarial regularisation), and the quantiles of each unit of its outputs are matched,
  class by class, to the recorded ones' (the classes of the recorded rows: the labels the server received with
  them, vanilla; U-shaped, the simulated head's guesses, after a first round matched over every row);
- **decoders** (three, averaged) from the simulator's outputs back to the raw inputs.

The decoders are then applied to the recorded activations: the figure is the reconstruction MSE over the MSE of
guessing the auxiliary rows' mean image (as the ``inversion`` measure's), with the per-wire inversion decoder's
(trained on a paired share of the recorded rows, ``aux_fraction``) on the same rows beside it; U-shaped, also the
simulated head's label accuracy on the recorded rows, against the majority class.

The start matters (measured on digits, docs/privacy.md): from the client's initial weights, which the plan gives
every party, the simulator reaches 0.14 of the mean image's MSE and 0.99 of a U-shaped run's labels; from a fresh
draw (``INIT = "random"``, the paper's start, and what the server has where the client's initial weights are its
own secret), 0.30 (the inversion decoder's 0.31) and the labels not at all.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.dryrun import merge_inputs
from .attacks import CLIENTS_RUN, LEAKS, MILD, NONE, Attack, Settings, Target, own_data_wires, register_attack
from .measures import invert, latest_per_id, ssim
from .where import image_shape, plan_table, row_classes, wire_slug

if TYPE_CHECKING:
    from .run import RunFolder

__all__ = ["SDAR", "Simulation", "simulate", "Decoders", "train_decoder", "quantiles", "STEPS", "ADVERSARIAL", "MATCH",
           "QUANTILES", "MAX_BATCH", "AGAIN", "DECODER_EPOCHS", "DECODER_BATCH", "DECODERS", "INIT", "MIN_AUX", "MAX_AUX",
           "MSE_LEAKS", "MSE_MILD"]

STEPS = 150  # simulator steps (each on every auxiliary row, at most MAX_BATCH of them)
ADVERSARIAL = 0.1  # weight of the discriminator's verdict in the simulator's loss
MATCH = 100.0  # weight of the per-class quantiles of every unit matched to the recorded ones'
QUANTILES = 16
DECODER_EPOCHS = 60
DECODERS = 3  # decoders of different seeds, their reconstructions averaged
MAX_BATCH = 512
AGAIN = 0.4  # U-shaped: the share of STEPS trained again once the recorded rows have the simulated head's classes
DECODER_BATCH = 64
# where the simulator (and a U-shaped run's simulated head) start: "plan", the client's initial weights, which every
# party derives from the plan seed (models/build.py); "random", a fresh draw (the paper's; what the attacker has
# where the client's initial weights are its secret)
INIT = "plan"
MIN_AUX = 50  # auxiliary rows the attack needs at least
MAX_AUX = 4096  # and uses at most (drawn at random): the decoders' epochs stay a few seconds
MSE_LEAKS, MSE_MILD = 0.5, 0.9  # relative MSE (over the mean image's): as the inversion measure's verdicts


class Simulation:
    """What :func:`simulate` trained: the simulator of the client's bottom, (U-shaped) the simulated head, the
    discriminator, and the losses per step (``task``, ``match``, ``discriminator``)."""

    def __init__(self, simulator: nn.Module, head: nn.Module | None, discriminator: nn.Module,
                 history: dict[str, list[float]]):
        self.simulator, self.head, self.discriminator, self.history = simulator, head, discriminator, history


def _mlp(d_in: int, d_out: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, d_out))


def quantiles(values: torch.Tensor, k: int = QUANTILES) -> torch.Tensor:
    """``k`` evenly spaced quantiles (by sorting, so differentiable) of every column of ``values`` ``[n, d]``:
    ``[k, d]``."""
    idx = (torch.linspace(0, 1, k) * (len(values) - 1)).round().long()
    return values.sort(0).values[idx]


def _groups(aux_y: torch.Tensor, recorded_y: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(auxiliary rows, recorded rows) of each class both hold two rows of at least; one group of every row where
    the recorded rows' classes are unknown."""
    if recorded_y is None:
        return [(torch.ones(len(aux_y), dtype=torch.bool), None)]
    out = []
    for c in torch.unique(aux_y):
        a, r = aux_y == c, recorded_y == c
        if int(a.sum()) >= 2 and int(r.sum()) >= 2:
            out.append((a, r))
    return out


def simulate(bottom: nn.Module, server: nn.Module, head: nn.Module | None, aux_x: torch.Tensor, aux_y: torch.Tensor,
             recorded: torch.Tensor, recorded_y: torch.Tensor | None = None, *, steps: int | None = None,
             adversarial: float | None = None, match: float | None = None, seed: int = 0,
             lr: float = 1e-2) -> Simulation:
    """Train SDAR's simulator (a copy of ``bottom``, trained from its weights as given) on the auxiliary rows
    ``aux_x`` (``[M, F]``, the bottom's inputs flat) and their labels ``aux_y`` ``[M]``, against the ``recorded``
    activations ``[N, ...]``: the attacker's own trained ``server`` segment (frozen) on the simulator's output fits
    the labels (through a copy of ``head``, trained alongside, where ``head`` is not None: U-shaped), while

    - a discriminator (an MLP on the activations and the one-hot class) tells the simulator's outputs from the
      recorded ones and the simulator learns to fool it (weight ``adversarial``: SDAR's adversarial
      regularisation);
    - the quantiles of every unit of the simulator's outputs, class by class, are matched to the recorded rows'
      (weight ``match``). A discriminator alone, on a few hundred rows, tells the two apart within a few steps and
      pulls the simulator nowhere useful. Measured on digits (vanilla, 8 epochs; the inversion decoder reaches
      0.308 of the mean image's MSE there): the task alone 1.03, with the discriminator 1.94 (weight 0.1) and 1.97
      (1.0), with the matching 0.138, with both 0.136.

    ``recorded_y``: the recorded rows' classes where the attacker knows them (the labels it received, or its
    simulated head's guesses); None: matched over every row at once. ``steps``, ``adversarial``, ``match``: None
    for :data:`STEPS`, :data:`ADVERSARIAL`, :data:`MATCH`. Seeded; the caller's random state is kept."""
    steps = STEPS if steps is None else steps
    adversarial = ADVERSARIAL if adversarial is None else adversarial
    match = MATCH if match is None else match
    if len(aux_x) < 2 or len(recorded) < 2:
        raise ValueError(f"{len(aux_x)} auxiliary and {len(recorded)} recorded rows: too few to train on")
    sim = copy.deepcopy(bottom).train()
    srv = copy.deepcopy(server).eval()
    for p in srv.parameters():
        p.requires_grad_(False)
    sim_head = copy.deepcopy(head).train() if head is not None else None
    z = recorded.reshape(len(recorded), -1).float()
    classes = int(max(aux_y.max(), recorded_y.max() if recorded_y is not None and len(recorded_y) else 0)) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        groups = _groups(aux_y, recorded_y)
        targets = [quantiles(z if r is None else z[r]) for _, r in groups]
        z_y = F.one_hot(recorded_y, classes).float() if recorded_y is not None else torch.zeros(len(z), classes)
        disc = _mlp(z.shape[1] + classes, 1, 128)
        params = list(sim.parameters()) + (list(sim_head.parameters()) if sim_head is not None else [])
        opt_s, opt_d = torch.optim.Adam(params, lr=lr), torch.optim.Adam(disc.parameters(), lr=1e-3)
        history: dict[str, list[float]] = {"task": [], "match": [], "discriminator": []}
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(steps):
                b = torch.randperm(len(aux_x), generator=g)[:MAX_BATCH].sort().values
                a_raw = sim(aux_x[b])
                a = a_raw.reshape(len(b), -1)
                out = srv(a_raw)
                task = F.cross_entropy(sim_head(out) if sim_head is not None else out, aux_y[b])
                y_b = F.one_hot(aux_y[b], classes).float() if recorded_y is not None else torch.zeros(len(b), classes)
                fool = F.binary_cross_entropy_with_logits(disc(torch.cat([a, y_b], 1)), torch.ones(len(b), 1))
                fit = sum((quantiles(a[m[b]]) - t).pow(2).mean() for (m, _), t in zip(groups, targets)
                          if int(m[b].sum()) >= 2) / max(len(groups), 1)
                opt_s.zero_grad(set_to_none=True)
                (task + adversarial * fool + match * fit).backward()
                opt_s.step()
                r = torch.randint(len(z), (len(b),), generator=g)
                d_loss = (F.binary_cross_entropy_with_logits(disc(torch.cat([z[r], z_y[r]], 1)), torch.ones(len(b), 1))
                          + F.binary_cross_entropy_with_logits(disc(torch.cat([a.detach(), y_b], 1)),
                                                               torch.zeros(len(b), 1)))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                for k, v in zip(history, (task, fit, d_loss)):
                    history[k].append(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
    sim.eval()
    if sim_head is not None:
        sim_head.eval()
    return Simulation(sim, sim_head, disc.eval(), history)


class Decoders(nn.Module):
    """``members`` MLP decoders (two hidden layers of ``hidden``, LeakyReLU) trained side by side as one batched
    network; the output is their mean."""

    def __init__(self, d_in: int, d_out: int, members: int, hidden: int = 256):
        super().__init__()
        dims = [d_in, hidden, hidden, d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims, dims[1:]):
            layers = [nn.Linear(a, b) for _ in range(members)]  # torch's initialisation, member by member
            self.weights.append(nn.Parameter(torch.stack([m.weight.detach().T for m in layers])))
            self.biases.append(nn.Parameter(torch.stack([m.bias.detach()[None] for m in layers])))

    def members(self, a: torch.Tensor) -> torch.Tensor:
        """Each member's reconstruction of ``a`` ``[n, d_in]``: ``[members, n, d_out]``."""
        h = a.expand(len(self.weights[0]), *a.shape)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                h = F.leaky_relu(h, 0.2)
        return h

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.members(a).mean(0)


def train_decoder(simulator: nn.Module, aux_x: torch.Tensor, *, epochs: int | None = None, members: int | None = None,
                  seed: int = 0, lr: float = 1e-3, batch_size: int | None = None) -> Decoders:
    """SDAR's decoder: ``members`` (None: :data:`DECODERS`) MLPs (Adam, MSE) from the simulator's outputs on the
    auxiliary rows ``aux_x`` back to those rows (flat), ``epochs`` (None: :data:`DECODER_EPOCHS`) passes; they
    reconstruct together (the mean of theirs). Seeded; the caller's random state is kept."""
    epochs = DECODER_EPOCHS if epochs is None else epochs
    members = DECODERS if members is None else members
    batch_size = DECODER_BATCH if batch_size is None else batch_size
    with torch.no_grad():
        a = simulator(aux_x).reshape(len(aux_x), -1).float()
    x = aux_x.reshape(len(aux_x), -1).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = Decoders(a.shape[1], x.shape[1], members)
        opt = torch.optim.Adam(dec.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), batch_size):
                    b = order[i:i + batch_size]
                    opt.zero_grad(set_to_none=True)
                    # summed over members: each member's gradient is its own MSE's
                    F.mse_loss(dec.members(a[b]), x[b].expand(members, *x[b].shape), reduction="sum").div(
                        len(b) * x.shape[1]).backward()
                    opt.step()
    return dec.eval()


def _single_consumer(run: RunFolder, src: str, party: str) -> str | None:
    """The one segment of ``party`` that reads ``src``, taking it as its only input; None otherwise."""
    users = [n for n in run.graph.nodes.values() if src in n.inputs and n.party == party]
    if len(users) != 1 or users[0].kind != "segment" or tuple(users[0].inputs) != (src,):
        return None
    return users[0].name


def _class_loss(run: RunFolder, segment: str):
    """The classification loss that takes ``segment``'s output, None where there is none."""
    return next((n for n in run.graph.nodes.values() if n.kind == "loss" and n.inputs[0] == segment
                 and row_classes(run.plan, n.name)), None)


def _received_labels(run: RunFolder, target: Target, pos: torch.Tensor) -> torch.Tensor | None:
    """The classes of the recorded rows ``pos`` where the attacker holds them: the labels it received on a label
    wire (their latest per sample), or its own; None where it holds none (U-shaped) or not for every row."""
    d = target.details
    if d["label_holder"] == target.attacker:
        return run.rows(target.attacker, d["labels"], pos).reshape(-1).long()
    wire = next((w for w in run.graph.wires if w.carries == "label" and w.src == d["labels"]
                 and w.dst_party == target.attacker), None)
    seen = run.seen(target.attacker, wire.name, "forward", "last") if wire is not None else None
    if seen is None:
        return None
    ids, values = latest_per_id(*seen)
    at = {int(i): int(v) for i, v in zip(ids, values.reshape(-1))}
    if any(int(p) not in at for p in pos):
        return None
    return torch.tensor([at[int(p)] for p in pos], dtype=torch.long)


def _redraw(modules: list[nn.Module], seed: int) -> None:
    """Draw every layer of ``modules`` afresh (torch's initialisation, seeded; the caller's random state kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for m in modules:
            for layer in m.modules():
                if layer is not m and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()


def _bottom_of(run: RunFolder, target: Target) -> tuple[str, list[str]]:
    d = target.details
    return d["bottom"], list(run.graph.nodes[d["bottom"]].inputs)


class SDAR(Attack):
    name = "sdar"
    title = "SDAR: simulator, discriminator and decoder (Zhu et al., NDSS 2025)"
    attacker = "server (receiver of a client's bottom activations)"
    needs = ("same-domain auxiliary rows with their labels, disjoint from the rows the client trained on: the run's "
             "test rows (never trained on, never recorded; [data] test_fraction, 0.5 for a disjoint half; at least "
             f"{MIN_AUX}); the labels it received with the activations where it receives them (vanilla); white-box access to its own trained segment (its "
             "weights); the plan every party holds (the client's bottom architecture and, derived from the plan "
             "seed, its initial weights); the activations it received (recorded); passive")
    applies_to = ("an activation wire from a bottom computed from its sender's own data alone into one segment of "
                  "the receiver: vanilla (that segment's output feeds a classification loss there) and U-shaped "
                  "(its output goes back to the sender, whose head feeds a classification loss on its own labels)")
    figure = ("reconstruction MSE of the client's training rows over the mean image's (SSIM for images), beside the "
              "inversion decoder's on the same rows; U-shaped: the simulated head's label accuracy on those rows")
    baseline = "the mean image of the auxiliary rows; the inversion decoder (paired rows); majority class (labels)"
    paper = ("CIFAR-10, ResNet-20: reconstruction MSE 0.023 (SSIM 0.60); U-shaped label accuracy 0.973; a "
             "distance-correlation penalty roughly doubles the MSE")

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        if run.per_client:
            return CLIENTS_RUN
        found, why = [], []
        for w in own_data_wires(run.graph):
            if w.masked:
                continue
            src = run.graph.nodes[w.src]
            if src.kind != "segment" or any(run.graph.nodes[d].kind != "input" for d in src.inputs):
                why.append(f"{w.name}: {w.src!r} is no bottom of {w.src_party!r}'s own data alone")
                continue
            mid = _single_consumer(run, w.src, w.dst_party)
            if mid is None:
                why.append(f"{w.name}: {w.dst_party!r} does not run one segment on it alone")
                continue
            details = {"bottom": w.src, "victim": w.src_party, "server": mid}
            loss = _class_loss(run, mid)
            if loss is not None:
                details.update(kind="vanilla", head=None)
            else:  # U-shaped: the middle's output goes back to a head of the sender's, on its own labels
                head = _single_consumer(run, mid, w.src_party)
                loss = _class_loss(run, head) if head else None
                if loss is None or run.graph.nodes[loss.inputs[1]].party != w.src_party:
                    why.append(f"{w.name}: {mid!r} feeds neither a classification loss nor a head of "
                               f"{w.src_party!r} on its own labels")
                    continue
                details.update(kind="u_shaped", head=head)
            if not (run.folder / "parties" / w.dst_party / "weights.safetensors").is_file():
                why.append(f"no weights of {w.dst_party!r} in the run folder")
                continue
            if run.seen(w.dst_party, w.name, "forward", "last") is None:
                why.append(f"{w.dst_party!r} recorded no activations on {w.name}")
                continue
            details.update(loss=loss.name, labels=loss.inputs[1], label_holder=run.graph.nodes[loss.inputs[1]].party)
            found.append(Target(w.dst_party, w.name, "the activations it received, its trained "
                                f"{mid!r} and auxiliary rows of the same domain", details))
        return found or "; ".join(why) or "no activation wire carries a bottom of its sender's own data"

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        from ...launch.results import load_weights

        d = target.details
        bottom, fields = _bottom_of(run, target)
        victim = run.setup(d["victim"])
        # the recorded rows: each training sample's last activation (the trained model)
        pos, z = latest_per_id(*run.seen(target.attacker, target.wire, "forward", "last"))
        aux = np.setdiff1d(np.asarray(victim.splits.test), pos.numpy())  # rows the client never trained on
        if len(aux) < MIN_AUX:
            raise ValueError(f"{len(aux)} auxiliary rows (the run's test rows, none of them recorded): SDAR needs at "
                             f"least {MIN_AUX}; train with a larger [data] test_fraction (0.5: a disjoint half)")
        aux = np.sort(np.random.default_rng(settings.seed).permutation(aux)[:MAX_AUX])
        aux_t = torch.from_numpy(aux)
        merge = run.plan.segments[bottom].merge

        def raw(p: torch.Tensor) -> list[torch.Tensor]:
            return [run.rows(d["victim"], n, p).float().cpu() for n in fields]

        class Bottom(nn.Module):  # the bottom on its fields, merged as the plan says
            def __init__(self, m: nn.Module):
                super().__init__()
                self.m = m

            def forward(self, xs: torch.Tensor) -> torch.Tensor:
                parts, at = [], 0
                for w in widths:
                    parts.append(xs[:, at:at + int(np.prod(w))].reshape(len(xs), *w))
                    at += int(np.prod(w))
                return merge_inputs(merge, self.m, parts)

        aux_parts, vic_parts = raw(aux_t), raw(pos)
        widths = [tuple(t.shape[1:]) for t in aux_parts]
        aux_x = torch.cat([t.reshape(len(t), -1) for t in aux_parts], dim=1)
        truth = torch.cat([t.reshape(len(t), -1) for t in vic_parts], dim=1)
        aux_y = run.rows(d["label_holder"], d["labels"], aux_t).reshape(-1).long()
        own = copy.deepcopy(run.setup(target.attacker).modules)
        load_weights(run.folder / "parties" / target.attacker / "weights.safetensors", own)
        init = Bottom(copy.deepcopy(victim.modules[bottom]).cpu())  # its initial weights: the plan's
        head = copy.deepcopy(run.setup(d["label_holder"]).modules[d["head"]]).cpu() if d["head"] else None
        if INIT == "random":
            _redraw([init] + ([head] if head is not None else []), settings.seed)
        elif INIT != "plan":
            raise ValueError(f"sdar.INIT must be 'plan' or 'random', got {INIT!r}")
        server = own[d["server"]].cpu().eval()
        known = _received_labels(run, target, pos)  # vanilla: the labels it received with the activations
        sim = simulate(init, server, head, aux_x, aux_y, z, known, seed=settings.seed)
        guess = None
        if sim.head is not None:  # U-shaped: again, each recorded row in the class the simulated head gives it
            with torch.no_grad():
                guess = sim.head(server(z.float())).argmax(1)
            sim = simulate(sim.simulator, server, sim.head, aux_x, aux_y, z, guess, seed=settings.seed,
                           steps=int(STEPS * AGAIN))
        decoder = train_decoder(sim.simulator, aux_x, seed=settings.seed)
        zf = z.reshape(len(z), -1).float()
        lo, hi = aux_x.min(0).values, aux_x.max(0).values
        shape = image_shape(run.plan, fields, dict(zip(fields, vic_parts)))
        if shape is not None:
            lo, hi = aux_x.min(), aux_x.max()
        with torch.no_grad():
            rec = torch.maximum(torch.minimum(decoder.members(zf), hi), lo).mean(0)
        mean_guess = aux_x.mean(0, keepdim=True).expand_as(truth)
        mse, base = float(F.mse_loss(rec, truth)), float(F.mse_loss(mean_guess, truth))
        rel = mse / base if base > 0 else float("nan")
        out: dict[str, Any] = {"mse": mse, "mse_mean_guess": base, "relative_mse": rel, "kind": d["kind"],
                               "aux_rows": int(len(aux)), "recorded_rows": int(len(pos)),
                               "aux_source": "the run's test rows (never trained on, never recorded), with labels",
                               "labels_of_recorded_rows": ("received" if known is not None else
                                                           "the simulated head's guesses" if guess is not None else None),
                               "simulator_start": INIT, "steps": STEPS, "adversarial_weight": ADVERSARIAL, "match_weight": MATCH,
                               "decoder_epochs": DECODER_EPOCHS, "decoders": DECODERS,
                               **{f"final_{k}_loss": v[-1] for k, v in sim.history.items()}}
        if shape is not None:
            rng = float(truth.max() - truth.min()) or 1.0
            out["ssim"] = float(ssim(truth.reshape(-1, *shape), rec.reshape(-1, *shape), rng).mean())
            out["ssim_mean_guess"] = float(ssim(truth.reshape(-1, *shape), mean_guess.reshape(-1, *shape), rng).mean())
        out.update(self._beside_inversion(zf, truth, rec, mean_guess, shape, settings))
        verdict = LEAKS if rel <= MSE_LEAKS else MILD if rel <= MSE_MILD else NONE
        text = f"MSE {mse:.4f}, {rel:.3f} of the mean image's"
        if out.get("inversion_relative_mse") is not None:
            text += f" (inversion decoder: {out['inversion_relative_mse']:.3f} on the same rows)"
        if sim.head is not None:
            labels = run.rows(d["label_holder"], d["labels"], pos).reshape(-1).long()
            with torch.no_grad():
                guess = sim.head(server(z.float())).argmax(1)
            acc = float((guess == labels).float().mean())
            majority = float(np.bincount(labels.numpy()).max() / len(labels))
            half = majority + (1 - majority) / 2
            label_verdict = LEAKS if acc >= half else MILD if acc >= majority + (1 - majority) / 10 else NONE
            out.update(label_accuracy=acc, label_majority=majority, label_verdict=label_verdict)
            text += f"; labels {acc:.3f} (majority {majority:.3f})"
            verdict = min((verdict, label_verdict), key=(LEAKS, MILD, NONE).index)
        png = out_dir / f"sdar_{wire_slug(target.wire)}.png"
        from .figures import inversion_grid

        inversion_grid(png, truth[:8], rec[:8], shape, f"SDAR: {target.attacker} rebuilds {d['victim']}'s "
                                                          f"{', '.join(fields)} ({text})")
        out.update(value=rel, verdict=verdict, figure_text=text, figure=str(png.relative_to(run.folder)),
                   thresholds=f"relative MSE <= {MSE_LEAKS} leaks, <= {MSE_MILD} mild; labels: half the way from "
                              "the majority class to 1 leaks, a tenth mild")
        if verdict != NONE:
            out["remedy"] = (f"a simulator of the bottom trained on rows of the same kind makes activations like these, "
                             f"and a decoder of them rebuilds the inputs. {plan_table(bottom)} nopeek = 1.0 "
                             "decorrelates them from the inputs (measured on digits: relative MSE 0.136 -> 0.324, x2.4, "
                             "for 0.932 -> 0.929 test accuracy and 2.9x the final training loss; docs/privacy.md)")
        return out

    @staticmethod
    def _beside_inversion(z: torch.Tensor, truth: torch.Tensor, rec: torch.Tensor, guess: torch.Tensor,
                          shape: tuple[int, ...] | None, settings: Settings) -> dict[str, Any]:
        """The per-wire inversion decoder (a paired ``aux_fraction`` of the recorded rows) and SDAR on the rows it
        is scored on (its seeded draw, checked against the originals it shows)."""
        try:
            inv = invert(z, truth, aux_fraction=settings.aux_fraction, seed=settings.seed, epochs=settings.epochs,
                         image_shape=shape)
        except ValueError as e:
            return {"inversion_why_not": str(e)}
        n = len(truth)
        ev = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))[int(round(
            settings.aux_fraction * n)):]
        if not torch.equal(truth[ev[:len(inv.originals)]], inv.originals):
            return {"inversion_relative_mse": inv.figures["relative_mse"], "same_rows": False}
        sdar = float(F.mse_loss(rec[ev], truth[ev])) / float(F.mse_loss(guess[ev], truth[ev]))
        return {"inversion_relative_mse": inv.figures["relative_mse"], "inversion_mse": inv.figures["mse"],
                "relative_mse_on_inversion_rows": sdar, "same_rows": True,
                "ratio_to_inversion": sdar / inv.figures["relative_mse"]}


register_attack(SDAR())
