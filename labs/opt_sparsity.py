"""FFN sparsity of an OPT model from a Hugging Face directory: exactness checks and a trained low-rank predictor.

    python -m labs.opt_sparsity HF_DIR --text FILE [--rank 128] [--seed 0] [--epochs 10]

Prints: flashlm's dense logits against transformers' OPTForCausalLM (when transformers is installed); whether the
sparse FFN over the true active set gives exactly the dense output; then, per layer and pooled, the held-out recall
and precision of predictors trained on the first part of the text, and the share of FFN neurons they select.
Training progress goes to stderr. The text is cut into windows; the last `--held-out` share of them is never trained
on (nor used to set thresholds).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from flashlm.errors import FlashLMError, InvalidOptionError
from flashlm.flash_store.relu_predictor import (ReluPredictor, SelectionQuality, TrainOptions, TrainProgress, as_selector,
                                          evaluate, selection_quality, train_predictor)
from labs.opt import OPTModel, all_neurons, oracle

EXACTNESS_TOKENS = 64  # the selected kernel runs token by token in numpy: a short window is enough to check bits


def token_windows(ids: list[int], length: int) -> list[np.ndarray]:
    """ids cut into consecutive windows of `length` (the last one shorter), each run from an empty context."""
    return [np.asarray(ids[i:i + length], np.int64) for i in range(0, len(ids), length)]


def collect(model: OPTModel, windows: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (FFN inputs (T, hidden), fc1 pre-activations (T, ffn_dim)) over all windows."""
    per_layer: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(model.args.n_layers)]
    for window in windows:
        for layer, seen in enumerate(model.ffn_activations(window)):
            per_layer[layer].append(seen)
    return [(np.concatenate([x for x, _ in seen]), np.concatenate([p for _, p in seen])) for seen in per_layer]


def relative_difference(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def transformers_logits(hf_dir: str, ids: np.ndarray) -> np.ndarray | None:
    """OPTForCausalLM's float32 logits, or None when torch/transformers are not installed."""
    try:
        import torch
        from transformers import OPTForCausalLM
    except ImportError:
        return None
    ref = OPTForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(ids)[None]).logits[0].float().numpy()


def oracle_matches_dense(model: OPTModel, ids: np.ndarray) -> bool:
    """The FFN over the true active set of each token gives bit for bit the all-neurons output."""
    return bool(np.array_equal(model.logits(ids, oracle(model)), model.logits(ids, all_neurons(model))))


def train_layers(model: OPTModel, train: list[tuple[np.ndarray, np.ndarray]], options: TrainOptions,
                 progress=None) -> list[ReluPredictor]:
    return [train_predictor(x, pre, options, layer=i, progress=progress) for i, (x, pre) in enumerate(train)]


def pooled_quality(predictors: list[ReluPredictor], held: list[tuple[np.ndarray, np.ndarray]]) -> SelectionQuality:
    selected = np.concatenate([p.predict(x) for p, (x, _) in zip(predictors, held)], axis=1)
    return selection_quality(selected, np.concatenate([pre > 0 for _, pre in held], axis=1))


def _print_progress(p: TrainProgress) -> None:
    print(f"\rpredictor for layer {p.layer}: epoch {p.epoch}/{p.epochs}, balanced loss {p.loss:.4f}, "
          f"validation precision {p.val_precision:.4f}", end="\n" if p.epoch == p.epochs else "", file=sys.stderr,
          flush=True)


def run(hf_dir: str, text: str, options: TrainOptions, window: int, held_out: float) -> None:
    from flashlm.loaders.hf_dir import HFModelDir

    hf = HFModelDir(hf_dir)
    model = OPTModel.from_dir(hf)
    ids = hf.tokenizer().encode(text).ids
    windows = token_windows(ids, min(window, model.args.max_positions))
    n_held = max(1, round(held_out * len(windows)))
    if len(windows) < 2 or n_held >= len(windows):
        raise InvalidOptionError(f"the text gives {len(ids)} tokens: too few for training and held-out windows")
    train_windows, held_windows = windows[:-n_held], windows[-n_held:]
    a = model.args
    print(f"OPT: {a.n_layers} layers, hidden {a.hidden_size}, ffn {a.ffn_dim}; {len(ids)} tokens, "
          f"{sum(map(len, train_windows))} for training, {sum(map(len, held_windows))} held out")

    probe = held_windows[0]
    dense = model.logits(probe)
    ref = transformers_logits(hf_dir, probe)
    print("dense vs transformers: " + ("transformers not installed, skipped" if ref is None else
          f"max relative logit difference {relative_difference(dense, ref):.2e} over {len(probe)} tokens"))
    print(f"oracle sparse == dense (bit for bit, {min(len(probe), EXACTNESS_TOKENS)} tokens): "
          f"{oracle_matches_dense(model, probe[:EXACTNESS_TOKENS])}")

    predictors = train_layers(model, collect(model, train_windows), options, _print_progress)
    held = collect(model, held_windows)
    print(f"predictors: rank {options.rank}, target recall {options.target_recall} (threshold set on validation "
          f"tokens), seed {options.seed}; held-out:")
    for i, (p, (x, pre)) in enumerate(zip(predictors, held)):
        print(f"  layer {i:>2}: {evaluate(p, x, pre > 0)} (epoch kept {p.epoch})")
    print(f"  pooled  : {pooled_quality(predictors, held)}")
    sparse = model.logits(probe[:EXACTNESS_TOKENS], as_selector(predictors))
    dense = dense[:EXACTNESS_TOKENS]
    print(f"predicted sparse vs dense logits ({len(sparse)} held-out tokens): top-1 agreement "
          f"{(sparse.argmax(-1) == dense.argmax(-1)).mean():.1%}, max relative difference "
          f"{relative_difference(sparse, dense):.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="Hugging Face OPT directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--text", required=True, help="text file: activations for training and held-out evaluation")
    p.add_argument("--rank", type=int, default=TrainOptions.rank)
    p.add_argument("--seed", type=int, default=TrainOptions.seed)
    p.add_argument("--epochs", type=int, default=TrainOptions.epochs)
    p.add_argument("--target-recall", type=float, default=TrainOptions.target_recall)
    p.add_argument("--window", type=int, default=256, help="tokens per window (each from an empty context)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of the windows kept for evaluation")
    a = p.parse_args(argv)
    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
        options = TrainOptions(rank=a.rank, seed=a.seed, epochs=a.epochs, target_recall=a.target_recall).validate()
        run(a.hf_dir, text, options, a.window, a.held_out)
    except (FlashLMError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
