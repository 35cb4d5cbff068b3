"""Which FFN neurons a token needs: neuron scores, top-k selection and page-coalesced read runs.

SmolLM2's SwiGLU FFN is not sparse (about 52% of neurons carry 90% of the mass), so a neuron is skipped when its
score is among the `fraction` lowest of its layer for that token (top-k per token: the read volume is fixed, which
the budget planner needs). Two scores, both computed from resident rows kept in their source quantization:

  - "cats":  |act(gate . x)|, the CATS signal (gate rows resident, 27% of a SmolLM2 record);
  - "exact": |act(gate . x) * (up . x)|, the true contribution size (gate and up rows resident, 54% of a
             record): the oracle ranking, so only down columns need to be fetched for it to pay.

Measured offline on SmolLM2 (FFN inputs of 2,048 GPL-3 tokens, relative error of the layer output when dropping
40% / 50% of neurons): exact 0.061 / 0.095, cats 0.166 / 0.228, a data-aware low-rank (r=128) linear predictor of
gate and up 0.237 / 0.279, 3-bit copies of gate and up 0.102 / 0.134. A third score is a trained low-rank predictor
stored in the file by `flashlm calibrate` (predictor_train.py, the paper's choice, with the figures that show it
losing to CATS on SmolLM2):

  - "predictor": b . (a . x) + bias, a rank-r map of the FFN input (no weight rows resident; 8.8 MB for SmolLM2 at
                 rank 128, against 17 MB of gate rows for "cats").

The predictor of a ReLU FFN (OPT) is relu_predictor.py.
"""

from __future__ import annotations

import numpy as np

from flashlm.errors import InvalidOptionError
from flashlm.flash_store import format as fmt
from flashlm.options import SCORES, parse_sparsity  # noqa: F401  (re-exported for callers of this module)

AUTO_FRACTION = 0.4  # measured on SmolLM2 with the exact score: +0.1% perplexity (README table)
RELU_SKIP_GUESS = 0.5  # a ReLU FFN read by exact/cats scores above zero, converted without activation statistics
READ_UNIT = 512  # selective reads go by disk sectors (O_DIRECT's logical block size), not 4 KiB pages: a 1,280-byte
                 # record then costs ~1.4x its size instead of a whole page shared with two neighbours
MERGE_GAP_BYTES = 4096  # a gap this small is read through rather than starting another request (~13 us each here)



def resolve_sparsity(sparsity, store, activation: str, score: str) -> tuple[float, np.ndarray | None]:
    """(fraction skipped, per-layer score thresholds or None) for a store. A fraction is a top-k per token. "auto"
    on a ReLU FFN reads, as in the paper, the neurons predicted active: with "predictor", those whose score reaches
    the layer's threshold stored by `flashlm calibrate` (set for 96% recall on validation tokens); with "exact" or
    "cats", those whose score is above zero, which for ReLU is the true active set (output equal to dense). The
    fraction returned then is the expected share skipped (calibration's held-out figure, or the conversion's
    activation statistics), used to plan reads.
    "auto" elsewhere is AUTO_FRACTION."""
    if sparsity != "auto":
        return float(sparsity), None
    if activation != "relu":
        return AUTO_FRACTION, None
    if score == "predictor":
        thresholds, selected = store.predictor_thresholds()
        return float(1.0 - selected.mean()), thresholds
    active = store.active_share()  # measured at conversion; a guess for a store converted without calibration
    skip = RELU_SKIP_GUESS if active is None else 1.0 - active
    return skip, np.full(len(store.layers), np.finfo(np.float32).tiny, np.float32)


def scorer_bytes(store, kind: str) -> int:
    """What a scorer of `kind` keeps in memory for the whole model: every gate row, and every up row for "exact";
    the stored predictor's tensors for "predictor"."""
    if kind == "predictor":
        if store.predictor_rank is None:
            store.predictor(0)  # raises the error that says how to train one
        return sum(store.file.tensors[name].nbytes for i in range(len(store.layers))
                   for name in fmt.predictor_names(i))
    layout = store.layout
    per_neuron = layout.gate_bytes + (layout.up_bytes if kind == "exact" else 0)
    return len(store.layers) * store.n_records * per_neuron


SPARSE_READ_MAX_COVERAGE = 0.75


def page_coverage(skip: float, record_bytes: int, unit: int = READ_UNIT) -> float:
    """Expected share of the cold range's bytes a token's selection reads: reads go by aligned units of `unit`
    bytes (O_DIRECT sectors; 4 KiB pages when the file is read through the page cache). A unit no larger than a
    record is read for each selected record it overlaps (on average record_bytes / unit + 1 of them); a larger one
    is needed unless all its records are skipped (records assumed independent)."""
    if unit <= record_bytes:
        return min(1.0, (1.0 - skip) * (1.0 + unit / record_bytes))
    return 1.0 - skip ** (unit / record_bytes)


def reads_selected(skip: float, record_bytes: int, unit: int = READ_UNIT) -> bool:
    """Whether a token reads only the units of its selected cold records. That gives up the next layer's prefetch
    (the selection needs this layer's input), so it is done only where it saves a quarter of the bytes or more;
    otherwise the cold range streams as when dense and the skipped neurons save compute only (and a sliding window
    has nothing to save)."""
    return skip > 0 and page_coverage(skip, record_bytes, unit) <= SPARSE_READ_MAX_COVERAGE


def keep_count(n: int, fraction: float) -> int:
    return max(1, int(round(n * (1.0 - fraction))))


class NeuronScorer:
    """Scores (S, n) for tokens x (S, d), in the layer's stored neuron order."""

    def __init__(self, kind: str, gate_rows: list[np.ndarray], up_rows: list[np.ndarray] | None, gate_type, up_type,
                 activation: str, predictor: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None):
        if kind not in SCORES:
            raise InvalidOptionError(f"sparsity score must be one of {', '.join(SCORES)}, got {kind!r}")
        self.kind, self.gate_rows, self.up_rows = kind, gate_rows, up_rows
        self.gate_type, self.up_type, self.activation = gate_type, up_type, activation
        self.predictor = predictor  # per layer (a rows, b rows, bias), FlashStore.predictor

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.gate_rows) + sum(r.nbytes for r in self.up_rows or []) + \
            sum(a.nbytes for layer in self.predictor or [] for a in layer)

    def scores(self, kernel, i: int, x: np.ndarray) -> np.ndarray:
        from flashlm.quant.bundle_kernel import activate, rows_matvec

        if self.kind == "predictor":
            a, b, bias = self.predictor[i]
            t = np.empty((x.shape[0], a.shape[0]), np.float32)
            rows_matvec(kernel, a, fmt.PREDICTOR_TYPE, x, t)
            s = np.empty((x.shape[0], b.shape[0]), np.float32)
            rows_matvec(kernel, b, fmt.PREDICTOR_TYPE, t, s)
            s += bias
            return s
        n = self.gate_rows[i].shape[0]
        g = np.empty((x.shape[0], n), np.float32)
        rows_matvec(kernel, self.gate_rows[i], self.gate_type, x, g)
        a = activate(g, self.activation)
        if self.kind == "exact":
            u = np.empty_like(g)
            rows_matvec(kernel, self.up_rows[i], self.up_type, x, u)
            a *= u
        return np.abs(a)


def select(scores: np.ndarray, keep: int) -> np.ndarray:
    """scores (n,) -> the `keep` best positions, ascending (the kernel sums in stored order: deterministic)."""
    if keep >= len(scores):
        return np.arange(len(scores))
    return np.sort(np.argpartition(-scores, keep - 1)[:keep])


def topk_mask(scores: np.ndarray, keep: int) -> np.ndarray:
    """scores (S, n) -> bool mask (S, n) of each token's `keep` best neurons."""
    if keep >= scores.shape[1]:
        return np.ones(scores.shape, bool)
    idx = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def page_runs(rel_starts: np.ndarray, record_bytes: int, unit: int = READ_UNIT,
              merge_gap: int = MERGE_GAP_BYTES) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) relative to an aligned origin, multiples of `unit`, covering the records that start
    at `rel_starts` (ascending); runs separated by at most `merge_gap` bytes are read as one."""
    if len(rel_starts) == 0:
        return []
    first = rel_starts // unit
    last = (rel_starts + record_bytes - 1) // unit
    gap_units = merge_gap // unit
    # a new run starts where a record's first unit lies beyond the previous record's last unit plus the gap
    # (records ascend and do not overlap, so the previous record's last unit is the run's furthest so far)
    starts = np.flatnonzero(first[1:] > last[:-1] + 1 + gap_units) + 1
    lo = first[np.concatenate([[0], starts])]
    hi = last[np.concatenate([starts - 1, [len(first) - 1]])]
    return [(int(a) * unit, (int(b) + 1) * unit) for a, b in zip(lo, hi)]
