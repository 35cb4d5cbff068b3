"""Activation statistics per FFN neuron on calibration text: what orders a layer's neurons hot first.

A neuron "fires" on a token when its |act(gate) * up| is in the top half of that layer's neurons for the token
(SwiGLU/GeGLU FFNs are not sparse, ../shared/MACHINE.md: ~52% of neurons carry 90% of the mass); its frequency is
the fraction of calibration tokens on which it fires. The hot set is then the prefix of the frequency order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidOptionError

DEFAULT_TEXT = (
    "A runtime that reads a language model from flash storage must decide, token after token, which weights to "
    "keep in memory and which to read again. The feed-forward layers hold most of the parameters, and for any one "
    "token only part of them matters much. Measuring which neurons matter most often, on ordinary text, lets the "
    "store place them first, so that the part kept in memory is one contiguous range and the rest is read in large "
    "pieces. The text used for this measurement should look like what the model will be asked to read: prose, "
    "questions and answers, lists, a little code, numbers and dates such as 12 March 2024 or 3.5 percent. "
) * 8


@dataclass
class Calibration:
    frequency: np.ndarray  # (n_layers, n_ff) float32: fraction of tokens on which each neuron fires
    mean_abs: np.ndarray  # (n_layers, n_ff) float32: mean |activation|, the tie-breaker
    description: str  # what was used, recorded in the .flash metadata

    def order(self, layer: int) -> np.ndarray:
        """Original neuron indices, hottest first (frequency, then mean |act|, then index: deterministic)."""
        f, m = self.frequency[layer], self.mean_abs[layer]
        return np.lexsort((np.arange(len(f)), -m, -f)).astype(np.uint32)


def read_text(path: str | None) -> tuple[str, str]:
    if path is None:
        return DEFAULT_TEXT, "built-in calibration paragraph"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidOptionError(f"{path}: cannot read calibration text ({getattr(e, 'strerror', None) or e})") \
            from None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return text, f"{os.path.basename(path)} (sha256 {digest})"


def calibrate(model_path: str, text_path: str | None, max_tokens: int = 1024, threads: int = 0,
              progress=None) -> Calibration:
    """Run the source model over the text and collect per-neuron statistics from its FFN activations."""
    from ..loaders.model_loader import load_model
    from ..loaders.tokenizer import Tokenizer
    from ..options import LoadOptions

    text, description = read_text(text_path)
    ids = Tokenizer(model_path).encode(text)[:max_tokens]
    if len(ids) < 16:
        raise InvalidOptionError(f"calibration text is too short ({len(ids)} tokens; 16 or more needed)")
    loaded = load_model(model_path, LoadOptions(threads=threads, ctx_size=len(ids) + 1, batch_size=256),
                        taps=("ffn_act",))
    n_layers = loaded.args.n_layers
    fires = mean_abs = None
    engine = loaded.engine
    for start in range(0, len(ids), 256):
        chunk = np.asarray(ids[start:start + 256], dtype=np.int64)
        engine.executor.forward(chunk)
        acts = np.stack([np.abs(engine.executor.tap_values[f"ffn_act_{i}"][0]) for i in range(n_layers)])
        top_half = acts >= np.median(acts, axis=-1, keepdims=True)  # (layers, S, n_ff)
        fires = top_half.sum(1) if fires is None else fires + top_half.sum(1)
        mean_abs = acts.sum(1) if mean_abs is None else mean_abs + acts.sum(1)
        if progress:
            progress(min(start + 256, len(ids)), len(ids))
    loaded.file.close()
    n = len(ids)
    return Calibration((fires / n).astype(np.float32), (mean_abs / n).astype(np.float32),
                       f"{description}, {n} tokens")
