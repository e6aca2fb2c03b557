"""Model completion (Fu et al., "Label inference attacks against vertical federated learning", USENIX
Security 2022): a feature party turns its own trained bottom into a label classifier with a few labelled rows.

The attacker holds its bottom's trained weights (``parties/P/weights.safetensors``), its own rows and a few
labels (``known_labels``, default 4 a class and at least 20: 40 for ten classes, 20 for two). It completes
its bottom with a linear head on ``[bottom(x), x]``, trained by self-training (Fu et al. train the head
semi-supervised too, with MixMatch): a logistic regression on the labelled rows, then again with the
unlabelled training rows it is most sure of added with the labels it gives them, in rounds. It is scored on
the run's test rows, against the main task's test accuracy (the paper's ratio), the majority class, and the
same learner on the party's raw inputs alone: what it knows without the run. The verdict is on that gain, the
part the split training gave away and a defense can take back. The labelled rows are drawn afresh
(stratified) ``DRAWS`` times; the figures are means over the draws.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...core.dryrun import merge_inputs
from .attacks import CLIENTS_RUN, LEAKS, MILD, NONE, Attack, Settings, Target, own_data_wires, register_attack
from .where import foreign_losses, row_classes, main_accuracy, plan_table, source_segment, wire_slug

if TYPE_CHECKING:
    from .run import RunFolder

__all__ = ["ModelCompletion", "self_train", "stratified", "DRAWS", "ROUNDS", "GAIN_LEAKS", "GAIN_MILD", "MAX_ROWS"]

DRAWS = 3  # draws of the labelled rows
ROUNDS = 3  # self-training rounds: the labelled rows, then 40 % and 80 % of the rest with the labels they are given
GAIN_LEAKS, GAIN_MILD = 0.1, 0.03  # accuracy the trained bottom adds over the party's own inputs
MAX_ROWS = 5000  # training rows (labelled or not) and test rows the attack uses at most, drawn at random


def stratified(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` positions of ``labels`` drawn at random, as evenly over the classes as they allow."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    out: list[int] = []
    while len(out) < min(k, len(labels)):
        for c in classes:
            taken = sum(1 for i in out if labels[i] == c)
            if len(out) < k and taken < len(pools[c]):
                out.append(int(pools[c][taken]))
    return np.array(sorted(out), dtype=np.int64)


def self_train(train: np.ndarray, test: np.ndarray, known: np.ndarray, labels: np.ndarray, rounds: int = ROUNDS,
               seed: int = 0) -> np.ndarray:
    """Self-training with a logistic regression (L2, C = 0.1): fit on the ``known`` rows of ``train`` (their
    ``labels``), then refit with a growing share of the other training rows labelled as the last fit predicts
    them (those it is surest of: up to 80 % of them in the last round; known rows weigh 3); the classes
    predicted for ``test``. Features are standardised with the training rows' statistics (the attacker holds
    them all)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    train, test = (train - mu) / sd, (test - mu) / sd
    x, y, w = train[known], labels, np.full(len(known), 3.0)
    rest = np.setdiff1d(np.arange(len(train)), known)
    model = LogisticRegression(C=0.1, max_iter=100, tol=1e-3, warm_start=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a warm start per round: close enough is enough
        for r in range(rounds):
            model.fit(x, y, sample_weight=w)
            if r == rounds - 1 or not len(rest):
                break
            p = model.predict_proba(train[rest])
            keep = rest[np.argsort(-p.max(1))[:int(len(rest) * 0.8 * (r + 1) / (rounds - 1))]]
            x = np.concatenate([train[known], train[keep]])
            y = np.concatenate([labels, model.classes_[model.predict_proba(train[keep]).argmax(1)]])
            w = np.concatenate([np.full(len(known), 3.0), np.ones(len(keep))])
    return model.predict(test)


class ModelCompletion(Attack):
    name = "model_completion"
    title = "model completion (Fu et al., USENIX Security 2022)"
    attacker = "feature party"
    needs = ("white-box access to its own trained bottom (its weights), its own rows, and a few labelled rows "
             "(default 4 a class, at least 20); passive")
    applies_to = ("vertical and vanilla plans: a party sending activations computed from its own data towards a "
                  "classification loss whose labels another party holds")
    figure = "accuracy of the completed bottom on the run's test rows, and its ratio to the main task's accuracy"
    baseline = "majority class; the same learner on the party's raw inputs alone (what it knows without the run)"
    paper = ("CIFAR-10, 40 labels: 0.63 against 0.83 for the main task (ratio 0.76); breast cancer 14/16 features, "
             "20 labels")

    def targets(self, run: RunFolder, settings: Settings) -> list[Target] | str:
        if run.per_client:
            return CLIENTS_RUN
        found, why = [], []
        done: set[tuple[str, str]] = set()
        for w in own_data_wires(run.graph):
            seg = source_segment(run.graph, w)
            todo = [n for n in foreign_losses(run.graph, w, w.src_party)
                    if row_classes(run.plan, n.name)]
            if not todo or (w.src_party, seg) in done:
                continue
            node = run.graph.nodes[seg]
            if any(run.graph.nodes[d].kind != "input" for d in node.inputs):
                why.append(f"{seg!r} of {w.src_party!r} also takes tensors it receives: its bottom alone is no model "
                           "of its own rows")
                continue
            if not (run.folder / "parties" / w.src_party / "weights.safetensors").is_file():
                why.append(f"no weights of {w.src_party!r} in the run folder")
                continue
            done.add((w.src_party, seg))
            loss = todo[0]
            found.append(Target(w.src_party, w.name, f"its trained {seg!r} and a few labelled rows",
                                {"segment": seg, "loss": loss.name, "labels": loss.inputs[1],
                                 "label_holder": run.graph.nodes[loss.inputs[1]].party}))
        return found or "; ".join(why) or ("no party sends activations of its own data towards a classification "
                                           "loss whose labels another party holds")

    def attack(self, run: RunFolder, target: Target, settings: Settings, out_dir: Path) -> dict[str, Any]:
        from ...launch.results import load_weights

        d = target.details
        setup = run.setup(target.attacker)
        modules = copy.deepcopy(setup.modules)
        load_weights(run.folder / "parties" / target.attacker / "weights.safetensors", modules)
        module = modules[d["segment"]].cpu().eval()
        node = run.graph.nodes[d["segment"]]
        rng = np.random.default_rng(settings.seed)  # at most MAX_ROWS of each: the fits stay a few seconds
        train_pos, test_pos = (np.sort(rng.permutation(np.asarray(p))[:MAX_ROWS])
                               for p in (setup.splits.train, setup.splits.test))
        if not len(test_pos):
            raise ValueError("the run has no test rows to score the completed model on")
        pos = torch.from_numpy(np.concatenate([train_pos, test_pos]))
        raw = torch.cat([setup.inputs[n][pos].reshape(len(pos), -1).float().cpu() for n in node.inputs], dim=1)
        with torch.no_grad():
            out = [merge_inputs(run.plan.segments[d["segment"]].merge, module,
                                [setup.inputs[n][pos[i:i + 1024]].cpu() for n in node.inputs])
                   for i in range(0, len(pos), 1024)]
        wire = next(w for w in run.graph.wires if w.name == target.wire)
        source = run.graph.nodes[wire.src]  # an output node picks its element of the segment's outputs
        emb = torch.cat([source.pick(o) if source.kind == "output" else o for o in out]).reshape(len(pos), -1).float()
        labels = run.rows(d["label_holder"], d["labels"], pos).reshape(-1).long().numpy()
        y_train, y_test = labels[:len(train_pos)], labels[len(train_pos):]
        classes = len(np.unique(labels))
        k = settings.known_labels or max(20, 4 * classes)
        if k >= len(train_pos):
            raise ValueError(f"known_labels {k} is not below the {len(train_pos)} training rows")
        both, alone = torch.cat([emb, raw], dim=1).numpy(), raw.numpy()
        n = len(train_pos)
        attack, own = [], []
        for i in range(DRAWS):
            known = stratified(y_train, k, settings.seed + i)
            for feats, scores in ((both, attack), (alone, own)):
                guess = self_train(feats[:n], feats[n:], known, y_train[known], seed=settings.seed)
                scores.append(float((guess == y_test).mean()))
        acc, own_acc = float(np.mean(attack)), float(np.mean(own))
        majority = float(np.bincount(y_test).max() / len(y_test))
        main = main_accuracy(run.result, run.plan, d["loss"])
        gain = acc - own_acc
        verdict = LEAKS if gain >= GAIN_LEAKS else MILD if gain >= GAIN_MILD else NONE
        png = out_dir / f"model_completion_{wire_slug(target.attacker)}.png"
        from .figures import attack_bars

        bars = {"majority class": majority, "own inputs only": own_acc, "completed bottom": acc,
                **({"main task": main} if main is not None else {})}
        attack_bars(png, f"model completion: {target.attacker} labels {d['loss']!r} from its {d['segment']!r} "
                         f"({k} labels)", bars, highlight="completed bottom")
        ratio = acc / main if main else None
        text = (f"accuracy {acc:.3f} with {k} labels" + (f" ({ratio:.2f} of the main task's {main:.3f})"
                                                          if ratio else "")
                + f"; {own_acc:.3f} from its own inputs alone, majority {majority:.3f}")
        out = {"value": acc, "verdict": verdict, "figure_text": text, "accuracy": acc, "per_draw": attack,
               "main_task_accuracy": main, "ratio_to_main_task": ratio, "gain_over_own_inputs": gain,
               "known_labels": k, "classes": classes, "test_rows": int(len(test_pos)), "loss": d["loss"],
               "segment": d["segment"], "label_holder": d["label_holder"],
               "baselines": {"majority_class": majority, "own_inputs": own_acc, "own_inputs_per_draw": own,
                             "chance": 1.0 / classes},
               "thresholds": f"gain over its own inputs >= {GAIN_LEAKS} leaks, >= {GAIN_MILD} mild",
               "figure": str(png.relative_to(run.folder))}
        if verdict != NONE:
            out["remedy"] = (f"its trained bottom adds {gain:+.3f} over what its own inputs tell it. Less label "
                             f"information reaching its bottom lowers that: {plan_table(wire.src)} nopeek = 0.5 "
                             "(measured on digits halves: +0.040 -> -0.021 for 2.2 points of main-task accuracy, "
                             "docs/privacy.md); what its own features tell it, no defense of the run takes away")
        return out


register_attack(ModelCompletion())
