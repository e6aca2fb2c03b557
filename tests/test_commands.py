"""The typed control messages of a ``[clients]`` run (wire/control.py) through their one encoder
and decoder (wire/messages.py): every instruction and reply round-trips, and a malformed field is
a WireError naming it."""

from __future__ import annotations

import dataclasses
import types
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlearn.wire import control as c
from splitlearn.wire import messages as m
from splitlearn.wire.codec import WireError

NAMES = st.text(min_size=0, max_size=12)
COUNT = st.integers(min_value=0, max_value=2**40)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


def _values(hint: typing.Any) -> st.SearchStrategy:
    """Values of a field's declared type (the kinds the control messages use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return COUNT
    if hint is c.Cursor:  # a checkpoint's (round, step): never before the start (0, -1)
        return st.builds(c.Cursor, COUNT, st.integers(min_value=-1, max_value=2**40))
    if hint is bool:
        return st.booleans()
    if hint is str:
        return NAMES
    if hint is typing.Any:
        return JSON
    if origin in (typing.Union, types.UnionType):
        return st.none() | _values(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return st.lists(_values(args[0]), max_size=4).map(tuple)
    if origin is dict:
        return st.dictionaries(NAMES, _values(args[1]), max_size=3)
    raise AssertionError(f"no values for {hint}")


def _of(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _values(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields).filter(lambda x: x.problem() is None)


def _round_trip(msg: m.Message) -> m.Message:
    return m.decode(m.encode(msg))


def test_every_instruction_and_reply_has_one_word():
    words = [cls.WORD for cls in c.INSTRUCTIONS.values()] + [cls.WORD for cls in c.REPLIES.values()]
    assert len(c.INSTRUCTIONS) == 13 and len(c.REPLIES) == 13
    assert all(words)
    for kinds in (c.INSTRUCTIONS, c.REPLIES):  # one word, one type (instructions and replies travel apart)
        assert len({cls.WORD for cls in kinds.values()}) == len(kinds)
    assert set(c.INSTRUCTIONS.values()) == set(c.Instruction.__subclasses__())  # every type is decodable
    assert set(c.REPLIES.values()) == set(c.Reply.__subclasses__())
    assert m.Kind.COMMAND.value == 6 and not hasattr(m.Kind, "STEP") and not hasattr(m.Kind, "CHECKPOINT")


@pytest.mark.parametrize("cls", list(c.INSTRUCTIONS.values()), ids=list(c.INSTRUCTIONS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_instruction_round_trips(cls, data):
    ins = data.draw(_of(cls))
    request, deadline = data.draw(st.integers(0, 2**62)), data.draw(st.floats(0, 1e12))
    msg = _round_trip(m.command("coordinator", "hospital-1", ins, request, deadline))
    assert msg.kind == m.Kind.COMMAND
    assert m.read_command(msg) == (request, deadline, ins)


@pytest.mark.parametrize("cls", list(c.REPLIES.values()), ids=list(c.REPLIES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_reply_round_trips(cls, data):
    answer = data.draw(_of(cls))
    request = data.draw(st.integers(0, 2**62))
    msg = _round_trip(m.reply("hospital-1", "coordinator", request, answer))
    assert msg.kind == m.Kind.ACK
    assert m.read_reply(msg) == (request, answer)


def _command(**body) -> m.Message:
    return m.Message(m.Kind.COMMAND, "a", "b", text=json.dumps({"request": 1, "deadline": 5.0, **body}))


@pytest.mark.parametrize("body, says", [
    ({"do": "turn", "turn": "3", "client": "h-1"}, "field 'turn' is not an integer"),
    ({"do": "turn", "turn": True, "client": "h-1"}, "field 'turn' is not an integer"),
    ({"do": "turn", "turn": 3}, "without its field 'client'"),
    ({"do": "turn", "turn": 3, "client": "h-1", "model": 7}, "field 'model'"),
    ({"do": "turn", "turn": 3, "client": "h-1", "x": 1}, "unknown fields 'x'"),
    ({"do": "load", "source": "s", "lend": "yes"}, "field 'lend' is not true or false"),
    ({"do": "rows", "train": [1, 2], "test": [1]}, "2 training and 1 test counts"),
    ({"do": "rows", "train": [1, -2], "test": [1, 1]}, "negative count -2"),
    ({"do": "rows", "train": [1, 2.5], "test": [1, 1]}, "field 'train'"),
    ({"do": "collect", "clients": ["a"], "samples": [1, 2]}, "1 clients and 2 sample counts"),
    ({"do": "download", "clients": "a", "requests": [1]}, "field 'clients'"),
    ({"do": "restore", "cursor": None, "attempt": 1}, "field 'cursor' is not [round, step]"),
    ({"do": "restore", "cursor": [3], "attempt": 1}, "field 'cursor' is not [round, step]"),
    ({"do": "restore", "cursor": [3, True], "attempt": 1}, "field 'cursor' is not [round, step]"),
    ({"do": "checkpoint", "cursor": [0, -2]}, "cursor [0, -2] is before the start"),
    ({"do": "stop", "reason": ["x"]}, "field 'reason'"),
    ({"do": "again"}, "unknown command 'again'"),
])
def test_a_malformed_instruction_is_a_wire_error_naming_its_field(body, says):
    with pytest.raises(WireError) as e:
        m.read_command(_command(**body))
    assert says in str(e.value)


def test_a_command_without_a_deadline_or_request_is_refused():
    with pytest.raises(WireError, match="deadline is not a number"):
        m.read_command(m.Message(m.Kind.COMMAND, "a", "b", text='{"do": "stop", "request": 1, "deadline": 1e999}'))
    with pytest.raises(WireError, match="'do' and 'request'"):
        m.read_command(m.Message(m.Kind.COMMAND, "a", "b", text='{"do": "stop", "request": true, "deadline": 1}'))


@pytest.mark.parametrize("body, says", [
    ({"reply": "census", "train": 3, "test": -1, "schema": {}}, "negative count -1"),
    ({"reply": "census", "train": 3, "test": 1, "schema": []}, "field 'schema'"),
    ({"reply": "collected", "averaged": ["a"], "refused": {"b": 3}}, "field 'refused'"),
    ({"reply": "held", "cursors": [[1, -1], [2, "2"]]}, "field 'cursors' is not a list of [round, step]"),
    ({"reply": "rejoined", "cursors": [[-1, 4]]}, "cursor [-1, 4] is before the start"),
    ({"reply": "loaded"}, "without its field 'source'"),
    ({"reply": "turn_done", "ok": 1}, "field 'ok' is not true or false"),
    ({"reply": "what"}, "unknown reply 'what'"),
])
def test_a_malformed_reply_is_a_wire_error_naming_its_field(body, says):
    msg = m.Message(m.Kind.ACK, "a", "b", text=json.dumps({"request": 2, **body}))
    with pytest.raises(WireError) as e:
        m.read_reply(msg)
    assert says in str(e.value)
