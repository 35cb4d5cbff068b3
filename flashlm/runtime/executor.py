"""The executor: runs the layer graphs in turn over the KV cache, then the head; and the Engine that tracks which
tokens the cache holds, so a new prompt reuses the shared prefix.

Per token: one onnxruntime call per layer plus one for the head, through IOBindings that stay bound between calls
(KV buffers, RoPE tables, position scalars updated in place); only the hidden-state ping-pong buffers are rebound.
The forward pass never touches files: embeddings come from the loader's table, weights live in the sessions.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from flashlm.quant.weights import EmbeddingTable
from flashlm.runtime.heap import ReusedArrays
from flashlm.runtime.kv_cache import KVCache


class ModelExecutor(Protocol):
    """What an Engine drives: Executor here (onnxruntime, a GGUF), kernel_executor.KernelExecutor and
    cuda_executor.CudaExecutor (a flash store). forward appends ids at kv.n_past and returns the logits of the last
    position, or of every position with all_logits."""

    kv: KVCache
    vocab_size: int

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray: ...


@runtime_checkable
class SplitExecutor(ModelExecutor, Protocol):
    """An executor that runs the layers and the head apart: hidden states once, then logits of chosen rows."""

    def hidden(self, ids: np.ndarray) -> np.ndarray: ...

    def logits(self, h, rows: np.ndarray) -> np.ndarray: ...


class Executor:
    def __init__(self, segments: list[tuple[object, range]], head: list, embed: EmbeddingTable, kv: KVCache,
                 vocab_size: int, rope: dict[str, np.ndarray]):
        import onnxruntime as ort

        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        self.segments, self.head, self.embed, self.kv, self.vocab_size = segments, head, embed, kv, vocab_size
        self.d_model = embed.d_model
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros((), np.int32)
        self._rows = np.zeros(1, np.int64)
        self.step_logits = ReusedArrays((1, vocab_size))  # a step's logits, the head sessions' output (heap.py)
        shared = {"seqlens_k": self._ortvalue(self._seqlens), "total_len": self._ortvalue(self._total),
                  **{name: self._ortvalue(table) for name, table in rope.items()}}
        self._rope = rope  # the OrtValues above point into these tables
        self.segment_io = []
        for sess, _ in segments:
            io = sess.io_binding()
            wanted = {i.name for i in sess.get_inputs()}
            for name, value in shared.items():
                if name in wanted:  # a segment without local layers has no local RoPE input
                    io.bind_ortvalue_input(name, value)
            self.segment_io.append(io)
        # The head is compiled in vocabulary slices; each writes its columns of the logits.
        self.head_io = [sess.io_binding() for sess in head]
        widths = [sess.get_outputs()[0].shape[1] for sess in head]
        self._head_bounds = np.cumsum([0] + widths)
        self._bound = None  # (KVCache, generation) the bindings point into; an Engine may swap in its own cache
        self._hidden: dict[int, tuple] = {}  # S -> (arrays, OrtValues) ping-pong buffers
        # Extra outputs a caller asked for at load (name -> last dimension); filled by each forward.
        self.taps = [{o.name: o.shape[-1] for o in sess.get_outputs()[1:] if not o.name.startswith("present_")}
                     for sess, _ in segments]
        self.tap_values: dict[str, np.ndarray] = {}

    def _bind_cache(self) -> None:
        for (_, layers), io in zip(self.segments, self.segment_io):
            for i in layers:
                for kind, buffers in (("key", self.kv.keys), ("value", self.kv.values)):
                    value = self._ortvalue(buffers[i])
                    io.bind_ortvalue_input(f"past_{kind}_{i}", value)
                    io.bind_ortvalue_output(f"present_{kind}_{i}", value)
        self._bound = (self.kv, self.kv.generation)

    def _hidden_buffers(self, n: int):
        if n not in self._hidden:
            if len(self._hidden) > 4:
                self._hidden.clear()
            arrays = [np.empty((1, n, self.d_model), np.float32) for _ in range(2)]
            self._hidden[n] = (arrays, [self._ortvalue(a) for a in arrays])
        return self._hidden[n]

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append ids (S,) at position kv.n_past; return logits for every new position (S, V) or the last (1, V)."""
        n = len(ids)
        total = self.kv.n_past + n
        self.kv.reserve(total)
        if self._bound is None or self._bound[0] is not self.kv or self._bound[1] != self.kv.generation:
            self._bind_cache()
        self._seqlens[0], self._total[()] = total - 1, total
        arrays, values = self._hidden_buffers(n)
        arrays[0][0] = self.embed.lookup(ids)
        for k, ((sess, _), io) in enumerate(zip(self.segments, self.segment_io)):
            io.bind_ortvalue_input("hidden", values[k % 2])
            io.bind_ortvalue_output("hidden_out", values[(k + 1) % 2])
            for name, dim in self.taps[k].items():
                self.tap_values[name] = np.empty((1, n, dim), np.float32)
                io.bind_ortvalue_output(name, self._ortvalue(self.tap_values[name]))
            sess.run_with_iobinding(io)
        hidden = values[len(self.segments) % 2]
        out = np.empty((n, self.vocab_size), np.float32) if all_logits else self.step_logits.get()
        self._rows[0] = n - 1
        rows = np.arange(n, dtype=np.int64) if all_logits else self._rows
        for sess, io, lo, hi in zip(self.head, self.head_io, self._head_bounds[:-1], self._head_bounds[1:]):
            io.bind_ortvalue_input("hidden", hidden)
            io.bind_cpu_input("logit_rows", rows)
            part = np.empty((n, hi - lo), np.float32) if all_logits else out[:, lo:hi]
            io.bind_ortvalue_output("logits", self._ortvalue(part))
            sess.run_with_iobinding(io)
            if all_logits:
                out[:, lo:hi] = part
        self.kv.n_past = total
        return out


SCORE_LOGITS_BYTES = 3 << 19  # Engine.score: logits rows held at once (1.5 MB: 7 rows of SmolLM2, 1 of Gemma 3)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64 as llama-perplexity sums it (float max, double sum of
    exponentials), one row at a time: no float64 copy of the whole block."""
    out = np.empty(len(targets), dtype=np.float64)
    for r, (row, t) in enumerate(zip(logits, targets)):
        m = float(row.max())
        out[r] = m + math.log(float(np.exp(row - m).sum(dtype=np.float64))) - float(row[t])
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Executor plus the token history its KV cache holds.

    `prefill` reuses the longest prefix shared with what the cache already holds (as llama-server's prompt cache
    does), so a multi-turn chat only evaluates each new turn. Timings of the last call are kept for stats.

    Threads: the executor (sessions, I/O buffers, neuron caches) is shared by every Engine made from it with
    `fork()`, each with its own KV cache and history; `lock` serializes their forward passes, and each call first
    points the executor at the calling Engine's cache. `advance` lets a request that was interleaved with another
    on the same Engine continue correctly: it re-evaluates from the shared prefix when the cache moved on.
    """

    def __init__(self, executor, n_ctx: int, n_batch: int = 512, kv: KVCache | None = None,
                 lock: threading.RLock | None = None):
        self.executor, self.n_ctx, self.n_batch = executor, n_ctx, n_batch
        self.kv = kv if kv is not None else executor.kv
        self.lock = lock if lock is not None else threading.RLock()
        self.tokens: list[int] = []
        self.last_prompt_tokens = 0  # tokens actually evaluated by the last prefill (after prefix reuse)
        # The last prefill's prompt and logits: the same prompt again gets these back, so identical calls give
        # identical results (evaluating its last token alone would differ in the last bits, and int8 kernels
        # can turn that into a different sampled token).
        self._prefill_memo: tuple[list[int], np.ndarray] | None = None

    def fork(self) -> "Engine":
        """A new Engine on the same executor and lock with an empty KV cache of its own (memory: its KV cache,
        which grows with the tokens it holds, kv.bytes_per_token() each)."""
        return Engine(self.executor, self.n_ctx, self.n_batch, self.kv.empty_like(), self.lock)

    def reset(self) -> None:
        with self.lock:
            self.tokens = []
            self._prefill_memo = None
            self.kv.truncate(0)

    def _rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        self.kv.truncate(n)

    def _eval(self, ids: list[int], all_logits: bool) -> np.ndarray:
        self.executor.kv = self.kv  # this Engine's cache (the lock is held)
        out = []
        for start in range(0, len(ids), self.n_batch):
            chunk = np.asarray(ids[start:start + self.n_batch], dtype=np.int64)
            last_chunk = start + self.n_batch >= len(ids)
            if all_logits or last_chunk:
                out.append(self.executor.forward(chunk, all_logits))
            elif isinstance(self.executor, SplitExecutor):
                self.executor.hidden(chunk)  # no logits for a chunk before the last (Gemma 3's head: ~5 ms)
            else:
                self.executor.forward(chunk, False)
            self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`; return the logits after the last one (1, V)."""
        with self.lock:
            keep = common_prefix(self.tokens, ids)
            if keep == len(ids) and self._prefill_memo is not None and self._prefill_memo[0] == ids:
                self._rewind(keep)
                self.last_prompt_tokens = 0
                return self._prefill_memo[1].copy()
            if keep == len(ids):
                keep -= 1  # the last token must be evaluated again to get its logits
            self._rewind(keep)
            self.last_prompt_tokens = len(ids) - keep
            logits = self._eval(ids[keep:], all_logits=False)
            self._prefill_memo = (list(ids), logits.copy())
            return logits

    def step(self, token: int) -> np.ndarray:
        with self.lock:
            return self._eval([token], all_logits=False)

    def advance(self, context: list[int], token: int) -> np.ndarray:
        """Logits after context + [token]: one decode step when the cache still holds exactly `context`, else
        (another request used this Engine in between) a prefill that reuses the prefix they share."""
        with self.lock:
            if self.tokens == context:
                return self._eval([token], all_logits=False)
            return self.prefill(context + [token])

    def logits_all(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), V) from an empty context."""
        with self.lock:
            self.reset()
            return self._eval(ids, all_logits=True)

    def score(self, ids: list[int], first: int) -> np.ndarray:
        """Negative log-likelihoods (float64) of ids[t + 1] after ids[:t + 1], for t = first .. len(ids) - 2, from
        an empty context, in full batches. A chunk's full logits are n_ctx x vocab floats (100 MB for SmolLM2 at
        -c 512, 537 MB for Gemma 3), which would break any memory budget: an executor that can split its forward
        pass (`hidden`, then `logits` of chosen rows: the flash-store executors) computes SCORE_LOGITS_BYTES of
        logits rows at a time; the others give a batch's logits at once (n_batch x vocab)."""
        n, ex = len(ids), self.executor
        split = isinstance(ex, SplitExecutor)
        group = max(1, SCORE_LOGITS_BYTES // (4 * ex.vocab_size))
        out = []
        with self.lock:
            self.reset()
            ex.kv = self.kv
            for start in range(0, n, self.n_batch):
                chunk = np.asarray(ids[start:start + self.n_batch], dtype=np.int64)
                lo, hi = max(first, start), min(start + len(chunk), n - 1)  # positions scored in this batch
                if lo >= hi and split:
                    ex.hidden(chunk)
                elif lo >= hi:
                    ex.forward(chunk, False)
                elif split:
                    h = ex.hidden(chunk)
                    for g in range(lo, hi, group):
                        rows = np.arange(g, min(g + group, hi)) - start
                        out.append(token_nll(ex.logits(h, rows), np.asarray(ids[g + 1:g + 1 + len(rows)])))
                else:
                    logits = ex.forward(chunk, True)
                    out.append(token_nll(logits[lo - start:hi - start], np.asarray(ids[lo + 1:hi + 1])))
                self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(out) if out else np.zeros(0)
