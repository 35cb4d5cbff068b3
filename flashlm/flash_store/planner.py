"""Planning under a memory budget: what stays resident, how many hot neurons each layer keeps, what streams.

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

from dataclasses import dataclass

from flashlm.errors import BudgetError
from flashlm.options import parse_size  # noqa: F401  (re-exported for callers of this module)

MB = 1_000_000
# A flash store runs on the bundle kernel: attention and output matrices are held as their own GGUF bytes.
# Activations, BLAS and OpenMP buffers, reader threads, Python objects. Measured as peak RSS (VmHWM) after a
# 64-token generation and a 200-token prompt minus the plan's other lines: SmolLM2 -c 256 at 150 MB 9.4 MB,
# at 125 MB 6.3 MB; Gemma 3 -c 512 at 300 MB under 9 MB. In a cgroup of the budget's size 12 MB left major page
# faults at 0.00-0.02 per token (150, 135, 120 MB); 9 MB let them rise to 0.08-0.4 (code pages evicted).
SCRATCH_BYTES = 12 * MB
HOT_ALIGN = 64  # hot-set sizes are multiples of this, so cold ranges start on aligned record boundaries
HEAD_ROW_ALIGN = 4096  # resident output rows: a multiple of this, so streamed reads start page-aligned


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

    @property
    def head_resident(self) -> bool:
        return self.head_resident_rows >= self.head_rows

    @property
    def cache_bytes(self) -> int:
        return self.hot_neurons * self.record_bytes * self.n_layers

    @property
    def total_bytes(self) -> int:
        return (self.baseline_bytes + self.resident_bytes + self.kv_bytes + self.scratch_bytes
                + self.io_buffer_bytes + self.cache_bytes)

    @property
    def streamed_fraction(self) -> float:
        return 1.0 - self.hot_neurons / self.n_ff

    def describe(self) -> str:
        mb = lambda n: f"{n / MB:.1f} MB"  # noqa: E731
        lines = [f"memory plan for a budget of {mb(self.budget_bytes) if self.budget_bytes else 'unlimited'}:",
                 f"  baseline (interpreter, libraries, tokenizer)  {mb(self.baseline_bytes)}",
                 f"  {'resident attention + ' + self._head_text():<46}{mb(self.resident_bytes)}",
                 f"  KV cache (full context)                       {mb(self.kv_bytes)}",
                 f"  {f'activation scratch (batch {self.batch_size})':<46}{mb(self.scratch_bytes)}",
                 f"  {f'FFN hot neurons {self.hot_neurons * self.group}/{self.n_ff * self.group} per layer':<46}"
                 f"{mb(self.cache_bytes)}",
                 f"  I/O buffers                                   {mb(self.io_buffer_bytes)}",
                 f"  total                                         {mb(self.total_bytes)}",
                 f"  streamed per token: {self.streamed_fraction:.0%} of the FFN "
                 f"({mb((self.n_ff - self.hot_neurons) * self.record_bytes * self.n_layers)})"
                 + ("" if self.head_resident else
                    f" and {1 - self.head_resident_rows / self.head_rows:.0%} of the output matrix")]
        return "\n".join(lines)

    def _head_text(self) -> str:
        if self.output_head == "sketch":
            return "head sketch + row cache"
        if self.head_resident:
            return "output matrix"
        return f"{self.head_resident_rows}/{self.head_rows} output rows"


def plan_flash(*, budget: int | None, baseline: int, attention_bytes: int, head_bytes: int,
               n_layers: int, n_ff: int, record_bytes: int, kv_bytes_per_token: int, n_ctx: int, batch_size: int,
               n_heads: int, head_stream_bytes: int, head_rows: int, scorer_bytes: int = 0,
               head_streamable: bool = True, group: int = 1) -> FlashPlan:
    """FFN neurons stream first; only if even a fully streamed FFN does not fit, the output matrix streams too.
    n_ff and record_bytes count records (a record holds `group` neurons)."""
    align = max(1, HOT_ALIGN // group)
    head_row_bytes = head_bytes // head_rows
    kv = kv_bytes_per_token * n_ctx
    batch = batch_size
    if budget is not None:  # attention scores for a prompt batch are (heads, batch, context) floats
        while batch > 16 and batch * n_ctx * n_heads * 4 > 8 * MB:
            batch //= 2
    scratch = SCRATCH_BYTES + batch * n_ctx * n_heads * 4
    attention = attention_bytes + scorer_bytes

    def plan(hot: int, head_resident: bool | int) -> FlashPlan:
        """head_resident: True (all rows), False (none) or a number of resident rows."""
        rows = head_rows if head_resident is True else int(head_resident)
        io = 0 if hot >= n_ff else 2 * ((n_ff - hot) * record_bytes + 2 * 4096)
        resident = attention + rows * head_row_bytes + (0 if rows >= head_rows else head_stream_bytes)
        return FlashPlan(budget, baseline, resident, kv, scratch, io, hot, rows, head_rows, n_ff, n_layers,
                         record_bytes, batch, group=group)

    if budget is None or plan(n_ff, True).total_bytes <= budget:
        return plan(n_ff, True)
    head_resident = plan(0, True).total_bytes <= budget
    if not head_resident and (not head_streamable or plan(0, False).total_bytes > budget):
        smallest = plan(0, not head_streamable)
        raise BudgetError(f"a memory budget of {budget / MB:.0f} MB cannot hold this model: the smallest workable "
                          f"budget is {-(-smallest.total_bytes // MB)} MB at a context of {n_ctx} tokens "
                          f"(baseline {baseline / MB:.0f} MB, resident {smallest.resident_bytes / MB:.0f} MB, "
                          f"KV cache {kv / MB:.0f} MB; a smaller -c lowers it)")
    spare = budget - plan(0, head_resident).total_bytes + 2 * n_ff * record_bytes
    hot = min(n_ff, max(0, spare // (record_bytes * max(1, n_layers - 2))) // align * align)
    while hot > 0 and plan(hot, head_resident).total_bytes > budget:
        hot -= align
    if hot < n_ff or head_resident:
        return plan(max(0, hot), head_resident)
    rows = (budget - plan(n_ff, False).total_bytes) // head_row_bytes // HEAD_ROW_ALIGN * HEAD_ROW_ALIGN
    return plan(n_ff, min(max(0, rows), head_rows - 1))
