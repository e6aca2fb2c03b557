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

A vision transformer (ViT, DeiT: ``main_input_name`` ``pixel_values``) has no mask: the first piece takes the
pixel values, a later one the hidden states (the patches' and the class token's), and only they cross a cut.

A piece (:func:`~splitlearn.models.hfload.load_piece` from a model folder, :func:`~splitlearn.models.hfload.piece_of`
from a model object) is built on the ``meta`` device, what it does not own taken out (:func:`cut_model`), then its own
tensors read one at a time: a party never holds the others'.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = ["HFError", "HFPiece", "is_hf_model", "is_vision", "hf_blocks", "cut_model", "owned_modules", "set_module"]


_PLAIN = "cut a plain vision transformer (ViT, DeiT, DINOv2, BEiT without a shared position bias, CLIP's vision model)"


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


def _shell(module: nn.Module) -> nn.Module:
    """``module``'s tree without weights: each tensor an empty one of its dtype, not saved (a forward may read a
    weight's dtype of a module it does not run: ViT's patch embedding)."""
    shell = nn.Module()
    for name, t in [*module._parameters.items(), *module._buffers.items()]:
        if t is not None:
            shell.register_buffer(name, torch.empty(0, dtype=t.dtype), persistent=False)
    for name, child in module.named_children():
        shell.add_module(name, _shell(child))
    return shell


class _Zeros(nn.Module):
    """A prelude module another party runs: zeros of the hidden size, shaped like its first tensor argument (like the
    received hidden states, where the piece gives them: a vision model's)."""

    def __init__(self, width: int, like: nn.Module):
        super().__init__()
        self.width = width
        for name, child in _shell(like).named_children():
            self.add_module(name, child)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(self, "state", {}).get("entered"):  # it runs after the blocks: no prelude module, a stub's zeros
            raise HFError("a module registered before the blocks runs after them (a final norm?): this model's pieces "
                          "cannot be told apart by their order; it is not supported")
        if getattr(self, "state", {}).get("like") is not None:
            return torch.zeros_like(self.state["like"])
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
    """Piece ``index`` of ``pieces`` of a Hugging Face model: ``forward(ids_or_hidden, attention_mask)``, or
    ``forward(pixels_or_hidden)`` for a vision model (:attr:`vision`).

    The first piece takes token ids ``[B, T]``, a later one hidden states ``[B, T, H]``; a piece before the last
    returns ``(hidden [B, T, H], attention_mask [B, T])``, the last the model's logits. A vision model's first
    piece takes pixel values ``[B, C, H, W]``, and a piece before the last returns the hidden states
    ``[B, N + 1, H]`` alone (N patches and the class token; no mask). Its parameters and
    ``state_dict`` keys are the model's own (``model.layers.3.mlp.up_proj.weight``); where some of them are
    frozen (a base under LoRA adapters), ``state_dict`` holds only those that train.
    """

    def __init__(self, model: nn.Module, path: str | None, owned: range, index: int, pieces: int):
        super().__init__()
        object.__setattr__(self, "hf", model)  # not a submodule: its children are registered below, by their names
        for name, child in model.named_children():
            self.add_module(name, child)
        self.index, self.pieces, self.path, self.owned = index, pieces, path, owned
        self.vision = is_vision(model)
        self._incoming: torch.Tensor | None = None
        self._state = {"entered": False}  # whether this forward has reached its first block (the stubs check it)
        for m in model.modules():
            if isinstance(m, _Zeros):
                m.state = self._state
        if index > 0 and not self.vision and getattr(model.config, "pad_token_id", None) is None:  # a pooling head
            model.config = copy.copy(model.config)  # reads the stand-in ids' padding (the mask's): it needs a pad id
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

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.vision or attention_mask is None:
            return self._see(x, attention_mask)
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

    def _see(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A vision model's forward: pixel values or hidden states in, hidden states or the model's output out."""
        name, cfg = type(self.hf).__name__, self.hf.config
        if not self.vision or attention_mask is not None:
            raise HFError(f"{name} takes " + ("pixel values or hidden states only, no attention mask" if self.vision
                                              else "token ids or hidden states and their attention mask"))
        image = _image(cfg)
        want = [image[0], "H", "W"] if self.first else ["N", int(cfg.hidden_size)]
        if x.dim() != len(want) + 1 or x.shape[1 if self.first else 2] != want[0 if self.first else 1]:
            raise HFError(f"piece {self.index} of {name} takes {'pixel values' if self.first else 'hidden states'} "
                          f"[B, {', '.join(map(str, want))}], not {list(x.shape)}")
        if not self.first:  # pixel stand-ins of the configured shape (no memory): the prelude, a stub, never reads them
            self._incoming = x
            x = x.new_zeros(()).expand(len(x), *image)
        self._state.update(entered=False, like=self._incoming)
        try:
            out = self.hf(pixel_values=x)
        except _Reached as r:
            return r.hidden
        except (ValueError, TypeError, RuntimeError) as e:  # before its first block: the stubs' zeros did not fit
            if self.first or self._state["entered"]:
                raise
            raise HFError(f"{name} cannot start at a block on this side ({type(e).__name__}: {e}): its embeddings "
                          f"give more than the hidden states (a patch grid?), which a cut does not carry; {_PLAIN}"
                          ) from None
        finally:
            self._incoming = self._state["like"] = None
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _image(cfg: Any) -> tuple[int, int, int]:
    """The configured image shape: channels, height, width."""
    size = getattr(cfg, "image_size", 1)
    height, width = tuple(size)[-2:] if isinstance(size, (list, tuple)) else (size, size)
    return int(getattr(cfg, "num_channels", 3)), int(height), int(width)


def is_vision(model: nn.Module) -> bool:
    """Whether ``model`` is a vision model: its forward takes pixel values (ViT, DeiT), not token ids."""
    return getattr(model, "main_input_name", None) == "pixel_values"


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


def cut_model(model: nn.Module, cuts: Sequence[str], index: int) -> tuple[nn.Module, str | None, range]:
    """``model`` with what piece ``index`` does not own taken out (in place); no cuts: the whole model."""
    if ("pixel_values" if is_vision(model) else "input_ids") not in inspect.signature(model.forward).parameters:
        raise HFError(f"{type(model).__name__} takes neither token ids nor pixel values: splitlearn cuts text models "
                      "(token ids and an attention mask in) and vision transformers (pixel values in)")
    if not cuts:
        return model, None, range(0)
    kinds = set(getattr(model.config, "layer_types", None) or ())
    if len(kinds) > 1:  # its forward picks each block's mask by the block's position in the list
        raise HFError(f"its blocks attend in different ways ({sorted(kinds)}: sliding-window or hybrid attention), "
                      "which a cut does not carry yet; cut a model whose blocks all attend alike")
    if getattr(model.config, "use_shared_relative_position_bias", False):  # a prelude module every block reads
        raise HFError(f"{type(model).__name__} shares one relative position bias among its blocks (a module run "
                      f"before them whose output each block reads), which a cut does not carry; {_PLAIN}")
    if is_vision(model) and getattr(model.config, "depths", None):
        raise HFError(f"{type(model).__name__}'s blocks are stages of different shapes (depths "
                      f"{list(model.config.depths)}: Swin, ConvNeXt style), which a cut does not carry; {_PLAIN}")
    path, indices, n = hf_blocks(model, cuts)
    if not 0 <= index <= len(cuts):
        raise HFError(f"{len(cuts)} cuts make {len(cuts) + 1} pieces: no piece {index}")
    owned = _owned_blocks(indices, n, index)
    before, after = _sides(model, path)
    odd = _not_one_tensor(model, path, before) if is_vision(model) and index > 0 else []
    if odd:
        raise HFError(f"{type(model).__name__}'s {odd[0]} gives more than the hidden states (a patch grid?), which a "
                      f"cut does not carry; {_PLAIN}")
    width = int(model.config.hidden_size)
    blocks = model.get_submodule(path)
    set_module(model, path, _Blocks({i: blocks[i] for i in owned}))
    if index > 0:
        for name in before:
            set_module(model, name, _Zeros(width, model.get_submodule(name)))
    if index < len(cuts):
        for name in after:
            set_module(model, name, _Elsewhere())
    return model, path, owned


def _stop_before(module: nn.Module, args: tuple) -> None:
    raise _Reached(args[0] if args else torch.empty(0))


def _not_one_tensor(model: nn.Module, path: str, before: list[str]) -> list[str]:
    """The prelude modules of a vision model that return more than one tensor (Data2VecVision's embeddings: the
    hidden states and the patch grid), which a later piece's stubs cannot stand in for: found by running the model
    up to its first block on an empty image of the configured shape (on the ``meta`` device where the model is)."""
    odd: list[str] = []
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: None if isinstance(out, torch.Tensor) else odd.append(name)) for name in before]
    hooks.append(model.get_submodule(path)[0].register_forward_pre_hook(_stop_before))
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, *_image(model.config), device=next(model.parameters()).device))
    except Exception:  # noqa: BLE001 - _Reached; or a forward that cannot run so: its pieces' forward will tell
        pass
    finally:
        for h in hooks:
            h.remove()
    return odd


def owned_modules(model: nn.Module, cuts: Sequence[str], index: int) -> list[str]:
    """The names of the modules with weights that piece ``index`` of ``model`` cut after ``cuts`` runs."""
    if not cuts:
        return [""]
    path, indices, n = hf_blocks(model, cuts)
    before, after = _sides(model, path)
    return ([*before] if index == 0 else []) + [f"{path}.{i}" for i in _owned_blocks(indices, n, index)] \
        + ([*after] if index == len(cuts) else [])
