from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    HELLO: _ClassVar[Kind]
    ACTIVATION: _ClassVar[Kind]
    GRADIENT: _ClassVar[Kind]
    WEIGHTS: _ClassVar[Kind]
    COMMAND: _ClassVar[Kind]
    ACK: _ClassVar[Kind]
    STOP: _ClassVar[Kind]
    ERROR: _ClassVar[Kind]
    ALIGN: _ClassVar[Kind]
    CREDIT: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
HELLO: Kind
ACTIVATION: Kind
GRADIENT: Kind
WEIGHTS: Kind
COMMAND: Kind
ACK: Kind
STOP: Kind
ERROR: Kind
ALIGN: Kind
CREDIT: Kind

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "data", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    data: bytes
    extra: _containers.ScalarMap[str, bytes]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., data: _Optional[bytes] = ..., extra: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("sender", "receiver", "step", "kind", "wire", "tensors", "text")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    receiver: str
    step: int
    kind: Kind
    wire: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    text: str
    def __init__(self, sender: _Optional[str] = ..., receiver: _Optional[str] = ..., step: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., wire: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...
