"""Loading a .flash store under a memory budget: plan -> compile the resident graphs -> set up the streamed FFN.

The attention half of every layer and the output matrix are compiled as with a GGUF (one session per layer, since
the FFN runs between two of them); the FFN runs from the bundles through the neuron caches and the I/O engine.
"""

from __future__ import annotations

import mmap
from types import ModuleType

import numpy as np
import psutil

from ..flash_store.io_engine import FlashReader
from ..flash_store.planner import FlashPlan, plan_flash
from ..flash_store.reader import FlashStore
from ..models.base import declare_segment_io
from ..options import LoadOptions
from ..quant.bundle_kernel import BundleKernel
from ..runtime.streaming import StreamedFFN, StreamedHead
from ..runtime.onnx_graph import GraphBuilder
from .gguf_reader import GGUFFile


def _attention_segment(gb: GraphBuilder, family: ModuleType, args, i: int, lw) -> None:
    declare_segment_io(gb, range(i, i + 1), args.d_model, args.n_kv_heads, args.head_dim)
    gb.output("ffn_in", np.float32, [1, "S", args.d_model])
    x, residual = family.build_attention(gb, args, lw, i, "hidden")
    gb.op("Identity", [residual], out=["hidden_out"])
    gb.op("Identity", [x], out=["ffn_in"])


HEAD_SLICE_ROWS = 4096


def _head_info(f: GGUFFile):
    return f.tensors.get("output.weight") or f.tensors["token_embd.weight"]


def plan_for(f: GGUFFile, args, store: FlashStore, opts: LoadOptions, n_ctx: int,
             baseline: int | None = None) -> FlashPlan:
    attention = sum(t.nbytes for name, t in f.tensors.items() if name.startswith("blk.") and "ffn" not in name)
    info = _head_info(f)
    head = info.nbytes
    head_stream = 2 * (HEAD_SLICE_ROWS * (info.nbytes // info.shape[0]) + 2 * 4096)
    kv_per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4
    import onnxruntime  # noqa: F401  (the baseline must include the libraries the run will load)

    return plan_flash(budget=opts.memory_budget, baseline=baseline or psutil.Process().memory_info().rss,
                      attention_bytes=attention, head_bytes=head,
                      n_layers=args.n_layers, n_ff=args.n_ff, record_bytes=store.record_bytes,
                      kv_bytes_per_token=kv_per_token, n_ctx=n_ctx, batch_size=opts.batch_size,
                      n_heads=args.n_heads, head_stream_bytes=head_stream)


def load_flash_parts(path: str, f: GGUFFile, family: ModuleType, args, opts: LoadOptions, n_ctx: int,
                     threads: int, compile_piece) -> tuple[list, FlashPlan, StreamedFFN, object]:
    """Returns (attention segments, plan, streamed FFN, streamed head or None); raises BudgetError before
    compiling anything."""
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model)
    plan = plan_for(f, args, store, opts, n_ctx)
    segments = [(compile_piece(lambda i=i: family.load_layer(f, args, i, ffn=False),
                               lambda gb, w, i=i: _attention_segment(gb, family, args, i, w), f"attn{i}"),
                 range(i, i + 1)) for i in range(args.n_layers)]
    f._mmap.madvise(mmap.MADV_DONTNEED)
    reader = FlashReader(path, threads=opts.io_threads)
    kernel = BundleKernel(store.layout, family.FFN_ACTIVATION, threads)
    # The head always runs on the kernel for a flash store, resident or not, so a budget never changes the logits.
    info = _head_info(f)
    norm = family.load_head(f, args, 0, 1).output_norm
    head = StreamedHead(reader, kernel, info.offset, info.shape[0], info.nbytes // info.shape[0], info.ggml_type,
                        norm, args.norm_eps, plan.head_resident, HEAD_SLICE_ROWS)
    return segments, plan, StreamedFFN(store, reader, plan, kernel), head
