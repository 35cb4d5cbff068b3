"""The KV cache: per-layer key/value buffers that onnxruntime's GroupQueryAttention appends to in place.

Buffers are (1, n_kv_heads, capacity, head_dim). Capacity grows in steps up to the context size (memory
follows the tokens actually held, not the maximum), and `truncate(n)` forgets everything after position n so a new
prompt can reuse a shared prefix.
"""

from __future__ import annotations

import numpy as np

GROW_STEP = 256


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_tokens: int, dtype=np.float32, xp=np):
        """dtype: float32 for onnxruntime's GroupQueryAttention; float16 (as llama.cpp's default) where attention
        runs in numpy, halving the cache. xp: the array module of the buffers (CuPy for the GPU executor)."""
        self.n_layers, self.n_kv_heads, self.head_dim, self.xp = n_layers, n_kv_heads, head_dim, xp
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.n_past = 0
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.generation = 0  # bumped whenever the buffers are replaced, so bindings know to refresh

    def empty_like(self) -> "KVCache":
        """A new empty cache of the same shape, dtype and device (a session's own: runtime/executor.py Engine.fork)."""
        return KVCache(self.n_layers, self.n_kv_heads, self.head_dim, self.max_tokens, self.dtype, self.xp)

    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_token()

    def reserve(self, n_tokens: int) -> None:
        """Make room for n_tokens positions in total (n_tokens <= max_tokens is the caller's check)."""
        if n_tokens <= self.capacity:
            return
        new_cap = min(self.max_tokens, max(n_tokens, -(-n_tokens // GROW_STEP) * GROW_STEP, 2 * self.capacity))
        shape = (1, self.n_kv_heads, new_cap, self.head_dim)
        for buffers in (self.keys, self.values):
            old = list(buffers)
            buffers.clear()
            for i in range(self.n_layers):
                new = self.xp.zeros(shape, self.dtype)
                if old:
                    new[:, :, :self.n_past] = old[i][:, :, :self.n_past]
                buffers.append(new)
        self.capacity = new_cap
        self.generation += 1

    def truncate(self, n_tokens: int) -> None:
        self.n_past = min(self.n_past, n_tokens)
