"""Build a piece of a Hugging Face ``transformers`` model (:mod:`splitlearn.models.hf`) from a model folder or object,
reading only the piece's own tensors.

The piece is built on the ``meta`` device, what it does not own taken out, then its own tensors put in place one at a
time, read from the folder's safetensors (mapped once) or copied from the model object's state: a party never holds
the others' layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from .hf import HFError, HFPiece, cut_model

__all__ = ["TASKS", "piece_of", "load_piece"]

TASKS = {"causal_lm": ("AutoModelForCausalLM",), "base": ("AutoModel",),
         "classification": ("AutoModelForSequenceClassification", "AutoModelForImageClassification")}
"""Each task's auto classes, tried in order: a text configuration's sequence classifier, a vision one's image
classifier."""


def piece_of(model: nn.Module, cuts: Sequence[str], index: int, state: dict[str, torch.Tensor] | None = None,
             seed: int = 0) -> HFPiece:
    """Piece ``index`` of ``model`` (a transformers model object) cut after ``cuts``: built from its config on the
    ``meta`` device, only the piece's own tensors materialised, taken from ``state`` (the model's own
    ``state_dict`` unless given)."""
    source = model.state_dict() if state is None else state
    piece = _build(type(model), model.config, cuts, index,
                   _Weights(set(source), lambda k: source[k].detach().clone()), seed)  # the caller's stays theirs
    return piece.train(model.training)


class _Weights(NamedTuple):
    """The tensors a piece may read: their names, and one tensor at a time by name."""

    names: set[str]
    get: Callable[[str], torch.Tensor]


def _sources(model: nn.Module, names: set[str], own: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each of ``model``'s tensor names its name among the saved ``names``, as ``from_pretrained`` reads them: the
    model's renamings of older checkpoints (GPT-NeoX's ``embed_out``), a base model's weights without or with the
    base model's prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renames = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        mapped = {rename_source_key(n, renames, [], prefix, own)[0]: n for n in sorted(names)}
    except (ImportError, AttributeError, TypeError):  # another transformers: the prefix only
        mapped = {}
    for n in sorted(names):
        for k in (n, n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else None, f"{prefix}.{n}"):
            if k in own:
                mapped.setdefault(k, n)
    return mapped


def _build(cls: Any, config: Any, cuts: Sequence[str], index: int, weights: _Weights, seed: int) -> HFPiece:
    """The piece, its own tensors put in place one at a time (each held once: no copy beside an initialised one);
    those the weights lack (a new head, buffers computed from the config) initialised as the model does, under
    ``seed``. A base weight the weights lack is refused: it would train, or run, from random values."""
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32)  # a bf16 folder too: precision is the plan's
    model, path, owned = cut_model(model, cuts, index)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    own = model.state_dict()
    saved = _sources(model, weights.names, own)
    found: dict[str, torch.Tensor] = {}
    for key, meta in own.items():
        src = saved.get(key) or (saved.get(tied[key]) if key in tied else None)
        if src is None:
            continue
        value = weights.get(src)
        if tuple(value.shape) != tuple(meta.shape):
            raise HFError(f"{key} has shape {list(value.shape)} in the model's weights, {list(meta.shape)} in its config")
        found[key] = _put(model, key, value.to(meta.dtype) if value.is_floating_point() else value)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = model.get_output_embeddings()  # a language model's head: loaded, never new
    head = {f"{m}.weight" for m, x in model.named_modules() if x is out} if isinstance(out, nn.Linear) else set()
    base = getattr(model, "base_model", None) is model  # (task "base": every weight is the base's)
    lost = [k for k in own if k not in found and (base or k.startswith(prefix + ".") or k in head)]
    if lost:
        raise HFError(f"its weights lack {len(lost)} tensor(s) of the base model ({', '.join(lost[:3])}): saved by "
                      "another class or in an older format? Save the model with save_pretrained from this version")
    with torch.random.fork_rng(devices=[]):  # what the weights lack: initialised as the model does, from the seed
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            empty = [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None and t.is_meta]
            if empty:  # to_empty replaces every tensor it holds directly, and its initialisation may write to its
                below = [k for k in found if not name or k.startswith(name + ".")]  # children's (CLIP's embeddings):
                for key in below:  # the loaded tensors wait on meta meanwhile, then are put back
                    _put(model, key, found[key].to("meta"))
                module.to_empty(device="cpu", recurse=False)
                model._init_weights(module)
                for key in below:
                    _put(model, key, found[key])
    if any(k in own and src in own for k, src in tied.items()):
        model.tie_weights()  # both ends here (the whole model): one weight again
    piece = HFPiece(model, path, owned, index, len(cuts) + 1)
    piece.tied_across = path is not None and any((k in own) != (src in own) for k, src in tied.items())
    piece.fresh = sorted(n for n, _ in model.named_parameters() if n not in found)  # a new head: initialised here
    return piece


def _put(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` in place of the meta tensor ``key`` of ``model`` (a parameter keeps its requires_grad)."""
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value
    return value


def _folder_weights(folder: Path) -> _Weights:
    """The folder's safetensors weights: their names, and one tensor read at a time."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            where = {k: (folder / f).resolve() for k, f in json.loads(index.read_text())["weight_map"].items()}
            if any(folder.resolve() not in f.parents for f in where.values()):
                raise HFError(f"{index} names shards outside its folder")
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
                where = {k: folder / "model.safetensors" for k in h.keys()}
        else:
            raise HFError(f"{folder} holds no model.safetensors (nor an index of shards): save the model with "
                          "save_pretrained (safetensors; pickled .bin weights are never read)")
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:  # a damaged or foreign file
        raise HFError(f"{folder}: not readable safetensors weights ({type(e).__name__}: {e})") from None

    opened: dict[Path, Any] = {}  # one mapping of each file for the whole build (not one per tensor)

    def get(key: str) -> torch.Tensor:
        try:
            if where[key] not in opened:
                opened[where[key]] = safe_open(str(where[key]), framework="pt")
            return opened[where[key]].get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise HFError(f"{where[key]}: not a readable safetensors file ({e})") from None
    return _Weights(set(where), get)


def load_piece(folder: str | Path, task: str, cuts: Sequence[str], index: int, *, seed: int = 0,
               config: dict[str, Any] | None = None) -> HFPiece:
    """Piece ``index`` of the model saved in ``folder`` (``save_pretrained``: ``config.json`` and safetensors),
    for ``task`` (:data:`TASKS`), cut after ``cuts``; only its own tensors are read. ``config`` overrides entries
    of the saved configuration (``num_labels`` of a classification head, which the folder then lacks and which
    is initialised under ``seed``)."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HFError(f"{folder} is not a model folder: it has no config.json (save the model with save_pretrained)")
    if task not in TASKS:
        raise HFError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    try:  # the folder's own configuration class only: no code from the folder is ever run
        cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise HFError(f"cannot read the configuration in {folder}: {type(e).__name__}: {e}") from None
    cls = _task_class(cfg, task, folder)
    for key, value in (config or {}).items():  # entries of the configuration, never arguments of the loader
        if not hasattr(cfg, key):
            raise HFError(f"config entry {key!r} is not one of {type(cfg).__name__}'s")
        setattr(cfg, key, value)
    cfg.use_cache = False
    return _build(cls, cfg, cuts, index, _folder_weights(folder), seed).eval()  # as from_pretrained gives it


def _task_class(cfg: Any, task: str, folder: Path) -> Any:
    """The model class of ``task`` for ``cfg``: of the first of the task's auto classes that knows the configuration,
    the one its ``architectures`` name where there are several (DeiT's classifier with or without its teacher)."""
    import transformers

    for auto in TASKS[task]:
        mapping = getattr(transformers, auto)._model_mapping
        if type(cfg) in mapping:
            found = mapping[type(cfg)]
            found = found if isinstance(found, (list, tuple)) else (found,)
            named = [c for c in found if c.__name__ in (getattr(cfg, "architectures", None) or ())]
            return (named or found)[0]
    raise HFError(f"{folder} holds a {type(cfg).__name__}, which has no model for task {task!r} "
                  f"({' nor '.join(TASKS[task])} knows it): choose another task")
