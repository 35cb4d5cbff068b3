"""What every architecture file shares: typed metadata access, RoPE tables, and the graph's I/O names.

The executor drives every model through the same graph interface:
  inputs   hidden (1, S, d) float32, seqlens_k (1,) int32 = past + S - 1, total_len () int32 = past + S,
           logit_rows (R,) int64, past_key_{i} / past_value_{i} (1, n_kv, capacity, head_dim) float32
  outputs  logits (R, vocab) float32, present_key_{i} / present_value_{i} bound to the same buffers as the past
           (onnxruntime's GroupQueryAttention then appends the new keys in place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError
from ..loaders.gguf_reader import GGUFFile

_MISSING = object()


class Metadata:
    """Reads `{arch}.{key}` values with type checks, so a hostile file gets a clear error and not a crash."""

    def __init__(self, f: GGUFFile):
        self.f = f
        arch = f.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{f.path}: no general.architecture in the metadata")
        self.arch = arch

    def raw(self, key: str, default=_MISSING):
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        value = self.f.get(full, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ModelFileError(f"{self.f.path}: missing metadata key {full!r}")
            return default
        return value

    def int(self, key: str, default=_MISSING, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if isinstance(value, np.ndarray):
            raise UnsupportedModelError(f"{self.f.path}: per-layer values for {self.arch}.{key} are not supported")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r} is not an integer >= {minimum}")
        return int(value)

    def float(self, key: str, default=_MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r} is not a finite number")
        return float(value)

    def str(self, key: str, default=_MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ModelFileError(f"{self.f.path}: {self.arch}.{key} = {value!r} is not a string")
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
            raise UnsupportedModelError(f"{meta.f.path}: partial rotary embeddings ({dim} of {head_dim}) "
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
