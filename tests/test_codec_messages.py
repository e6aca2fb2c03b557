"""Tensor codecs and the protobuf envelope round-trip exactly (or within stated bounds)."""

import numpy as np
import pytest
import torch

from splitlearn.wire.codec import DTYPES, Encoded, WireError, from_bytes, get_codec
from splitlearn.wire.messages import Kind, Limits, Message, decode, encode


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_raw_codec_roundtrips_every_allowed_dtype(dtype):
    t = (torch.randn(3, 5) * 10).to(DTYPES[dtype][0])
    enc = get_codec("raw").encode(t)
    assert len(enc.data) == t.numel() * t.element_size()
    back = get_codec("raw").decode(enc)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_float32_identity_is_exact_and_four_bytes_per_value():
    t = torch.randn(32, 128)
    enc = get_codec("float32").encode(t)
    assert enc.nbytes == 32 * 128 * 4
    assert torch.equal(get_codec("float32").decode(enc), t)


@pytest.mark.parametrize("name,bytes_per,tol", [("float16", 2, 1e-3), ("bfloat16", 2, 1e-2)])
def test_half_codecs(name, bytes_per, tol):
    t = torch.randn(64, 16)
    enc = get_codec(name).encode(t)
    assert enc.nbytes == t.numel() * bytes_per
    back = get_codec(name).decode(enc)
    assert back.dtype == torch.float32
    assert torch.allclose(back, t, rtol=tol, atol=tol)


def test_int8_within_half_a_step():
    t = torch.randn(64, 32) * 3
    enc = get_codec("int8").encode(t)
    assert enc.nbytes == t.numel() + 8
    back = get_codec("int8").decode(enc)
    step = (t.max() - t.min()) / 255
    assert (back - t).abs().max() <= step / 2 + 1e-5


def test_topk_keeps_exactly_k_largest():
    t = torch.randn(10, 50)
    codec = get_codec("topk:0.1")
    back = codec.decode(codec.encode(t))
    kept = back != 0
    assert int(kept.sum()) == 50
    assert torch.equal(back[kept], t[kept])
    assert t.abs()[kept].min() >= t.abs()[~kept].max()


def test_envelope_roundtrip():
    msg = Message(Kind.GRADIENT, "server", "hospital", 42, "bottom->top",
                  {"t": get_codec("float32").encode(torch.randn(4, 3))}, text="hi")
    back = decode(encode(msg))
    assert back == msg


@pytest.mark.parametrize("bad", [b"\xff\xfe garbage", bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))])
def test_random_bytes_are_refused(bad):
    with pytest.raises(WireError):
        decode(bad)


def test_disallowed_dtype_and_lying_shape_are_refused():
    good = Message(Kind.ACTIVATION, "a", "b", 1, "w", {"t": get_codec("float32").encode(torch.zeros(2, 2))})
    data = encode(good).replace(b"float32", b"object!")
    with pytest.raises(WireError, match="not allowed"):
        decode(data)
    with pytest.raises(WireError, match="bytes for shape"):
        from_bytes(b"\x00" * 12, "float32", (2, 2))
    with pytest.raises(WireError, match="exceed"):
        from_bytes(b"", "float32", (1 << 20, 1 << 20))
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(b"\x00" * 100, Limits(message_bytes=10))


def test_int8_per_channel_is_tighter_on_channels_of_different_scales():
    t = torch.randn(16, 4, 5, 5) * torch.tensor([0.01, 1.0, 10.0, 100.0]).reshape(1, 4, 1, 1)
    per_tensor, per_channel = get_codec("int8"), get_codec("int8:channel")
    e = per_channel.encode(t)
    assert e.nbytes == t.numel() + 8 * 4
    back = per_channel.decode(e)
    for c in range(4):
        step = (t[:, c].max() - t[:, c].min()) / 255
        assert (back[:, c] - t[:, c]).abs().max() <= step / 2 + 1e-4
    assert (back[:, 0] - t[:, 0]).abs().max() < (per_tensor.decode(per_tensor.encode(t))[:, 0] - t[:, 0]).abs().max()


def test_topk_error_feedback_sends_what_it_left_out_later():
    sender, receiver = get_codec("topk:0.25:ef"), get_codec("topk:0.25:ef")
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    first = receiver.decode(sender.encode(t))
    assert first.tolist() == [[4.0, 0.0, 0.0, 0.0]]
    second = receiver.decode(sender.encode(torch.zeros(1, 4)))
    assert second.tolist() == [[0.0, 3.0, 0.0, 0.0]]  # the largest of what was left out
    total = first + second + sum(receiver.decode(sender.encode(torch.zeros(1, 4))) for _ in range(2))
    assert torch.equal(total, t)  # after four sends everything arrived


@pytest.mark.parametrize("bad", ["topk:2", "topk:x", "topk:0.1:zz", "int9", "gzip"])
def test_bad_codec_names(bad):
    with pytest.raises(ValueError):
        get_codec(bad)


@pytest.mark.parametrize("codec", ["float32", "float16", "bfloat16", "int8", "int8:channel", "topk:0.1", "raw"])
@pytest.mark.parametrize("step", [0, 7, -1, 2**40, -(2**40)])
def test_the_envelope_splitlearn_writes_is_byte_for_byte_what_protobuf_writes(codec, step):
    """messages.encode builds the Envelope from its parts (a tensor's bytes copied once, from its
    own memory); protobuf must read it back as the same message and would write the same bytes."""
    from splitlearn.wire import messages as msgs
    from splitlearn.wire.codec import get_codec
    from splitlearn.wire.proto import splitlearn_pb2 as pb

    t = torch.randn(64, 32, 4, 4)
    enc = get_codec(codec).encode(t)
    assert isinstance(enc.data, memoryview)  # a view of the encoded tensor, not a copy
    msg = msgs.Message(msgs.Kind.ACTIVATION, "hospital-1", "server", step, "bottom->top", {"t": enc},
                       text="why" if step == 7 else "")
    ours = msgs.encode(msg)
    env = pb.Envelope(sender=msg.sender, receiver=msg.receiver, step=step, kind=int(msg.kind), wire=msg.wire,
                      text=msg.text)
    env.tensors.add(name="t", dtype=enc.dtype, shape=list(enc.shape), codec=enc.codec, data=bytes(enc.data),
                    extra=enc.extra)
    assert ours == env.SerializeToString()
    back = msgs.decode(memoryview(b"D" + bytes(8) + ours)[9:])  # as the gRPC transport hands it on
    assert (back.kind, back.sender, back.receiver, back.step, back.wire, back.text) == \
        (msg.kind, msg.sender, msg.receiver, step, msg.wire, msg.text)
    assert back.tensors["t"].data == bytes(enc.data) and back.tensors["t"].extra == enc.extra
    decoded = get_codec(codec).decode(back.tensors["t"])
    assert torch.equal(decoded, get_codec(codec).decode(enc))


def test_empty_fields_and_tensors_are_left_out_as_protobuf_leaves_them_out():
    from splitlearn.wire import messages as msgs
    from splitlearn.wire.codec import get_codec
    from splitlearn.wire.proto import splitlearn_pb2 as pb

    for msg in [msgs.Message(msgs.Kind.STOP, "a", "b"), msgs.Message(msgs.Kind.HELLO, "a", "b", text='{"x": 1}'),
                msgs.Message(msgs.Kind.ACTIVATION, "a", "b", 3, "w", {"t": get_codec("float32").encode(torch.zeros(0, 3))})]:
        env = pb.Envelope(sender=msg.sender, receiver=msg.receiver, step=msg.step, kind=int(msg.kind), wire=msg.wire,
                          text=msg.text)
        for name, e in msg.tensors.items():
            env.tensors.add(name=name, dtype=e.dtype, shape=list(e.shape), codec=e.codec, data=bytes(e.data))
        assert msgs.encode(msg) == env.SerializeToString()


# -- in one process: messages handed over whole, metered at the bytes the wire would carry --------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

import splitlearn.wire.codec as codec_module  # noqa: E402

from splitlearn.wire.messages import checked, encoded_size, handed_over  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Kind)), st.text(max_size=300), st.integers(-2**63, 2**63 - 1), st.text(max_size=20),
       st.lists(st.tuples(st.sampled_from(["float32", "raw", "int8", "float16", "topk:0.5"]),
                          st.lists(st.integers(0, 70), min_size=0, max_size=4)), max_size=3),
       st.text(max_size=150), st.text(max_size=3))
def test_a_message_handed_over_is_metered_at_the_bytes_of_its_encoding(kind, text, step, wire, tensors, sender, tag):
    """``encoded_size`` is ``len(encode(msg))`` for any message (names of any characters, negative steps, steps
    and shapes of every varint width, empty tensors, codecs with side buffers), and a message handed over keeps it."""
    encs = {f"t{i}{tag}": get_codec(codec).encode(torch.randn(shape)) for i, (codec, shape) in enumerate(tensors)}
    msg = Message(kind, sender, "server", step, wire, encs, text)
    assert encoded_size(msg) == len(encode(msg)) == encoded_size(handed_over(msg))
    assert decode(encode(handed_over(msg))) == decode(encode(msg))


def test_a_tensor_given_as_any_buffer_is_sized_by_its_bytes():
    """``encoded_size`` counts a buffer's bytes, not its length: a numpy array or a float memoryview of 12 floats
    is 48 bytes, as ``encode`` writes them."""
    import numpy as np

    arr = np.arange(12, dtype=np.float32)
    for data in (arr, memoryview(arr), memoryview(arr).cast("B"), arr.tobytes(), bytearray(arr.tobytes())):
        msg = Message(Kind.ACTIVATION, "hospital", "server", 1, "bottom", {"t": Encoded("float32", "float32", (12,), data)})
        assert encoded_size(msg) == len(encode(msg)) == encoded_size(handed_over(msg))


def test_a_message_handed_over_is_the_receivers_own_and_is_decoded_without_a_copy():
    """The sender may change its tensor once sent; the receiver's tensor is made over the handed-over bytes."""
    t = torch.randn(4, 8)
    msg = handed_over(Message(Kind.ACTIVATION, "hospital", "server", 3, "bottom", {"t": get_codec("float32").encode(t)}))
    sent = t.clone()
    t.mul_(-1)  # the sender's activation changes after the send
    got = get_codec("float32").decode(checked(msg).tensors["t"])
    assert torch.equal(got, sent)
    got.add_(1)  # writable, and the message's own memory: no copy was made
    assert torch.equal(get_codec("float32").decode(msg.tensors["t"]), sent + 1)


def test_a_message_handed_over_meets_the_limits_an_encoded_one_does():
    big = Message(Kind.ACTIVATION, "hospital", "server", 1, "w", {"t": get_codec("float32").encode(torch.zeros(64, 64))})
    for limits in (Limits(message_bytes=1000), Limits(tensor_bytes=1000), Limits(max_dims=1), Limits(name_chars=2)):
        with pytest.raises(WireError) as encoded:
            decode(encode(big), limits)
        with pytest.raises(WireError) as whole:
            checked(handed_over(big), limits)
        assert str(whole.value) == str(encoded.value)


def test_a_run_in_one_process_encodes_and_decodes_no_message(monkeypatch):
    """The simulation hands every message over whole (none is encoded nor parsed), and its parties meter the
    bytes of the gRPC run (tests/test_accounting.py compares them)."""
    import splitlearn
    import splitlearn.wire.link as link
    import splitlearn.wire.messages as messages

    counted = {"encode": 0, "decode": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            counted[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(link, "encode", counting("encode", link.encode))
    monkeypatch.setattr(messages, "decode", counting("decode", messages.decode))  # (a link parses with it)
    from .conftest import EXAMPLES

    result = splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1)
    assert counted == {"encode": 0, "decode": 0}
    assert result["parties"]["hospital"]["bytes_sent"] > 1000 * 45  # the activations of 45 batches, metered


def test_a_tensor_lent_in_one_process_is_the_senders_memory_and_refused_once_written_to():
    """A tensor its sender lends (codec.lend) is handed over in this process as it is (messages.handed_over) and
    decoded over the sender's own memory, not copied; one written to in place before it was read is refused, never
    read changed; written to after it was read, autograd refuses the gradient that saved it. Bytes that are no
    tensor's whole memory are not lent, and what is not lent is copied once at the hand-over."""
    import copy

    from splitlearn.wire.codec import Lent, Owned, lend
    from splitlearn.wire.messages import handed_over

    def sent(t, lent=True):
        enc = get_codec("float32").encode(t)
        if lent and lend(enc.data) is not None:
            enc = Encoded(enc.codec, enc.dtype, enc.shape, lend(enc.data), enc.extra)
        return handed_over(Message(Kind.ACTIVATION, "a", "b", 0, "w", {"t": enc})).tensors["t"]

    x = torch.randn(4, 3)
    enc = sent(x)
    assert isinstance(enc.data, Lent) and enc.nbytes == 4 * 3 * 4
    got = get_codec("float32").decode(enc)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, x)
    assert len(encode(Message(Kind.ACTIVATION, "a", "b", 0, "w", {"t": enc}))) > 48  # as bytes, it goes anywhere
    assert isinstance(sent(x, lent=False).data, Owned)  # not lent: a copy
    assert get_codec("float32").decode(sent(x, lent=False)).data_ptr() != x.data_ptr()
    assert isinstance(sent(x.t()).data, Lent)  # not contiguous: encoding copied it, and that copy is lent
    assert lend(memoryview(torch.randn(8, 3)[:4].numpy()).cast("B")) is None  # a part of a larger memory: copied
    assert lend(memoryview(b"abcd")) is None

    y = torch.randn(4, 3)
    enc = sent(y)
    y.mul_(2)  # the sender writes into what it sent before the receiver read it
    with pytest.raises(WireError, match="written to in place after it was sent"):
        get_codec("float32").decode(enc)

    z = torch.randn(4, 3)
    leaf = get_codec("float32").decode(sent(z)).requires_grad_(True)  # the receiver's leaf, saved by its product
    out = (leaf * leaf).sum()
    z.add_(1)  # written after it was read: the shared version counter tells autograd
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()

    w = torch.randn(4, 3)
    kept = copy.deepcopy(sent(w).data)  # what numpy derives from a Lent lends nothing: plain bytes
    assert isinstance(kept, Lent) and kept.tensor is None
    back = get_codec("float32").decode(Encoded("float32", "float32", (4, 3), kept))
    assert torch.equal(back, w) and back.data_ptr() != w.data_ptr()

    half = torch.randn(4, 3).to(torch.bfloat16)  # its bits are reinterpreted when encoded (a copy): copied, not lent
    assert isinstance(sent(half).data, Owned) and torch.equal(get_codec("float32").decode(sent(half)), half)


class _Negating(codec_module.Codec):
    """A codec of a user's: its own encode (the shortcut of a codec that sends a tensor as it is must not skip it)."""

    name = "negating"

    def encode(self, t):
        return super().encode(~t if t.dtype == torch.bool else -t)


class _HalfIsBFloat16(codec_module.Float32):
    """Float32's encode, with a float16 tensor converted (only bfloat16 travels as itself)."""

    HALF = ("bfloat16",)


class _Float16Wire(codec_module.Float32):
    wire_dtype = "float16"


_OWN = {"negating": _Negating, "half is bfloat16": _HalfIsBFloat16, "float16 wire": _Float16Wire}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["float32", "raw", "float16", "bfloat16", "int8", "topk:0.5", *_OWN]),
       st.sampled_from(["float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]),
       st.lists(st.integers(0, 5), min_size=0, max_size=3), st.sampled_from(["whole", "transposed", "part"]),
       st.booleans())
def test_a_tensor_lent_straight_is_what_encoding_then_lending_gives(name, dtype, shape, layout, grad):
    """``Codec.encode_lent`` (what the engine sends a training step's activations and gradients with) gives what
    ``encode(t).lent()`` gives for every codec, dtype and layout: the same codec, dtype, shape and bytes, lent where
    that is lent (the tensor's whole memory), and the same tensor decoded; a codec that encodes its own way is used."""
    import numpy as np

    t = (torch.randn(tuple(shape)) * 3).to(codec_module.DTYPES[dtype][0])
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "part" and t.dim() and t.shape[0] > 1:
        t = t[1:]
    if grad and t.is_floating_point():
        t = t.clone().requires_grad_(True)
    codec = _OWN[name]() if name in _OWN else get_codec(name)
    if name in ("int8", "topk:0.5") and not t.is_floating_point():
        return  # (they take floating tensors)
    want, got = codec.encode(t).lent(), codec.encode_lent(t)
    assert (got.codec, got.dtype, got.shape, got.extra) == (want.codec, want.dtype, want.shape, want.extra)
    assert isinstance(got.data, codec_module.Lent) == isinstance(want.data, codec_module.Lent)
    assert np.array_equal(np.frombuffer(got.data, np.uint8), np.frombuffer(want.data, np.uint8))
    out = codec.decode(got)
    assert out.dtype == codec.decode(want).dtype and torch.equal(out, codec.decode(want))
    if isinstance(got.data, codec_module.Lent):  # the sender's own memory where that is lent, a copy's else
        ptr = t.data_ptr() if t.numel() else None
        assert (got.data.tensor.data_ptr() == ptr) == (want.data.tensor.data_ptr() == ptr)


def test_a_hello_read_twice_is_parsed_once_and_each_reader_gets_its_own(monkeypatch):
    """A hello handed over in one process is read by a turn's switch and by its session: parsed once per limits, a
    reader's changes to its dict not seen by the next, limits that refuse it still refuse it, and a copy of the
    message with another text (``dataclasses.replace``) is read anew."""
    import dataclasses

    import splitlearn.wire.messages as messages

    parses = []
    parse = messages.parse_json
    monkeypatch.setattr(messages, "parse_json", lambda text, limits: parses.append(text) or parse(text, limits))
    msg = messages.hello("hospital", "server", "abc", "ids", rows=[3, 4], plan_parts={"a": "1"})
    first = messages.read_hello(msg, Limits())
    first["rows"] = None
    assert messages.read_hello(msg, Limits()) == {**first, "rows": [3, 4]} and len(parses) == 1
    with pytest.raises(WireError, match="exceeds the limit of 10"):
        messages.read_hello(msg, Limits(text_bytes=10))
    other = dataclasses.replace(msg, text=msg.text.replace('"abc"', '"xyz"'))
    assert messages.read_hello(other, Limits())["plan_hash"] == "xyz"


def test_in_one_process_the_engine_lends_the_tensors_of_its_training_steps(monkeypatch):
    """A two-party run in one process lends each training step's activation (the receiver's leaf, which autograd
    keeps anyone from writing into) and gradient instead of copying them; labels, the handshake's and the
    evaluations' tensors are copied once, as a receiver may write into them. Training still matches the unsplit model
    (tests/test_equivalence.py checks it to the bit)."""
    import splitlearn
    import splitlearn.wire.codec as codec
    import splitlearn.wire.messages as messages
    from .conftest import EXAMPLES

    seen = {"copied": 0, "lent": 0}

    def owned(data):
        seen["copied"] += 1
        return codec.Owned(data)

    def decoding(fn):
        def wrapped(data, *a, **k):
            seen["lent"] += isinstance(data, codec.Lent)
            return fn(data, *a, **k)
        return wrapped

    monkeypatch.setattr(messages, "Owned", owned)
    monkeypatch.setattr(codec, "from_bytes", decoding(codec.from_bytes))
    result = splitlearn.train(EXAMPLES / "vanilla.toml", epochs=1)
    tensors = sum(row["messages"] for p in result["parties"].values() for row in p["received"]
                  if row["direction"] in ("forward", "backward"))
    steps = result["parties"]["hospital"]["train_steps"]
    assert steps == 45 and seen["lent"] == 2 * steps  # an activation and its gradient, every training step
    assert seen["copied"] == tensors - 2 * steps > steps  # the labels, the handshake, the evaluations
