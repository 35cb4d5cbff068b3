"""read -> place -> compile: from a GGUF path to a ready Engine, keeping memory lean.

A flash store runs on the CPU kernels (flash_loader.py) or the GPU; a GGUF runs on the same CPU kernels over its
own matrices (gguf_kernels.py) where they take its types, else through onnxruntime (and always with `taps`, or
FLASHLM_GGUF_ONNX=1). For onnxruntime, weights are repacked from the mapped file into MatMulNBits layout, handed to
onnxruntime (which keeps its own prepacked copy), and then every transient is released: our repacked buffers, the
mapped file's resident pages (MADV_DONTNEED; the embedding rows are paged back in on use) and the freed heap
(malloc_trim).
"""

from __future__ import annotations

import mmap
import os
import shlex
import time

import numpy as np
from dataclasses import dataclass
from types import ModuleType

from flashlm.errors import BudgetError, InvalidOptionError
from flashlm.flash_store.reader import is_flash_store
from flashlm.models import read_model
from flashlm.runtime.onnx_ops import build_head, build_segment
from flashlm.options import LoadOptions
from flashlm.runtime import heap
from flashlm.runtime.executor import Engine, Executor
from flashlm.runtime.kv_cache import KVCache
from flashlm.quant.onnx_graph import GraphBuilder
from flashlm.models import output_matrix
from flashlm.runtime.flash_loader import load_cuda_executor, load_flash_executor
from flashlm.runtime.gguf_kernels import load_gguf_kernel_executor, runs_on_kernels
from flashlm.loaders.gguf_reader import GGUFFile


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
    plan: object = None  # FlashPlan when running a flash store


HEAD_SLICE_BYTES = 8 << 20  # the output matrix is compiled in vocabulary slices of about this size
LAYERS_PER_SEGMENT = 6  # each onnxruntime session costs ~1 MB; fewer, larger ones cost a larger load transient


def _segments(n_layers: int) -> list[range]:
    return [range(s, min(s + LAYERS_PER_SEGMENT, n_layers)) for s in range(0, n_layers, LAYERS_PER_SEGMENT)]


def _head_slices(f: GGUFFile, args) -> list[tuple[int, int]]:
    info = output_matrix(f)
    n = max(1, -(-info.nbytes // HEAD_SLICE_BYTES))
    bounds = [int(b) for b in np.linspace(0, args.vocab_size, n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def load_model(path: str, opts: LoadOptions, taps: tuple[str, ...] = (), load_tokenizer=None) -> LoadedModel:
    """Piece by piece: repack one layer (or one slice of the output matrix), compile its session, release the
    transients, go on. Peak memory stays near the final footprint plus one piece, instead of holding every
    repacked buffer and onnxruntime's copy of it at once. `taps` names intermediates (e.g. "ffn_act") the
    executor should hand back after each forward (calibration). `load_tokenizer()` runs once the file is
    validated: before the weights of a flash store (its memory plan counts the tokenizer in the baseline), after
    those of a GGUF (so its load transients and the tokenizer do not add up in the peak)."""
    t0 = time.perf_counter()
    opts.validate()
    heap.fixed_mmap_threshold()
    f, family, args = read_model(path)
    flash = is_flash_store(f)

    try:
        n_ctx = opts.resolved_ctx(args.n_ctx_train)
        threads = opts.resolved_threads()
        if flash and load_tokenizer is not None:
            load_tokenizer()
        if opts.device == "cuda" and not flash:
            raise InvalidOptionError(f"{path}: --device cuda runs flash stores: convert it first (flashlm convert "
                                     f"-m {shlex.quote(str(path))} -o MODEL.flash)")
        if flash and opts.device == "cuda":
            if opts.sparsity:
                raise InvalidOptionError("--sparsity is not available with --device cuda yet")
            try:
                executor, plan = load_cuda_executor(path, f, family, args, opts, n_ctx, threads)
            except MemoryError as e:  # CuPy's pool refused an allocation (its OutOfMemoryError is a MemoryError)
                budget = opts.gpu_memory_budget
                what = f"the GPU memory budget ({budget / 1e6:.0f} MB)" if budget else "the GPU's memory"
                raise BudgetError(f"{what} ran out while loading {os.path.basename(path)}: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                                  "a larger --gpu-memory-budget or a smaller -c fits it") from None
            resident = sum(m.nbytes for w in executor.layers for m in (*w.qkv, w.o))
        elif flash:
            executor, plan = load_flash_executor(path, f, family, args, opts, n_ctx, threads)
            resident = sum(w.nbytes for w in executor.layers if w is not None)
        else:
            plan = None
            if opts.sparsity:
                raise InvalidOptionError(f"{path}: --sparsity needs a .flash store (flashlm convert -m "
                                         f"{shlex.quote(str(path))} -o MODEL.flash); a GGUF runs dense")
            if opts.memory_budget is not None:
                _check_gguf_fits(f, opts.memory_budget)
            if not taps and os.environ.get("FLASHLM_GGUF_ONNX", "0") != "1" and runs_on_kernels(f, family, args):
                executor, resident = load_gguf_kernel_executor(f, family, args, n_ctx, threads)
            else:
                executor, resident = _gguf_executor(f, family, args, n_ctx, threads, taps)
        heap.release()
        if not flash and load_tokenizer is not None:
            load_tokenizer()
    except Exception:
        f.close()
        raise
    engine = Engine(executor, n_ctx, plan.batch_size if plan else opts.resolved_batch())
    return LoadedModel(path, f, family, args, engine, n_ctx, threads, (time.perf_counter() - t0) * 1e3, resident,
                       plan)


def _gguf_executor(f: GGUFFile, family: ModuleType, args, n_ctx: int, threads: int, taps) -> tuple[Executor, int]:
    """onnxruntime sessions compiled piece by piece; returns the executor and the bytes handed to onnxruntime."""

    def compile_piece(load, build, name):
        weights = load()
        f._mmap.madvise(mmap.MADV_DONTNEED)  # the file pages just read are not ours to keep
        gb = GraphBuilder(name)
        build(gb, weights)
        del weights
        return gb.session(threads), gb.resident_bytes

    segments = [(compile_piece(lambda seg=seg: [family.load_layer(f, args, i) for i in seg],
                               lambda gb, w, seg=seg: build_segment(gb, family, args, seg, w, taps),
                               f"layers{seg[0]}"), seg) for seg in _segments(args.n_layers)]
    head = [compile_piece(lambda r=r: family.load_head(f, args, *r), lambda gb, w: build_head(gb, family, args, w),
                          f"head{r[0]}") for r in _head_slices(f, args)]
    rope = family.rope_tables(f, args, n_ctx)
    embed = family.load_embedding(f, args)
    f._mmap.madvise(mmap.MADV_DONTNEED)
    kv = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_ctx)
    executor = Executor([(s, seg) for (s, _), seg in segments], [s for s, _ in head], embed, kv, args.vocab_size,
                        rope)
    return executor, sum(b for (_, b), _ in segments) + sum(b for _, b in head)


def _check_gguf_fits(f: GGUFFile, budget: int) -> None:
    """A GGUF runs fully resident; under a budget it must fit, or be converted to a flash store first."""
    import psutil

    need = psutil.Process().memory_info().rss + int(sum(t.nbytes for t in f.tensors.values()) * 1.7)
    if need > budget:
        raise BudgetError(f"{f.path}: a GGUF runs fully resident and needs about {need / 1e6:.0f} MB; for a budget "
                          f"of {budget / 1e6:.0f} MB convert it first (flashlm convert -m {shlex.quote(str(f.path))} "
                          f"-o MODEL.flash) and run the .flash file")
