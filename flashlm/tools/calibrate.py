"""`flashlm calibrate MODEL.flash --text FILE`: train a low-rank sparsity predictor per layer on the model's own
activations and store it in the .flash file (format.predictor_names), for `--sparsity-score predictor`.

As in "LLM in a flash" (after Deja Vu): layer i scores its neurons from the FFN input x (the hidden state after
attention, after the FFN norm) as (x @ u) @ v + bias, u (d_model, rank), v (rank, n_ff); a token then reads and
computes its top (1 - sparsity) neurons by score. A ReLU-gated FFN (ProSparse, TurboSparse) is active where its
gate is positive. SwiGLU and GeGLU have no zero activations, so there a neuron counts as "active" for a token when
its |act(gate . x) * (up . x)| is among the token's LABEL_SHARE largest (the neurons --sparsity keeps). Training is
relu_predictor.train_predictor's: the best rank-r least-squares map to that margin as the start, then a
class-balanced logistic loss, the epoch kept chosen on validation tokens. The calibration tokens are split in text
order: the first 80% fit, the next 10% validate, the last 10% are held out and give the recall and precision
reported (and stored in the file's metadata with the text, the seed and the settings).

u and v are stored as Q8_0 rows (a = u.T, b = v.T), bias as F32: a rank-128 predictor of SmolLM2 is 0.29 MB per
layer (8.8 MB in all, with the F32 biases), scored by the bundle kernel's row products.

What it buys on gated FFNs is measured in the README: on SmolLM2, no predictor from x alone came near the exact
score. Relative error of a layer's output (layers 5 and 20, 2,048 GPL-3 tokens) when dropping 40% of neurons:
exact 0.092 / 0.059, CATS 0.258 / 0.153, trained rank-128 predictors 0.39-0.43 / 0.22-0.25 (logistic, weighted
logistic, squared error, log-magnitude losses), a 576-1,536-1,536 ReLU MLP 0.19-0.20 (layer 20), and CATS times a
rank-128 reduced-rank fit of up 0.161 (layer 20).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from flashlm.errors import InvalidOptionError
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.quant.formats import dequantize
from flashlm.flash_store import format as fmt
from flashlm.flash_store.calibrate import read_text
from flashlm.flash_store.reader import is_flash_store
from flashlm.flash_store.relu_predictor import TrainOptions, evaluate, train_predictor

LABEL_SHARE = 0.5  # a token's "active" neurons: the top half by |act(gate) * up| (calibrate.py's "fires")
HELD_OUT = 0.1  # the last share of the calibration tokens: never trained on, reported
CHUNK = 512  # tokens per forward pass (a fresh context each, as llama-perplexity's chunks)
DEFAULT_TOKENS = 4096


@dataclass
class PredictorReport:
    path: str
    rank: int
    tokens: int
    description: str
    recall: list[float] = field(default_factory=list)  # per layer, held-out tokens, at the validation threshold
    precision: list[float] = field(default_factory=list)
    selected: list[float] = field(default_factory=list)  # share of neurons selected at that threshold
    thresholds: list[float] = field(default_factory=list)  # per layer, on the logits (--sparsity auto on ReLU)
    seconds: float = 0.0


def collect_ffn_inputs(model, ids: list[int], progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Run the store (fully resident) over ids in CHUNK-token passes; per layer the FFN inputs (T, d_model)."""
    ffn = model.engine.executor.ffn
    seen: dict[int, list[np.ndarray]] = {i: [] for i in range(ffn.n_layers)}

    def record(i, x):
        seen[i].append(np.array(x, np.float32))

    ffn.observers.append(record)
    try:
        for start in range(0, len(ids), CHUNK):
            model.score(ids[start:start + CHUNK])
            if progress:
                progress(min(start + CHUNK, len(ids)), len(ids))
    finally:
        ffn.observers.remove(record)
    return [np.concatenate(seen[i]) for i in range(ffn.n_layers)]


def gate_up(store, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gate . x and up . x (T, n_ff) in stored neuron order, from the layer's records."""
    layout = store.layout
    records = store.file.tensor_bytes(fmt.bundle_name(i))
    g, u, _ = layout.slices()
    gate = dequantize(np.ascontiguousarray(records[:, g]), layout.gate_type).reshape(-1, layout.d_model)
    up = dequantize(np.ascontiguousarray(records[:, u]), layout.up_type).reshape(-1, layout.d_model)
    return x @ gate.T, x @ up.T


def activity_margin(g: np.ndarray, u: np.ndarray, activation: str) -> np.ndarray:
    """> 0 where a neuron is active for a token: a ReLU gate's pre-activation (its output is exactly zero
    otherwise); for smooth activations, |act(g) * u| less the token's median (its top LABEL_SHARE)."""
    from flashlm.quant.bundle_kernel import activate

    if activation == "relu":
        return g
    h = np.abs(activate(g, activation) * u)
    return h - np.quantile(h, 1 - LABEL_SHARE, axis=1, keepdims=True)


def calibrate_predictor(path: str, text_path: str, rank: int = 128, epochs: int = 10, seed: int = 0,
                        max_tokens: int = DEFAULT_TOKENS, threads: int = 0, output: str | None = None,
                        progress: Callable[[str, int, int], None] | None = None,
                        recall: float = TrainOptions.target_recall) -> PredictorReport:
    """Train and store the predictor of every layer; `output` (default: `path` itself, rewritten atomically).
    `recall`: the share of active neurons each layer's threshold keeps on validation tokens (higher: fewer misses,
    more neurons read)."""
    import flashlm

    _check_request(path, rank, epochs, max_tokens, recall)
    text, text_description = read_text(text_path)
    t0 = time.perf_counter()
    model = flashlm.load(path, threads=threads, ctx_size=CHUNK, batch_size=CHUNK)
    try:
        store = model.engine.executor.ffn.store
        if store.group > 1:
            raise InvalidOptionError(f"{path}: the predictor picks single neurons; this store has records of "
                                     f"{store.group} (convert with --bundle neuron)")
        if rank > min(store.layout.d_model, store.n_records):
            raise InvalidOptionError(f"--rank {rank} exceeds the model's d_model {store.layout.d_model}")
        ids = model.tokenize(text)[:max_tokens]
        if len(ids) < 10 * 16:
            raise InvalidOptionError(f"calibration text is too short ({len(ids)} tokens; 160 or more needed)")
        xs = collect_ffn_inputs(model, ids, progress and (lambda d, t: progress("running", d, t)))
        activation = model.engine.executor.ffn.kernel.activation
        n_test = max(16, round(HELD_OUT * len(ids)))
        options = TrainOptions(rank=rank, epochs=epochs, seed=seed, validation_fraction=1 / 9,
                               target_recall=recall).validate()
        report = PredictorReport(output or path, rank, len(ids), "")
        tensors = []
        for i, x in enumerate(xs):
            tensors += _train_layer(store, i, x, activation, options, n_test, report)
            if progress:
                progress("training", i + 1, len(xs))
    finally:
        model.close()
    active = "relu(gate) > 0" if activation == "relu" else f"top {LABEL_SHARE:.0%} by |act(gate)*up|"
    report.description = (f"{text_description}, {len(ids)} tokens ({len(ids) - n_test} fitted, {n_test} held out), "
                          f"rank {rank}, {epochs} epochs, seed {seed}, recall target {recall}, active = {active}; held out: recall "
                          f"{np.mean(report.recall):.4f}, precision {np.mean(report.precision):.4f} (means over "
                          f"layers)")
    _store(path, output, tensors, report)
    report.seconds = time.perf_counter() - t0
    return report


def _check_request(path: str, rank: int, epochs: int, max_tokens: int, recall: float = 0.96) -> None:
    if not 0 < recall <= 1:
        raise InvalidOptionError(f"--recall {recall}: must be in (0, 1]")
    if rank < 32 or rank % 32:
        raise InvalidOptionError(f"--rank must be a positive multiple of 32 (Q8_0 rows), got {rank}")
    if epochs < 0 or max_tokens < 1:
        raise InvalidOptionError("--epochs must be >= 0 and --tokens >= 1")
    with GGUFFile(path) as f:
        if not is_flash_store(f):
            raise InvalidOptionError(f"{path}: not a .flash store (make one with `flashlm convert "
                                     f"{os.path.basename(path)} -o MODEL.flash --bundle neuron`)")


def _train_layer(store, i: int, x: np.ndarray, activation: str, options: TrainOptions, n_test: int,
                 report: PredictorReport) -> list[tuple[str, np.ndarray, fmt.QT]]:
    """Layer i's predictor, fitted on all but the last n_test tokens and scored on those (into `report`); returns
    its tensors as stored (format.predictor_names)."""
    from gguf.quants import quantize

    margin = activity_margin(*gate_up(store, i, x), activation)
    fit = slice(0, len(x) - n_test)
    p = train_predictor(x[fit], margin[fit], options, layer=i)
    q = evaluate(p, x[-n_test:], margin[-n_test:] > 0)
    report.recall.append(q.recall)
    report.precision.append(q.precision)
    report.selected.append(q.selected_fraction)
    report.thresholds.append(p.threshold)
    a, b, bias = fmt.predictor_names(i)
    return [(a, quantize(np.ascontiguousarray(p.u.T), fmt.PREDICTOR_TYPE), fmt.PREDICTOR_TYPE),
            (b, quantize(np.ascontiguousarray(p.v.T), fmt.PREDICTOR_TYPE), fmt.PREDICTOR_TYPE),
            (bias, p.bias.astype(np.float32).view(np.uint8).reshape(1, -1), fmt.QT.F32)]


def _store(path: str, output: str | None, tensors: list, report: PredictorReport) -> None:
    """The predictor's tensors and metadata into the file, replacing any earlier predictor."""
    from gguf import GGUFValueType as VT

    from flashlm.flash_store.writer import add_resident_tensors

    add_resident_tensors(path, tensors, {
        fmt.KEY_PREDICTOR: (report.description, VT.STRING),
        fmt.KEY_PREDICTOR_RANK: (report.rank, VT.UINT32),
        fmt.KEY_PREDICTOR + ".recall": (report.recall, VT.ARRAY, VT.FLOAT32),
        fmt.KEY_PREDICTOR + ".precision": (report.precision, VT.ARRAY, VT.FLOAT32),
        fmt.KEY_PREDICTOR + ".selected": (report.selected, VT.ARRAY, VT.FLOAT32),
        fmt.KEY_PREDICTOR + ".threshold": (report.thresholds, VT.ARRAY, VT.FLOAT32),
    }, dst=output, replace=lambda name: ".ffn_predictor_" in name or name.startswith(fmt.KEY_PREDICTOR))
