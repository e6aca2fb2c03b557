"""Split generation from a run folder: greedy decoding across the pieces of a trained transformers network.

Each party's trained piece is rebuilt from the plan (its base from the model folder, its adapters from its
``weights.safetensors``) and the prompt is decoded through the pieces in order with a key/value cache at each
(:func:`splitlearn.models.generation.greedy`): after the prompt, each new token's hidden state crosses each
cut once. In this process: the pieces are the parties' own, the wires in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.plan import beside_plan
from ..core.specs import PlanError
from ..data import DataError
from ..data.text import load_tokenizer
from ..launch.results import load_run_plan, load_weights
from ..models import build_segment
from ..models.build import is_hf_network
from ..models.generation import greedy

__all__ = ["generate"]


def _tokenizer(plan: Any, run_dir: Path, given: str | Path | None) -> Any:
    """The tokenizer named by ``given``, else by the plan's text data (its ``tokenizer`` option)."""
    path = given
    if path is None:
        specs = [plan.data, *[p.data for p in plan.parties.values() if p.data is not None]]
        named = [s.options["tokenizer"] for s in specs if s is not None and "tokenizer" in s.options]
        if not named:
            raise PlanError("the run's data names no tokenizer, so a prompt given as text cannot be tokenised",
                            file=run_dir, hint="give tokenizer= (a tokenizer.json or model folder) or token ids")
        path = beside_plan(plan, named[0])
    try:
        return load_tokenizer(Path(path).expanduser())
    except DataError as e:
        raise PlanError(str(e), file=run_dir, hint="give tokenizer= naming the model folder") from None


def generate(run_dir: str | Path, prompt: str | Sequence[int], *, max_new_tokens: int = 20,
             network: str | None = None, tokenizer: str | Path | None = None, stop: bool = True) -> dict[str, Any]:
    """Decode ``max_new_tokens`` greedily after ``prompt`` (text, tokenised as the run's data was, or token ids)
    with the trained pieces of the run's transformers ``network``; stops at the end-of-text token unless
    ``stop=False``. Returns the new tokens, their text, tokens per second and bytes per token over each cut."""
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError(f"{run_dir} is not a run folder (no plan.json)", hint="train with --out first")
    plan = load_run_plan(run_dir)
    names = [n for n in plan.networks if is_hf_network(plan, n)] if network is None else [network]
    if len(names) != 1 or names[0] not in plan.networks or not is_hf_network(plan, names[0]):
        raise PlanError(f"generate decodes with one transformers network; the run has {sorted(plan.networks)}",
                        file=run_dir, hint="name it: network=...")
    segments = [s for s, spec in plan.segments.items() if spec.network == names[0]]
    pieces = {}
    for s in segments:
        party = plan.segments[s].party
        pieces[s] = build_segment(plan, s)
        try:
            load_weights(run_dir / "parties" / party / "weights.safetensors", {s: pieces[s]})
        except (ValueError, OSError) as e:
            raise PlanError(f"party {party!r}: {e}", file=run_dir, hint="generate from the run folder it trained") from None
    if pieces[segments[-1]].hf.get_output_embeddings() is None:  # (GPT-NeoX's is embed_out: asked, not named)
        raise PlanError(f"network {names[0]!r} has no language-model head (its task is not causal_lm)", file=run_dir)
    config = pieces[segments[0]].hf.config
    tok = None
    if isinstance(prompt, str):
        tok = _tokenizer(plan, run_dir, tokenizer)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        ids = ([config.bos_token_id] if config.bos_token_id is not None else []) + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids or any(not 0 <= i < config.vocab_size for i in ids):
        raise PlanError(f"the prompt's token ids must be 1 or more in [0, {config.vocab_size})", file=run_dir)
    eos = config.eos_token_id if stop and isinstance(config.eos_token_id, int) else None
    out = greedy(list(pieces.values()), torch.tensor([ids]), max_new_tokens, eos)
    wires = [plan.segments[s].party + "->" + plan.segments[n].party for s, n in zip(segments, segments[1:])]
    return {"prompt_tokens": ids, "tokens": out.tokens,
            "text": tok.decode(out.tokens, skip_special_tokens=True) if tok is not None else None,
            "tokens_per_second": out.tokens_per_second,
            "bytes_per_token": dict(zip([f"{s} ({w})" for s, w in zip(segments, wires)], out.bytes_per_token))}
