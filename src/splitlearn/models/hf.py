"""Cut a Hugging Face ``transformers`` model after named blocks, each party holding only its own layers.

A transformer runs a prelude (embeddings), a list of blocks (``model.layers``, ``transformer.h``,
``bert.encoder.layer``) and a postlude (final norm, language-model or classification head). A cut names a
block (``"model.layers.2"``): piece 0 runs the prelude and the blocks up to that one, each later piece the
blocks up to its own cut, the last piece the remaining blocks and the postlude.

Each piece runs the model's **own forward**, eagerly (so key/value caches, masks and ``peft`` adapters work
as the library wrote them), with what it does not own taken out:

- the blocks of other pieces are not in its block list at all, and the prelude and postlude modules with
  weights it does not own are stubs without weights (a prelude stub gives zeros of the hidden size: their
  values are never used);
- a piece after the first receives the hidden states and the padding mask; the mask enters the forward as
  the model's ``attention_mask``, so the causal mask, the position ids and the rotary tables are
  **recomputed on this side**, not sent; the received hidden states replace the first owned block's input;
- a piece before the last stops after its last block and returns its hidden states (and the mask).

A piece (:func:`load_piece` from a model folder, :func:`piece_of` from a model object) is built on the ``meta``
device, what it does not own taken out, then its own tensors read one at a time: a party never holds the others'.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["HFError", "HFPiece", "is_hf_model", "hf_blocks", "piece_of", "load_piece", "owned_modules", "set_module",
           "TASKS"]

TASKS = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
         "base": "AutoModel"}


class HFError(ValueError):
    """A Hugging Face model that cannot be cut or loaded as asked, with the reason."""


def is_hf_model(net: Any) -> bool:
    """Whether ``net`` is a ``transformers`` model (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(net).__mro__)


def hf_blocks(net: nn.Module, cuts: Sequence[str]) -> tuple[str, list[int], int]:
    """The block list the cuts name (its path), the cut blocks' indices and how many blocks it has."""
    if not cuts:
        raise HFError("no cut given")
    lists = {name for name, m in net.named_modules() if isinstance(m, nn.ModuleList)}
    paths, indices = set(), []
    for c in cuts:
        parent, _, index = c.rpartition(".")
        if parent not in lists or not index.isdigit():
            found = sorted(lists)
            raise HFError(f"{c!r} names no block of a block list; cut after a block, e.g. "
                          f"{found[0] + '.1' if found else 'model.layers.1'} (block lists of this model: {found})")
        paths.add(parent)
        indices.append(int(index))
    if len(paths) > 1:
        raise HFError(f"the cuts {list(cuts)} name blocks of different lists {sorted(paths)}: cut one list")
    path = paths.pop()
    n = len(net.get_submodule(path))
    if any(i >= n for i in indices):
        raise HFError(f"{path} has {n} blocks (0..{n - 1}); the cuts {list(cuts)} name one past them")
    if sorted(set(indices)) != indices:
        raise HFError(f"the cuts {list(cuts)} must name blocks in increasing order, each once")
    if indices[-1] == n - 1:
        raise HFError(f"the last cut {cuts[-1]!r} leaves no block to the last piece: cut before {path}.{n - 1}")
    return path, indices, n


def _owned_blocks(indices: list[int], n: int, index: int) -> range:
    bounds = [-1, *indices, n - 1]
    return range(bounds[index] + 1, bounds[index + 1] + 1)


def _heavy(m: nn.Module) -> bool:
    """A module holding weights or saved buffers (what a party owns or not); the others run everywhere."""
    return any(True for _ in m.parameters()) or any(
        name not in sub._non_persistent_buffers_set
        for _, sub in m.named_modules() for name, _ in sub.named_buffers(recurse=False))


def _sides(net: nn.Module, path: str) -> tuple[list[str], list[str]]:
    """The modules with weights outside the block list: those registered before it (the prelude) and after."""
    before, after = [], []

    def walk(module: nn.Module, prefix: str) -> None:
        side = before
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == path:
                side = after
            elif path.startswith(full + "."):
                walk(child, full + ".")
                side = after
            elif _heavy(child):
                side.append(full)
    walk(net, "")
    return before, after


class _Zeros(nn.Module):
    """A prelude module another party runs: zeros of the hidden size, shaped like its first tensor argument."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(self, "state", {}).get("entered"):  # it runs after the blocks: no prelude module, a stub's zeros
            raise HFError("a module registered before the blocks runs after them (a final norm?): this model's pieces "
                          "cannot be told apart by their order; it is not supported")
        first = next(a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
        lead = first.shape[:2] if not first.is_floating_point() else first.shape[:-1]
        return torch.zeros(*lead, self.width, device=first.device)


class _Elsewhere(nn.Module):
    """A postlude module another party runs: never reached (the piece stops at its last block)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("a module of another party was called: the piece did not stop at its last block")


class _Blocks(nn.Module):
    """The owned blocks of a block list, under their own indices (``model.layers.3``), iterated in order."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for i, b in blocks.items():
            self.add_module(str(i), b)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: Any) -> Any:
        mods = list(self._modules.values())
        return mods[i]


class _Reached(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` under ``root``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class HFPiece(nn.Module):
    """Piece ``index`` of ``pieces`` of a Hugging Face model: ``forward(ids_or_hidden, attention_mask)``.

    The first piece takes token ids ``[B, T]``, a later one hidden states ``[B, T, H]``; a piece before the last
    returns ``(hidden [B, T, H], attention_mask [B, T])``, the last the model's logits. Its parameters and
    ``state_dict`` keys are the model's own (``model.layers.3.mlp.up_proj.weight``); where some of them are
    frozen (a base under LoRA adapters), ``state_dict`` holds only those that train.
    """

    def __init__(self, model: nn.Module, path: str | None, owned: range, index: int, pieces: int):
        super().__init__()
        object.__setattr__(self, "hf", model)  # not a submodule: its children are registered below, by their names
        for name, child in model.named_children():
            self.add_module(name, child)
        self.index, self.pieces, self.path, self.owned = index, pieces, path, owned
        self._incoming: torch.Tensor | None = None
        self._state = {"entered": False}  # whether this forward has reached its first block (the stubs check it)
        for m in model.modules():
            if isinstance(m, _Zeros):
                m.state = self._state
        if index > 0 and getattr(model.config, "pad_token_id", None) is None:  # a pooling head reads the stand-in
            model.config = copy.copy(model.config)  # ids' padding (the mask's): it needs a pad id to tell them
            model.config.pad_token_id = 0
        blocks = list(model.get_submodule(path)) if path is not None else []
        if index > 0:
            blocks[0].register_forward_pre_hook(self._take_incoming, with_kwargs=True)
        if index < pieces - 1:
            blocks[-1].register_forward_hook(self._stop)
        self.register_state_dict_post_hook(_trained_only)
        self.register_load_state_dict_post_hook(_frozen_not_missing)

    def _take_incoming(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._state["entered"] = True
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._incoming}
        return (self._incoming, *args[1:]), kwargs

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        raise _Reached(output[0] if isinstance(output, tuple) else output)

    def train(self, mode: bool = True) -> "HFPiece":
        super().train(mode)
        self.hf.training = mode
        return self

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.pieces - 1

    def new_cache(self) -> Any:
        """An empty key/value cache for this piece (``forward(..., cache=c, position_ids=p)``): its lengths are read
        from the piece's first block, not block 0, which another party runs."""
        from transformers import DynamicCache

        first = self.owned.start if self.path is not None else 0

        class PieceCache(DynamicCache):
            def get_seq_length(self, layer_idx: int = 0) -> int:
                return super().get_seq_length(layer_idx or first)

            def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
                return super().get_mask_sizes(query_length, layer_idx or first)

        return PieceCache(config=self.hf.config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        if self.first:
            ids = x
        else:  # token ids stand-ins for the prelude (never embedded here): pad where the mask is 0, for pooling heads
            pad = self.hf.config.pad_token_id
            pad = 0 if pad is None else int(pad)
            now = attention_mask[:, attention_mask.shape[1] - x.shape[1]:].bool()  # a cache's past: not in x
            ids = torch.where(now, (pad + 1) % self.hf.config.vocab_size, pad)
            self._incoming = x
        self._state["entered"] = False
        try:  # a key/value cache (split generation) holds this piece's blocks only
            out = self.hf(input_ids=ids, attention_mask=attention_mask, use_cache=kwargs.get("cache") is not None,
                          **kwargs)
        except _Reached as r:
            return r.hidden, attention_mask
        finally:
            self._incoming = None
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _frozen(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def _trained_only(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    for name in _frozen(module):
        state.pop(prefix + name, None)


def _frozen_not_missing(module: nn.Module, incompatible: Any) -> None:
    """A frozen weight is not saved (it is read from the model folder): its absence is no missing key."""
    frozen = _frozen(module)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if k not in frozen and not any(k.endswith("." + f) for f in frozen)]


def _cut(model: nn.Module, cuts: Sequence[str], index: int) -> tuple[nn.Module, str | None, range]:
    """``model`` with what piece ``index`` does not own taken out (in place); no cuts: the whole model."""
    if "input_ids" not in inspect.signature(model.forward).parameters:
        raise HFError(f"{type(model).__name__} takes no token ids: splitlearn cuts text models (token ids and an "
                      "attention mask in)")
    if not cuts:
        return model, None, range(0)
    kinds = set(getattr(model.config, "layer_types", None) or ())
    if len(kinds) > 1:  # its forward picks each block's mask by the block's position in the list
        raise HFError(f"its blocks attend in different ways ({sorted(kinds)}: sliding-window or hybrid attention), "
                      "which a cut does not carry yet; cut a model whose blocks all attend alike")
    path, indices, n = hf_blocks(model, cuts)
    if not 0 <= index <= len(cuts):
        raise HFError(f"{len(cuts)} cuts make {len(cuts) + 1} pieces: no piece {index}")
    owned = _owned_blocks(indices, n, index)
    before, after = _sides(model, path)
    width = int(model.config.hidden_size)
    blocks = model.get_submodule(path)
    set_module(model, path, _Blocks({i: blocks[i] for i in owned}))
    if index > 0:
        for name in before:
            set_module(model, name, _Zeros(width))
    if index < len(cuts):
        for name in after:
            set_module(model, name, _Elsewhere())
    return model, path, owned


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
    model, path, owned = _cut(model, cuts, index)
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
            if empty:  # (to_empty replaces every tensor it holds directly: those loaded are put back)
                module.to_empty(device="cpu", recurse=False)
                model._init_weights(module)
                for key in [k for k in found if k.rpartition(".")[0] == name]:
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
        cls = getattr(transformers, TASKS[task])._model_mapping[type(cfg)]
    except (OSError, ValueError, KeyError) as e:
        raise HFError(f"cannot read the configuration in {folder} for task {task!r}: {type(e).__name__}: {e}") from None
    for key, value in (config or {}).items():  # entries of the configuration, never arguments of the loader
        if not hasattr(cfg, key):
            raise HFError(f"config entry {key!r} is not one of {type(cfg).__name__}'s")
        setattr(cfg, key, value)
    cfg.use_cache = False
    return _build(cls, cfg, cuts, index, _folder_weights(folder), seed).eval()  # as from_pretrained gives it


def owned_modules(model: nn.Module, cuts: Sequence[str], index: int) -> list[str]:
    """The names of the modules with weights that piece ``index`` of ``model`` cut after ``cuts`` runs."""
    if not cuts:
        return [""]
    path, indices, n = hf_blocks(model, cuts)
    before, after = _sides(model, path)
    return ([*before] if index == 0 else []) + [f"{path}.{i}" for i in _owned_blocks(indices, n, index)] \
        + ([*after] if index == len(cuts) else [])
