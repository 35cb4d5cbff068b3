"""Matrix-product kernels, chosen by weight format (never by branching on type ids at the call site).

Measured on a 2-core machine (x[1,4096] @ W[4096,11008]): onnxruntime MatMulNBits with prepacked constant
4-bit weights and accuracy_level=4 (int8 activations, like llama.cpp's Q8 dot products) 0.65-1.0 ms; 8-bit ~1.5 ms;
accuracy_level=0 ~2 ms; numpy float32 ~3.5 ms; a numba Q4 kernel 7-15 ms. So quantized weights go to MatMulNBits at
level 4 (Q4_K at 0: formats.NBitsWeights.accuracy_level), float weights (rare: small F16/F32 matrices) to a float32 MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlm.quant.onnx_graph import MS_DOMAIN, GraphBuilder
from flashlm.quant.formats import NBitsWeights

@dataclass(frozen=True)
class Linear:
    """y = x @ W.T (+ bias). W is either MatMulNBits-ready or float32 (N, K)."""

    n_out: int
    n_in: int
    nbits: NBitsWeights | None = None
    dense: np.ndarray | None = None  # (N, K) float32
    bias: np.ndarray | None = None  # (N,) float32

    @property
    def nbytes(self) -> int:
        own = self.nbits.nbytes if self.nbits is not None else self.dense.nbytes
        return own + (0 if self.bias is None else self.bias.nbytes)


def _block_sums(gb: GraphBuilder, x: str, n_in: int, block_size: int) -> str:
    """(1, S, K) -> (1, S, K/block_size): the per-block sums of x that per-block offsets multiply."""
    key = ("block_sums", x, block_size)
    if key not in gb.memo:
        shape = gb.const("bs_shape", np.array([0, 0, n_in // block_size, block_size], np.int64))
        blocks = gb.op("Reshape", [x, shape])
        gb.memo[key] = gb.op("ReduceSum", [blocks, gb.const("axis", np.array([-1], np.int64))], keepdims=0)
    return gb.memo[key]


def emit_linear(gb: GraphBuilder, x: str, w: Linear, hint: str) -> str:
    """Append the nodes computing x @ W.T (+ bias) for x of shape (1, S, K); returns the (1, S, N) output."""
    if w.nbits is not None:
        q = w.nbits
        inputs = [x, gb.const(f"{hint}_q", q.packed), gb.const(f"{hint}_scales", q.scales)]
        if w.bias is not None:
            inputs += ["", "", gb.const(f"{hint}_bias", w.bias)]  # zero_points and g_idx stay default
        y = gb.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=q.n_in, N=q.n_out, bits=q.bits,
                  block_size=q.block_size, accuracy_level=q.accuracy_level)
        if q.offsets is not None:
            sums = _block_sums(gb, x, q.n_in, q.block_size)
            correction = gb.op("MatMul", [sums, gb.const(f"{hint}_offsets", q.offsets)])
            y = gb.op("Add", [y, correction])
        return y
    y = gb.op("MatMul", [x, gb.const(f"{hint}_wT", np.ascontiguousarray(w.dense.T))])
    if w.bias is not None:
        y = gb.op("Add", [y, gb.const(f"{hint}_bias", w.bias)])
    return y


def emit_linears(gb: GraphBuilder, x: str, parts: list[Linear], hint: str) -> str:
    """Several matrices on one input (a fused q|k|v or gate|up split by format): outputs concatenated."""
    ys = [emit_linear(gb, x, w, f"{hint}{i}") for i, w in enumerate(parts)]
    return ys[0] if len(ys) == 1 else gb.op("Concat", ys, axis=-1)
