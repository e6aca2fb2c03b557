"""Membership inference by the federation on one client's weights: the loss-threshold attack of Yeom et al.
("Privacy risk in machine learning: analyzing the connection to overfitting", IEEE CSF 2018).

In a ``[clients]`` schedule that averages (``splitfed_v1``, ``splitfed_v2``, ``fedavg``) the federation receives
each client's weights in the clear and keeps, for the audit, those of the last round it averaged
(:func:`splitlearn.clients.results.federation_record`). For each of the first :data:`MAX_CLIENTS` clients it
recorded (the plan's order) it composes that client's weights with the rest of the trained model it can hold
(the other parties' segments, ``parties/P/weights.safetensors``), scores each row's loss (the plan's losses,
weighted as in training) and guesses "member" where the loss is low. The figure is the ROC AUC of that guess
between the client's own training rows (members) and the run's test rows (non-members; with per-client files the
client's own test rows): 0.5 is chance. The same attack on the averaged model (which every client receives anyway)
is its baseline: what one client's weights add is the difference. A target for the averaged model alone scores it
on every client's training rows.

With ``[clients] secure_aggregation = true`` the federation holds only the weighted sum of the clients' weights: the
attack does not apply to one client, and runs on the average (as the inversion runs on the sum of a ``secure_sum``
wire). Verdicts: the audit's AUC thresholds (:data:`splitlearn.tools.audit.verdicts.THRESHOLDS`, ``label_leakage``).
The composed model is the segments alone: a wire's defenses (noise, MID's bottleneck) are not applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ...clients.context import client_labels
from ...clients.results import RECORDED_CLIENTS, Averaging, FederationRound, averaging_of, federation_received
from ...clients.schedule import client_shares
from ...clients.secure import SECAGG_WIRE
from ...core import losses
from ...core.dryrun import forward
from ...core.graph import Graph
from ...core.plan import per_client
from .attacks import NONE, Attack, Settings, Target, register_attack
from .verdicts import THRESHOLDS, verdict
from .where import wire_slug

if TYPE_CHECKING:
    from .run import RunFolder

__all__ = ["MembershipInference", "membership_auc", "row_losses", "compose", "MAX_CLIENTS", "MAX_ROWS", "BATCH",
           "SECURE_NOTE", "REMEDY"]

MAX_CLIENTS = RECORDED_CLIENTS  # clients attacked at most: those the federation recorded (the first it averaged)
MAX_ROWS = 2000  # members and non-members scored at most, each drawn at random
BATCH = 512  # rows a forward takes at once
SECURE_NOTE = "the federation holds only the weighted sum of the clients' weights (secure_aggregation)"
REMEDY = "[clients] secure_aggregation = true"


def membership_auc(member_losses: np.ndarray, other_losses: np.ndarray) -> float:
    """The ROC AUC of "lower loss: member" between members' and non-members' per-row losses (0.5: chance)."""
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([np.ones(len(member_losses)), np.zeros(len(other_losses))])
    return float(roc_auc_score(truth, -np.concatenate([member_losses, other_losses])))


def compose(run: RunFolder, template: str, weights: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Every segment of the run's plan, in evaluation mode: ``template``'s from ``weights`` (``segment.key``, as
    the federation averages them), every other party's from its trained weights in the run folder."""
    from ...launch.results import load_weights
    from ...models import build_segment

    graph, modules = run.graph, {}
    for party in run.plan.parties:
        segs = {s: build_segment(run.plan, s) for s in graph.local_order(party) if graph.nodes[s].kind == "segment"}
        if not segs:
            continue
        if party == template:
            for s, m in segs.items():
                state = {k[len(s) + 1:]: v for k, v in weights.items() if k.startswith(f"{s}.")}
                try:
                    m.load_state_dict(state)
                except RuntimeError as e:
                    raise ValueError(f"the weights the federation recorded do not fit segment {s!r}: "
                                     f"{str(e).splitlines()[0]}") from None
        else:
            path = run.folder / "parties" / party / "weights.safetensors"
            if not path.is_file():
                raise ValueError(f"no weights of {party!r} in the run folder: the rest of the model is missing")
            load_weights(path, segs)
        modules.update(segs)
    for m in modules.values():
        m.cpu().eval()
    return modules


def row_losses(graph: Graph, modules: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """Each row's loss through the whole graph: every loss of the plan on that row alone, weighted as in training
    and summed. ``inputs``: every input node's rows (features and targets)."""
    plan, total = graph.plan, None
    rows = len(next(iter(inputs.values())))
    for start in range(0, rows, BATCH):
        values = forward(graph, modules, {k: v[start:start + BATCH] for k, v in inputs.items()})
        part = torch.zeros(len(next(iter(values.values()))), dtype=torch.float64)
        with torch.no_grad():
            for node in graph.losses():
                out, target = values[node.inputs[0]], values[node.inputs[1]]
                fn, weight = losses.get(plan.losses[node.name].kind).fn, plan.losses[node.name].weight
                part += torch.tensor([float(fn(out[i:i + 1], target[i:i + 1])) for i in range(len(out))],
                                     dtype=torch.float64) * weight
        total = part if total is None else torch.cat([total, part])
    return total.numpy()


def _rows(run: RunFolder, who: Averaging, client: str | None, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    """Every input node's values for the members (``client``'s training rows; None: every client's) then the
    non-members (the run's test rows; per-client files: the clients' own), at most :data:`MAX_ROWS` of each drawn
    at random; and how many members lead."""
    plan, graph = run.plan, run.graph
    rng = np.random.default_rng(seed)
    nodes = [n for n, node in graph.nodes.items() if node.kind == "input"]

    def pick(pos: np.ndarray) -> np.ndarray:
        return np.sort(rng.permutation(np.asarray(pos))[:MAX_ROWS])

    if per_client(plan):  # each client's own file: its own rows, its own test rows
        names = [client] if client is not None else who.clients
        parts: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        for c in names:
            s = run.client_setup(c)
            parts.append(({n: s.inputs[n][torch.from_numpy(s.splits.train)] for n in nodes},
                          {n: s.inputs[n][torch.from_numpy(s.splits.test)] for n in nodes}))
        members = {n: torch.cat([p[0][n] for p in parts]) for n in nodes}
        others = {n: torch.cat([p[1][n] for p in parts]) for n in nodes}
        keep_m, keep_o = (pick(np.arange(len(next(iter(d.values()))))) for d in (members, others))
        m = {n: v[torch.from_numpy(keep_m)] for n, v in members.items()}
        o = {n: v[torch.from_numpy(keep_o)] for n, v in others.items()}
    else:
        setup = run.setup(who.template)
        shares = client_shares(plan, setup.splits.train, client_labels(plan, setup))
        own = shares[who.clients.index(client)] if client is not None else np.concatenate(shares)
        keep_m, keep_o = pick(own), pick(setup.splits.test)
        m, o = ({n: run.rows(graph.nodes[n].party, n, torch.from_numpy(k)) for n in nodes} for k in (keep_m, keep_o))
    if not len(keep_m) or not len(keep_o):
        raise ValueError("no training rows or no test rows to tell apart")
    return {n: torch.cat([m[n], o[n]]) for n in nodes}, len(keep_m)


class MembershipInference(Attack):
    name = "membership"
    title = "membership inference on a client's weights (loss threshold, Yeom et al., CSF 2018)"
    attacker = "the federation (it averages the clients' weights)"
    needs = ("each client's weights as it received them in the last averaging round (recorded by the federation), "
             "the rest of the trained model (the other parties' segments), rows of the client's domain to score "
             "(the run's test rows are the non-members); passive")
    applies_to = ("[clients] schedules that average (splitfed_v1, splitfed_v2, fedavg); with secure_aggregation "
                  "the federation holds only the sum: the averaged model is attacked instead")
    figure = ("ROC AUC of 'lower loss: member' between a client's own training rows and the run's test rows, on its "
              "weights as received; the same on the averaged model")
    baseline = "0.5 (chance); the averaged model every client receives anyway"

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        plan, who = run.plan, averaging_of(run.plan)
        if isinstance(who, str):
            return who
        if any(losses.get(s.kind).tokens for s in plan.losses.values()):
            return "a loss over token sequences: the per-row loss threshold is not built for text rows"
        fed = who.federation
        f = run.folder / "parties" / fed / "observed.safetensors"
        from safetensors.torch import load_file

        if not f.is_file():
            return (f"no recording of the federation {fed!r} in this run folder (parties/{fed}/observed.safetensors: "
                    "a run trained with out=... writes it, a party process in its own --out folder)")
        got = federation_received(plan, load_file(str(f)))
        if got is None:
            return (f"the federation {fed!r} recorded no averaging round (none went through, or it was restored from "
                    "a checkpoint as a new process and averaged no round after)")
        details = {"record": got, "client": None, "who": who}
        average = Target(fed, SECAGG_WIRE if who.secure else "weights",
                         "the averaged weights (what every client receives)", details)
        if who.secure:
            return [average, Target(fed, SECAGG_WIRE, "one client's weights", {**details, "secure": True})]
        if not got.clients:
            return f"the federation {fed!r} recorded no client's weights"
        return [average] + [Target(fed, f"weights from {c}", f"{c}'s weights as received in the last round",
                                   {**details, "client": c}) for c in list(got.clients)[:MAX_CLIENTS]]

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        d = target.details
        if d.get("secure"):
            raise ValueError(f"it does not apply to one client: {SECURE_NOTE}; the attack runs on the average")
        rec: FederationRound = d["record"]
        who: Averaging = d["who"]
        client = d["client"]
        inputs, members = _rows(run, who, client, settings.seed)
        on_average = row_losses(run.graph, compose(run, who.template, rec.average), inputs)
        avg_auc = membership_auc(on_average[:members], on_average[members:])
        bars = {"chance": 0.5, "averaged model": avg_auc}
        rows = {"member_rows": members, "non_member_rows": int(len(on_average) - members)}
        if client is None:
            value, secure = avg_auc, who.secure
            text = (f"AUC {avg_auc:.3f} on the averaged model (members: every client's training rows"
                    + (f"; {SECURE_NOTE}: it does not apply to one client" if secure else "") + ")")
            out: dict[str, Any] = {"value": value, "auc": value, "averaged_model_auc": avg_auc, **rows}
            if secure:
                out["note"] = f"it does not apply to one client: {SECURE_NOTE}; run on the average"
            highlight = "averaged model"
        else:
            own = row_losses(run.graph, compose(run, who.template, rec.clients[client]), inputs)
            value = membership_auc(own[:members], own[members:])
            bars[f"{client}'s weights"] = value
            highlight = f"{client}'s weights"
            text = (f"{client}: AUC {value:.3f} on its weights as received, {avg_auc:.3f} on the averaged model "
                    f"({value - avg_auc:+.3f} from its own weights)")
            out = {"value": value, "auc": value, "averaged_model_auc": avg_auc, "gain_over_average": value - avg_auc,
                   "client": client, "samples": rec.samples.get(client), **rows}
        v = verdict("label_leakage", value)  # the audit's AUC thresholds
        png = out_dir / f"membership_{wire_slug(client or 'average')}.png"
        from .figures import attack_bars

        attack_bars(png, f"membership inference by {target.attacker} ({client or 'the average'})", bars,
                    highlight=highlight, label="ROC AUC")
        out.update({"verdict": v, "figure_text": text, "baselines": {"chance": 0.5, "averaged_model": avg_auc},
                    "thresholds": THRESHOLDS["label_leakage"], "figure": str(png.relative_to(run.folder))})
        if v != NONE and client is not None:
            out["remedy"] = (f"{REMEDY}: the federation then holds only the weighted sum of the clients' weights, "
                             f"whose AUC here is {avg_auc:.3f} ({value - avg_auc:+.3f} is what {client}'s own "
                             "weights add)")
        elif v != NONE:
            out["remedy"] = ("every client receives the averaged model: less overfitting lowers this (fewer "
                             "[clients] local_epochs or [train] epochs, more rows a client); secure aggregation "
                             "does not change it")
        return out


register_attack(MembershipInference())
