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

from flashlm.quant.weights import EmbeddingTable
from flashlm.quant.bundle_kernel import BundleKernel, rows_matvec
from flashlm.runtime.kv_cache import KVCache


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
    """qkv: q, k and v rows stacked in one matrix when their formats agree (one kernel call), else three.
    norms: the optional extra norms of families that have them (Gemma 3: q_norm, k_norm per head;
    post_attn_norm, post_ffw_norm on the sublayers' outputs), name -> weight."""

    def __init__(self, attn_norm, qkv: list[RowMatrix], o: RowMatrix, ffn_norm, norms: dict | None = None):
        self.attn_norm, self.qkv, self.o, self.ffn_norm = attn_norm, qkv, o, ffn_norm
        norms = norms or {}
        self.q_norm, self.k_norm = norms.get("q_norm"), norms.get("k_norm")
        self.post_attn_norm, self.post_ffw_norm = norms.get("post_attn_norm"), norms.get("post_ffw_norm")

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in (*self.qkv, self.o))

    def project(self, kernel: BundleKernel, x: np.ndarray) -> np.ndarray:
        outs = [m(kernel, x) for m in self.qkv]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight).astype(np.float32)


def apply_rope(x, cos, sin, interleaved: bool, xp=np):
    """x (S, heads, hd); cos/sin (S, hd/2). Interleaved rotates pairs (2i, 2i+1) (llama.cpp NORM), else halves.
    xp: the array module (numpy, or CuPy for the GPU executor)."""
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = xp.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return xp.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)


def attend(a, q, k, v, keys, values, start: int, cos, sin, window: int, xp=np):
    """Attention of n new positions (start..start+n-1): RoPE, cache write, causal (and windowed) softmax over the
    cached keys, in the array module xp (numpy here, CuPy for the GPU executor). q (n, heads, hd), k and v
    (n, kv_heads, hd); keys/values (kv_heads, capacity, hd). Returns (n, heads * hd)."""
    n = q.shape[0]
    total = start + n
    cos, sin = cos[start:total], sin[start:total]
    q = apply_rope(q, cos, sin, a.rope.interleaved, xp)
    k = apply_rope(k, cos, sin, a.rope.interleaved, xp)
    keys[:, start:total] = k.transpose(1, 0, 2)
    values[:, start:total] = v.transpose(1, 0, 2)
    group = a.n_heads // a.n_kv_heads
    qg = q.transpose(1, 0, 2).reshape(a.n_kv_heads, group * n, a.head_dim)  # heads grouped by their KV head
    kk = keys[:, :total].astype(xp.float32, copy=False)  # a float16 cache: products in float32
    vv = values[:, :total].astype(xp.float32, copy=False)
    scores = qg @ kk.transpose(0, 2, 1) * np.float32(a.head_dim ** -0.5)  # (n_kv, group*n, T)
    if n > 1 or window:  # causal: query j (position start+j) sees keys up to start+j (and within the window)
        dist = (start + xp.arange(n))[:, None] - xp.arange(total)[None, :]
        allowed = (dist >= 0) & (dist < window) if window else dist >= 0
        scores = xp.where(xp.tile(allowed, (group, 1))[None], scores, np.float32(-np.inf))
    scores -= scores.max(-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ vv).reshape(a.n_heads, n, a.head_dim).transpose(1, 0, 2).reshape(n, -1)


class KernelExecutor:
    """Same interface as Executor (forward, kv, ffn, head_stream), for flash stores."""

    def __init__(self, args, layers: list[AttentionWeights], kernel: BundleKernel, ffn, head, embed: EmbeddingTable,
                 kv: KVCache, rope: dict[str, np.ndarray]):
        self.args, self.layers, self.kernel, self.ffn, self.head_stream = args, layers, kernel, ffn, head
        self.embed, self.kv, self.vocab_size = embed, kv, args.vocab_size
        self.rope = rope  # name -> table; layer i reads the pair args.rope_names(i)

    def _attention(self, i: int, w: AttentionWeights, h: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        a, k_ = self.args, self.kernel
        n = h.shape[0]
        x = rms_norm(h, w.attn_norm, a.norm_eps)
        qkv = w.project(k_, x)
        nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        q = qkv[:, :nq].reshape(n, a.n_heads, a.head_dim)
        k = qkv[:, nq:nq + nkv].reshape(n, a.n_kv_heads, a.head_dim)
        v = qkv[:, nq + nkv:].reshape(n, a.n_kv_heads, a.head_dim)
        if w.q_norm is not None:  # QK-norm: each head normalized before RoPE
            q, k = rms_norm(q, w.q_norm, a.norm_eps), rms_norm(k, w.k_norm, a.norm_eps)
        keys, values = self.kv.keys[i][0], self.kv.values[i][0]  # (n_kv, capacity, hd)
        cos, sin = (self.rope[name] for name in a.rope_names(i))
        window = a.sliding_window if a.is_local(i) else 0
        if n == 1 and k_.attention_decode is not None and keys.dtype == np.float16:
            out = self._attention_decode(q, k, v, keys, values, start, cos, sin, window)
        else:
            out = attend(a, q, k, v, keys, values, start, cos, sin, window)
        o = w.o(k_, np.ascontiguousarray(out, dtype=np.float32))
        h1 = h + (o if w.post_attn_norm is None else rms_norm(o, w.post_attn_norm, a.norm_eps))
        return rms_norm(h1, w.ffn_norm, a.norm_eps), np.ascontiguousarray(h1, dtype=np.float32)

    def _attention_decode(self, q, k, v, keys, values, pos: int, cos, sin, window: int) -> np.ndarray:
        """One token, in C: RoPE, cache write, softmax attention (the numpy path costs ~8 ms per token here).
        A sliding window is a view: the cache pointers start at the window's first position, whose row stride is
        unchanged, so the kernel sees positions lo..pos as 0..pos-lo (RoPE uses the true position's table row)."""
        a = self.args
        lo = max(0, pos - window + 1) if window else 0
        q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
        out = np.empty(a.n_heads * a.head_dim, np.float32)
        scores = np.empty(pos - lo + 1, np.float32)
        skip = lo * a.head_dim * keys.itemsize
        status = self.kernel.attention_decode(
            q.ctypes.data, k.ctypes.data, v.ctypes.data, keys.ctypes.data + skip, values.ctypes.data + skip,
            keys.shape[1], pos - lo, cos[pos].ctypes.data, sin[pos].ctypes.data, int(a.rope.interleaved), a.n_heads,
            a.n_kv_heads, a.head_dim, a.head_dim ** -0.5, out.ctypes.data, scores.ctypes.data)
        if status != 0:
            raise RuntimeError(f"attention_decode failed ({status})")
        return out[None]

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        h = self.hidden(ids)
        return self.logits(h, np.arange(len(ids)) if all_logits else np.array([len(ids) - 1]))

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        """Append ids at the cache's position; returns the last layer's hidden states (len(ids), d)."""
        n = len(ids)
        start = self.kv.n_past
        self.kv.reserve(start + n)
        h = self.embed.lookup(ids).astype(np.float32)
        self.ffn.begin(n)
        with self.kernel.one_blas_thread:  # numpy's attention products next to the OpenMP kernels (see there)
            for i, w in enumerate(self.layers):
                x, h = self._attention(i, w, h, start)
                if w.post_ffw_norm is None:
                    self.ffn.run(i, x, h)  # h += FFN(x), in place
                else:
                    y = np.zeros_like(h)
                    self.ffn.run(i, x, y)
                    h += rms_norm(y, w.post_ffw_norm, self.args.norm_eps)
        self.kv.n_past = start + n
        return h

    def logits(self, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Logits (len(rows), vocab) of the given rows of hidden states: final norm, output matrix, soft-cap."""
        out = np.empty((len(rows), self.vocab_size), np.float32)
        with self.kernel.one_blas_thread:
            self.head_stream.run(h, rows, out)
        cap = getattr(self.args, "logit_softcap", 0.0)
        if cap:
            np.multiply(np.tanh(out / cap), cap, out=out)
        return out
