"""Block-format codecs are exact against gguf-py's reference dequantization, and the kernel computes the product."""

from __future__ import annotations

import numpy as np
import pytest
import gguf
from gguf.constants import GGMLQuantizationType as QT

from flashlm.errors import UnsupportedModelError
from flashlm.quant.formats import NBitsWeights, codec_for, dequantize, to_nbits
from flashlm.quant.kernels import Linear, emit_linear
from flashlm.quant.onnx_graph import GraphBuilder

QUANTIZED = [QT.Q4_0, QT.Q4_1, QT.Q8_0]


def _raw(qtype: QT, n: int = 48, k: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 7.0  # a constant block
    return w, gguf.quants.quantize(w, qtype)


def _reconstruct(nb: NBitsWeights) -> np.ndarray:
    """W from the MatMulNBits layout: scale * (q - 2^(bits-1)) + per-block offset."""
    n, bs = nb.n_out, nb.block_size
    blocks = nb.n_in // bs
    if nb.bits == 4:
        q = np.stack([nb.packed & 15, nb.packed >> 4], axis=-1).reshape(n, blocks, bs)
    else:
        q = nb.packed.reshape(n, blocks, bs)
    w = (q.astype(np.float32) - 2 ** (nb.bits - 1)) * nb.scales.reshape(n, blocks, 1)
    if nb.offsets is not None:
        w = w + nb.offsets.T.reshape(n, blocks, 1)
    return w.reshape(n, nb.n_in)


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_nbits_layout_is_exact(qtype):
    _, raw = _raw(qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    got = _reconstruct(to_nbits(raw, qtype, 256))
    # Q4_1's  d*q + m  is regrouped as  d*(q-8) + (m+8d): equal up to float32 rounding
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))
    if qtype != QT.Q4_1:
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
def test_float_formats_dequantize_like_gguf(qtype):
    w = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype) if qtype == QT.BF16 else w.astype(np.float16 if qtype == QT.F16 else np.float32)
    raw_bytes = np.ascontiguousarray(raw).view(np.uint8).reshape(4, -1)
    np.testing.assert_array_equal(dequantize(raw_bytes, qtype), gguf.quants.dequantize(raw_bytes, qtype))
    assert to_nbits(raw_bytes, qtype, 64) is None


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_matmulnbits_product_matches_float_reference(qtype):
    w, raw = _raw(qtype, n=96, k=512, seed=3)
    ref_w = gguf.quants.dequantize(raw, qtype)
    x = np.random.default_rng(4).standard_normal((1, 3, 512)).astype(np.float32)
    gb = GraphBuilder("t")
    gb.input("x", np.float32, [1, "S", 512])
    y = emit_linear(gb, "x", Linear(96, 512, nbits=to_nbits(raw, qtype, 512)), "w")
    gb.op("Identity", [y], out=["y"])
    gb.output("y", np.float32, [1, "S", 96])
    got = gb.session(1).run(["y"], {"x": x})[0]
    expected = x @ ref_w.T
    # accuracy_level 4 quantizes activations to int8 per 32-block, as llama.cpp's Q8 dot products do
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 0.02, rel


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.IQ2_XS])
def test_unsupported_types_are_named(qtype):
    with pytest.raises(UnsupportedModelError, match=qtype.name):
        codec_for(qtype, "blk.0.ffn_down.weight")
