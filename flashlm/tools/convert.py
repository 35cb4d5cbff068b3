"""`flashlm convert`: a GGUF -> a flash store, or a Hugging Face directory -> a GGUF or a flash store.

Converting to a flash store first runs the source model over calibration text (activation_statistics): how often
each FFN neuron fires orders each layer's neurons hot first, so the part a budget keeps resident is one contiguous
prefix (flash_store/writer.py writes the store; flash_store/calibrate.py holds the statistics' type and text).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from flashlm.atomic_file import temp_path
from flashlm.errors import InvalidOptionError
from flashlm.flash_store import writer
from flashlm.flash_store.calibrate import Calibration, read_text
from flashlm.loaders import hf_convert as hf
from flashlm.loaders.tokenizer import Tokenizer
from flashlm.options import LoadOptions
from flashlm.runtime.model_loader import load_model


def _progress(done: int, total: int, what: str) -> None:
    if sys.stderr.isatty() or os.environ.get("FLASHLM_PROGRESS"):
        bar = "#" * int(30 * done / total)
        print(f"\r{what:<12} [{bar:<30}] {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def convert_gguf(src: str, dst: str, calibration_text: str | None = None, force: bool = False,
                 calibration: Calibration | None = None, bundle: str = "auto") -> writer.ConvertReport:
    """GGUF -> flash store. calibration_text: a file, None (the built-in paragraph) or "none" (source order)."""
    writer.check_destination(dst, force)
    if calibration is None and calibration_text != "none":
        calibration = activation_statistics(src, calibration_text,
                                            progress=lambda d, t: _progress(d, t, "calibrating"))
    return writer.write_store(src, dst, calibration, force=force, bundle=bundle)


def convert_hf(src_dir: str, dst: str, quant: str = hf.DEFAULT_QUANT, force: bool = False,
               calibration_text: str | None = None) -> hf.HFConvertReport:
    """HF directory -> X.gguf, or -> X.flash through a temporary GGUF beside it (removed afterwards)."""
    if not dst.endswith(".flash"):
        return hf.write_gguf(src_dir, dst, quant, force)
    writer.check_destination(dst, force)
    tmp_gguf = temp_path(dst, "src", ".gguf")
    try:
        report = hf.write_gguf(src_dir, tmp_gguf, quant, force=True)
        convert_gguf(tmp_gguf, dst, calibration_text, force=force)
    finally:
        if os.path.exists(tmp_gguf):
            os.unlink(tmp_gguf)
    report.path = dst
    report.nbytes = os.path.getsize(dst)
    return report


def activation_statistics(model_path: str, text_path: str | None, max_tokens: int = 1024, threads: int = 0,
                          progress=None) -> Calibration:
    """Run the source model over the text and collect per-neuron statistics from its FFN activations."""
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
        # strictly above: on a ReLU FFN the median is 0, and a neuron fires where its activation is not
        top_half = acts > np.median(acts, axis=-1, keepdims=True)  # (layers, S, n_ff)
        fires = top_half.sum(1) if fires is None else fires + top_half.sum(1)
        mean_abs = acts.sum(1) if mean_abs is None else mean_abs + acts.sum(1)
        if progress:
            progress(min(start + 256, len(ids)), len(ids))
    loaded.file.close()
    n = len(ids)
    return Calibration((fires / n).astype(np.float32), (mean_abs / n).astype(np.float32),
                       f"{description}, {n} tokens")
