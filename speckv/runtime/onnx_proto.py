"""Just enough of the ONNX protobuf format, in pure Python, for the torch- and onnx-free runtime.

The runtime's base install is numpy + onnxruntime; the ``onnx`` package (and its protobuf
classes) belongs to the training extra. onnxruntime runs the graph but does not hand back its
weights, and speckv wants three small things from the file itself: its metadata (read before
onnxruntime is asked to load it, so a foreign or newer file gets speckv's own message), the
initializers (for the pure-numpy reference of the same MLP) and a tiny Identity model (the
latency floor of ``speckv bench-controller``). This module reads and writes exactly those
parts of the protobuf wire format; every field it does not know is skipped.

Field numbers are those of ``onnx/onnx.proto`` (ModelProto, GraphProto, NodeProto,
AttributeProto, TensorProto, ValueInfoProto and the type/shape messages).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

# wire types
_VARINT: Final = 0
_FIXED64: Final = 1
_LEN: Final = 2
_FIXED32: Final = 5

# TensorProto.DataType values speckv's graphs use, and their little-endian numpy types
FLOAT: Final = 1
INT32: Final = 6
INT64: Final = 7
DOUBLE: Final = 11
_NUMPY_TYPES: Final = {FLOAT: "<f4", INT32: "<i4", INT64: "<i8", DOUBLE: "<f8"}
_EXTERNAL: Final = 1  # TensorProto.DataLocation.EXTERNAL


class ProtoError(ValueError):
    """The bytes are not a protobuf message of the expected shape."""


@dataclass(frozen=True)
class Node:
    """One ``NodeProto``: operator, wiring and the attributes speckv reads."""

    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, object]


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: name, element type and shape (int or symbolic name)."""

    name: str
    elem_type: int
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Model:
    """The parts of a ``ModelProto`` the runtime uses."""

    ir_version: int
    opsets: Mapping[str, int]
    metadata: Mapping[str, str]
    nodes: tuple[Node, ...] = ()
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict)
    inputs: tuple[ValueInfo, ...] = ()
    outputs: tuple[ValueInfo, ...] = ()


# --------------------------------------------------------------------------------- reading
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def _spans(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview, int, int]]:
    """(field number, wire type, value, start, end) of each field of one message, in order.

    ``value`` is an int for varints and a zero-copy slice otherwise; ``buf[start:end]`` is
    the whole field, key included.
    """
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        value: int | memoryview
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_LEN, _FIXED32, _FIXED64):
            if wire == _LEN:
                size, pos = _varint(buf, pos)
            else:
                size = 4 if wire == _FIXED32 else 8
            if pos + size > end:
                raise ProtoError("field runs past the end of its message")
            value = buf[pos:pos + size]
            pos += size
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        yield number, wire, value, start, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message, in file order."""
    for number, wire, value, _, _ in _spans(buf):
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise ProtoError("expected a string field")
    return bytes(value).decode("utf-8")


def _msg(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise ProtoError("expected a message field")
    return value


def _ints(wire: int, value: int | memoryview) -> list[int]:
    """A repeated int64 field, packed or not."""
    if wire == _VARINT:
        return [_signed(int(value))]  # type: ignore[arg-type]
    buf, out, pos = _msg(value), [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(_signed(v))
    return out


def _string_pair(buf: memoryview) -> tuple[str, str]:
    key = value = ""
    for number, _, v in _fields(buf):
        if number == 1:
            key = _text(v)
        elif number == 2:
            value = _text(v)
    return key, value


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    name, dims, dtype, raw = "", [], 0, None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, v in _fields(buf):
        if number == 1:
            dims += _ints(wire, v)
        elif number == 2:
            dtype = int(v)  # type: ignore[arg-type]
        elif number == 4:  # float_data
            data = _msg(v) if wire == _LEN else v
            floats += np.frombuffer(data, "<f4").tolist()  # type: ignore[arg-type]
        elif number in (5, 7):  # int32_data, int64_data (varints)
            ints += _ints(wire, v)
        elif number == 8:
            name = _text(v)
        elif number == 9:
            raw = bytes(_msg(v))
        elif number == 14 and v == _EXTERNAL:
            raise ProtoError(f"initializer {name or '?'} keeps its data in an external file")
    if dtype not in _NUMPY_TYPES:
        raise ProtoError(f"initializer {name!r} has element type {dtype}, which speckv's "
                         "reader does not handle")
    if raw is not None:
        array = np.frombuffer(raw, _NUMPY_TYPES[dtype])
    else:
        array = np.asarray(floats if dtype in (FLOAT, DOUBLE) else ints, _NUMPY_TYPES[dtype])
    count = int(np.prod(dims)) if dims else 1
    if array.size != count:
        raise ProtoError(f"initializer {name!r}: {array.size} values for shape {dims}")
    return name, array.astype(array.dtype.newbyteorder("="), copy=True).reshape(dims)


def _attribute(buf: memoryview) -> tuple[str, object]:
    name, value = "", None
    for number, wire, v in _fields(buf):
        if number == 1:
            name = _text(v)
        elif number == 2:  # f
            value = struct.unpack("<f", _msg(v))[0]
        elif number == 3:  # i
            value = _signed(int(v))  # type: ignore[arg-type]
        elif number == 4:  # s
            value = bytes(_msg(v))
        elif number == 5:  # t
            value = _tensor(_msg(v))[1]
        elif number == 7:  # floats
            data = _msg(v) if wire == _LEN else v
            prev = value if isinstance(value, list) else []
            value = prev + np.frombuffer(data, "<f4").tolist()  # type: ignore[arg-type]
        elif number == 8:  # ints
            prev = value if isinstance(value, list) else []
            value = prev + _ints(wire, v)
    return name, value


def _node(buf: memoryview) -> Node:
    op_type, domain = "", ""
    inputs: list[str] = []
    outputs: list[str] = []
    attrs: dict[str, object] = {}
    for number, _, v in _fields(buf):
        if number == 1:
            inputs.append(_text(v))
        elif number == 2:
            outputs.append(_text(v))
        elif number == 4:
            op_type = _text(v)
        elif number == 5:
            key, value = _attribute(_msg(v))
            attrs[key] = value
        elif number == 7:
            domain = _text(v)
    return Node(op_type, domain, tuple(inputs), tuple(outputs), attrs)


def _value_info(buf: memoryview) -> ValueInfo:
    name, elem_type = "", 0
    shape: list[int | str | None] = []
    for number, _, v in _fields(buf):
        if number == 1:
            name = _text(v)
        elif number == 2:  # TypeProto
            for n2, _, tensor in _fields(_msg(v)):
                if n2 != 1:  # tensor_type
                    continue
                for n3, _, t in _fields(_msg(tensor)):
                    if n3 == 1:
                        elem_type = int(t)  # type: ignore[arg-type]
                    elif n3 == 2:  # TensorShapeProto
                        for n4, _, dim in _fields(_msg(t)):
                            if n4 != 1:
                                continue
                            size: int | str | None = None
                            for n5, _, d in _fields(_msg(dim)):
                                size = int(d) if n5 == 1 else _text(d)  # type: ignore[arg-type]
                            shape.append(size)
    return ValueInfo(name, elem_type, tuple(shape))


def parse_model(data: bytes, *, graph: bool = True) -> Model:
    """Read a serialized ``ModelProto``; with ``graph=False`` only its header and metadata.

    Raises :class:`ProtoError` when ``data`` is not a protobuf message, or not one that
    looks like an ONNX model (no graph and no IR version).
    """
    buf = memoryview(data)
    ir_version, graph_buf = 0, None
    opsets: dict[str, int] = {}
    metadata: dict[str, str] = {}
    for number, _, v in _fields(buf):
        if number == 1:
            ir_version = int(v)  # type: ignore[arg-type]
        elif number == 7:
            graph_buf = _msg(v)
        elif number == 8:
            domain, version = "", 0
            for n2, _, v2 in _fields(_msg(v)):
                if n2 == 1:
                    domain = _text(v2)
                elif n2 == 2:
                    version = int(v2)  # type: ignore[arg-type]
            opsets[domain] = version
        elif number == 14:
            key, value = _string_pair(_msg(v))
            metadata[key] = value
    if graph_buf is None or not ir_version:
        raise ProtoError("no ONNX graph or IR version")
    if not graph:
        return Model(ir_version, opsets, metadata)
    nodes: list[Node] = []
    inits: dict[str, np.ndarray] = {}
    inputs: list[ValueInfo] = []
    outputs: list[ValueInfo] = []
    for number, _, v in _fields(graph_buf):
        if number == 1:
            nodes.append(_node(_msg(v)))
        elif number == 5:
            name, array = _tensor(_msg(v))
            inits[name] = array
        elif number == 11:
            inputs.append(_value_info(_msg(v)))
        elif number == 12:
            outputs.append(_value_info(_msg(v)))
    return Model(ir_version, opsets, metadata, tuple(nodes), inits, tuple(inputs), tuple(outputs))


# --------------------------------------------------------------------------------- writing
def _put_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _put(number: int, value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return _put_varint(number << 3 | _VARINT) + _put_varint(value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _put_varint(number << 3 | _LEN) + _put_varint(len(data)) + data


def _put_value_info(name: str, elem_type: int, shape: tuple[int | str, ...]) -> bytes:
    dims = b"".join(_put(1, _put(1, d) if isinstance(d, int) else _put(2, d)) for d in shape)
    tensor_type = _put(1, elem_type) + _put(2, dims)
    return _put(1, name) + _put(2, _put(1, tensor_type))


def identity_model(width: int, *, opset: int = 17, ir_version: int = 8) -> bytes:
    """A serialized ONNX model ``out = Identity(features)`` over float32 ``[batch, width]``.

    It has the controller's input but no work: the latency floor of one onnxruntime call.
    """
    node = _put(1, "features") + _put(2, "out") + _put(3, "floor") + _put(4, "Identity")
    graph = (_put(1, node) + _put(2, "floor")
             + _put(11, _put_value_info("features", FLOAT, ("batch", width)))
             + _put(12, _put_value_info("out", FLOAT, ("batch", width))))
    return (_put(1, ir_version) + _put(2, "speckv") + _put(7, graph)
            + _put(8, _put(1, "") + _put(2, opset)))


def replace_metadata(data: bytes, metadata: Mapping[str, str | None]) -> bytes:
    """``data`` (a serialized ModelProto) with metadata entries set, or removed where None.

    Every other field is copied byte for byte; the entries are appended after them.
    """
    buf = memoryview(data)
    kept: dict[str, str] = {}
    out = bytearray()
    for number, _, v, start, end in _spans(buf):
        if number == 14:
            key, value = _string_pair(_msg(v))
            kept[key] = value
        else:
            out += buf[start:end]
    for key, value in metadata.items():
        if value is None:
            kept.pop(key, None)
        else:
            kept[key] = value
    for key, value in kept.items():
        out += _put(14, _put(1, key) + _put(2, value))
    return bytes(out)


def _name(buf: memoryview, number: int) -> str:
    """The string field ``number`` of a message (a tensor's or value info's name)."""
    for n, _, v in _fields(buf):
        if n == number:
            return _text(v)
    return ""


def extract(data: bytes, outputs: tuple[str, ...] | list[str]) -> bytes:
    """``data`` (a serialized ModelProto) reduced to what computes ``outputs``.

    Nodes, initializers, inputs and value infos that none of ``outputs`` depends on are
    dropped, and so are the other outputs; everything else (metadata, opsets, node order) is
    copied byte for byte. onnxruntime runs every node of a graph whatever outputs a call
    asks for, so a graph with two independent heads is run as two extracted models.
    """
    buf = memoryview(data)
    spans = list(_spans(buf))
    graph_span = next((s for s in spans if s[0] == 7), None)
    if graph_span is None:
        raise ProtoError("no ONNX graph")
    graph = _msg(graph_span[2])
    fields = list(_spans(graph))
    declared = [_name(_msg(f[2]), 1) for f in fields if f[0] == 12]
    unknown = [o for o in outputs if o not in declared]
    if unknown:
        raise ProtoError(f"the graph has no output(s) {unknown}")
    needed = set(outputs)
    keep: set[int] = set()
    for index in range(len(fields) - 1, -1, -1):
        number, _, value, _, _ = fields[index]
        if number != 1:
            continue
        node = _node(_msg(value))
        if any(o in needed for o in node.outputs):
            keep.add(index)
            needed.update(i for i in node.inputs if i)
    out = bytearray()
    for index, (number, _, value, start, end) in enumerate(fields):
        if number == 1 and index not in keep:
            continue
        if number == 5 and _name(_msg(value), 8) not in needed:
            continue
        if number in (11, 13) and _name(_msg(value), 1) not in needed:
            continue
        if number == 12 and _name(_msg(value), 1) not in outputs:
            continue
        out += graph[start:end]
    model = bytearray()
    for number, _, _, start, end in spans:
        model += _put(7, bytes(out)) if number == 7 else buf[start:end]
    return bytes(model)
