"""What every architecture file shares: typed metadata access, RoPE tables, and the graphs' I/O names.

A model runs as a chain of graphs: segments of consecutive decoder layers, then the head (in vocabulary slices),
so the loader can compile piece by piece and a layer's weights can be streamed between two calls. Interfaces:
  segment  inputs   hidden (1, S, d) float32, seqlens_k (1,) int32 = past + S - 1, total_len () int32 = past + S,
                    rope_cos / rope_sin (positions, rot_dim/2) float32,
                    past_key_{i} / past_value_{i} (1, n_kv, capacity, hd) for each layer i of the segment
           outputs  hidden_out (1, S, d); present_key_{i} / present_value_{i} bound to the same buffers as the
                    past (onnxruntime's GroupQueryAttention then appends the new keys in place)
  head     inputs   hidden (1, S, d), logit_rows (R,) int64      outputs  logits (R, vocab slice)
A family's build_layer(gb, args, weights, i, hidden) -> hidden adds one layer to a segment graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def declare_segment_io(gb, layers: range, d_model: int, n_kv_heads: int, head_dim: int) -> None:
    f32 = np.float32
    gb.input("hidden", f32, [1, "S", d_model])
    gb.input("seqlens_k", np.int32, [1])
    gb.input("total_len", np.int32, [])
    gb.input("rope_cos", f32, ["positions", "half_rot"])
    gb.input("rope_sin", f32, ["positions", "half_rot"])
    kv_shape = [1, n_kv_heads, "capacity", head_dim]
    gb.output("hidden_out", f32, [1, "S", d_model])
    for i in layers:
        for kind in ("key", "value"):
            gb.input(f"past_{kind}_{i}", f32, kv_shape)
            gb.output(f"present_{kind}_{i}", f32, kv_shape)


def declare_head_io(gb, d_model: int, vocab_size: int) -> None:
    gb.input("hidden", np.float32, [1, "S", d_model])
    gb.input("logit_rows", np.int64, ["R"])
    gb.output("logits", np.float32, ["R", vocab_size])
