"""Loading a .flash store under a memory budget: plan (flash_store/planner.py) -> resident attention rows ->
streamed FFN and head.

Everything runs on the bundle kernel (runtime/kernel_executor.py): attention matrices stay in their GGUF bytes,
the FFN streams through the neuron caches, the output matrix is resident or streamed as the plan says.
"""

from __future__ import annotations

import mmap
from types import ModuleType

import numpy as np

from flashlm.flash_store.head_sketch import SketchHead
from flashlm.flash_store.io_engine import FlashReader
from flashlm.flash_store.planner import (HEAD_SLICE_ROWS, HEAD_STREAM_DEPTH, KV_DTYPE, FlashPlan, attention_names,
                                         gpu_plan_for, plan_for)
from flashlm.flash_store.predictor import resolve_sparsity
from flashlm.models import output_matrix
from flashlm.flash_store.reader import FlashStore
from flashlm.options import LoadOptions
from flashlm.quant.formats import dequantize
from flashlm.quant.bundle_kernel import SUPPORTED_ROW_TYPES, BundleKernel
from flashlm.runtime.kernel_executor import AttentionWeights, KernelExecutor, RowMatrix
from flashlm.runtime.kv_cache import KVCache
from flashlm.runtime.streaming import StreamedAttention, StreamedFFN, StreamedHead
from flashlm.loaders.gguf_reader import GGUFFile, GGMLQuantizationType as QT
from flashlm.quant.weights import require, vector

def _row_matrix(f: GGUFFile, name: str, bias_name: str | None) -> RowMatrix:
    info = require(f, name)
    bias = vector(f, bias_name, info.shape[0]) if bias_name and bias_name in f.tensors else None
    if info.ggml_type in SUPPORTED_ROW_TYPES:
        return RowMatrix(np.array(f.tensor_bytes(name)), info.ggml_type, bias)
    # float matrices (F32/F16/BF16) are kept as float32 and multiplied by numpy
    return RowMatrix(dequantize(f.tensor_bytes(name), info.ggml_type).reshape(info.shape), QT.F32, bias)


def attention_biases(f: GGUFFile, family: ModuleType, args, i: int) -> dict[str, np.ndarray]:
    """Layer i's q, k, v biases where the file has them (Qwen2), by key."""
    out = {}
    for name, key in zip(attention_names(family, i), ("q", "k", "v")):
        bias = family.layer_name(f"{key}_bias", i)
        if bias in f.tensors:
            out[key] = vector(f, bias, f.tensors[name].shape[0])
    return out


def load_attention(f: GGUFFile, family: ModuleType, args, i: int) -> AttentionWeights:
    q, k, v, o = attention_names(family, i)
    parts = [_row_matrix(f, name, family.layer_name(f"{key}_bias", i)) for name, key in ((q, "q"), (k, "k"), (v, "v"))]
    if len({(p.qtype, p.rows.dtype) for p in parts}) == 1:  # one stacked matrix: one kernel call per layer
        biases = [p.bias for p in parts]
        bias = None if all(b is None for b in biases) else np.concatenate(
            [b if b is not None else np.zeros(p.rows.shape[0], np.float32) for b, p in zip(biases, parts)])
        parts = [RowMatrix(np.concatenate([p.rows for p in parts]), parts[0].qtype, bias)]
    return AttentionWeights(parts, _row_matrix(f, o, None), layer_norms(f, family, args, i))


def layer_norms(f: GGUFFile, family: ModuleType, args, i: int) -> dict[str, np.ndarray]:
    """Layer i's norm weights under the family's names: attn_norm, ffn_norm and the family's own (QK-norm's
    q_norm / k_norm per head, post-norms)."""
    sizes = {"attn_norm": args.d_model, "ffn_norm": args.d_model, "q_norm": args.head_dim, "k_norm": args.head_dim,
             "post_attn_norm": args.d_model, "post_ffw_norm": args.d_model}
    return {key: vector(f, family.layer_name(key, i), n) for key, n in sizes.items() if key in family.LAYER_TENSORS}


def load_flash_executor(path: str, f: GGUFFile, family: ModuleType, args, opts: LoadOptions, n_ctx: int,
                        threads: int) -> tuple[KernelExecutor, FlashPlan]:
    """Raises BudgetError before reading any weight if the budget cannot hold the model."""
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model)
    plan = plan_for(f, family, args, store, opts, n_ctx)
    kernel = BundleKernel(store.layout, family.ffn_activation(args), threads)
    streamed = list(range(args.n_layers - plan.attention_streamed, args.n_layers))
    layers = []
    for i in range(args.n_layers):  # a streamed layer's matrices come from StreamedAttention each pass
        layers.append(None if i in streamed else load_attention(f, family, args, i))
        f._mmap.madvise(mmap.MADV_DONTNEED)  # the copies are ours; the file's pages need not stay
    reader = FlashReader(path, threads=opts.io_threads)
    try:  # a failed load-time read leaves no reader thread behind
        attention = StreamedAttention(reader, f, family, streamed, {i: layer_norms(f, family, args, i) for i in streamed},
                                      {i: attention_biases(f, family, args, i) for i in streamed}) if streamed else None
        info = output_matrix(f)
        norm = vector(f, family.TENSORS["output_norm"], args.d_model)
        if plan.output_head == "sketch":
            head = SketchHead(reader, kernel, info.offset, info.shape[0], info.nbytes // info.shape[0], info.ggml_type,
                              norm, args.d_model, cache_rows=plan.sketch_cache_rows)
        else:
            head = StreamedHead(reader, kernel, info.offset, info.shape[0], info.nbytes // info.shape[0],
                                info.ggml_type, norm, plan.head_resident_rows, HEAD_SLICE_ROWS,
                                HEAD_STREAM_DEPTH)
        fraction, thresholds = resolve_sparsity(opts.sparsity, store, family.ffn_activation(args),
                                                opts.sparsity_score)
        ffn = StreamedFFN(store, reader, plan, kernel, fraction, opts.sparsity_score, thresholds, opts.window)
    except BaseException:
        reader.close()
        raise
    rope = family.rope_tables(f, args, n_ctx)
    kv = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_ctx, KV_DTYPE)
    embed = family.load_embedding(f, args)
    f._mmap.madvise(mmap.MADV_DONTNEED)
    return KernelExecutor(family, args, layers, kernel, ffn, head, embed, kv, rope, attention=attention), plan


def load_cuda_executor(path: str, f: GGUFFile, family: ModuleType, args, opts: LoadOptions, n_ctx: int,
                       threads: int, naive: bool = False):
    """The CUDA backend (runtime/cuda_executor.py): attention, head and the hot records on the GPU within
    opts.gpu_memory_budget, the next records pinned in host memory within opts.memory_budget, the rest streamed.
    `naive`: the baseline that copies every layer's weights to the GPU for every token."""
    from flashlm.quant.cuda_kernels import CudaKernels
    from flashlm.runtime.cuda_executor import CudaExecutor, GpuHead, GpuLayer, GpuMatrix, import_cupy
    from flashlm.runtime.cuda_ffn import GpuFFN

    cp = import_cupy()
    cp.zeros(1)  # the CUDA context: its host memory belongs in the baseline the host plan measures
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model)
    host_plan, plan = gpu_plan_for(f, family, args, store, opts, n_ctx, naive)
    info = output_matrix(f)
    gpu_budget = opts.gpu_memory_budget
    # every GPU array of ours comes from this pool (process-wide: models loaded side by side share the budget)
    cp.get_default_memory_pool().set_limit(size=gpu_budget or 0)
    kernels = CudaKernels()

    def gpu_matrix(m: RowMatrix):
        return GpuMatrix(cp, kernels, m.rows, m.qtype, m.bias, args.d_model if m.rows.dtype != np.float32 else
                         m.rows.shape[1], keep_on_gpu=not naive)

    layers = []
    for i in range(args.n_layers):
        w = load_attention(f, family, args, i)
        k_in = [gpu_matrix(m) for m in w.qkv]
        o_rows = w.o
        o = GpuMatrix(cp, kernels, o_rows.rows, o_rows.qtype, o_rows.bias, args.n_heads * args.head_dim,
                      keep_on_gpu=not naive)
        norms = {name: weight for name, weight in vars(w).items() if name not in ("qkv", "o")}
        layers.append(GpuLayer(cp, k_in, o, norms))
        f._mmap.madvise(mmap.MADV_DONTNEED)
    reader = FlashReader(path, threads=opts.io_threads)
    try:
        head_rows = np.array(f.tensor_bytes(info.name)).reshape(info.shape[0], -1)
        head = GpuHead(cp, GpuMatrix(cp, kernels, head_rows, info.ggml_type, None, args.d_model),
                       vector(f, family.TENSORS["output_norm"], args.d_model))
        del head_rows
        ffn = GpuFFN(cp, kernels, store, reader, plan, family.ffn_activation(args))
    except BaseException:
        reader.close()
        raise
    rope = family.rope_tables(f, args, n_ctx)
    kv = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_ctx, np.float16, xp=cp)
    embed = family.load_embedding(f, args)
    f._mmap.madvise(mmap.MADV_DONTNEED)
    return CudaExecutor(cp, family, args, layers, ffn, head, embed, kv, rope, plan), host_plan
