"""rows_matvec with int8 activations (bundle_kernel.c: rows_matvec_i8), the decode path for S <= INT8_MAX_TOKENS.

Two references per case: (a) x quantized exactly as the kernel does (checked bit for bit against numpy below), then
a float64 product: the kernel must match it up to float32 accumulation (2e-5 relative), which pins the unpacking of
every type; (b) the float64 product with the float x: the int8 rounding of x costs under 1% relative (max error
over the outputs / max |output|; measured 0.15-0.85% on these rows and x ~ N(0, 1), what llama.cpp's q8_0
activations cost; the float32-x path: < 5e-7), so 2%.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QT

from flashlm.quant import bundle_kernel as bk

from .oracles import quantize_x_reference

from .test_kquants import REAL_TENSORS, gemma_file, synthetic_rows  # noqa: F401  (gemma_file: a fixture)

TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
GEMMA = {**REAL_TENSORS, QT.Q8_0: "token_embd.weight"}
CASES = [(t, "synthetic") for t in TYPES] + [(t, "gemma") for t in GEMMA]
EXACT_TOL, FLOAT_TOL = 2e-5, 0.02


@pytest.fixture(scope="module")
def kernel():
    from flashlm.flash_store.format import RecordLayout

    k = bk.BundleKernel(RecordLayout(512, QT.Q8_0, QT.Q8_0, QT.Q8_0), "silu", threads=2)
    if not k.native:
        pytest.skip("no C compiler")
    return k


quantize_x = quantize_x_reference


def c_quantize_x(lib, x: np.ndarray):
    S, d = x.shape
    q, dx = np.empty((S, d), np.int8), np.empty((S, d // 32), np.float32)
    sums = np.empty((S, d // 16), np.int32)
    fn = lib.quantize_x_i8
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
    assert fn(x.ctypes.data, S, d, q.ctypes.data, dx.ctypes.data, sums.ctypes.data) == 0
    return q, dx, sums


def test_quantize_x_exact(kernel):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1024)).astype(np.float32) * rng.uniform(0.01, 100, (3, 1)).astype(np.float32)
    x[0, :32] = 0.0  # zero block: scale 0, q 0
    x[1, 32:64] = -3.5  # constant block: all -127
    x[2, 64:96] = np.arange(32, dtype=np.float32) - 15.5  # halves: ties decided by rint (to even)
    x[2, 96:128] = rng.standard_normal(32).astype(np.float32) * 1e-30  # tiny but nonzero
    q, dx, sums = c_quantize_x(kernel._lib, x)
    q_ref, dx_ref = quantize_x(x)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(sums, q_ref.reshape(3, -1, 16).astype(np.int32).sum(-1))
    assert (q[1, 32:64] == -127).all() and (q[0, :32] == 0).all() and dx[0, 0] == 0
    x = np.random.default_rng(7).standard_normal((7, 2048)).astype(np.float32)  # x[6, 1295] / dx = -36.500004:
    q, dx, _ = c_quantize_x(kernel._lib, x)  # -37, where an approximate reciprocal (-ffast-math) made it -36
    q_ref, dx_ref = quantize_x(x)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(q, q_ref)


def rows_for(qtype, source, request, n=1000):
    if source == "synthetic":
        if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
            return synthetic_rows(qtype, 300, 512, seed=5)
        w = np.random.default_rng(5).standard_normal((300, 512)).astype(np.float32)
        w[0, :32] = 0.0
        return gguf.quants.quantize(w, qtype)
    f = request.getfixturevalue("gemma_file")
    raw = f.tensor_bytes(GEMMA[qtype])
    assert f.tensors[GEMMA[qtype]].ggml_type == qtype
    step = max(1, len(raw) // n)  # rows spread over the whole matrix
    return np.ascontiguousarray(raw[::step][:n])


def errors(out, x, raw, qtype):
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    q, dx = quantize_x(x)
    xq = (q.reshape(len(x), -1, 32) * dx[..., None].astype(np.float64)).reshape(x.shape)
    exact, ref = xq @ w.T, x.astype(np.float64) @ w.T
    scale = np.abs(ref).max()
    return np.abs(out - exact).max() / scale, np.abs(out - ref).max() / scale


@pytest.mark.parametrize("S", [1, 3, 7])  # 7: the largest S the int8 path takes (BLAS from 8 on)
@pytest.mark.parametrize("qtype,source", CASES)
def test_int8_matvec(qtype, source, S, kernel, request):
    raw = rows_for(qtype, source, request)
    d = raw.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    x = np.random.default_rng(S).standard_normal((S, d)).astype(np.float32)
    wide = np.full((S, len(raw) + 5), np.nan, np.float32)
    out = wide[:, 2:2 + len(raw)]  # a column slice, as the streamed output matrix passes
    assert S <= bk.INT8_MAX_TOKENS and qtype in bk.INT8_ROW_TYPES and bk.INT8_ACTIVATIONS
    bk.rows_matvec(kernel, raw, qtype, x, out)
    assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, 2 + len(raw):]).all()
    exact_err, float_err = errors(out, x, raw, qtype)
    assert exact_err < EXACT_TOL, exact_err
    assert float_err < FLOAT_TOL, float_err
    # row by row: slicing the rows (streamed head) or the thread count does not change a bit
    parts = np.empty_like(out)
    for lo in range(0, len(raw), 77):
        bk.rows_matvec(kernel, raw[lo:lo + 77], qtype, x, parts[:, lo:lo + 77])
    np.testing.assert_array_equal(parts, out)
    one = np.empty_like(out)
    status = kernel._matvec_i8(raw.ctypes.data, len(raw), raw.shape[1], int(qtype), d, x.ctypes.data, S,
                               one.ctypes.data, len(raw), 1)
    assert status == 0
    np.testing.assert_array_equal(one, out)


@pytest.mark.parametrize("qtype", TYPES)
def test_gemm_equals_token_by_token(qtype, kernel):
    """rows_gemm_i8 (prompt batches) gives every token bit for bit what rows_matvec_i8 gives it alone (the decode
    path), for any token count (tiles of 4 and their remainders), row count (tiles of 4), thread count, an odd
    number of 32-blocks and a column slice of the output."""
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        raw, d = synthetic_rows(qtype, 203, 512, seed=9), 512
    else:
        d = 544  # 17 blocks: a lone last sub-block
        w = np.random.default_rng(9).standard_normal((203, d)).astype(np.float32)
        w[1, :32] = 0.0
        raw = gguf.quants.quantize(w, qtype)
    for S in (1, 2, 5, 13, 32):
        x = np.random.default_rng(S).standard_normal((S, d)).astype(np.float32) * 3
        x[0, 32:64] = 0.0
        alone = np.empty((S, len(raw)), np.float32)
        for s in range(S):
            assert kernel._matvec_i8(raw.ctypes.data, len(raw), raw.shape[1], int(qtype), d, x[s].ctypes.data, 1,
                                     alone[s].ctypes.data, len(raw), 1) == 0
        for threads in (1, 2):
            wide = np.full((S, len(raw) + 3), np.nan, np.float32)
            assert kernel._gemm_i8(raw.ctypes.data, len(raw), raw.shape[1], int(qtype), d, x.ctypes.data, S,
                                   wide[:, 1:].ctypes.data, wide.shape[1], threads) == 0
            assert np.isnan(wide[:, 0]).all() and np.isnan(wide[:, -2:]).all()
            np.testing.assert_array_equal(wide[:, 1:1 + len(raw)], alone, err_msg=f"{qtype.name} S={S}")


def test_int8_rejects_what_it_does_not_cover(kernel):
    raw = synthetic_rows(QT.Q4_K, 4, 512)
    x, out = np.zeros((9, 640), np.float32), np.zeros((9, 4), np.float32)
    args = (raw.ctypes.data, 4, raw.shape[1])
    assert kernel._matvec_i8(*args, int(QT.Q4_K), 640, x.ctypes.data, 1, out.ctypes.data, 4, 1) == -1
    assert kernel._matvec_i8(*args, int(QT.Q4_K), 512, x.ctypes.data, 9, out.ctypes.data, 4, 1) == -3
    assert kernel._matvec_i8(*args, int(QT.F16), 512, x.ctypes.data, 1, out.ctypes.data, 4, 1) == -1  # as rows_matvec


@pytest.mark.parametrize("flags", ["-mno-avx512vnni -mno-avxvnni", "-mno-avx2 -mno-fma -mno-avx512f"])
def test_fallback_builds(flags, kernel, monkeypatch):
    """The AVX2-without-VNNI and the scalar builds compute the same products (up to float32 summation order)."""
    monkeypatch.setenv("FLASHLM_KERNEL_CFLAGS", flags)
    path = bk.build_library()
    assert path is not None
    lib = ctypes.CDLL(path)
    fn = lib.rows_matvec_i8
    fn.restype, fn.argtypes = ctypes.c_int, kernel._matvec_i8.argtypes
    for qtype in TYPES:
        raw = rows_for(qtype, "synthetic", None)
        d = 512
        x = np.random.default_rng(7).standard_normal((2, d)).astype(np.float32)
        out = np.empty((2, len(raw)), np.float32)
        assert fn(raw.ctypes.data, len(raw), raw.shape[1], int(qtype), d, x.ctypes.data, 2, out.ctypes.data,
                  len(raw), 2) == 0
        exact_err, float_err = errors(out, x, raw, qtype)
        assert exact_err < EXACT_TOL and float_err < FLOAT_TOL, (qtype.name, exact_err, float_err)
    # rows_gemm_i8 without the AVX-512 VNNI tiles: rows_matvec_i8 over groups of tokens, the same per token (the
    # scalar build's batches sum in their own float order, as its rows_matvec_i8's do)
    gemm = lib.rows_gemm_i8
    gemm.restype, gemm.argtypes = ctypes.c_int, kernel._gemm_i8.argtypes
    raw, S = rows_for(QT.Q4_K, "synthetic", None), 11
    x = np.random.default_rng(8).standard_normal((S, 512)).astype(np.float32)
    alone, batch = np.empty((S, len(raw)), np.float32), np.empty((S, len(raw)), np.float32)
    for s in range(S):
        assert fn(raw.ctypes.data, len(raw), raw.shape[1], int(QT.Q4_K), 512, x[s].ctypes.data, 1,
                  alone[s].ctypes.data, len(raw), 2) == 0
    assert gemm(raw.ctypes.data, len(raw), raw.shape[1], int(QT.Q4_K), 512, x.ctypes.data, S, batch.ctypes.data,
                len(raw), 2) == 0
    if "-mno-avx2" in flags:
        np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    else:
        np.testing.assert_array_equal(batch, alone)


def _records(qtype, source, request, n=300):
    """Records of n neurons: gate and up rows of qtype (real Gemma rows or synthetic ones), a Q8_0 down column."""
    from flashlm.flash_store.format import RecordLayout

    gate = rows_for(qtype, source, request, n)[:n]
    up = np.roll(gate, 1, axis=0)
    d = gate.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    w = np.random.default_rng(3).standard_normal((len(gate), d)).astype(np.float32) * 0.05
    layout = RecordLayout(d, qtype, qtype, QT.Q8_0)
    records = np.zeros((len(gate), layout.record_bytes), np.uint8)
    g, u, dn = layout.slices()
    records[:, g], records[:, u], records[:, dn] = gate, up, gguf.quants.quantize(w, QT.Q8_0)
    return layout, records


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("S", [1, 3, 8, 9, 20])  # token groups of 8 and their remainders
@pytest.mark.parametrize("qtype,source", CASES)
def test_int8_bundle_ffn(qtype, source, S, activation, request):
    """bundle_ffn_i8 (the FFN for every token count when int8 activations are on): (a) against x quantized as the
    kernel does and float64 products: float32 accumulation only; (b) against float x: the int8 rounding of x,
    under FLOAT_TOL as for rows_matvec_i8; (c) a batch gives each token what it gets alone (up to float32 rounding:
    each token count is its own specialised loop, and -ffast-math may order its float sums differently)."""
    layout, records = _records(qtype, source, request)
    k = bk.BundleKernel(layout, activation, threads=2)
    if k._ffn_i8 is None or not bk.FFN_INT8:
        pytest.skip("no int8 FFN kernel in this build (needs AVX2 and FMA) or int8 activations switched off")
    d = layout.d_model
    x = np.random.default_rng(S).standard_normal((S, d)).astype(np.float32)
    addresses = (records.ctypes.data + layout.record_bytes * np.arange(len(records))).astype(np.uint64)
    y = np.zeros_like(x)
    k.run(addresses, x, y)
    g, u, dn = layout.slices()
    wg = gguf.quants.dequantize(records[:, g], qtype).astype(np.float64)
    wu = gguf.quants.dequantize(records[:, u], qtype).astype(np.float64)
    wd = gguf.quants.dequantize(records[:, dn], QT.Q8_0).astype(np.float64)
    q, dx = quantize_x(x)
    xq = (q.reshape(S, -1, 32) * dx[..., None].astype(np.float64)).reshape(S, d)

    def ffn(xx):
        a = xx @ wg.T
        if activation == "silu":
            act = a / (1 + np.exp(-a))
        elif activation == "relu":
            act = np.maximum(a, 0)
        else:
            act = 0.5 * a * (1 + np.tanh(0.7978845608 * (a + 0.044715 * a ** 3)))
        return (act * (xx @ wu.T) * mask) @ wd

    mask = 1.0
    exact, ref = ffn(xq), ffn(x.astype(np.float64))
    scale = np.abs(ref).max()
    assert np.abs(y - exact).max() / scale < 1e-4
    assert np.abs(y - ref).max() / scale < FLOAT_TOL
    for s in range(S):
        alone = np.zeros((1, d), np.float32)
        k.run(addresses, x[s:s + 1], alone)
        assert np.abs(alone[0] - y[s]).max() / scale < 1e-6
    # a per-token mask (sparsity over a batch) zeroes exactly the masked neurons, in the same int8 arithmetic
    mask = np.random.default_rng(S + 1).random((S, len(records))) < 0.6
    ym = np.zeros_like(x)
    k.run(addresses, x, ym, mask=mask)
    assert np.abs(ym - ffn(xq)).max() / scale < 1e-4
