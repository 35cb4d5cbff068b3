"""GGUF block formats, one small codec each, looked up by type (the gguf-py `quants.py` pattern).

A codec turns a GGUF tensor's raw rows into what a kernel consumes. The kernel for quantized matrices is
onnxruntime's MatMulNBits (com.microsoft), which computes  W[n, k] = scale[n, b] * (q[n, k] - zp)  with 4- or 8-bit
q packed two-per-byte (element 2i in the low nibble) and a default zero point of 2^(bits-1). Each GGUF format maps
onto it exactly:

  Q4_0  w = d * (q - 8)                         -> 4-bit, zp 8, scale d (nibbles reordered)
  Q4_1  w = d * q + m = d * (q - 8) + (m + 8 d)  -> 4-bit, zp 8, scale d, plus a per-block offset (m + 8 d)
  Q8_0  w = d * q, q int8                        -> 8-bit, zp 128, q + 128 as uint8

A per-block offset o[b, n] adds sum_b o[b, n] * (sum of x over block b) to the product: a (K/32, N) float matmul
of the per-block sums of x, exact, and 1/32 the size of the weights. Block sizes and byte sizes come from gguf-py's
GGML_QUANT_SIZES; dequantization (embedding rows, norms, tests) uses gguf-py's reference `gguf.quants.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as _gguf_dequantize

from ..errors import UnsupportedModelError

NBITS_BLOCK = 32  # MatMulNBits block_size used for every format (all supported GGUF blocks are 32 wide)


@dataclass(frozen=True)
class NBitsWeights:
    """A matrix in MatMulNBits layout: W[n, k] = scales[n, b] * (q[n, k] - 2^(bits-1)) + offsets[b, n]."""

    bits: int
    n_out: int  # N
    n_in: int  # K
    packed: np.ndarray  # (N, K/32, 32*bits/8) uint8
    scales: np.ndarray  # (N * K/32,) float32
    offsets: np.ndarray | None  # (K/32, N) float32, or None when zero

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)


def _blocks(raw: np.ndarray, type_size: int) -> np.ndarray:
    """(N, row_bytes) uint8 -> (N, n_blocks, type_size) uint8 view."""
    n = raw.shape[0]
    return raw.reshape(n, -1, type_size)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(N, nb, 32) values 0..15 -> (N, nb, 16) bytes, element 2i in the low nibble (MatMulNBits order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML 4-bit blocks store element j in the low nibble of byte j and element j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(b: np.ndarray) -> np.ndarray:
    """(N, nb, 2) uint8 -> (N, nb) float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _q4_0(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 18)
    d = _f16(blk[..., 0:2])
    q = _ggml_nibbles(blk[..., 2:18])
    return NBitsWeights(4, raw.shape[0], n_in, _pack_nibbles(q), d.reshape(-1), None)


def _q4_1(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 20)
    d, m = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    q = _ggml_nibbles(blk[..., 4:20])
    offsets = np.ascontiguousarray((m + 8.0 * d).T)  # (nb, N)
    return NBitsWeights(4, raw.shape[0], n_in, _pack_nibbles(q), d.reshape(-1), offsets)


def _q8_0(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 34)
    d = _f16(blk[..., 0:2])
    q = blk[..., 2:34] ^ np.uint8(0x80)  # int8 two's complement + 128 == flip the sign bit
    return NBitsWeights(8, raw.shape[0], n_in, np.ascontiguousarray(q), d.reshape(-1), None)


@dataclass(frozen=True)
class Codec:
    qtype: QT
    to_nbits: Callable[[np.ndarray, int], NBitsWeights] | None  # None: computed in float32

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


CODECS: dict[QT, Codec] = {c.qtype: c for c in [
    Codec(QT.F32, None),
    Codec(QT.F16, None),
    Codec(QT.BF16, None),
    Codec(QT.Q4_0, _q4_0),
    Codec(QT.Q4_1, _q4_1),
    Codec(QT.Q8_0, _q8_0),
]}


def codec_for(qtype: QT, tensor_name: str = "") -> Codec:
    codec = CODECS.get(qtype)
    if codec is None:
        where = f" (tensor {tensor_name!r})" if tensor_name else ""
        supported = ", ".join(c.name for c in CODECS)
        raise UnsupportedModelError(f"tensor type {qtype.name}{where} is not supported (supported: {supported})")
    return codec


def dequantize(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Raw rows (..., row_bytes) -> float32 (..., row_elems), with gguf-py's reference implementation."""
    return np.asarray(_gguf_dequantize(raw, qtype), dtype=np.float32)


def to_nbits(raw: np.ndarray, qtype: QT, n_in: int, tensor_name: str = "") -> NBitsWeights | None:
    """MatMulNBits layout of a quantized (N, row_bytes) matrix, or None for float formats."""
    codec = codec_for(qtype, tensor_name)
    return None if codec.to_nbits is None else codec.to_nbits(raw, n_in)
