"""Split generation from a run folder: greedy decoding across the parties, each with its own trained piece.

Each party rebuilds its trained pieces from the plan (the base from its model folder, its adapters from its
``weights.safetensors``) and decodes as a run of the engine (:mod:`splitlearn.launch.generating`): the prompt
crosses each cut once, then each new token's hidden state, over the plan's wires, checked and metered; the
next token is decided at the text's owner. ``launcher="threads"`` runs every party in this process over the
in-process transport, ``"processes"`` one process per party over gRPC with mutual TLS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from ..core.plan import beside_plan
from ..core.specs import PlanError
from ..data import DataError
from ..data.text import load_tokenizer
from ..launch.generating import PartyGeneration, generation_result, job_of, plan_generation
from ..launch.results import load_run_plan
from ..launch.threads import run_local

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
             network: str | None = None, tokenizer: str | Path | None = None, stop: bool = True,
             launcher: Literal["threads", "processes"] = "threads") -> dict[str, Any]:
    """Decode ``max_new_tokens`` greedily after ``prompt`` (text, tokenised as the run's data was, or token ids)
    with the trained pieces of the run's transformers ``network``, each party with its own (``launcher``: in
    threads of this process, or in party processes over gRPC); the tokens after the end-of-text token (the
    first of several) are dropped unless ``stop=False`` (every step is decoded all the same). Returns the new
    tokens, their text, tokens per second (at the text's owner, the prompt's pass included) and each wire's
    bytes per new token (framing included)."""
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").is_file():
        raise PlanError(f"{run_dir} is not a run folder (no plan.json)", hint="train with --out first")
    if launcher not in ("threads", "processes"):
        raise PlanError(f"launcher {launcher!r}: choose threads or processes", entry="launcher")
    plan = load_run_plan(run_dir)
    try:
        gen = plan_generation(plan, network)
    except PlanError as e:
        raise e.in_file(run_dir) from None
    config = _config(plan, gen.network, run_dir)
    tok = None
    if isinstance(prompt, str):
        tok = _tokenizer(plan, run_dir, tokenizer)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        ids = ([config.bos_token_id] if getattr(config, "bos_token_id", None) is not None else []) + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids or any(not 0 <= i < config.vocab_size for i in ids):
        raise PlanError(f"the prompt's token ids must be 1 or more in [0, {config.vocab_size})", file=run_dir)
    try:
        gen.check(len(ids), max_new_tokens, config)
    except PlanError as e:
        raise e.in_file(run_dir) from None
    if launcher == "threads":
        parts = {p: PartyGeneration(plan, run_dir, p, gen, max_new_tokens, ids if p == gen.owner else None)
                 for p in plan.parties}
        reports = run_local(plan, {p: g.setup for p, g in parts.items()}, steps=parts[gen.owner].steps,
                            predicting=True, built=lambda n, participant: parts[n].attach(participant))
        reports = {p: parts[p].finish(r) for p, r in reports.items()}
    else:
        from ..launch.processes import launch

        jobs = {p: job_of(run_dir, gen, max_new_tokens, ids, p) for p in plan.parties}
        reports = launch(run_dir / "plan.json", run_dir / "generation", checked=plan, jobs=jobs)
    eos = getattr(config, "eos_token_id", None) if stop else None  # one id, or several (Llama 3's)
    eos = eos if isinstance(eos, int) or isinstance(eos, list) and all(isinstance(e, int) for e in eos) else None
    out_ = generation_result(gen, reports, eos)
    return {"prompt_tokens": ids, "tokens": out_["tokens"],
            "text": tok.decode(out_["tokens"], skip_special_tokens=True) if tok is not None else None,
            "tokens_per_second": out_["tokens_per_second"], "seconds": out_["seconds"],
            "bytes_per_token": out_["bytes_per_token"], "launcher": launcher}


def _config(plan: Any, network: str, run_dir: Path) -> Any:
    """The network's transformers configuration (vocabulary size, special tokens), read from its folder."""
    spec = plan.networks[network]
    if spec.hf is None:
        raise PlanError(f"network {network!r} was given as a Python object: generate needs its model folder",
                        file=run_dir)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(beside_plan(plan, spec.hf.folder).resolve()), local_files_only=True,
                                          trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise PlanError(f"network {network!r}: cannot read its model folder's config ({e})", file=run_dir) from None
