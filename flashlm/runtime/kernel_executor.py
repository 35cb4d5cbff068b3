"""The CPU executor for flash stores: every matrix product on the bundle kernel, attention in numpy or C, no
onnxruntime; the family's layer and head (models/) run over KernelOps.

Why a second executor: under a memory budget, onnxruntime's sessions cost more than the weights they hold (one
session per layer, since the streamed FFN runs between two of them: 30 attention sessions for SmolLM2's 16.6 MB of
attention weights measured 42 MB, plus 18 MB for importing onnxruntime). Here the attention weights stay in their
GGUF bytes (resident, read once at load) and go through `rows_matvec`, like the output matrix, while the FFN
streams through the neuron caches. Activations stay float32 end to end, so the result does not depend on what was
resident and what was streamed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from flashlm.quant.weights import EmbeddingTable
from flashlm.quant.bundle_kernel import BundleKernel, address, rows_matvec
from flashlm.runtime.heap import ReusedArrays, batch_heap
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
    """A layer's resident weights: qkv (q, k and v rows stacked in one matrix when their formats agree: one kernel
    call, else three), o, and its norm weights under the family's names (attn_norm, ffn_norm, and e.g. Gemma 3's
    q_norm, k_norm, post_attn_norm, post_ffw_norm)."""

    def __init__(self, qkv: list[RowMatrix], o: RowMatrix, norms: dict):
        self.qkv, self.o = qkv, o
        for name, weight in norms.items():
            setattr(self, name, weight)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in (*self.qkv, self.o))

    def project(self, kernel: BundleKernel, x: np.ndarray) -> np.ndarray:
        outs = [m(kernel, x) for m in self.qkv]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    if x.ndim == 2 and x.shape[0] == 1 and x.dtype == np.float32 and weight.dtype == np.float32:
        # one token (decode): the same float32 arithmetic as below (pairwise sum, mean, sqrt) with the mean as a
        # scalar; the general form's numpy calls (mean's Python wrapper, keepdims, a copy) cost ~12 us, times
        # Gemma 3's six norms in each of 18 layers (~1.3 ms of a 13 ms token)
        ms = np.add.reduce(x[0] * x[0]) / x.shape[1]
        return x / np.sqrt(ms + eps) * weight
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight).astype(np.float32, copy=False)


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


class FFNSource(Protocol):
    """A flash-store executor's FFN: runtime/streaming.py's StreamedFFN (CPU), cuda_ffn.GpuFFN (CUDA)."""

    n_layers: int

    def begin(self, n_tokens: int = 1) -> None:
        """A forward pass of n_tokens starts (reads for layer 0 may be issued)."""

    def run(self, i: int, x, y) -> None:
        """y (S, d) += FFN of layer i of x (S, d), in place."""

    def close(self) -> None: ...


class OutputHead(Protocol):
    """A flash-store executor's output matrix: streaming.StreamedHead, head_sketch.SketchHead, cuda_executor.GpuHead.
    output_norm: the final norm's weight (the executor applies it)."""

    output_norm: np.ndarray
    io_wait_s: float

    def run(self, normed, rows: np.ndarray, out: np.ndarray) -> None:
        """out (R, vocab) = logits of rows (R,) of the normed hidden states (S, d)."""


class ArrayOps:
    """models/base.py's Ops on arrays: numpy here; CuPy arrays run through the same ufuncs on the GPU
    (cuda_executor.py). Activations are (S, d) float32 rows; q, k, v are (S, heads, head_dim)."""

    def __init__(self, ex, start: int):
        self.ex, self.args, self.start = ex, ex.args, start  # start: the first new position's index
        self.rows = None  # positions whose logits `output` computes

    def norm(self, x, weight, eps: float):
        return rms_norm(x, weight, eps)

    def add(self, x, y):
        return y + x

    def add_norm(self, x, residual, weight, eps: float):
        total = residual + x
        return rms_norm(total, weight, eps), total

    def head_norm(self, t, weight, eps: float):
        return rms_norm(t, weight, eps)

    def split_heads(self, qkv):
        a, n = self.args, qkv.shape[0]
        nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        return (qkv[:, :nq].reshape(n, a.n_heads, a.head_dim), qkv[:, nq:nq + nkv].reshape(n, a.n_kv_heads, a.head_dim),
                qkv[:, nq + nkv:].reshape(n, a.n_kv_heads, a.head_dim))

    def cache_of(self, i: int):
        """Layer i's key and value caches (n_kv, capacity, hd), its RoPE tables and its attention window."""
        a = self.args
        cos, sin = (self.ex.rope[name] for name in a.rope_names(i))
        return (self.ex.kv.keys[i][0], self.ex.kv.values[i][0], cos, sin,
                a.sliding_window if a.is_local(i) else 0)

    def ffn(self, i: int, w, x, residual=None):
        y = residual if residual is not None else self.ex.xp.zeros((x.shape[0], self.args.d_model), np.float32)
        self.ex.ffn.run(i, x, y)  # y += FFN(x), in place
        return y

    def output(self, x, w):
        out = (self.ex.step_logits.get() if len(self.rows) == 1 else
               np.empty((len(self.rows), self.args.vocab_size), np.float32))
        w.run(x, self.rows, out)
        return out

    def softcap(self, logits, cap: float):
        np.multiply(np.tanh(logits / cap), cap, out=logits)
        return logits


class KernelOps(ArrayOps):
    """The CPU flash-store backend: matrix products on the GGUF rows through the bundle kernel, one token's
    attention in C."""

    def qkv(self, i: int, w, x):
        return self.split_heads(w.project(self.ex.kernel, x))

    def attend(self, i: int, q, k, v):
        keys, values, cos, sin, window = self.cache_of(i)
        if q.shape[0] == 1 and self.ex.kernel.attention_decode is not None and keys.dtype == np.float16:
            out = self._attention_decode(q, k, v, keys, values, self.start, cos, sin, window)
        elif self.ex.kernel.attention_batch is not None and keys.dtype == np.float16:
            out = self._attention_batch(q, k, v, keys, values, self.start, cos, sin, window)
        else:
            out = attend(self.args, q, k, v, keys, values, self.start, cos, sin, window)
        return np.ascontiguousarray(out, dtype=np.float32)

    def linear(self, x, matrix):
        return matrix(self.ex.kernel, x)

    def _attention_decode(self, q, k, v, keys, values, pos: int, cos, sin, window: int) -> np.ndarray:
        """One token, in C: RoPE, cache write, softmax attention (the numpy path costs ~8 ms per token here).
        A sliding window is a view: the cache pointers start at the window's first position, whose row stride is
        unchanged, so the kernel sees positions lo..pos as 0..pos-lo (RoPE uses the true position's table row)."""
        a = self.args
        lo = max(0, pos - window + 1) if window else 0
        q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
        out = np.empty(a.n_heads * a.head_dim, np.float32)
        scores = np.empty(a.n_heads * (pos - lo + 1), np.float32)
        skip = lo * a.head_dim * keys.itemsize
        status = self.ex.kernel.attention_decode(
            address(q), address(k), address(v), address(keys) + skip, address(values) + skip,
            keys.shape[1], pos - lo, address(cos[pos]), address(sin[pos]), int(a.rope.interleaved), a.n_heads,
            a.n_kv_heads, a.head_dim, a.head_dim ** -0.5, address(out), address(scores), self.ex.kernel.threads)
        if status != 0:
            raise RuntimeError(f"attention_decode failed ({status})")
        return out[None]


    def _attention_batch(self, q, k, v, keys, values, start: int, cos, sin, window: int) -> np.ndarray:
        """A prompt's tokens, in C: each (token, head) as _attention_decode computes it at that token's position,
        so a prompt gives the logits its tokens give one by one (numpy's batched products sum in an order that
        depends on the batch's shape)."""
        a, n = self.args, q.shape[0]
        q, k, v = (np.ascontiguousarray(t, dtype=np.float32) for t in (q, k, v))
        out = np.empty((n, a.n_heads * a.head_dim), np.float32)
        c, s = (np.ascontiguousarray(t[start:start + n], dtype=np.float32) for t in (cos, sin))
        status = self.ex.kernel.attention_batch(
            address(q), address(k), address(v), address(keys), address(values), keys.shape[1], start,
            n, address(c), address(s), int(a.rope.interleaved), a.n_heads, a.n_kv_heads, a.head_dim,
            a.head_dim ** -0.5, window, address(out), self.ex.kernel.threads)
        if status != 0:
            raise RuntimeError(f"attention_batch failed ({status})")
        return out


class KernelExecutor:
    """The executor of a flash store on the CPU: the family's layer and head (models/) over KernelOps.
    ffn: the FFN source (runtime/streaming.py: StreamedFFN); head_stream: the output matrix (StreamedHead or
    flash_store/head_sketch.py: SketchHead), each `run(x, rows, out)` on normed hidden states."""

    xp = np
    ops_class = KernelOps

    def __init__(self, family, args, layers: list[AttentionWeights | None], kernel: BundleKernel, ffn: FFNSource,
                 head: OutputHead, embed: EmbeddingTable, kv: KVCache, rope: dict[str, np.ndarray], compute=None,
                 attention=None):
        self.family, self.args, self.layers, self.kernel, self.ffn, self.head_stream = family, args, layers, kernel, \
            ffn, head
        self.attention = attention  # streaming.StreamedAttention: the weights of the layers that are None above
        self.embed, self.kv, self.vocab_size = embed, kv, args.vocab_size
        self.step_logits = ReusedArrays((1, args.vocab_size))  # one row of logits, reused (runtime/heap.py)
        self.rope = rope  # name -> table; layer i reads the pair args.rope_names(i)
        # numpy's attention products next to the OpenMP kernels take one BLAS thread (quant/bundle_kernel.py);
        # compute: the context the layers run in where a backend needs another
        self.compute = kernel.one_blas_thread if compute is None else compute

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        h = self.hidden(ids)
        return self.logits(h, np.arange(len(ids)) if all_logits else np.array([len(ids) - 1]))

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        """Append ids at the cache's position; returns the last layer's hidden states (len(ids), d)."""
        n = len(ids)
        start = self.kv.n_past
        self.kv.reserve(start + n)
        h = self.xp.asarray(self.embed.lookup(ids), dtype=np.float32)
        self.ffn.begin(n)
        if self.attention is not None:
            self.attention.begin()
        ops = self.ops_class(self, start)
        with self.compute, batch_heap(n > 1):
            for i, w in enumerate(self.layers):
                h = self.family.layer(ops, self.args, w if w is not None else self.attention.weights(i), i, h)
        self.kv.n_past = start + n
        return h

    def logits(self, h, rows: np.ndarray) -> np.ndarray:
        """Logits (len(rows), vocab) of the given rows of hidden states: the family's head."""
        ops = self.ops_class(self, self.kv.n_past)
        ops.rows = rows
        with self.compute, batch_heap(len(rows) > 1):
            return self.family.head(ops, self.args, self.head_stream, h)
