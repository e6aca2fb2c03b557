"""Text inversion: what the receiver of a transformer's hidden states at a cut learns of the tokens.

Functions of tensors, as :mod:`splitlearn.tools.audit.measures` (only :func:`base_embedding` reads a file):

- :func:`nearest_embedding`: each position's nearest token embedding (cosine similarity). The attacker
  knows the public base model, so its embedding matrix; at a cut right after the embeddings this
  recovers every token, and shallow cuts keep most of them (the residual stream carries the embedding);
- :func:`train_inverter` and :func:`invert`: a learned inverter (a small MLP, or a linear map, from a
  position's hidden state to token logits) trained on auxiliary text whose hidden states at the cut the
  attacker computes itself, then applied to what it received: the attack for deeper cuts;
- :func:`recovery`: the share of real (unmasked) positions recovered, against chance (the share of the
  most frequent token: the best guess without the hidden states);
- :func:`text_inversion`: both attacks on one set of recorded rows, a share of them standing for the
  attacker's auxiliary text (as :func:`splitlearn.tools.audit.measures.invert` does for features), within a
  compute budget (:data:`TRAIN_BUDGET`, ``max_train_positions``, ``max_eval_positions``): a vocabulary of 32k
  and 100k recorded positions stays under a minute on one CPU thread;
- for the audit of a run folder (:mod:`splitlearn.tools.audit.run`): :func:`token_inputs` (which of a sender's
  raw fields are the token ids, and the padding mask, behind hidden states it sent), :func:`exact_field` (which
  field an integer element it sent is) and :func:`base_embedding` (the public base model's embedding matrix of
  a plan's ``[networks.X] hf`` segment).

Shapes: hidden states ``[N, T, H]``, token ids and masks ``[N, T]`` (a mask is 1 at real tokens, 0 at
padding; ``None``: every position is real), an embedding matrix ``[V, H]``. Inputs are checked and a
wrong one is refused with a ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .measures import _one_thread

__all__ = ["nearest_embedding", "TokenInverter", "train_inverter", "invert", "recovery", "text_inversion",
           "token_inputs", "exact_field", "base_embedding", "TRAIN_BUDGET"]

_CHUNK = 1 << 22  # scores held at once (positions x vocabulary): 16 MiB of float32
# the learned inverter's training, in positions x its parameters per pass (epochs x training positions x
# parameters at most): about 30 s on one CPU thread (measured: 750 positions a second for a vocabulary of 32k and
# hidden states of width 4096, whose inverter has 9.4M parameters)
TRAIN_BUDGET = 2e11


def _hidden(hidden: torch.Tensor, name: str = "hidden") -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        got = f"a {hidden.dim()}-D {hidden.dtype} tensor" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{name} must be floating hidden states [rows, tokens, width], got {got}")
    if not bool(torch.isfinite(hidden).all()):
        raise ValueError(f"{name} holds NaN or infinite values: no recovery figure from it would mean anything")
    return hidden.float()


def _ids(ids: torch.Tensor, shape: torch.Size, name: str, vocab: int | None = None) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids, got "
                         f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(ids.shape)}, but the positions are {list(shape)}")
    ids = ids.long()
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds token ids outside the vocabulary of {vocab} (from {int(ids.min())} to "
                         f"{int(ids.max())}): give the vocabulary size of the model's tokenizer")
    return ids


def _mask(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask has shape {got}, but the positions are {list(shape)}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold 1 at real tokens and 0 at padding only (an attention mask)")
    return mask.bool()


def _embedding(embedding: torch.Tensor, width: int) -> torch.Tensor:
    if (not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or embedding.shape[1] != width
            or not embedding.is_floating_point() or embedding.shape[0] < 1):
        got = (f"a {embedding.dtype} tensor of shape {list(embedding.shape)}" if isinstance(embedding, torch.Tensor)
               else type(embedding).__name__)
        raise ValueError(f"embedding must be the token embedding matrix [vocabulary, {width}] (the hidden states' "
                         f"width), got {got}")
    if not bool(torch.isfinite(embedding).all()):
        raise ValueError("embedding holds NaN or infinite values")
    return embedding.detach().float()


def nearest_embedding(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The token whose embedding row is nearest (cosine similarity) to each position's hidden state.

    ``hidden`` ``[N, T, H]``, ``embedding`` ``[V, H]`` (the base model's input embedding matrix);
    returns ids ``[N, T]`` (int64). Positions are scored in chunks, so memory stays bounded.
    """
    h = _hidden(hidden)
    table = F.normalize(_embedding(embedding, h.shape[2]), dim=1)
    flat = F.normalize(h.reshape(-1, h.shape[2]), dim=1)
    step = max(1, _CHUNK // table.shape[0])
    with torch.no_grad():
        out = [(flat[i:i + step] @ table.T).argmax(dim=1) for i in range(0, len(flat), step)]
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).reshape(h.shape[:2])


class TokenInverter(nn.Module):
    """A position's hidden state -> token logits: standardised with the training states' statistics,
    then a one-hidden-layer MLP (``hidden_units`` > 0) or a linear map (``hidden_units == 0``)."""

    def __init__(self, width: int, vocab: int, hidden_units: int, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.reshape(width).float().clone())
        self.register_buffer("scale", scale.reshape(width).float().clone())
        self.net = (nn.Linear(width, vocab) if hidden_units == 0 else
                    nn.Sequential(nn.Linear(width, hidden_units), nn.ReLU(), nn.Linear(hidden_units, vocab)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` of hidden states ``[..., H]``."""
        return self.net((hidden.float() - self.mean) / self.scale)


def train_inverter(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, vocab: int, *,
                   epochs: int = 30, seed: int = 0, hidden_units: int = 256, lr: float = 3e-3,
                   batch_size: int = 256) -> TokenInverter:
    """Train a :class:`TokenInverter` (Adam, cross-entropy) on the real positions of auxiliary text.

    ``hidden`` ``[M, T, H]``: the auxiliary text's hidden states at the cut; ``ids`` ``[M, T]``: its
    tokens; ``mask``: 1 at real tokens (padding is not trained on); ``vocab``: the tokenizer's size.
    Seeded: the same inputs give the same inverter, and the caller's random state is left untouched.
    """
    h = _hidden(hidden)
    for name, v, low in (("vocab", vocab, 1), ("epochs", epochs, 1), ("hidden_units", hidden_units, 0),
                         ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    vocab, hidden_units = int(vocab), int(hidden_units)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    y_all = _ids(ids, h.shape[:2], "ids", vocab)
    real = _mask(mask, h.shape[:2])
    x, y = h[real], y_all[real]
    if len(y) == 0:
        raise ValueError("no real (unmasked) positions to train the inverter on")
    mean, sd = x.mean(0), x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
    sd = sd.clamp_min(max(1e-3 * float(sd.max()), 1e-8))  # units (near) constant stay bounded
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        model = TokenInverter(h.shape[2], vocab, hidden_units, mean, sd)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.enable_grad(), _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), batch_size):
                b = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
    return model.eval()


def invert(inverter: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The inverter's most likely token at each position: ids ``[N, T]`` (int64) of hidden states ``[N, T, H]``."""
    h = _hidden(hidden)
    flat = h.reshape(-1, h.shape[2])
    out = []
    with torch.no_grad():
        for i in range(0, len(flat), 4096):
            logits = inverter(flat[i:i + 4096])
            out.append(logits.argmax(dim=-1))
    return (torch.cat(out) if out else torch.zeros(0, dtype=torch.long)).reshape(h.shape[:2])


def recovery(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """How many real (unmasked) positions ``pred`` recovers of ``truth`` (both ``[N, T]`` token ids).

    Returns ``rate`` (recovered / positions), ``chance`` (the share of the most frequent true token among
    those positions: what guessing that one token everywhere scores), ``advantage`` (``(rate - chance) /
    (1 - chance)``: 0 at chance, 1 when every token is recovered; None when one token fills every position),
    ``chance_token``, ``recovered`` and ``positions``.
    """
    if not isinstance(truth, torch.Tensor) or truth.dim() != 2:
        got = list(truth.shape) if isinstance(truth, torch.Tensor) else type(truth).__name__
        raise ValueError(f"truth must be token ids [rows, tokens], got {got}")
    t = _ids(truth, truth.shape, "truth")
    p = _ids(pred, truth.shape, "pred")
    real = _mask(mask, truth.shape)
    n = int(real.sum())
    if n == 0:
        raise ValueError("no real (unmasked) positions to score")
    hits = int((p[real] == t[real]).sum())
    counts = torch.bincount(t[real] - int(t[real].min()))
    top = int(counts.argmax())
    rate, chance = hits / n, int(counts[top]) / n
    return {"rate": rate, "chance": chance, "advantage": (rate - chance) / (1 - chance) if chance < 1 else None,
            "chance_token": top + int(t[real].min()), "recovered": hits, "positions": n}


def _rows_within(rows: torch.Tensor, real: torch.Tensor, cap: int) -> torch.Tensor:
    """The leading ``rows`` whose real positions add up to at most ``cap`` (at least one row)."""
    within = int((real[rows].sum(1).cumsum(0) <= cap).sum())
    return rows[:max(1, within)]


def _inverter_size(width: int, vocab: int, hidden_units: int) -> int:
    return (width + 1) * vocab if hidden_units == 0 else (width + 1) * hidden_units + (hidden_units + 1) * vocab


def text_inversion(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                   embedding: torch.Tensor | None = None, vocab: int | None = None, aux_fraction: float = 0.5,
                   seed: int = 0, epochs: int = 30, hidden_units: int = 256, max_train_positions: int = 20_000,
                   max_eval_positions: int = 4096) -> dict[str, Any]:
    """Both attacks on recorded hidden states ``[N, T, H]`` of the rows whose tokens ``ids`` ``[N, T]`` were.

    ``aux_fraction`` of the rows (whole sequences, drawn with ``seed``) stand for the attacker's auxiliary
    text: the learned inverter trains on them; both attacks are scored on the other rows, against the chance
    of those rows. ``embedding`` (``[V, H]``, the base model's token embeddings): also run
    :func:`nearest_embedding` (else ``nearest_embedding`` is None). ``vocab`` defaults to the embedding's rows.
    Bounded: the inverter trains on at most ``max_train_positions`` real positions (whole rows, fewer where one
    epoch of them would pass :data:`TRAIN_BUDGET`) for at most ``epochs`` epochs (fewer where they would pass it);
    both attacks are scored on at most ``max_eval_positions`` real positions (whole rows).
    Returns ``{"learned": recovery + settings (``epochs`` trained, ``train_positions``), "nearest_embedding":
    recovery | None, "chance", "aux_rows", "eval_rows"}`` (the rows used).
    """
    h = _hidden(hidden)
    if embedding is not None:
        embedding = _embedding(embedding, h.shape[2])
    if vocab is None:
        if embedding is None:
            raise ValueError("give vocab (the tokenizer's size) or embedding (whose rows are the vocabulary)")
        vocab = int(embedding.shape[0])
    y = _ids(ids, h.shape[:2], "ids", vocab)
    real = _mask(mask, h.shape[:2])
    if not 0 < aux_fraction < 1:
        raise ValueError(f"aux_fraction must be between 0 and 1 (exclusive), got {aux_fraction}")
    for name, v in (("max_train_positions", max_train_positions), ("max_eval_positions", max_eval_positions),
                    ("epochs", epochs)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    n = len(h)
    n_aux = int(round(aux_fraction * n))
    if n_aux < 1 or n - n_aux < 1:
        raise ValueError(f"{n} rows are too few for an auxiliary share of {aux_fraction}: the inverter needs rows "
                         "to train on and rows to be scored on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    size = _inverter_size(h.shape[2], int(vocab), int(hidden_units))
    aux = _rows_within(perm[:n_aux], real, min(int(max_train_positions), max(1, int(TRAIN_BUDGET // size))))
    ev = _rows_within(perm[n_aux:], real, int(max_eval_positions))
    positions = int(real[aux].sum())
    trained = min(int(epochs), max(1, int(TRAIN_BUDGET // max(1, positions * size))))
    inverter = train_inverter(h[aux], y[aux], real[aux], vocab, epochs=trained, seed=seed, hidden_units=hidden_units)
    learned = recovery(invert(inverter, h[ev]), y[ev], real[ev])
    nearest = None if embedding is None else recovery(nearest_embedding(h[ev], embedding), y[ev], real[ev])
    return {"learned": {**learned, "epochs": trained, "hidden_units": hidden_units, "train_positions": positions},
            "nearest_embedding": nearest, "chance": learned["chance"], "aux_rows": int(len(aux)),
            "eval_rows": int(len(ev))}


def _binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, T']`` padded with zeros to ``[N, width]`` (a batch of notes comes padded only to its longest)."""
    return F.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


def exact_field(values: torch.Tensor, fields: Mapping[str, torch.Tensor]) -> str | None:
    """The first of ``fields`` (name -> ``[N, T']``) that integer ``values`` ``[N, T]`` equal (padded with zeros
    to ``T``): a mask or ids element that crossed as the sender's field is; None where none does."""
    if values.dim() != 2 or values.is_floating_point():
        return None
    return next((n for n, v in fields.items() if v.dim() == 2 and len(v) == len(values) and not v.is_floating_point()
                 and v.shape[1] <= values.shape[1] and torch.equal(_widen(v, values.shape[1]).to(values.dtype), values)),
                None)


def token_inputs(hidden: torch.Tensor, fields: Mapping[str, torch.Tensor]) -> tuple[str, str | None] | None:
    """Which of a sender's raw input ``fields`` (name -> values of the recorded rows, in the order to prefer) hold
    the token ids behind hidden states ``[N, T, H]`` it sent, and which the padding mask: ``(ids, mask | None)``,
    or None where the values are no hidden states or no field holds token ids of their positions.

    Token ids: an integer field ``[N, T']`` (``T' <= T``: a batch of notes padded only to its longest) that is
    not all 0 and 1; the mask: another such field holding only 0 and 1."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        return None
    n, t = hidden.shape[:2]
    fit = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and len(v) == n
           and v.shape[1] <= t and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)}
    ids = next((k for k, v in fit.items() if not _binary(v)), None)
    if ids is None:
        return None
    mask = next((k for k, v in fit.items() if k != ids and v.shape == fit[ids].shape and _binary(v)), None)
    return ids, mask


def base_embedding(plan: Any, segment: str) -> tuple[torch.Tensor | None, str | None]:
    """The input embedding matrix ``[V, H]`` of the public base model that ``segment`` of ``plan`` (a
    :class:`~splitlearn.core.plan.Plan`) runs from a ``[networks.X] hf`` folder, as an attacker who knows that
    model holds it (read from the folder: the prelude and the blocks up to the segment's cut only);
    ``(None, why)`` where there is none."""
    from ...core.plan import beside_plan
    from ...models.hf import HFError
    from ...models.hfload import load_piece

    seg = plan.segments[segment]
    spec = plan.networks.get(seg.network) if seg.network else None
    if spec is None or spec.hf is None:
        return None, (f"segment {segment!r} runs no [networks.X] hf model folder, so the base model's embeddings "
                      "(the nearest-embedding attack) are not at hand")
    folder = beside_plan(plan, spec.hf.folder)
    try:
        piece = load_piece(folder, spec.hf.task, [seg.cut] if seg.cut else [], 0, config=spec.hf.config)
        table = piece.hf.get_input_embeddings().weight.detach().float()
    except (HFError, OSError, AttributeError) as e:
        return None, (f"the base model of network {seg.network!r} cannot be read from {folder} ({e}): audit where "
                      "the folder is at hand for the nearest-embedding attack")
    return table, None
