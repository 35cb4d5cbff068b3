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
from ..runtime.flash_ffn import StreamedFFN
from ..runtime.onnx_graph import GraphBuilder
from .gguf_reader import GGUFFile


def _attention_segment(gb: GraphBuilder, family: ModuleType, args, i: int, lw) -> None:
    declare_segment_io(gb, range(i, i + 1), args.d_model, args.n_kv_heads, args.head_dim)
    gb.output("ffn_in", np.float32, [1, "S", args.d_model])
    x, residual = family.build_attention(gb, args, lw, i, "hidden")
    gb.op("Identity", [residual], out=["hidden_out"])
    gb.op("Identity", [x], out=["ffn_in"])


def plan_for(f: GGUFFile, args, store: FlashStore, opts: LoadOptions, n_ctx: int, n_head_slices: int,
             baseline: int | None = None) -> FlashPlan:
    attention = sum(t.nbytes for name, t in f.tensors.items() if name.startswith("blk.") and "ffn" not in name)
    head = (f.tensors.get("output.weight") or f.tensors["token_embd.weight"]).nbytes
    kv_per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4
    return plan_flash(budget=opts.memory_budget, baseline=baseline or psutil.Process().memory_info().rss,
                      attention_bytes=attention, head_bytes=head, n_head_slices=n_head_slices,
                      n_layers=args.n_layers, n_ff=args.n_ff, record_bytes=store.record_bytes,
                      kv_bytes_per_token=kv_per_token, n_ctx=n_ctx, batch_size=opts.batch_size,
                      n_heads=args.n_heads)


def load_flash_parts(path: str, f: GGUFFile, family: ModuleType, args, opts: LoadOptions, n_ctx: int,
                     threads: int, compile_piece, head_slices) -> tuple[list, FlashPlan, StreamedFFN]:
    """Returns (attention segments, plan, streamed FFN); raises BudgetError before compiling anything."""
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model)
    plan = plan_for(f, args, store, opts, n_ctx, len(head_slices))
    segments = [(compile_piece(lambda i=i: family.load_layer(f, args, i, ffn=False),
                               lambda gb, w, i=i: _attention_segment(gb, family, args, i, w), f"attn{i}"),
                 range(i, i + 1)) for i in range(args.n_layers)]
    f._mmap.madvise(mmap.MADV_DONTNEED)
    reader = FlashReader(path, threads=opts.io_threads)
    kernel = BundleKernel(store.layout, family.FFN_ACTIVATION, threads)
    return segments, plan, StreamedFFN(store, reader, plan, kernel)
