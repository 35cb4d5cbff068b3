"""numpy references the kernels are checked against (test oracles: not part of the package)."""

from __future__ import annotations

import numpy as np


def quantize_x_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy mirror of the int8 activations (quantize_x_i8 here, quantize_x in quant/cuda_kernels.py): per 32
    values dx = max|x| * float32(1/127), q = rint(x * (1/dx)) clipped to +-127, float32 arithmetic.
    x (S, d) -> (q (S, d) int8, dx (S, d/32) float32)."""
    S, d = x.shape
    xb = x.reshape(S, d // 32, 32).astype(np.float32)
    dx = np.abs(xb).max(-1) * (np.float32(1.0) / np.float32(127.0))
    with np.errstate(divide="ignore"):
        inv = np.where(dx != 0, np.float32(1.0) / dx, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(S, d), dx.astype(np.float32)
