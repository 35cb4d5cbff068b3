"""`flashlm calibrate`: a low-rank sparsity predictor trained on SmolLM2's own activations, stored in the .flash,
used by --sparsity-score predictor (real weights; small rank and few tokens to keep the suite fast)."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

import flashlm
from flashlm.errors import InvalidOptionError, ModelFileError
from flashlm.flash_store import format as fmt
from flashlm.tools.calibrate import calibrate_predictor
from flashlm.flash_store.reader import FlashStore, verify_store
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.quant.formats import dequantize

from .test_bad_input import assert_one_line_error, run_cli

CAL_TEXT = "/usr/share/common-licenses/Apache-2.0"  # calibration; GPL-3 is what the suite evaluates on
SETTINGS = dict(rank=32, epochs=1, seed=3, max_tokens=480, threads=2)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tensors(path: str) -> dict[str, bytes]:
    with GGUFFile(path) as f:
        return {n: bytes(f.tensor_bytes(n)) for n in f.tensors if ".ffn_predictor_" in n}


@pytest.fixture(scope="module")
def calibrated(flash_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pred") / "smol_pred.flash")
    before = _sha(flash_path)
    report = calibrate_predictor(flash_path, CAL_TEXT, output=out, **SETTINGS)
    assert _sha(flash_path) == before  # -o leaves the source as it was
    return out, report


def test_calibrate_records_what_it_used_and_the_file_verifies(calibrated, flash_path):
    path, report = calibrated
    assert all(s.ok for s in verify_store(path))
    with GGUFFile(path) as f:
        store = FlashStore(f, 30, 1536, 576)
        assert store.predictor_rank == 32
        desc = f.get(fmt.KEY_PREDICTOR)
        with open(CAL_TEXT, encoding="utf-8") as t:
            digest = hashlib.sha256(t.read().encode()).hexdigest()[:16]
        for needle in ("Apache-2.0", digest, "480 tokens", "rank 32", "1 epochs", "seed 3"):
            assert needle in desc, (needle, desc)
        recall = np.asarray(f.get(fmt.KEY_PREDICTOR + ".recall"))
        assert recall.shape == (30,) and np.allclose(recall, report.recall)
        # bundles and neuron orders are the source's, byte for byte
        with GGUFFile(flash_path) as src:
            for i in (0, 29):
                assert np.array_equal(f.tensor_bytes(fmt.bundle_name(i)), src.tensor_bytes(fmt.bundle_name(i)))
                assert np.array_equal(f.get(fmt.layer_key(i, "neuron_order")), src.get(fmt.layer_key(i, "neuron_order")))
    print(f"held-out recall {np.mean(report.recall):.4f}, precision {np.mean(report.precision):.4f}")
    # the threshold is set for 96% recall on validation tokens; held-out tokens land near it
    assert 0.85 <= np.mean(report.recall) <= 1.0 and 0.4 <= np.mean(report.precision) <= 1.0


def test_calibrate_is_reproducible_and_recalibrating_replaces(calibrated, tmp_path):
    path, _ = calibrated
    again = str(tmp_path / "again.flash")
    shutil.copy(path, again)  # calibrating a calibrated store replaces its predictor
    calibrate_predictor(again, CAL_TEXT, **SETTINGS)
    assert _tensors(again) == _tensors(path)
    with GGUFFile(again) as f:
        assert sum(".ffn_predictor_a" in n for n in f.tensors) == 30
    assert all(s.ok for s in verify_store(again))


def test_predictor_scores_select_the_computed_neurons(calibrated):
    """One decoded token: the kernel's predictor scores match a float product of the stored rows, and the FFN output
    equals the sum over exactly the top 60% by those scores, computed from the dequantized records."""
    path, _ = calibrated
    m = flashlm.load(path, threads=2, ctx_size=64, sparsity=0.4, sparsity_score="predictor")
    try:
        ffn = m.engine.executor.ffn
        seen = {}
        original = ffn.run

        def recording(i, x, y):
            before = y.copy()
            original(i, x, y)
            seen.setdefault(i, []).append((x.copy(), y - before))

        ffn.run = recording
        m.logits(m.tokenize("The capital of France is Paris")[:6])
        ffn.run = original
        store, layout = ffn.store, ffn.store.layout
        for i in (0, 17):
            x, dy = seen[i][0]
            x, dy = x[-1:], dy[-1:]
            a, b, bias = store.predictor(i)
            A = dequantize(a, fmt.PREDICTOR_TYPE).reshape(a.shape[0], -1)
            B = dequantize(b, fmt.PREDICTOR_TYPE).reshape(b.shape[0], -1)
            expect = (x @ A.T) @ B.T + bias
            got = ffn.scorer.scores(ffn.kernel, i, x)
            assert np.abs(got - expect).max() <= 0.05 * np.abs(expect).max()  # int8 x in the kernel
            keep = np.sort(np.argsort(-got[0])[:ffn.keep])
            records = store.file.tensor_bytes(fmt.bundle_name(i))[keep]
            g, u, d = layout.slices()
            G = dequantize(np.ascontiguousarray(records[:, g]), layout.gate_type).reshape(len(keep), -1)
            U = dequantize(np.ascontiguousarray(records[:, u]), layout.up_type).reshape(len(keep), -1)
            D = dequantize(np.ascontiguousarray(records[:, d]), layout.down_type).reshape(len(keep), -1)
            gx = x @ G.T
            ref = ((gx / (1 + np.exp(-gx))) * (x @ U.T)) @ D
            assert np.abs(dy - ref).max() <= 0.02 * np.abs(ref).max()
            # and not the same as keeping every neuron
            G_all = store.file.tensor_bytes(fmt.bundle_name(i))
            assert len(keep) == round(0.6 * len(G_all))
    finally:
        m.close()


def test_predictor_is_counted_in_the_plan(calibrated):
    path, _ = calibrated
    with GGUFFile(path) as f:
        size = sum(f.tensors[n].nbytes for i in range(30) for n in fmt.predictor_names(i))
    dense = flashlm.load(path, threads=2, ctx_size=128)
    sparse = flashlm.load(path, threads=2, ctx_size=128, sparsity=0.4,
                          sparsity_score="predictor")
    try:
        assert sparse.engine.executor.ffn.scorer.nbytes == size
        assert sparse.engine.executor.ffn.plan.resident_bytes - dense.engine.executor.ffn.plan.resident_bytes == size
    finally:
        dense.close()
        sparse.close()


def test_calibrate_bad_input_loses_nothing(flash_path, tmp_path, smollm_path):
    copy = str(tmp_path / "c.flash")
    shutil.copy(flash_path, copy)
    before = _sha(copy)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for args, needle, code in (([copy, "--text", str(short)], "too short", 2),
                               ([copy, "--text", str(tmp_path / "missing.txt")], "cannot read calibration text", 2),
                               ([copy, "--text", CAL_TEXT, "--rank", "48"], "multiple of 32", 2),
                               ([copy, "--text", CAL_TEXT, "--recall", "1.5"], "--recall 1.5: must be in (0, 1]", 2),
                               ([str(tmp_path / "none.flash"), "--text", CAL_TEXT], "no such file", 2)):
        assert_one_line_error(run_cli("calibrate", *args), needle, code=code)
    assert _sha(copy) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # a store without a predictor: --sparsity-score predictor says how to get one
    with pytest.raises(ModelFileError, match="flashlm calibrate"):
        flashlm.load(copy, sparsity=0.4, sparsity_score="predictor")
    assert_one_line_error(run_cli("generate", "-m", copy, "-p", "hi", "-n", "2", "--sparsity", "0.4",
                                  "--sparsity-score", "predictor"), "has no sparsity predictor", code=2)
    with pytest.raises(InvalidOptionError, match="not a .flash store"):
        calibrate_predictor(smollm_path, CAL_TEXT, **SETTINGS)


def test_rewrite_failing_midway_leaves_the_store_as_it_was(flash_path, tmp_path, monkeypatch):
    """add_resident_tensors (what calibrate writes through) fails while writing data: the store is unchanged and no
    temporary is left; done again without the fault, the file verifies and holds the new tensor."""
    import gguf

    from flashlm.flash_store.writer import add_resident_tensors

    copy = str(tmp_path / "w.flash")
    shutil.copy(flash_path, copy)
    before = _sha(copy)
    extra = [("blk.0.ffn_predictor_bias", np.arange(1536, dtype=np.float32).view(np.uint8).reshape(1, -1),
              fmt.QT.F32)]
    calls = {"n": 0}
    original = gguf.GGUFWriter.write_tensor_data

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        return original(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="No space"):
        add_resident_tensors(copy, extra, {})
    assert _sha(copy) == before and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", original)
    add_resident_tensors(copy, extra, {})
    assert all(s.ok for s in verify_store(copy))
    with GGUFFile(copy) as f:
        assert np.array_equal(f.tensor_bytes("blk.0.ffn_predictor_bias").view(np.float32).ravel(),
                              np.arange(1536, dtype=np.float32))
