"""Planning under a memory budget, in one place: what stays resident, how many hot neurons each layer keeps, what
streams, which output head, and on the GPU which records live in GPU memory, pinned host memory or flash
(plan_for: the host plan of a model; gpu_plan_for: with --device cuda; plan_flash and plan_gpu: the arithmetic).

The budget caps the whole process (interpreter and libraries included). What is left after the measured baseline
pays, in order: the resident attention matrices (their GGUF bytes), the KV cache for the
full context, activation scratch for a prompt batch, two I/O buffers for the streamed part of a layer's FFN (one
being read while the other is computed), and then as many hot neurons per layer as fit, pinned in each layer's
neuron cache. If even a fully streamed FFN leaves no room for the output matrix, the output matrix streams too:
its first rows stay resident as far as the budget allows (dense FFN and dense head: a resident byte of either
saves one byte of reads per token, so the FFN's neurons, which need no per-token slicing, go first). Streaming
whole attention layers is not implemented: a budget that cannot hold them fails before loading, naming the
smallest workable budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np
import psutil

from flashlm.errors import BudgetError, InvalidOptionError
from flashlm.flash_store.head_sketch import DEFAULT_CACHE_ROWS, DEFAULT_CANDIDATES, STREAMING_CACHE_ROWS, sketch_bytes
from flashlm.flash_store.predictor import reads_selected, resolve_sparsity, scorer_bytes
from flashlm.flash_store.reader import FlashStore
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import output_matrix
from flashlm.options import LoadOptions, parse_size  # noqa: F401  (parse_size: re-exported for callers)
from flashlm.quant.bundle_kernel import SUPPORTED_ROW_TYPES

MB = 1_000_000
# A flash store runs on the bundle kernel: attention and output matrices are held as their own GGUF bytes.
# Activations, BLAS and OpenMP buffers, reader threads, Python objects. Measured as peak RSS (VmHWM) after a
# 64-token generation and a 200-token prompt minus the plan's other lines: SmolLM2 -c 256 at 150 MB 9.4 MB,
# at 125 MB 6.3 MB; Gemma 3 -c 512 at 300 MB under 9 MB. In a cgroup of the budget's size 12 MB left major page
# faults at 0.00-0.02 per token (150, 135, 120 MB); 9 MB let them rise to 0.08-0.4 (code pages evicted).
SCRATCH_BYTES = 12 * MB
HOT_ALIGN = 64  # hot-set sizes are multiples of this, so cold ranges start on aligned record boundaries
HEAD_ROW_ALIGN = 4096  # resident output rows: a multiple of this, so streamed reads start page-aligned
HEAD_SLICE_ROWS = 4096
HEAD_STREAM_DEPTH = 4  # slices of a streamed output matrix in flight: one computed while the next ones are read
KV_DTYPE = np.float16  # attention runs in numpy here: a half-size cache, as llama.cpp's default
GPU_SCRATCH_BYTES = 64 << 20  # activations, logits and int8 x of a prompt batch, attention scores


@dataclass
class FlashPlan:
    budget_bytes: int | None
    baseline_bytes: int
    resident_bytes: int  # attention and output matrices, and the sparsity scorer's rows
    kv_bytes: int
    scratch_bytes: int
    io_buffer_bytes: int  # both buffers together
    hot_neurons: int  # records per layer (neurons, or blocks of `group` neurons)
    head_resident_rows: int  # rows of the output matrix kept in memory; the rest stream from flash each token
    head_rows: int
    n_ff: int  # records per layer
    n_layers: int
    record_bytes: int
    batch_size: int
    output_head: str = "exact"  # "exact" (the matrix, resident or streamed) or "sketch" (head_sketch.py)
    group: int = 1  # neurons per record (format.RecordLayout)
    sketch_cache_rows: int = 0  # output_head "sketch": rows of its exact-row cache (head_sketch.py)
    window_rows: int = 0  # records per layer the sliding window may hold beside the hot ones (residency.py)
    attention_streamed: int = 0  # layers whose attention matrices are read from flash each forward pass (the last)
    attention_layer_bytes: int = 0  # a layer's attention matrices as stored (the span one read covers)

    @property
    def head_resident(self) -> bool:
        return self.head_resident_rows >= self.head_rows

    @property
    def cache_bytes(self) -> int:
        return (self.hot_neurons + self.window_rows) * self.record_bytes * self.n_layers

    @property
    def total_bytes(self) -> int:
        return (self.baseline_bytes + self.resident_bytes + self.kv_bytes + self.scratch_bytes
                + self.io_buffer_bytes + self.cache_bytes)

    @property
    def attention_streamed_bytes(self) -> int:
        return self.attention_streamed * self.attention_layer_bytes

    @property
    def streamed_fraction(self) -> float:
        return 1.0 - self.hot_neurons / self.n_ff

    def describe(self) -> str:
        mb = lambda n: f"{n / MB:.1f} MB"  # noqa: E731
        lines = [f"memory plan for a budget of {mb(self.budget_bytes) if self.budget_bytes else 'unlimited'}:",
                 f"  baseline (interpreter, libraries, tokenizer)  {mb(self.baseline_bytes)}",
                 f"  {self._resident_text():<45} {mb(self.resident_bytes)}",
                 f"  KV cache (full context)                       {mb(self.kv_bytes)}",
                 f"  {f'activation scratch (batch {self.batch_size})':<46}{mb(self.scratch_bytes)}",
                 f"  {f'FFN hot neurons {self.hot_neurons * self.group}/{self.n_ff * self.group} per layer':<46}"
                 f"{mb(self.hot_neurons * self.record_bytes * self.n_layers)}",
                 *([f"  {f'FFN sliding window, up to {self.window_rows} per layer':<46}"
                    f"{mb(self.window_rows * self.record_bytes * self.n_layers)}"] if self.window_rows else []),
                 f"  I/O buffers                                   {mb(self.io_buffer_bytes)}",
                 f"  total                                         {mb(self.total_bytes)}",
                 f"  streamed per token: {self.streamed_fraction:.0%} of the FFN "
                 f"({mb((self.n_ff - self.hot_neurons) * self.record_bytes * self.n_layers)})"
                 + ("" if self.head_resident else
                    f" and {1 - self.head_resident_rows / self.head_rows:.0%} of the output matrix")
                 + (f" and the attention of {self.attention_streamed}/{self.n_layers} layers "
                    f"({mb(self.attention_streamed_bytes)})" if self.attention_streamed else "")]
        return "\n".join(lines)

    def _resident_text(self) -> str:
        layers = f" ({self.n_layers - self.attention_streamed}/{self.n_layers} layers)" if self.attention_streamed else ""
        return f"resident attention{layers} + {self._head_text()}"

    def _head_text(self) -> str:
        if self.output_head == "sketch":
            return "head sketch + row cache"
        if self.head_resident:
            return "output matrix"
        return f"{self.head_resident_rows}/{self.head_rows} output rows"


def plan_flash(*, budget: int | None, baseline: int, attention_bytes: int, head_bytes: int,
               n_layers: int, n_ff: int, record_bytes: int, kv_bytes_per_token: int, n_ctx: int, batch_size: int,
               n_heads: int, head_stream_bytes: int, head_rows: int, scorer_bytes: int = 0,
               head_streamable: bool = True, group: int = 1, window_rows: int = 0,
               attention_layer_bytes: int = 0) -> FlashPlan:
    """FFN neurons stream first; only if even a fully streamed FFN does not fit, the output matrix streams too, and
    then (attention_layer_bytes > 0: a layer's attention span in the file, where the layers can stream) the
    attention matrices of as few layers as make the plan fit, read from flash each forward pass into two buffers
    of that span. n_ff and record_bytes count records (a record holds `group` neurons). window_rows: records per
    layer a sliding window would hold beside the hot ones: paid before hot records, as far as the budget allows (a
    window never makes a budget unworkable)."""
    align = max(1, HOT_ALIGN // group)
    head_row_bytes = head_bytes // head_rows
    kv = kv_bytes_per_token * n_ctx
    batch = batch_size
    if budget is not None:  # attention scores for a prompt batch are (heads, batch, context) floats
        while batch > 16 and batch * n_ctx * n_heads * 4 > 8 * MB:
            batch //= 2
    scratch = SCRATCH_BYTES + batch * n_ctx * n_heads * 4
    attention = attention_bytes + scorer_bytes

    layer_bytes = attention_bytes // n_layers
    streamed = 0  # attention layers streamed (set below, before the FFN's hot records are sized)

    def plan(hot: int, head_resident: bool | int, window: int = 0, att: int | None = None) -> FlashPlan:
        """head_resident: True (all rows), False (none) or a number of resident rows; att: attention layers
        streamed (default: `streamed`)."""
        att = streamed if att is None else att
        rows = head_rows if head_resident is True else int(head_resident)
        io = (0 if hot >= n_ff else 2 * ((n_ff - hot) * record_bytes + 2 * 4096)) + \
            (2 * (attention_layer_bytes + 2 * 4096) if att else 0)
        resident = attention - att * layer_bytes + rows * head_row_bytes + (0 if rows >= head_rows else
                                                                           head_stream_bytes)
        return FlashPlan(budget, baseline, resident, kv, scratch, io, hot, rows, head_rows, n_ff, n_layers,
                         record_bytes, batch, group=group, window_rows=min(window, n_ff - hot),
                         attention_streamed=att, attention_layer_bytes=attention_layer_bytes)

    def fits(p: FlashPlan) -> bool:
        return p.total_bytes <= budget

    if budget is None or fits(plan(n_ff, True)):
        return plan(n_ff, True)
    if not fits(plan(0, True)) and not (head_streamable and fits(plan(0, False))) and attention_layer_bytes:
        streamed = _attention_to_stream(plan, fits, n_layers, head_streamable)
    head_resident = fits(plan(0, True))
    if not head_resident and (not head_streamable or not fits(plan(0, False))):
        raise _too_small(plan(0, not head_streamable, att=n_layers if attention_layer_bytes else 0), n_ctx)
    window = min(window_rows, (budget - plan(0, head_resident).total_bytes) // (n_layers * record_bytes))
    spare = budget - plan(0, head_resident, window).total_bytes + 2 * n_ff * record_bytes
    hot = min(n_ff, max(0, spare // (record_bytes * max(1, n_layers - 2))) // align * align)
    while hot > 0 and plan(hot, head_resident, window).total_bytes > budget:
        hot -= align
    if hot < n_ff or head_resident:
        return plan(max(0, hot), head_resident, window)
    rows = (budget - plan(n_ff, False).total_bytes) // head_row_bytes // HEAD_ROW_ALIGN * HEAD_ROW_ALIGN
    return plan(n_ff, min(max(0, rows), head_rows - 1))


def _attention_to_stream(plan, fits, n_layers: int, head_streamable: bool) -> int:
    """The fewest attention layers streamed (the last ones) with which a plan of no hot records fits, the output
    matrix resident or, where it can, streamed; 0 if no number does."""
    return next((att for att in range(1, n_layers + 1)
                 if fits(plan(0, True, att=att)) or (head_streamable and fits(plan(0, False, att=att)))), 0)


def _too_small(smallest: FlashPlan, n_ctx: int) -> BudgetError:
    """The refusal of a budget below the smallest workable plan, naming that plan's total."""
    p, mb = smallest, lambda n: f"{n / MB:.0f} MB"
    return BudgetError(f"a memory budget of {mb(p.budget_bytes)} cannot hold this model: the smallest workable budget "
                       f"is {-(-p.total_bytes // MB)} MB at a context of {n_ctx} tokens (baseline "
                       f"{mb(p.baseline_bytes)}, resident {mb(p.resident_bytes)}, KV cache {mb(p.kv_bytes)}; a smaller "
                       f"-c lowers it)", p.total_bytes)


# -- a model's plan: CPU, GPU and output head placement ---------------------------------------------------
def attention_names(family: ModuleType, i: int) -> list[str]:
    return [family.layer_name(k, i) for k in ("q", "k", "v", "o")]


def attention_span(f: GGUFFile, family: ModuleType, i: int) -> tuple[int, int]:
    """[start, end) of the file bytes holding layer i's q, k, v and o matrices (one read when it streams)."""
    tensors = [f.tensors[n] for n in attention_names(family, i)]
    return min(t.offset for t in tensors), max(t.offset + t.nbytes for t in tensors)


def attention_streamable(f: GGUFFile, family: ModuleType, n_layers: int) -> int:
    """The largest layer's attention span if every layer's attention matrices are in a type the row kernel takes
    from their stored bytes (a float matrix is kept dequantized, so it cannot stream); else 0."""
    if any(f.tensors[n].ggml_type not in SUPPORTED_ROW_TYPES for i in range(n_layers)
           for n in attention_names(family, i)):
        return 0
    return max(end - start for start, end in (attention_span(f, family, i) for i in range(n_layers)))


def window_rows(store: FlashStore, activation: str, opts: LoadOptions) -> int:
    """Records per layer a sliding window of opts.window tokens may hold: that many tokens' expected selections
    (predictor.resolve_sparsity's expected share kept, with a quarter more for the spread between tokens)."""
    if not opts.window or not opts.sparsity:
        return 0
    fraction, _ = resolve_sparsity(opts.sparsity, store, activation, opts.sparsity_score)
    if not reads_selected(fraction, store.record_bytes):  # the cold range streams whole: nothing to keep
        return 0
    per_token = (1.0 - fraction) * store.n_records
    return min(store.n_records, int(opts.window * per_token * 1.25))


def plan_for(f: GGUFFile, family: ModuleType, args, store: FlashStore, opts: LoadOptions, n_ctx: int,
             baseline: int | None = None, gpu_resident: bool = False) -> FlashPlan:
    """gpu_resident: attention, output matrix and KV cache live on the GPU (--device cuda); the host plan then
    counts only what stays in host memory (its hot neurons are the pinned tier). output_head "auto": the exact
    matrix where the budget keeps everything resident, else whichever streams fewer bytes per token
    (plan.output_head says which)."""
    if opts.output_head == "auto":
        return _auto_head_plan(f, family, args, store, opts, n_ctx, baseline or psutil.Process().memory_info().rss,
                               gpu_resident)
    attention = sum(f.tensors[n].nbytes for i in range(args.n_layers) for n in attention_names(family, i))
    info = output_matrix(f)
    head_bytes, head_rows = info.nbytes, info.shape[0]
    if gpu_resident:
        attention, head_bytes = 0, 0
    sketch = opts.output_head == "sketch"  # resident sketch + row cache instead of the matrix: nothing streams in bulk
    head_stream = 0 if gpu_resident else HEAD_STREAM_DEPTH * (HEAD_SLICE_ROWS * (info.nbytes // info.shape[0]) + 2 * 4096)
    kv_per_token = 0 if gpu_resident else 2 * args.n_layers * args.n_kv_heads * args.head_dim * np.dtype(KV_DTYPE).itemsize
    if opts.sparsity and store.group > 1:
        raise InvalidOptionError(f"--sparsity needs a flash store with one record per neuron; this one has blocks of "
                                 f"{store.group} (convert with --bundle neuron)")
    scorer = scorer_bytes(store, opts.sparsity_score) if opts.sparsity else 0
    window = window_rows(store, family.ffn_activation(args), opts)
    baseline = baseline or psutil.Process().memory_info().rss
    span = 0 if gpu_resident else attention_streamable(f, family, args.n_layers)

    def plan(head_bytes: int) -> FlashPlan:
        return plan_flash(budget=opts.memory_budget, baseline=baseline, attention_bytes=attention,
                          head_bytes=head_bytes, n_layers=args.n_layers, n_ff=store.n_records,
                          record_bytes=store.record_bytes, kv_bytes_per_token=kv_per_token, n_ctx=n_ctx,
                          batch_size=opts.resolved_batch(), n_heads=args.n_heads, head_stream_bytes=head_stream,
                          head_rows=head_rows, scorer_bytes=scorer, head_streamable=not sketch, group=store.group,
                          window_rows=window, attention_layer_bytes=span)

    if not sketch:
        return replace(plan(head_bytes), output_head=opts.output_head)

    def sketch_plan(rows: int) -> FlashPlan:
        p = plan(sketch_bytes(info.shape[0], args.d_model, info.nbytes // info.shape[0], rows))
        return replace(p, output_head="sketch", sketch_cache_rows=rows)

    # The exact-row cache shrinks where the FFN streams (its memory goes to FFN records), and to one token's
    # candidates where nothing larger fits.
    for rows in (DEFAULT_CACHE_ROWS, STREAMING_CACHE_ROWS):
        try:
            p = sketch_plan(rows)
        except BudgetError:
            continue
        if p.hot_neurons == p.n_ff and p.budget_bytes is not None:
            # the whole FFN resident: what the budget has left goes to more cached rows (fewer reads per token),
            # less head_rows bytes (plan_flash counts the head as rows x its bytes per row, rounded down)
            extra = (p.budget_bytes - p.total_bytes - head_rows) // (info.nbytes // info.shape[0] + 16)
            bigger = sketch_plan(min(head_rows, rows + extra)) if extra > 0 else p
            return bigger if bigger.hot_neurons == bigger.n_ff else p
        if p.hot_neurons == p.n_ff or rows == STREAMING_CACHE_ROWS:
            return p
    return sketch_plan(DEFAULT_CANDIDATES)  # the budget error, if even this does not fit


def _auto_head_plan(f: GGUFFile, family: ModuleType, args, store: FlashStore, opts: LoadOptions, n_ctx: int,
                    baseline: int, gpu_resident: bool) -> FlashPlan:
    """output_head "auto": the exact matrix when nothing needs streaming, else the head (exact or sketch) whose
    plan streams fewer bytes per token. SmolLM2 at 150 MB: exact keeps the 30 MB matrix but only 448 of 1,536
    neurons per layer (44 MB of reads per token, 22.3 tok/s); the sketch leaves room for 832 (28.5 MB, 28.8 tok/s)."""
    def plan(head):
        return plan_for(f, family, args, store, replace(opts, output_head=head), n_ctx, baseline, gpu_resident)

    def attempt(head):
        try:
            return plan(head)
        except BudgetError:
            return None

    info = output_matrix(f)
    row_bytes = info.nbytes // info.shape[0]

    def streamed(p):
        return ((p.n_ff - p.hot_neurons) * p.record_bytes * p.n_layers + (p.head_rows - p.head_resident_rows) * row_bytes
                + p.attention_streamed_bytes)

    exact = attempt("exact")
    if gpu_resident or (exact is not None and streamed(exact) == 0):
        return exact if exact is not None else plan("exact")  # (raises the budget error)
    sketch = attempt("sketch")
    fitting = [p for p in (exact, sketch) if p is not None]
    if fitting:
        return min(fitting, key=streamed)  # ties: exact
    errors = []  # none fits: the error naming the smaller of the two heads' smallest workable budgets
    for head in ("exact", "sketch"):
        try:
            plan(head)
        except BudgetError as e:
            errors.append(e)
    raise min(errors, key=lambda e: e.smallest_bytes or 0)


@dataclass
class GpuPlan:
    gpu_budget: int | None
    gpu_fixed: int  # attention + head + KV at n_ctx + staging + scratch
    gpu_hot: int  # records per layer resident on the GPU
    host_hot: int  # records per layer resident on the GPU or in pinned host memory (>= gpu_hot)
    n_ff: int  # records per layer
    record_bytes: int
    n_layers: int
    group: int = 1  # neurons per record

    def describe(self) -> str:
        mb, g = 1e6, self.group
        return (f"GPU: {self.gpu_hot * g}/{self.n_ff * g} neurons per layer resident "
                f"({self.gpu_hot * self.record_bytes * self.n_layers / mb:.0f} MB) + {self.gpu_fixed / mb:.0f} MB "
                f"attention, head, KV cache and staging; host: neurons {self.gpu_hot * g}..{self.host_hot * g} pinned "
                f"({(self.host_hot - self.gpu_hot) * self.record_bytes * self.n_layers / mb:.0f} MB); "
                f"{(self.n_ff - self.host_hot) * g} per layer read from flash each token")


def plan_gpu(gpu_budget: int | None, host_hot: int, n_ff: int, rb: int, n_layers: int, resident_bytes: int,
             kv_bytes: int, naive: bool = False, gpu_rb: int | None = None) -> GpuPlan:
    """gpu_hot: as many records per layer as the GPU budget leaves room for after the fixed parts and the
    staging of the non-resident records (two layers' landing buffers as stored, rb each, and one planar copy for
    the kernels, gpu_rb each: GpuRecords)."""
    g = gpu_rb or rb
    stage_per = 2 * rb + g  # per non-resident record: two landing buffers and the planar copy
    if naive:
        return GpuPlan(gpu_budget, resident_bytes + kv_bytes + n_ff * stage_per + GPU_SCRATCH_BYTES, 0, 0, n_ff,
                       rb, n_layers)
    fixed = resident_bytes + kv_bytes + GPU_SCRATCH_BYTES
    if gpu_budget is None:
        return GpuPlan(None, fixed, n_ff, n_ff, n_ff, rb, n_layers)
    # budget >= fixed + L*hot*g + (n_ff - hot)*stage_per  (no staging when hot == n_ff)
    if fixed + n_layers * n_ff * g <= gpu_budget:
        hot = n_ff
    else:
        if fixed + n_ff * stage_per > gpu_budget:
            raise BudgetError(f"a GPU memory budget of {gpu_budget / 1e6:.0f} MB cannot hold this model: the "
                              f"smallest workable GPU budget is {(fixed + n_ff * stage_per) / 1e6:.0f} MB "
                              f"(attention, output matrix, KV cache and staging)")
        hot = max(0, min(n_ff - 1, (gpu_budget - fixed - n_ff * stage_per) // max(1, n_layers * g - stage_per)))
    stage = 0 if hot == n_ff else (n_ff - hot) * stage_per
    return GpuPlan(gpu_budget, fixed + stage, hot, max(hot, host_hot), n_ff, rb, n_layers)


def gpu_plan_for(f: GGUFFile, family: ModuleType, args, store: FlashStore, opts: LoadOptions, n_ctx: int,
                 naive: bool = False):
    """(host plan, GPU plan) for --device cuda: arithmetic only (no CUDA needed, so `flashlm info` can show it)."""
    from flashlm.quant.cuda_kernels import GpuRecords, gpu_matrix_bytes

    host_plan = plan_for(f, family, args, store, opts, n_ctx, gpu_resident=True)
    matrices = [f.tensors[n] for i in range(args.n_layers) for n in attention_names(family, i)] + [output_matrix(f)]
    resident = sum(gpu_matrix_bytes(t.ggml_type, t.shape[0], t.shape[1]) for t in matrices)  # as the GPU holds them
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2 * n_ctx
    plan = plan_gpu(opts.gpu_memory_budget, 0 if naive else host_plan.hot_neurons, store.n_records,
                    store.record_bytes, args.n_layers, resident, kv_bytes, naive=naive,
                    gpu_rb=GpuRecords.of(store.layout).record_bytes)
    return host_plan, replace(plan, group=store.group)
