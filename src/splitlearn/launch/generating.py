"""Split generation as a run of the engine: each party decodes with its own trained piece, in its own thread or
process, and the text's owner keeps the prompt and the tokens.

Generation is ``max_new_tokens`` prediction steps of the run's plan. The owner's text fields are fed by a
:class:`~splitlearn.models.generation.Decoding` (step 0: the prompt; step ``k``: the token step ``k - 1``
decided), every piece runs with a key/value cache of its own blocks
(:class:`~splitlearn.models.generation.CachedPiece`), and what crosses each cut goes over the plan's wires as
in training: checked, metered, refused past its bounds. The owner must hold the last piece (the
language-model head: a U-shaped plan), so that the next token is decided where the prompt is. The other
parties are never sent the prompt's tokens nor the new ones (only the number of steps): they see the prompt's
length and the hidden states at their cuts, as in training (what those reveal: ``splitlearn audit``'s
text inversion).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..clients.strategies import strategy_of
from ..core.plan import Plan
from ..core.specs import DataSpec, PlanError
from ..models.generation import CachedPiece, Decoding, Feed, Watch
from ..models.hf import HFPiece
from ..run.report import PartyReport
from ..run.setup import PartySetup, Step, setup_party
from .results import load_weights

__all__ = ["Generation", "plan_generation", "PartyGeneration", "generation_result", "job_of", "party_job"]

_TEXT = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class Generation:
    """What every party derives alike from the run's plan: the network, its segments in order, the text's owner
    and the most positions a sequence may reach (the bound its wires carry)."""

    network: str
    segments: tuple[str, ...]
    owner: str
    limit: int

    def check(self, prompt_tokens: int, max_new_tokens: int, config: Any = None) -> None:
        """A PlanError unless the prompt and the new tokens fit the run's wires (and the model's positions, from
        its transformers ``config``: ``n_positions`` or ``max_position_embeddings``)."""
        if max_new_tokens < 1:
            raise PlanError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_tokens < 1:
            raise PlanError("the prompt has no token")
        need = prompt_tokens + max_new_tokens - 1  # the last token is decided, not sent on
        if need > self.limit:
            raise PlanError(f"the prompt ({prompt_tokens} tokens) and {max_new_tokens} new tokens reach {need} "
                            f"positions; the run's wires carry sequences of at most {self.limit}",
                            hint=f"ask for at most {max(self.limit - prompt_tokens + 1, 0)} new tokens, or train with "
                                 "a larger max_length (and vary bounds)")
        for entry in ("n_positions", "max_position_embeddings"):
            most = getattr(config, entry, None)
            if isinstance(most, int) and need > most:
                raise PlanError(f"the prompt ({prompt_tokens} tokens) and {max_new_tokens} new tokens reach {need} "
                                f"positions; the model has {most} ({entry})",
                                hint=f"ask for at most {max(most - prompt_tokens + 1, 0)} new tokens")


def plan_generation(plan: Plan, network: str | None = None) -> Generation:
    """The generation a run's plan allows, or a PlanError saying why it allows none."""
    from ..models.build import is_hf_network

    if strategy_of(plan).coordinated:
        raise PlanError("generate runs a plan without [clients] (one model, its parties)", entry="clients")
    names = [n for n in plan.networks if is_hf_network(plan, n)] if network is None else [network]
    if len(names) != 1 or names[0] not in plan.networks or not is_hf_network(plan, names[0]):
        raise PlanError(f"generate decodes with one transformers network; the run has {sorted(plan.networks)}",
                        hint="name it: network=...")
    name = names[0]
    segments = tuple(s for s, spec in plan.segments.items() if spec.network == name)
    others = [s for s in plan.segments if s not in segments]
    if others:
        raise PlanError(f"segment(s) {others} belong to other networks: generate runs one language model's pieces",
                        entry=f"segments.{others[0]}")
    owner = plan.segments[segments[0]].party
    last = plan.segments[segments[-1]].party
    if last != owner:
        raise PlanError(f"the language-model head (segment {segments[-1]!r}) is at {last!r}, but the prompt is at "
                        f"{owner!r}: the next token would be decided where the prompt cannot read it",
                        entry=f"segments.{segments[-1]}.party",
                        hint="generate from a U-shaped run, where the text's owner holds the first and last pieces")
    hf = plan.networks[name].hf
    if hf is not None and hf.task != "causal_lm":
        raise PlanError(f"network {name!r} has no language-model head (its task is {hf.task}, not causal_lm)",
                        entry=f"networks.{name}.hf.task")
    holds = plan.parties[owner].holds
    for s in segments:
        for i in plan.segments[s].inputs:
            party, _, local = i.partition(".")
            if party == owner and local in holds and holds[local].field not in _TEXT:
                raise PlanError(f"segment {s!r} reads {i!r} (field {holds[local].field!r}); generation feeds token "
                                "ids and their mask only", entry=f"segments.{s}.inputs")
    bounds = []
    for s in segments[:-1]:
        outs = plan.segments[s].outputs or []
        if not outs or any(1 not in o.vary for o in outs):
            raise PlanError(f"segment {s!r}'s outputs do not vary in length (vary = {{ 1 = ... }}): a new token's "
                            "hidden state is one position long", entry=f"segments.{s}.outputs")
        bounds += [o.vary[1] for o in outs]
    return Generation(name, segments, owner, min(bounds) if bounds else 1 << 30)


class PartyGeneration:
    """One party's part of a generation: its setup (trained pieces with caches; at the owner, the prompt's
    feed), the steps every party runs, and what it reports (:meth:`finish`)."""

    def __init__(self, plan: Plan, run_dir: Path, party: str, gen: Generation, max_new_tokens: int,
                 prompt: list[int] | None = None):
        self.gen, self.party, self.max_new_tokens = gen, party, max_new_tokens
        self.watch = Watch()
        self.decoding: Decoding | None = None
        if party == gen.owner:
            if prompt is None:
                raise PlanError(f"party {party!r} holds the text: it needs the prompt")
            gen.check(len(prompt), max_new_tokens)
            self.decoding = Decoding(prompt)
            row = self.decoding.prompt.numpy()
            data = DataSpec.of_arrays({"input_ids": row, "attention_mask": row * 0 + 1, "lm_labels": row * 0})
            self.setup = setup_party(plan, party, data=data, predict=True, optimizer=False)
            for local, ref in plan.parties[party].holds.items():
                if ref.field in _TEXT and f"{party}.{local}" in self.setup.inputs:
                    self.setup.inputs[f"{party}.{local}"] = Feed(self.decoding, ref.field)
        else:
            self.setup = setup_party(plan, party, predict=True, optimizer=False)
        _load_pieces(self.setup, run_dir, party)
        for s, m in self.setup.modules.items():
            if not isinstance(m, HFPiece):
                raise PlanError(f"segment {s!r} is not a piece of a transformers model", entry=f"segments.{s}")
            last = s == gen.segments[-1]
            if last and m.hf.get_output_embeddings() is None:  # (GPT-NeoX's is embed_out: asked, not named)
                raise PlanError(f"network {gen.network!r} has no language-model head (its task is not causal_lm)")
            k = gen.segments.index(s)
            source = "the text" if k == 0 else repr(plan.segments[gen.segments[k - 1]].party)
            self.setup.modules[s] = CachedPiece(m, self.watch, self.decoding if last else None, source=source)
            if self.decoding is not None and s == gen.segments[0]:
                vocab = m.hf.config.vocab_size
                if int(self.decoding.prompt.max()) >= vocab:
                    raise PlanError(f"the prompt's token ids must lie in [0, {vocab}), the model's vocabulary")
                gen.check(len(prompt), max_new_tokens, m.hf.config)

    @property
    def steps(self) -> list[Step]:
        """One prediction step a token: every party runs the same."""
        return [Step(i, "predict", 0, torch.zeros(1, dtype=torch.int64)) for i in range(self.max_new_tokens)]

    def attach(self, participant: Any) -> None:
        """Watch the traffic of the party built over ``participant``'s link."""
        self.watch.meter = participant.link.meter

    def finish(self, report: PartyReport) -> PartyReport:
        """Its report, with what generation adds (``meter["generation"]``: the owner's tokens and seconds, each
        party's bytes per new token on the wires it sends) and without logits or weights to keep."""
        report.predictions, report.modules = {}, {}
        part: dict[str, Any] = {"bytes_per_token": self.watch.bytes_per_token(self.max_new_tokens)}
        if self.decoding is not None:
            part.update(tokens=list(self.decoding.tokens), seconds=self.decoding.seconds)
        report.meter["generation"] = part
        return report


def job_of(run_dir: Path, gen: Generation, max_new_tokens: int, prompt: list[int], party: str) -> dict[str, Any]:
    """What a party process is told to do (``PartyOptions.generate``): the run folder, the network and the number
    of new tokens; the prompt only where ``party`` is the text's owner."""
    return {"run": str(Path(run_dir).resolve()), "network": gen.network, "max_new_tokens": max_new_tokens,
            "prompt": list(prompt) if party == gen.owner else None}


def party_job(job: Any, party: str) -> tuple[Plan, PartyGeneration]:
    """The run's plan and ``party``'s part of the generation ``job`` (:func:`job_of`); a PlanError naming what
    does not fit."""
    from .results import load_run_plan

    keys = {"run", "network", "max_new_tokens", "prompt"}
    if not isinstance(job, dict) or set(job) != keys:
        raise PlanError(f"a generation job has the entries {sorted(keys)}, got {sorted(job) if isinstance(job, dict) else job!r}")
    run, n, prompt = job["run"], job["max_new_tokens"], job["prompt"]
    if not isinstance(run, str) or not (Path(run) / "plan.json").is_file():
        raise PlanError(f"{run!r} is not a run folder (no plan.json)")
    if type(n) is not int or n < 1:
        raise PlanError(f"max_new_tokens must be an integer of at least 1, got {n!r}")
    if prompt is not None and (not isinstance(prompt, list) or not all(type(t) is int and t >= 0 for t in prompt)):
        raise PlanError("the prompt must be a list of token ids (integers of at least 0)")
    plan = load_run_plan(Path(run))
    gen = plan_generation(plan, job["network"])
    if prompt is not None and party != gen.owner:
        raise PlanError(f"party {party!r} was given the prompt, but the text is {gen.owner!r}'s")
    return plan, PartyGeneration(plan, Path(run), party, gen, n, prompt)


def _load_pieces(setup: PartySetup, run_dir: Path, party: str) -> None:
    path = run_dir / "parties" / party / "weights.safetensors"
    if not path.is_file():
        raise PlanError(f"no weights for party {party!r} at {path}", file=run_dir, hint="train with --out first")
    try:
        load_weights(path, setup.modules)
    except (ValueError, OSError) as e:
        raise PlanError(f"party {party!r}: {e}", file=run_dir, hint="generate from the run folder it trained") from None


def generation_result(gen: Generation, reports: dict[str, PartyReport],
                      stop_at: int | Sequence[int] | None = None) -> dict[str, Any]:
    """The new tokens (up to and with the first of ``stop_at``, the end-of-text token or tokens, where given),
    tokens per second at the owner and each wire's bytes per new token, from the parties' reports."""
    owner = reports[gen.owner].meter.get("generation") or {}
    tokens = [int(t) for t in owner.get("tokens", [])]
    decoded = len(tokens)
    ends = set() if stop_at is None else {stop_at} if isinstance(stop_at, int) else set(stop_at)
    first = next((i for i, t in enumerate(tokens) if t in ends), None)
    if first is not None:
        tokens = tokens[:first + 1]
    seconds = float(owner.get("seconds", 0.0))
    per_token: dict[str, float] = {}
    for rep in reports.values():
        per_token.update((rep.meter.get("generation") or {}).get("bytes_per_token", {}))
    return {"tokens": tokens, "decoded": decoded, "seconds": seconds,
            "tokens_per_second": decoded / seconds if seconds > 0 else float("nan"), "bytes_per_token": per_token}
