"""The executor: runs the model graph over the KV cache, and the token history that makes prefix reuse work.

Decode is one onnxruntime call per token through an IOBinding whose KV and logits buffers stay bound between
calls; only the new token's embedding and two position scalars are rebound. The forward pass never touches files:
embeddings come from the loader's table, everything else lives in the session.
"""

from __future__ import annotations

import time

import numpy as np

from ..loaders.weights import EmbeddingTable
from .kv_cache import KVCache


class Executor:
    def __init__(self, session, embed: EmbeddingTable, kv: KVCache, vocab_size: int):
        import onnxruntime as ort

        self._ort = ort
        self.session, self.embed, self.kv, self.vocab_size = session, embed, kv, vocab_size
        self.io = session.io_binding()
        self._bound_generation = -1
        self._last_logits = np.empty((1, vocab_size), np.float32)
        self._last_logits_value = ort.OrtValue.ortvalue_from_numpy(self._last_logits)
        self._last_row = np.zeros(1, np.int64)

    def _bind_cache(self) -> None:
        ov = self._ort.OrtValue.ortvalue_from_numpy
        for i in range(self.kv.n_layers):
            for kind, buffers in (("key", self.kv.keys), ("value", self.kv.values)):
                value = ov(buffers[i])
                self.io.bind_ortvalue_input(f"past_{kind}_{i}", value)
                self.io.bind_ortvalue_output(f"present_{kind}_{i}", value)
        self._bound_generation = self.kv.generation

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append ids (S,) at position kv.n_past; return logits for every new position (S, V) or the last (1, V)."""
        n = len(ids)
        total = self.kv.n_past + n
        self.kv.reserve(total)
        if self.kv.generation != self._bound_generation:
            self._bind_cache()
        io = self.io
        io.bind_cpu_input("hidden", self.embed.lookup(ids)[None])
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_len", np.array(total, np.int32))
        if all_logits:
            out = np.empty((n, self.vocab_size), np.float32)
            io.bind_cpu_input("logit_rows", np.arange(n, dtype=np.int64))
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(out))
        else:
            self._last_row[0] = n - 1
            io.bind_cpu_input("logit_rows", self._last_row)
            io.bind_ortvalue_output("logits", self._last_logits_value)
        self.session.run_with_iobinding(io)
        self.kv.n_past = total
        return out if all_logits else self._last_logits.copy()


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
    """

    def __init__(self, executor: Executor, n_ctx: int, n_batch: int = 512):
        self.executor, self.n_ctx, self.n_batch = executor, n_ctx, n_batch
        self.tokens: list[int] = []
        self.last_prompt_tokens = 0  # tokens actually evaluated by the last prefill (after prefix reuse)

    def reset(self) -> None:
        self.tokens = []
        self.executor.kv.truncate(0)

    def _rewind(self, n: int) -> None:
        self.tokens = self.tokens[:n]
        self.executor.kv.truncate(n)

    def _eval(self, ids: list[int], all_logits: bool) -> np.ndarray:
        out = []
        for start in range(0, len(ids), self.n_batch):
            chunk = np.asarray(ids[start:start + self.n_batch], dtype=np.int64)
            last_chunk = start + self.n_batch >= len(ids)
            if all_logits or last_chunk:
                out.append(self.executor.forward(chunk, all_logits))
            else:
                self.executor.forward(chunk, False)
            self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`; return the logits after the last one (1, V)."""
        keep = common_prefix(self.tokens, ids)
        if keep == len(ids):
            keep -= 1  # the last token must be evaluated again to get its logits
        self._rewind(keep)
        self.last_prompt_tokens = len(ids) - keep
        return self._eval(ids[keep:], all_logits=False)

    def step(self, token: int) -> np.ndarray:
        return self._eval([token], all_logits=False)

    def logits_all(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), V) from an empty context."""
        self.reset()
        return self._eval(ids, all_logits=True)


def now_ms() -> float:
    return time.perf_counter() * 1e3
