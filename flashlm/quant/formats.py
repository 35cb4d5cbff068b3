"""GGUF block formats, one small codec each, looked up by type (the gguf-py `quants.py` pattern).

A codec turns a GGUF tensor's raw rows into what a kernel consumes. The kernel for quantized matrices is
onnxruntime's MatMulNBits (com.microsoft), which computes  W[n, k] = scale[n, b] * (q[n, k] - zp)  with 4- or 8-bit
q packed two-per-byte (element 2i in the low nibble) and a default zero point of 2^(bits-1). Each GGUF format maps
onto it exactly:

  Q4_0  w = d * (q - 8)                         -> 4-bit, zp 8, scale d (nibbles reordered)
  Q4_1  w = d * q + m = d * (q - 8) + (m + 8 d)  -> 4-bit, zp 8, scale d, plus a per-block offset (m + 8 d)
  Q8_0  w = d * q, q int8                        -> 8-bit, zp 128, q + 128 as uint8
  Q5_0  w = d * (q - 16), q 0..31                -> 8-bit, zp 128, q + 112, scale d
  Q5_1  w = d * q + m                            -> 8-bit, zp 128, q + 128, scale d, offset m
  Q4_K  256-wide super-blocks of 8 sub-blocks of 32, 6-bit sc and mn:  w = d*sc * q - dmin*mn
                                                 -> 4-bit, scale d*sc, offset 8 d*sc - dmin*mn (float32 rounding)
  Q5_K  as Q4_K with 5-bit q                     -> 8-bit, q + 128, scale d*sc, offset -dmin*mn
  Q6_K  16 sub-blocks of 16, int8 sc: w = d*sc * (q - 32), q 0..63  -> 8-bit, block size 16, q + 96, scale d*sc

A per-block offset o[b, n] adds sum_b o[b, n] * (sum of x over block b) to the product: a (K/bs, N) float matmul
of the per-block sums of x, exact, and 1/bs the size of the weights. Block sizes and byte sizes come from gguf-py's
GGML_QUANT_SIZES; dequantization (embedding rows, norms, tests) uses gguf-py's reference `gguf.quants.dequantize`.

The 5- and 6-bit types stay exact at 8 bits rather than re-quantized to 4 (measured, 2 threads, one MatMulNBits
product x[1,K] @ W.T at accuracy_level 4, error of the product against the float dequantized weights):
  Gemma 3 270M ffn_gate 2048x640 Q5_0:  8-bit 0.059 ms, max rel err 0.7%;  re-quantized Q4_0 0.082 ms, 9%
  Gemma 3 270M ffn_down 640x2048 Q6_K:  8-bit bs16 0.146 ms, 0.5%;         re-quantized Q4_0 0.083 ms, 10%
  synthetic 4096x11008 Q5_0:            8-bit 3.46 ms, 0.5%;               Q4_0 2.06 ms, 9.5%;  Q4_1 2.32 ms, 7%
  synthetic 4096x11008 Q5_K:            8-bit 3.99 ms, 0.6%;               Q4_0 2.42 ms, 6.3%;  Q4_1 2.72 ms, 3.9%
  synthetic 4096x11008 Q6_K:            8-bit bs16 5.03 ms, 0.4%;          Q4_0 1.58 ms, 5.8%;  Q4_1 2.59 ms, 5.7%
  (Q4_K, exact at 4 bits: 2.36 ms, 0.45%.) Re-quantizing is 1.5-3x faster on large matrices but 10-20x less
accurate (the int8 activations of level 4 alone cost ~0.5%), and on Gemma-sized matrices it saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from flashlm._bare_import import bare_import
from flashlm.errors import UnsupportedModelError
from flashlm.loaders.gguf_reader import GGML_QUANT_SIZES, GGMLQuantizationType as QT

_gguf_dequantize = bare_import("gguf.quants").dequantize  # not `import gguf`: see _bare_import

NBITS_BLOCK = 32  # MatMulNBits block_size of every format but Q6_K (16-wide sub-blocks)


@dataclass(frozen=True)
class NBitsWeights:
    """A matrix in MatMulNBits layout: W[n, k] = scales[n, b] * (q[n, k] - 2^(bits-1)) + offsets[b, n]."""

    bits: int
    n_out: int  # N
    n_in: int  # K
    packed: np.ndarray  # (N, K/bs, bs*bits/8) uint8
    scales: np.ndarray  # (N * K/bs,) float32
    offsets: np.ndarray | None  # (K/bs, N) float32, or None when zero
    block_size: int = NBITS_BLOCK  # bs
    # MatMulNBits accuracy_level: 4 = int8 activations (fast), 0 = float activations. Q4_K takes 0: on Gemma 3 270M
    # (AMD EPYC, onnxruntime 1.32) level 4 on its Q4_K matrices moved perplexity +0.97% from transformers' float32
    # run of the same weights, level 0 +0.17% (level 0 on the 8-bit types is 10x slower: they stay at 4).
    accuracy_level: int = 4

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


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """(N, nb, 4) uint8 holding a little-endian uint32 -> (N, nb, n) its bits 0..n-1 as 0/1 uint8."""
    h = np.ascontiguousarray(qh).view("<u4")
    return ((h >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K 12-byte packed 6-bit scales and mins (N, nb, 12) -> two (N, nb, 8) float32 arrays."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _sub_blocks(q: np.ndarray, n_sub: int) -> np.ndarray:
    """(N, nb, ...) -> (N, nb * n_sub, -1): super-blocks split into their sub-blocks."""
    return q.reshape(q.shape[0], -1, q.size // (q.shape[0] * q.shape[1] * n_sub))


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


def _q5_0(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 22)
    d = _f16(blk[..., 0:2])
    q = _ggml_nibbles(blk[..., 6:22]) | (_high_bits(blk[..., 2:6], 32) << 4)  # 0..31
    return NBitsWeights(8, raw.shape[0], n_in, q + np.uint8(112), d.reshape(-1), None)  # q - 16 + 128


def _q5_1(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 24)
    d, m = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    q = _ggml_nibbles(blk[..., 8:24]) | (_high_bits(blk[..., 4:8], 32) << 4)
    return NBitsWeights(8, raw.shape[0], n_in, q + np.uint8(128), d.reshape(-1), np.ascontiguousarray(m.T))


def _q4_k(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 144)
    n = raw.shape[0]
    d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    sc, mn = _k_scale_min(blk[..., 4:16])
    qs = blk[..., 16:144].reshape(n, -1, 4, 1, 32)  # byte l of chunk j: sub-block 2j (low), 2j+1 (high)
    q = _sub_blocks(np.concatenate([qs & 0x0F, qs >> 4], axis=-2), 8)  # (N, K/32, 32)
    scale = d[..., None] * sc  # (N, nb, 8): w = scale * q - dmin * m
    offsets = 8.0 * scale - dmin[..., None] * mn
    return NBitsWeights(4, n, n_in, _pack_nibbles(q), scale.reshape(-1), np.ascontiguousarray(offsets.reshape(n, -1).T),
                        accuracy_level=0)


def _q5_k(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 176)
    n = raw.shape[0]
    d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    sc, mn = _k_scale_min(blk[..., 4:16])
    qh = blk[..., 16:48].reshape(n, -1, 1, 32)  # bit s of byte l: high bit of element l of sub-block s
    qs = blk[..., 48:176].reshape(n, -1, 4, 1, 32)
    ql = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(n, -1, 8, 32)
    q = ql | (((qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
    scale = d[..., None] * sc
    offsets = -(dmin[..., None] * mn)
    return NBitsWeights(8, n, n_in, _sub_blocks(q + np.uint8(128), 8), scale.reshape(-1),
                        np.ascontiguousarray(offsets.reshape(n, -1).T))


def _q6_k(raw: np.ndarray, n_in: int) -> NBitsWeights:
    blk = _blocks(raw, 210)
    n = raw.shape[0]
    # each half of 128 elements: 64 ql bytes (low nibbles: elements 0..63, high: 64..127), 32 qh bytes (bits 2k..2k+1
    # of byte l: element 32k + l)
    ql = blk[..., 0:128].reshape(n, -1, 2, 1, 64)
    qh = blk[..., 128:192].reshape(n, -1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(n, -1, 2, 128)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, -1, 2, 128)
    q = (low | (high << 4)) + np.uint8(96)  # q - 32 + 128
    scale = _f16(blk[..., 208:210])[..., None] * blk[..., 192:208].view(np.int8).astype(np.float32)  # (N, nb, 16)
    return NBitsWeights(8, n, n_in, _sub_blocks(q, 16), scale.reshape(-1), None, block_size=16)


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
    Codec(QT.Q5_0, _q5_0),
    Codec(QT.Q5_1, _q5_1),
    Codec(QT.Q4_K, _q4_k),
    Codec(QT.Q5_K, _q5_k),
    Codec(QT.Q6_K, _q6_k),
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
