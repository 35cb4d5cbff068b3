"""The executor for flash stores: every matrix product on the bundle kernel, attention in numpy, no onnxruntime.

Why a second executor: under a memory budget, onnxruntime's sessions cost more than the weights they hold (one
session per layer, since the streamed FFN runs between two of them: 30 attention sessions for SmolLM2's 16.6 MB of
attention weights measured 42 MB, plus 18 MB for importing onnxruntime). Here the attention weights stay in their
GGUF bytes (resident, read once at load) and go through `rows_matvec`, like the output matrix, while the FFN
streams through the neuron caches. Activations stay float32 end to end, so the result does not depend on what was
resident and what was streamed.
"""

from __future__ import annotations

import numpy as np

from ..loaders.weights import EmbeddingTable
from ..quant.bundle_kernel import BundleKernel, rows_matvec
from .kv_cache import KVCache


class RowMatrix:
    """A quantized matrix kept as its GGUF rows: y (S, n) = x (S, k) @ W.T."""

    def __init__(self, rows: np.ndarray, qtype, bias: np.ndarray | None = None):
        self.rows, self.qtype, self.bias = np.ascontiguousarray(rows), qtype, bias

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def __call__(self, kernel: BundleKernel, x: np.ndarray) -> np.ndarray:
        if self.rows.dtype == np.float32:  # a float matrix (F32/F16/BF16 in the file), kept dequantized
            out = x @ self.rows.T
        else:
            out = np.empty((x.shape[0], self.rows.shape[0]), np.float32)
            rows_matvec(kernel, self.rows, self.qtype, x, out)
        if self.bias is not None:
            out += self.bias
        return out


class AttentionWeights:
    """qkv: q, k and v rows stacked in one matrix when their formats agree (one kernel call), else three."""

    def __init__(self, attn_norm, qkv: list[RowMatrix], o: RowMatrix, ffn_norm):
        self.attn_norm, self.qkv, self.o, self.ffn_norm = attn_norm, qkv, o, ffn_norm

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in (*self.qkv, self.o))

    def project(self, kernel: BundleKernel, x: np.ndarray) -> np.ndarray:
        outs = [m(kernel, x) for m in self.qkv]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """x (S, heads, hd); cos/sin (S, hd/2). Interleaved rotates pairs (2i, 2i+1) (llama.cpp NORM), else halves."""
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


class KernelExecutor:
    """Same interface as Executor (forward, kv, ffn, head_stream), for flash stores."""

    def __init__(self, args, layers: list[AttentionWeights], kernel: BundleKernel, ffn, head, embed: EmbeddingTable,
                 kv: KVCache, rope_cos: np.ndarray, rope_sin: np.ndarray):
        self.args, self.layers, self.kernel, self.ffn, self.head_stream = args, layers, kernel, ffn, head
        self.embed, self.kv, self.vocab_size = embed, kv, args.vocab_size
        self.cos, self.sin = rope_cos, rope_sin

    def _attention(self, i: int, w: AttentionWeights, h: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        a, k_ = self.args, self.kernel
        n = h.shape[0]
        x = rms_norm(h, w.attn_norm, a.norm_eps)
        qkv = w.project(k_, x)
        nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q = qkv[:, :nq].reshape(n, a.n_heads, a.head_dim)
        k = qkv[:, nq:nq + nkv].reshape(n, a.n_kv_heads, a.head_dim)
        v = qkv[:, nq + nkv:].reshape(n, a.n_kv_heads, a.head_dim)
        keys, values = self.kv.keys[i][0], self.kv.values[i][0]  # (n_kv, capacity, hd)
        if n == 1 and k_.attention_decode is not None and keys.dtype == np.float16:
            out = self._attention_decode(q, k, v, keys, values, start)
        else:
            out = self._attention_numpy(q, k, v, keys, values, start)
        h1 = h + w.o(k_, np.ascontiguousarray(out, dtype=np.float32))
        return rms_norm(h1, w.ffn_norm, a.norm_eps), np.ascontiguousarray(h1, dtype=np.float32)

    def _attention_decode(self, q, k, v, keys, values, pos: int) -> np.ndarray:
        """One token, in C: RoPE, cache write, softmax attention (the numpy path costs ~8 ms per token here)."""
        a = self.args
        q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
        out = np.empty(a.n_heads * a.head_dim, np.float32)
        scores = np.empty(pos + 1, np.float32)
        status = self.kernel.attention_decode(
            q.ctypes.data, k.ctypes.data, v.ctypes.data, keys.ctypes.data, values.ctypes.data, keys.shape[1], pos,
            self.cos[pos].ctypes.data, self.sin[pos].ctypes.data, int(a.rope.interleaved), a.n_heads, a.n_kv_heads,
            a.head_dim, a.head_dim ** -0.5, out.ctypes.data, scores.ctypes.data)
        if status != 0:
            raise RuntimeError(f"attention_decode failed ({status})")
        return out[None]

    def _attention_numpy(self, q, k, v, keys, values, start: int) -> np.ndarray:
        a = self.args
        n = q.shape[0]
        total = start + n
        cos, sin = self.cos[start:total], self.sin[start:total]
        q = apply_rope(q, cos, sin, a.rope.interleaved)
        k = apply_rope(k, cos, sin, a.rope.interleaved)
        keys[:, start:total] = k.transpose(1, 0, 2)
        values[:, start:total] = v.transpose(1, 0, 2)
        group = a.n_heads // a.n_kv_heads
        qg = q.transpose(1, 0, 2).reshape(a.n_kv_heads, group * n, a.head_dim)  # heads grouped by their KV head
        scores = qg @ keys[:, :total].transpose(0, 2, 1) * np.float32(a.head_dim ** -0.5)  # (n_kv, group*n, T)
        if n > 1:  # causal: query j (position start+j) sees keys up to start+j
            allowed = np.arange(total)[None, :] <= (start + np.arange(n))[:, None]
            scores = np.where(np.tile(allowed, (group, 1))[None], scores, np.float32(-np.inf))
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores, dtype=np.float32)
        probs /= probs.sum(-1, keepdims=True)
        return (probs @ values[:, :total]).reshape(a.n_heads, n, a.head_dim).transpose(1, 0, 2).reshape(n, -1)

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        n = len(ids)
        start = self.kv.n_past
        self.kv.reserve(start + n)
        h = self.embed.lookup(ids).astype(np.float32)
        self.ffn.begin(n)
        for i, w in enumerate(self.layers):
            x, h = self._attention(i, w, h, start)
            self.ffn.run(i, x, h)  # h += FFN(x), in place
        rows = np.arange(n) if all_logits else np.array([n - 1])
        out = np.empty((len(rows), self.vocab_size), np.float32)
        self.head_stream.run(h, rows, out)
        self.kv.n_past = start + n
        return out
