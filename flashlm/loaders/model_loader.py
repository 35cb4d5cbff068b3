"""read -> place -> compile: from a GGUF path to a ready Engine, keeping memory lean.

Weights are repacked from the mapped file into MatMulNBits layout, handed to onnxruntime (which keeps its own
prepacked copy), and then every transient is released: our repacked buffers, the mapped file's resident pages
(MADV_DONTNEED; the embedding rows are paged back in on use) and the freed heap (malloc_trim).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import time
from dataclasses import dataclass
from types import ModuleType

from ..models import family_for
from ..models.base import Metadata
from ..options import LoadOptions
from ..runtime.executor import Engine, Executor
from ..runtime.kv_cache import KVCache
from ..runtime.onnx_graph import GraphBuilder
from .gguf_reader import GGUFFile


@dataclass
class LoadedModel:
    path: str
    file: GGUFFile
    family: ModuleType
    args: object  # the family's ModelArgs
    engine: Engine
    n_ctx: int
    threads: int
    load_ms: float
    resident_bytes: int  # weights handed to the compute graph, in our (packed) layout


def _release_heap() -> None:
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def read_model(path: str) -> tuple[GGUFFile, ModuleType, object]:
    """Open and validate the file; return it with its architecture family and ModelArgs (no weights read)."""
    f = GGUFFile(path)
    try:
        family = family_for(Metadata(f).arch, path)
        return f, family, family.ModelArgs.from_gguf(f)
    except Exception:
        f.close()
        raise


def load_model(path: str, opts: LoadOptions) -> LoadedModel:
    t0 = time.perf_counter()
    opts.validate()
    f, family, args = read_model(path)
    try:
        n_ctx = opts.ctx_size or args.n_ctx_train
        threads = opts.resolved_threads()
        weights = family.load_weights(f, args)
        resident = weights.matrix_bytes
        gb = GraphBuilder(args.arch)
        family.build_graph(gb, args, weights, n_ctx)
        session = gb.session(threads)
        embed = weights.embed
        del weights, gb
        f._mmap.madvise(mmap.MADV_DONTNEED)
        _release_heap()
    except Exception:
        f.close()
        raise
    kv = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_ctx)
    engine = Engine(Executor(session, embed, kv, args.vocab_size), n_ctx, opts.batch_size)
    return LoadedModel(path, f, family, args, engine, n_ctx, threads, (time.perf_counter() - t0) * 1e3, resident)
