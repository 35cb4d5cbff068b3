"""ReLU-fied llama (ProSparse / TurboSparse style: hidden_act "relu") from a Hugging Face directory: converted with
flashlm's activation key, run by the ONNX graph and the bundle kernel against transformers' float logits, exact
when the skipped neurons are the inactive ones, and a predictor trained by `flashlm calibrate` on held-out tokens.
No ReLU-fied weights can be fetched here, so the model is a tiny random-weight one saved by transformers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashlm  # noqa: E402
from flashlm.errors import UnsupportedModelError  # noqa: E402
from flashlm.tools.calibrate import calibrate_predictor  # noqa: E402
from flashlm.loaders.gguf_reader import GGUFFile  # noqa: E402
from flashlm.loaders.keys import KEY_FFN_ACTIVATION  # noqa: E402
from flashlm.tools.convert import convert_hf  # noqa: E402

from .test_hf_convert import BOUNDS, PROMPT, SHAPE, _edit_config, _tokenizer  # noqa: E402

CAL_TEXT = "/usr/share/common-licenses/Apache-2.0"


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("relu") / "relu-llama")
    config = transformers.LlamaConfig(**{**SHAPE, "hidden_act": "relu"})
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(relu_dir):
    ids = transformers.AutoTokenizer.from_pretrained(relu_dir)(PROMPT)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(relu_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def flash(relu_dir, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("relu_flash") / "relu.flash")
    convert_hf(relu_dir, path, "q8_0", calibration_text="none")
    return path


def _err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_relu_gguf_and_flash_match_transformers(relu_dir, flash, reference, tmp_path):
    ids, ref = reference
    gguf = str(tmp_path / "relu.f32.gguf")
    convert_hf(relu_dir, gguf, "f32")
    with GGUFFile(gguf) as f:
        assert f.get(KEY_FFN_ACTIVATION) == "relu"
    with GGUFFile(flash) as f:
        assert f.get(KEY_FFN_ACTIVATION) == "relu"  # carried into the flash store
    with flashlm.load(gguf, threads=2, ctx_size=128) as m:
        e_gguf = _err(m.logits(ids), ref)
    with flashlm.load(flash, threads=2, ctx_size=128) as m:
        e_flash = _err(m.logits(ids), ref)
        assert m.engine.executor.ffn.kernel.activation == "relu"
    print(f"\nrelu llama: f32 GGUF {e_gguf:.2e}, q8_0 .flash {e_flash:.2e} (max |diff| / max |ref|)")
    assert e_gguf <= BOUNDS["f32"] and e_flash <= BOUNDS["q8_0"]
    # the same weights run as SiLU would be far off: the activation really is applied
    assert _err(_silu_logits(relu_dir, ids), ref) > 10 * BOUNDS["f32"]


def _silu_logits(relu_dir: str, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(relu_dir, dtype=torch.float32, hidden_act="silu")
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def test_skipping_inactive_neurons_changes_nothing(flash):
    """exact scores are |relu(g) * u|: zero for inactive neurons, so keeping 75% (more than any token's active
    ~50%) keeps every active one, and decode equals dense up to float summation order."""
    with flashlm.load(flash, threads=2, ctx_size=128) as dense, \
            flashlm.load(flash, threads=2, ctx_size=128, sparsity=0.25, sparsity_score="exact") as sparse:
        ids = dense.tokenize(PROMPT)
        for m in (dense, sparse):
            m.engine.reset()
        a, b = dense.engine.prefill(ids[:4]), sparse.engine.prefill(ids[:4])
        worst = _err(b, a)
        for t in ids[4:24]:  # token by token: the sparse path computes only its selected records
            a, b = dense.engine.step(t), sparse.engine.step(t)
            worst = max(worst, _err(b, a))
        ffn = sparse.engine.executor.ffn
        assert ffn.keep == 96 and ffn.stats.neurons_used / ffn.stats.calls == 96
    print(f"\nsparse (inactive skipped) vs dense, 20 decode steps: {worst:.2e}")
    assert worst <= 1e-5


def test_calibrated_predictor_recall_on_held_out_tokens(flash, tmp_path):
    out = str(tmp_path / "relu_pred.flash")
    r = calibrate_predictor(flash, CAL_TEXT, rank=32, epochs=5, seed=0, max_tokens=2048, threads=2, output=out)
    recall, precision = float(np.mean(r.recall)), float(np.mean(r.precision))
    print(f"\nReLU llama predictor, rank 32, {r.tokens} tokens: held-out recall {recall:.4f}, precision "
          f"{precision:.4f}, selects {np.mean(r.selected):.1%}")
    assert "relu(gate) > 0" in r.description
    assert recall >= 0.95 and precision > 0.5  # ~50% of neurons are active: better than chance
    with flashlm.load(out, threads=2, ctx_size=128) as dense, \
            flashlm.load(out, threads=2, ctx_size=128, sparsity=0.4, sparsity_score="predictor") as sparse:
        ids = dense.tokenize(PROMPT)
        agree = float((dense.logits(ids).argmax(-1) == sparse.logits(ids).argmax(-1)).mean())
    print(f"top-1 agreement, predictor at 0.4 vs dense: {agree:.3f}")
    assert agree >= 0.8
    # --sparsity auto: as in the paper, each token reads the neurons predicted active (the stored thresholds);
    # what it computed is checked against the true active set, gate . x > 0 from the dequantized records
    from flashlm.flash_store import format as fmt
    from flashlm.quant.formats import dequantize

    with flashlm.load(out, threads=2, ctx_size=128, sparsity="auto", sparsity_score="predictor") as sparse:
        ffn = sparse.engine.executor.ffn
        assert ffn.thresholds is not None and abs(ffn.sparsity - (1 - np.mean(r.selected))) < 1e-6
        seen, original = [], ffn._pick

        def recording(i, scores):
            pick = original(i, scores)
            seen.append((i, pick))
            return pick

        xs, run = [], ffn.run
        ffn._pick = recording
        ffn.run = lambda i, x, y: (xs.append(x.copy()), run(i, x, y))[1]
        sparse.engine.reset()
        ids = sparse.tokenize(PROMPT)
        sparse.engine.prefill(ids[:4])
        xs.clear()
        seen.clear()
        for t in ids[4:36]:
            sparse.engine.step(t)
        layout, hits, active, picked = ffn.store.layout, 0, 0, 0
        gates = [dequantize(np.ascontiguousarray(ffn.store.file.tensor_bytes(fmt.bundle_name(i))[:, layout.slices()[0]]),
                            layout.gate_type).reshape(ffn.n_ff, -1) for i in range(ffn.n_layers)]
        for x, (i, pick) in zip(xs, seen):
            truth = np.flatnonzero((x @ gates[i].T)[0] > 0)
            hits += len(np.intersect1d(truth, pick))
            active, picked = active + len(truth), picked + len(pick)
    recall, precision = hits / active, hits / picked
    print(f"--sparsity auto (predicted active), 32 decode steps: recall {recall:.4f}, precision {precision:.4f}, "
          f"{picked / len(seen) / ffn.n_ff:.1%} of neurons read and computed per layer and token")
    assert len(seen) == 32 * ffn.n_layers and recall >= 0.9 and precision > 0.6


def test_auto_with_exact_scores_reads_the_true_active_set(flash):
    """ReLU: --sparsity auto with exact scores keeps the neurons scoring above zero, the active ones: dense output
    from fewer neurons, however many a token needs."""
    with flashlm.load(flash, threads=2, ctx_size=128) as dense, \
            flashlm.load(flash, threads=2, ctx_size=128, sparsity="auto", sparsity_score="exact") as sparse:
        ids = dense.tokenize(PROMPT)
        dense.engine.reset()
        sparse.engine.reset()
        # a 12-token prefill (a masked batch through the int8 kernel, as the dense batch), then decode steps (the
        # selected records only)
        worst = _err(sparse.engine.prefill(ids[:12]), dense.engine.prefill(ids[:12]))
        for t in ids[12:28]:
            worst = max(worst, _err(sparse.engine.step(t), dense.engine.step(t)))
        ffn = sparse.engine.executor.ffn
        used = ffn.stats.neurons_used / ffn.stats.calls / ffn.n_ff
    print(f"\nauto + exact on ReLU: {used:.1%} of neurons computed per call, max diff {worst:.2e}")
    assert worst <= 1e-5 and used < 0.8


def test_unsupported_hidden_act_is_refused(relu_dir, tmp_path):
    import shutil

    d = str(tmp_path / "gelu")
    shutil.copytree(relu_dir, d)
    _edit_config(d, hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="hidden_act = 'gelu' is not supported"):
        convert_hf(d, str(tmp_path / "x.gguf"), "q8_0")
