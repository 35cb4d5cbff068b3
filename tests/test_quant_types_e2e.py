"""Every supported tensor type end to end: tiny random Llamas (SmolLM2's vocabulary) against llama.cpp's logits."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QT

import flashlm

from .ggufs import write_tiny_llama


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_tiny_llama_matches_llama_cpp(tmp_path, smollm_path, qtype):
    from llama_cpp import Llama

    path = str(tmp_path / f"tiny-{qtype.name}.gguf")
    write_tiny_llama(path, smollm_path, qtype=qtype, d_model=128, n_ff=256, n_heads=4, n_kv_heads=2,
                     tied=qtype == QT.Q8_0)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 2000, 17, 9000, 42, 600, 1234]
    ref = Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    ref.eval(ids)
    expected = np.array(ref.scores[:len(ids)])
    got = flashlm.load(path, threads=2, ctx_size=64).logits(ids)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    top1 = (got.argmax(-1) == expected.argmax(-1)).mean()
    print(f"{qtype.name}: max relative logit difference {rel:.4f}, top-1 agreement {top1:.2f}")
    assert rel < 0.05
    assert top1 >= 0.85
