"""A minimal ONNX protobuf writer: just the messages flashlm's graphs use.

Why not `onnx.helper`: importing the onnx package costs ~10 MB of resident memory (protobuf runtime plus its C++
extension), which a runtime promising a memory budget pays for its whole life. The wire format is small and
stable; field numbers below are those of onnx/onnx.proto3. tests/test_onnx_proto.py checks the bytes with the
onnx package itself (onnx.checker and a field-by-field comparison with onnx.helper's output).
"""

from __future__ import annotations

import struct

import numpy as np

# TensorProto.DataType
DTYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
          np.dtype(np.int64): 7, np.dtype(np.float16): 10}
_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING, _ATTR_INTS = 1, 2, 3, 7


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are written as their two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _str(field: int, s: str) -> bytes:
    return _bytes(field, s.encode("utf-8"))


def dtype_code(dtype) -> int:
    return DTYPES[np.dtype(dtype)]


def tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto with the data inline (raw_data, little-endian)."""
    array = np.ascontiguousarray(array)
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, dtype_code(array.dtype)) + _str(8, name) + _bytes(9, array.tobytes())


def external_tensor(name: str, dtype, shape: tuple[int, ...], nbytes: int) -> bytes:
    """TensorProto whose data is supplied at session creation (data_location EXTERNAL, an in-memory location)."""
    entries = b"".join(_bytes(13, _str(1, k) + _str(2, v))
                       for k, v in (("location", "flashlm-memory"), ("offset", "0"), ("length", str(nbytes))))
    return b"".join(_int(1, d) for d in shape) + _int(2, dtype_code(dtype)) + _str(8, name) + entries + _int(14, 1)


def value_info(name: str, dtype, shape: list | None) -> bytes:
    tensor_type = _int(1, dtype_code(dtype))
    if shape is not None:
        dims = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, int(d))) for d in shape)
        tensor_type += _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _attribute(name: str, value) -> bytes:
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return _str(1, name) + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, (float, np.floating)):
        return _str(1, name) + _key(2, 5) + struct.pack("<f", float(value)) + _int(20, _ATTR_FLOAT)
    if isinstance(value, str):
        return _str(1, name) + _bytes(4, value.encode("utf-8")) + _int(20, _ATTR_STRING)
    if isinstance(value, (list, tuple)):
        return _str(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, _ATTR_INTS)
    raise TypeError(f"attribute {name!r}: unsupported value {value!r}")


def node(op_type: str, inputs: list[str], outputs: list[str], name: str = "", domain: str = "", **attrs) -> bytes:
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    if name:
        out += _str(3, name)
    out += _str(4, op_type)
    out += b"".join(_bytes(5, _attribute(k, v)) for k, v in sorted(attrs.items()))
    if domain:
        out += _str(7, domain)
    return out


def model(graph_name: str, nodes: list[bytes], inputs: list[bytes], outputs: list[bytes],
          initializers: list[bytes], opsets: dict[str, int], ir_version: int) -> bytes:
    graph = (b"".join(_bytes(1, n) for n in nodes) + _str(2, graph_name)
             + b"".join(_bytes(5, t) for t in initializers)
             + b"".join(_bytes(11, v) for v in inputs) + b"".join(_bytes(12, v) for v in outputs))
    opset_ids = b"".join(_bytes(8, _str(1, d) + _int(2, v)) for d, v in opsets.items())
    return _int(1, ir_version) + _str(2, "flashlm") + _bytes(7, graph) + opset_ids
