"""Tensor <-> bytes. The only place tensors are serialised; nothing here can run code.

A codec turns a tensor into an :class:`Encoded` (raw little-endian buffers plus its dtype and
shape) and back. Decoding checks the dtype against an allow-list and the byte count against
the shape before touching the data. Codecs are chosen per wire and direction by name:

=============  ============================================  ==========================
name           sends                                          bytes per element
=============  ============================================  ==========================
``raw``        the tensor's own dtype, exactly (labels)       its itemsize
``float32``    float32, exactly (the identity codec); a       4 (a 16-bit float: 2)
               16-bit float as itself (mixed precision)
``float16``    float16                                        2
``bfloat16``   bfloat16                                       2
``int8``       affine 8-bit quantisation, one scale/tensor    1 (+ 8 per tensor)
``int8:channel`` the same with one scale per channel (dim 1)  1 (+ 8 per channel)
``topk:F``     the largest fraction F of entries by size      4 + 4 per kept entry
``topk:F:ef``  the same, with error feedback at the sender    4 + 4 per kept entry
=============  ============================================  ==========================
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Encoded", "Codec", "WireError", "get_codec", "CODECS", "DTYPES", "MAX_ELEMENTS", "decoded_bytes", "floating",
           "check_values", "extremes", "to_buffer", "Float32", "Float16", "BFloat16", "Int8", "TopK", "dtype_name", "to_bytes",
           "from_bytes", "Owned", "Lent", "lend"]

DTYPES: dict[str, tuple[torch.dtype, str]] = {  # name -> (torch dtype, little-endian numpy storage)
    "float32": (torch.float32, "<f4"),
    "float64": (torch.float64, "<f8"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<u2"),  # stored as its raw 16 bits
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "?"),
}
_NAMES = {t: n for n, (t, _) in DTYPES.items()}
_ITEMSIZE = {n: np.dtype(s).itemsize for n, (_, s) in DTYPES.items()}
# dtypes whose bytes numpy holds as torch does (on a little-endian machine), a tensor's memory lent as it is
_AS_IS = {t for n, (t, _) in DTYPES.items() if n != "bfloat16"} if sys.byteorder == "little" else set()
MAX_ELEMENTS = 1 << 28  # refuse anything larger, whatever its header claims


class WireError(ValueError):
    """Received data that is malformed or not what was agreed (``wire``/``step`` when known)."""

    def __init__(self, message: str, *, wire: str = "", step: int = 0):
        super().__init__(message)
        self.wire, self.step = wire, step


class Owned(bytearray):
    """A tensor's bytes handed from one party to another of this process (:func:`~splitlearn.wire.messages.handed_over`):
    a copy the receiver alone holds, so decoding makes its tensor over this memory instead of copying it again."""


class Lent(np.ndarray):
    """A tensor one party of this process lends another with a message, not copied (:func:`lend`, or
    :meth:`Codec.encode_lent` straight from the tensor; the engine lends
    the tensors of a training step that the receiver takes as its leaf, and gradients): its bytes as a flat ``uint8``
    array over the tensor's own memory, as bytes go anywhere (over gRPC they are copied into the frame as ever);
    handed over in this process (:func:`~splitlearn.wire.messages.handed_over`) it stays lent. ``tensor`` is the
    sender's (detached: the same memory and autograd version counter), ``version`` the counter when it was lent.
    Decoding gives the receiver that memory (:func:`from_bytes`): a tensor written to in place after it was lent is
    refused there (WireError), never read changed; written to after it was decoded, autograd refuses the gradient of
    whichever side saved it (the counter is shared), as for any tensor written to after it was used. A copy or a
    slice of it is plain bytes (no ``tensor``)."""

    tensor: torch.Tensor | None
    version: int

    def __array_finalize__(self, obj: object) -> None:
        self.tensor, self.version = None, -1  # (set by lend alone: what numpy derives from it lends nothing)


def lend(data: bytes | memoryview) -> Lent | None:
    """``data`` as a :class:`Lent` where it is a view of the whole memory of a contiguous tensor in host memory that
    has no more memory than that (what :func:`to_buffer` gives without copying); else None (the caller copies)."""
    arr = data.obj if isinstance(data, memoryview) else None
    t = getattr(arr, "base", None)  # a tensor's numpy() view keeps the tensor as its base (numpy: the memory's owner)
    n = len(data)
    # a C-contiguous array as large as a contiguous tensor it views and as the tensor's storage: all of it, no more
    if not isinstance(t, torch.Tensor) or not isinstance(arr, np.ndarray) or not n or arr.nbytes != n \
            or not t.is_cpu or t.numel() * t.element_size() != n or not t.is_contiguous() or not arr.flags.c_contiguous \
            or t.untyped_storage().nbytes() != n:
        return None
    return _lent(arr, t)


def _lent_tensor(t: torch.Tensor) -> Lent | None:
    """What ``lend(to_buffer(t))`` gives, made from the tensor without the memoryview between (a training step's
    activations and gradients, three or more a step): where ``t`` is contiguous in host memory, all of its storage,
    and numpy holds its dtype as it is (not bfloat16; a little-endian machine); else None."""
    n = t.numel() * t.element_size()
    if not n or t.dtype not in _AS_IS or not t.is_cpu or not t.is_contiguous() or t.untyped_storage().nbytes() != n:
        return None
    t = t.detach() if t.requires_grad else t
    return _lent(t.numpy(), t)


def _lent(arr: np.ndarray, t: torch.Tensor) -> Lent:
    """``arr`` (all of ``t``'s memory) as the Lent of ``t``."""
    out = arr.reshape(-1).view(np.uint8).view(Lent)
    out.tensor, out.version = t, t._version
    return out


@dataclass(frozen=True)
class Encoded:
    codec: str
    dtype: str  # dtype of the decoded tensor
    shape: tuple[int, ...]
    data: bytes | memoryview  # a sender's: a view of the tensor's own memory, copied once, into the message
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Payload bytes: the data and the codec's side buffers."""
        return len(self.data) + sum(len(v) for v in self.extra.values())

    def lent(self) -> "Encoded":
        """The same, its data lent (:func:`lend`) where it is a tensor's whole memory, not copied in this process."""
        data = lend(self.data)
        return self if data is None else Encoded(self.codec, self.dtype, self.shape, data, self.extra)


def decoded_bytes(dtype: str, numel: int) -> int:
    """The most memory decoding ``numel`` elements of ``dtype`` takes (codecs decode through float32)."""
    return numel * max(4, _ITEMSIZE.get(dtype, 8))


def check_values(t: torch.Tensor, what: object, *, allow_nonfinite: bool = False, max_abs: float = math.inf) -> float:
    """Refuse (WireError) a received floating-point tensor with NaN or infinite entries, or with
    an entry larger than ``max_abs`` in magnitude; ``what`` names it in the error (formatted only then). Returns its
    largest finite magnitude (0.0 for an empty or integer tensor), which the learnt bounds compare too."""
    if not t.is_floating_point() or not t.numel():
        return 0.0
    low, high = extremes(t)
    top = max(-low, high)  # (NaN in both: the max is NaN)
    if not math.isfinite(top):
        if not allow_nonfinite:
            bad = int((~torch.isfinite(t)).sum())
            raise WireError(f"{what} holds {bad} non-finite value(s) (NaN or infinity); refused "
                            "(set allow_nonfinite = true on the wire to accept them)")
        top = float(t.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
    if top > max_abs:
        raise WireError(f"{what} holds a value of magnitude {top:.3g}, over the wire's max_abs of {max_abs:g}; "
                        "refused (raise max_abs on the wire if such values are expected)")
    return top


def extremes(t: torch.Tensor) -> tuple[float, float] | tuple[int, int]:
    """The lowest and the highest entry of a non-empty tensor, in one pass (``torch.aminmax``, no temporary); NaN in
    both where an entry is NaN."""
    low, high = torch.aminmax(t.detach() if t.requires_grad else t)
    return low.item(), high.item()


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise WireError(f"dtype {dtype} cannot be sent; allowed: {sorted(DTYPES)}")
    return _NAMES[dtype]


def floating(name: str) -> bool:
    """Whether a wire dtype's name (as the handshake agrees it) is a floating one: a tensor that carries a gradient."""
    return name in DTYPES and DTYPES[name][0].is_floating_point


def to_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes, as a view of its own memory where it is contiguous, on
    the CPU and little-endian already (no copy: the message is built from it directly). The view
    keeps the memory alive; the tensor must not change until the message is encoded."""
    t = t.detach() if t.requires_grad else t  # (each call torch would make for nothing costs microseconds a message)
    t = t if t.is_contiguous() else t.contiguous()
    t = t if t.is_cpu else t.cpu()
    name = dtype_name(t.dtype)
    if name == "bfloat16":
        t = t.view(torch.int16)  # numpy has no bfloat16: send its 16 bits
    arr = t.numpy().astype(DTYPES[name][1], copy=False)  # copies only on a big-endian machine
    return memoryview(arr).cast("B") if arr.size else memoryview(b"")


def to_bytes(t: torch.Tensor) -> bytes:
    return bytes(to_buffer(t))


def from_bytes(data: bytes | memoryview, dtype: str, shape: tuple[int, ...], to: str | None = None) -> torch.Tensor:
    """A tensor from raw little-endian bytes, after checking dtype, shape and length. ``to``: the
    dtype wanted in the end; a conversion is then the one copy made (else the bytes are copied
    once, so the tensor owns writable memory; bytes :class:`Owned` or a :class:`Lent` tensor are not copied)."""
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not allowed; allowed: {sorted(DTYPES)}")
    if min(shape, default=0) < 0:
        raise WireError(f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise WireError(f"{numel} elements exceed the limit of {MAX_ELEMENTS}")
    torch_dtype, storage = DTYPES[dtype]
    itemsize = _ITEMSIZE[dtype]
    if len(data) != numel * itemsize:
        raise WireError(f"{len(data)} bytes for shape {list(shape)} of {dtype} (expected {numel * itemsize})")
    if isinstance(data, Lent) and data.tensor is not None:  # lent in this process: the sender's memory, unless
        if data.tensor._version != data.version:  # written to since
            raise WireError("its tensor was written to in place after it was sent (a party of this process lent it, "
                            "and changed it before it was read)")
        if data.tensor.dtype == torch_dtype and (to is None or to == dtype):
            lent = data.tensor if data.tensor.shape == shape else data.tensor.view(shape)
            return lent.detach()  # (the same version counter: see Lent)
    arr = np.frombuffer(data, dtype=storage).reshape(shape)  # a view of the received bytes (read-only but Owned)
    if to is not None and to != dtype and dtype != "bfloat16" and to in ("float32", "float64", "float16"):
        return torch.from_numpy(arr.astype(DTYPES[to][1]))  # the conversion is the copy (exact, as torch's)
    t = torch.from_numpy(arr if isinstance(data, Owned) and arr.size else arr.copy())  # handed over: its memory
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class Codec:
    """Base codec: sends the tensor as ``wire_dtype`` (or its own dtype if None)."""

    name = "raw"
    wire_dtype: str | None = None

    def encode(self, t: torch.Tensor) -> Encoded:
        out_dtype = dtype_name(t.dtype)
        if self.wire_dtype is not None and t.dtype != DTYPES[self.wire_dtype][0]:
            t = t.to(DTYPES[self.wire_dtype][0])
        return Encoded(self.name, out_dtype, tuple(t.shape), to_buffer(t))

    def encode_lent(self, t: torch.Tensor) -> Encoded:
        """``encode(t).lent()``: its data lent where it is the tensor's whole memory (:func:`lend`), made from the
        tensor straight where a built-in codec sends it as it is (a codec of the user's always encodes)."""
        if type(self) in _AS_SENT and "encode" not in vars(self) and self._as_is(t) \
                and (data := _lent_tensor(t)) is not None:
            return Encoded(self.name, _NAMES[t.dtype], tuple(t.shape), data)
        return self.encode(t).lent()

    def _as_is(self, t: torch.Tensor) -> bool:
        """Whether :meth:`encode` sends ``t``'s own bytes, unchanged."""
        return self.wire_dtype is None or t.dtype == DTYPES[self.wire_dtype][0]

    def decode(self, e: Encoded) -> torch.Tensor:
        t = from_bytes(e.data, self.wire_dtype or e.dtype, e.shape, to=e.dtype)
        return t.to(DTYPES[e.dtype][0]) if e.dtype in DTYPES and t.dtype != DTYPES[e.dtype][0] else t


class Float32(Codec):
    """The identity codec: a tensor of 32 bits or fewer arrives as it was sent. A 16-bit float (``float16``,
    ``bfloat16``: what a party in mixed precision sends) travels as itself, two bytes an element; any other
    floating tensor as float32."""

    name, wire_dtype = "float32", "float32"
    HALF = ("float16", "bfloat16")

    def encode(self, t: torch.Tensor) -> Encoded:
        dtype = dtype_name(t.dtype)
        if dtype in self.HALF:
            return Encoded(self.name, dtype, tuple(t.shape), to_buffer(t))
        return super().encode(t)

    def _as_is(self, t: torch.Tensor) -> bool:
        return t.dtype == DTYPES[self.wire_dtype][0] or _NAMES.get(t.dtype) in self.HALF

    def decode(self, e: Encoded) -> torch.Tensor:
        if e.dtype in self.HALF:
            return from_bytes(e.data, e.dtype, e.shape)
        return super().decode(e)


class Float16(Codec):
    name, wire_dtype = "float16", "float16"


class BFloat16(Codec):
    name, wire_dtype = "bfloat16", "bfloat16"


class Int8(Codec):
    """Affine quantisation to 256 levels between the min and max of the tensor (``int8``) or of
    each channel, the second dimension (``int8:channel``).

    Error bound: ``|x - decode(encode(x))| <= (max - min) / 255 / 2`` per element, with the
    min and max of the tensor or of the element's channel.
    """

    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.name = "int8:channel" if per_channel else "int8"

    def _ranges(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel and x.dim() >= 2:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
        else:
            lo, hi = (x.min(), x.max()) if x.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            lo, hi = lo.reshape(1), hi.reshape(1)
        return lo, torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))

    def _view(self, v: torch.Tensor, x_dim: int) -> torch.Tensor:
        return v.reshape(1, -1, *([1] * (x_dim - 2))) if self.per_channel and x_dim >= 2 else v

    def encode(self, t: torch.Tensor) -> Encoded:
        x = t.detach().float()
        lo, scale = self._ranges(x)
        q = torch.round((x - self._view(lo, x.dim())) / self._view(scale, x.dim())).clamp_(0, 255).to(torch.uint8)
        params = torch.stack([lo, scale], dim=1).numpy().astype("<f4").tobytes()
        return Encoded(self.name, dtype_name(t.dtype), tuple(t.shape), to_buffer(q), {"affine": params})

    def decode(self, e: Encoded) -> torch.Tensor:
        channels = e.shape[1] if self.per_channel and len(e.shape) >= 2 else 1
        if len(e.extra.get("affine", b"")) != 8 * channels:
            raise WireError(f"{self.name} tensor without its {8 * channels}-byte affine parameters")
        params = torch.from_numpy(np.frombuffer(e.extra["affine"], dtype="<f4").reshape(channels, 2).copy())
        if not bool(torch.isfinite(params).all()):
            raise WireError(f"{self.name} tensor with non-finite affine parameters (offset or scale)")
        q = from_bytes(e.data, "uint8", e.shape, to="float32")  # the levels as floats: one copy
        lo, scale = self._view(params[:, 0], len(e.shape)), self._view(params[:, 1], len(e.shape))
        return (q * scale + lo).to(DTYPES[e.dtype][0])


class TopK(Codec):
    """Keep the ``fraction`` of entries largest in magnitude (at least one); the rest are zero.

    With error feedback (``topk:F:ef``) the sender adds what it left out last time to the next
    tensor of the same shape, so nothing is lost for good (Stich et al., 2018).
    """

    def __init__(self, fraction: float, error_feedback: bool = False):
        if not 0 < fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction, self.error_feedback = fraction, error_feedback
        self.name = f"topk:{fraction:g}" + (":ef" if error_feedback else "")
        self.residual: torch.Tensor | None = None

    def k(self, numel: int) -> int:
        return max(1, int(math.ceil(self.fraction * numel))) if numel else 0

    def encode(self, t: torch.Tensor) -> Encoded:
        flat = t.detach().float().reshape(-1)
        if self.error_feedback and self.residual is not None and self.residual.shape == flat.shape:
            flat = flat + self.residual
        idx = torch.topk(flat.abs(), self.k(flat.numel()), sorted=False).indices.sort().values
        if self.error_feedback:
            self.residual = flat.clone()
            self.residual[idx] = 0
        return Encoded(self.name, dtype_name(t.dtype), tuple(t.shape), to_buffer(flat[idx]),
                       {"indices": to_bytes(idx.to(torch.int32))})

    def decode(self, e: Encoded) -> torch.Tensor:
        numel, k = math.prod(e.shape), self.k(math.prod(e.shape))
        values = from_bytes(e.data, "float32", (k,))
        idx = from_bytes(e.extra.get("indices", b""), "int32", (k,)).long()
        if k and (idx.min() < 0 or idx.max() >= numel):
            raise WireError(f"top-k index out of range for shape {list(e.shape)}")
        out = torch.zeros(numel, dtype=torch.float32)
        out[idx] = values
        return out.reshape(e.shape).to(DTYPES[e.dtype][0])


CODECS = {c.name: c for c in (Codec, Float32, Float16, BFloat16)}
_AS_SENT = (Codec, Float32, Float16, BFloat16)  # the codecs that may lend a tensor straight (Codec.encode_lent)
_SHARED: dict[str, Codec] = {}  # name -> the one instance get_codec gives (made at its first call)


def get_codec(name: str) -> Codec:
    """A codec instance by name: ``float32``, ``float16``, ``bfloat16``, ``int8``, ``int8:channel``,
    ``topk:0.1`` (``topk:0.1:ef`` with error feedback) or ``raw``."""
    if name in ("int8", "int8:channel"):
        return Int8(per_channel=name.endswith("channel"))
    if name.startswith("topk:"):
        parts = name.split(":")
        try:
            if len(parts) > 3 or (len(parts) == 3 and parts[2] != "ef"):
                raise ValueError("expected topk:FRACTION or topk:FRACTION:ef")
            return TopK(float(parts[1]), error_feedback=len(parts) == 3)
        except ValueError as e:
            raise ValueError(f"bad top-k codec {name!r}: {e}") from None
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS) + ['int8', 'int8:channel']} "
                         "or 'topk:FRACTION[:ef]'")
    shared = _SHARED.get(name)  # (these keep no state: one instance serves every wire)
    if type(shared) is not CODECS[name]:  # (the first call, or a class put in CODECS since)
        shared = _SHARED[name] = CODECS[name]()
    return shared
