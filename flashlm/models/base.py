"""What every family file shares: typed metadata access, RoPE tables, and the ops its layer is written over.

A family writes its decoder layer and head once, as functions over `Ops`; each backend implements Ops on its own
values (runtime/onnx_ops.py: ONNX graph node names; runtime/kernel_executor.py: numpy arrays and the C kernels;
runtime/cuda_executor.py: CuPy arrays and the CUDA kernels). Norms, RoPE, attention and the FFN's kernels are written
once per backend; what differs between families (which norms, where, the activation, a logit soft-cap) is written
once per family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from flashlm.errors import ModelFileError, UnsupportedModelError
from flashlm.loaders.gguf_reader import GGUFFile

_MISSING = object()


class Metadata:
    """Reads `{arch}.{key}` values with type checks, so a hostile file gets a clear error and not a crash."""

    def __init__(self, f: GGUFFile):
        self.f = f
        arch = f.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{f.path}: no general.architecture (a string) in the metadata"
                                 f"{f.where('general.architecture')}")
        self.arch = arch

    def _full(self, key: str) -> str:
        return key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"

    def raw(self, key: str, default=_MISSING):
        full = self._full(key)
        value = self.f.get(full, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ModelFileError(f"{self.f.path}: missing metadata key {full!r} (header of {len(self.f.metadata)} "
                                     f"keys ends at byte {self.f.data_offset})")
            return default
        return value

    def int(self, key: str, default=_MISSING, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if isinstance(value, np.ndarray):
            raise UnsupportedModelError(f"{self.f.path}: per-layer values for {self.arch}.{key}"
                                        f"{self.f.where(self._full(key))} are not supported")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r:.40}{self.f.where(self._full(key))} "
                                 f"is not an integer >= {minimum}")
        return int(value)

    def float(self, key: str, default=_MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r:.40}{self.f.where(self._full(key))} "
                                 "is not a finite number")
        return float(value)

    def str(self, key: str, default=_MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r:.40}{self.f.where(self._full(key))} "
                                 "is not a string")
        return value


@dataclass(frozen=True)
class RopeConfig:
    dim: int
    base: float
    scaling: str = "none"  # none | linear
    factor: float = 1.0
    interleaved: bool = True  # llama.cpp's NORM mode rotates adjacent pairs; NEOX rotates halves

    @classmethod
    def from_metadata(cls, meta: Metadata, head_dim: int, interleaved: bool) -> "RopeConfig":
        dim = meta.int("rope.dimension_count", head_dim)
        if dim != head_dim:
            raise UnsupportedModelError(f"{meta.f.path}: partial rotary embeddings ({dim} of {head_dim}"
                                        f"{meta.f.where(meta._full('rope.dimension_count'))}) "
                                        "are not supported")
        scaling = meta.str("rope.scaling.type", "none")
        factor = meta.float("rope.scaling.factor", 1.0)
        if scaling not in ("none", "linear") and factor != 1.0:
            raise UnsupportedModelError(f"{meta.f.path}: RoPE scaling {scaling!r} is not supported (none, linear)")
        if factor <= 0:
            raise ModelFileError(f"{meta.f.path}: rope.scaling.factor {factor} must be positive")
        return cls(dim, meta.float("rope.freq_base", 10000.0), scaling, factor, interleaved)

    def tables(self, n_positions: int, freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of shape (n_positions, dim/2), computed in float64 as llama.cpp does in its rope kernels."""
        inv_freq = self.base ** (-np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)
        if freq_factors is not None:  # llama3-style per-frequency divisors (rope_freqs.weight)
            inv_freq = inv_freq / freq_factors.astype(np.float64)
        pos = np.arange(n_positions, dtype=np.float64)
        if self.scaling == "linear":
            pos = pos / self.factor
        angles = np.outer(pos, inv_freq)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Ops(Protocol):
    """The operations a family's layer and head are written over. Values are the backend's own (arrays, graph
    names); `w` is the backend's weights for layer i, with the family's norm weights under the family's names."""

    def norm(self, x: Any, weight: Any, eps: float) -> Any:
        """RMSNorm over the last axis, times weight."""

    def add(self, x: Any, y: Any) -> Any:
        """The residual add."""

    def add_norm(self, x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """(norm(x + residual), x + residual): the residual add and the next sublayer's norm, fused where a backend
        can fuse them."""

    def qkv(self, i: int, w: Any, x: Any) -> tuple[Any, Any, Any]:
        """Layer i's q, k and v projections of x (biases included)."""

    def head_norm(self, t: Any, weight: Any, eps: float) -> Any:
        """RMSNorm of each attention head of q or k (QK-norm)."""

    def attend(self, i: int, q: Any, k: Any, v: Any) -> Any:
        """RoPE, append k and v to layer i's KV cache, causal softmax attention over the cache (within the sliding
        window where args.is_local(i)); returns the heads' outputs concatenated."""

    def linear(self, x: Any, matrix: Any) -> Any:
        """x @ matrix.T for a weight matrix of the layer (the attention output projection)."""

    def ffn(self, i: int, w: Any, x: Any, residual: Any = None) -> Any:
        """Layer i's gated FFN of x with the family's activation (resident, streamed or sparse: the backend's
        FFN source decides), plus residual when given."""

    def output(self, x: Any, w: Any) -> Any:
        """Logits: x (already normed) times the output matrix."""

    def softcap(self, logits: Any, cap: float) -> Any:
        """cap * tanh(logits / cap)."""
