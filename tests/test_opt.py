"""OPT from a Hugging Face directory and its ReLU sparsity predictor, on tiny random-weight models.

No real OPT weights can be fetched here: transformers saves small random OPTs (single file, sharded, bfloat16,
opt-350m's projected post-LayerNorm shape) and its OPTForCausalLM is the reference. The loader's error paths and
the exactness of the sparse FFN are also checked on directories written with numpy alone (no torch needed).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="Hugging Face directories are read with the safetensors package")
pytest.importorskip("tokenizers", reason="tokenizer.json is read with the tokenizers package")
from safetensors.numpy import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from flashlm.errors import ContextLengthError, ModelFileError, UnsupportedModelError  # noqa: E402
from flashlm.flash_store.relu_predictor import (ReluPredictor, TrainOptions, as_selector, evaluate,  # noqa: E402
                                                layers_from_arrays, layers_to_arrays, train_predictor)
from flashlm.loaders.hf_dir import ConfigReader, HFModelDir  # noqa: E402
from labs import opt  # noqa: E402
from labs.opt import OPTModel, all_neurons, ffn_dense, ffn_selected, oracle  # noqa: E402
from labs.opt_sparsity import collect, main, pooled_quality, relative_difference  # noqa: E402

VOCAB = 1000
WORDS = [f"w{i}" for i in range(VOCAB - 1)]
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
            max_position_embeddings=128)
# name -> (config overrides, save options)
HF_CONFIGS = {
    "base": ({}, {}),
    "projected_post_ln_sharded": (dict(hidden_size=96, word_embed_proj_dim=48, do_layer_norm_before=False,
                                       num_hidden_layers=3), {"max_shard_size": "100KB"}),
    "bf16_4_layers": (dict(num_hidden_layers=4, ffn_dim=512, hidden_size=128), {"bf16": True}),
    "no_bias_untied": (dict(enable_bias=False, layer_norm_elementwise_affine=False, tie_word_embeddings=False), {}),
}
PREDICTOR_CONFIG = dict(BASE, hidden_size=256, ffn_dim=1024, num_hidden_layers=2)
RANK = 128  # the default; half the hidden size here, so the predictor is genuinely low-rank
IDS = np.random.default_rng(1).integers(0, VOCAB, 48)


def save_tokenizer(path) -> None:
    """A word-level tokenizer.json over the test vocabulary (id 0 is [UNK])."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))


def save_hf_opt(path, config: dict, bf16: bool = False, max_shard_size: str | None = None, fc1_shift: bool = False):
    """A random-weight OPT saved by transformers; returns the float32 reference model (bf16-rounded when bf16)."""
    torch = pytest.importorskip("torch", reason="torch is needed to build reference OPT models")
    transformers = pytest.importorskip("transformers", reason="transformers is the OPT reference")
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**config)).eval()
    if fc1_shift:  # trained-like sparsity: most neurons off, each at its own rate (hot and cold neurons)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                spread = 0.02 * config["hidden_size"] ** 0.5  # the pre-activation's std at init
                layer.fc1.bias.copy_(-spread * (0.5 + 2 * torch.rand(layer.fc1.bias.shape, generator=gen)))
    if bf16:
        model = model.to(torch.bfloat16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    save_tokenizer(path)
    return model.float()


def reference_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory, float32 reference OPTForCausalLM), saved once for the module."""
    out = {}
    for name, (overrides, save) in HF_CONFIGS.items():
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (path, save_hf_opt(path, dict(BASE, **overrides), **save))
    return out


# -- against transformers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_dense_logits_match_transformers(hf_models, name):
    path, ref_model = hf_models[name]
    files = sorted(os.listdir(path))
    model = OPTModel.from_dir(path)
    got, ref = model.logits(IDS), reference_logits(ref_model, IDS)
    rel = relative_difference(got, ref)
    print(f"{name}: max relative logit difference {rel:.2e} ({len(files)} files)")
    assert rel < 1e-4
    if "sharded" in name:
        assert "model.safetensors.index.json" in files


@pytest.mark.parametrize("name", ["base", "projected_post_ln_sharded"])
def test_token_by_token_decode_equals_full_pass(hf_models, name):
    model = OPTModel.from_dir(hf_models[name][0])
    full = model.logits(IDS)
    cache = model.new_cache()
    steps = np.concatenate([model.forward(IDS[:20], cache)] + [model.forward([t], cache) for t in IDS[20:]])
    assert cache.n_past == len(IDS)
    assert relative_difference(steps, full) < 1e-5
    greedy = list(model.greedy(IDS[:8], 6))
    assert len(greedy) == 6 and greedy[0] == int(full[7].argmax())


def test_tokenizer_from_directory(hf_models):
    tok = HFModelDir(hf_models["base"][0]).tokenizer()
    assert tok.encode("w0 w5 nonsense").ids == [1, 6, 0]


# -- sparse FFN exactness -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["base", "projected_post_ln_sharded", "no_bias_untied"])
def test_oracle_sparse_output_equals_dense(hf_models, name):
    model = OPTModel.from_dir(hf_models[name][0])
    ids = IDS[:24]
    dense_order = model.logits(ids, all_neurons(model))  # the dense FFN in the selected kernel's summation order
    assert np.array_equal(model.logits(ids, oracle(model)), dense_order)
    assert relative_difference(dense_order, model.logits(ids)) < 1e-5  # and BLAS's order: rounding only
    x = model.ffn_activations(ids)[0][0]
    lw = model.weights.layers[0]
    active = oracle(model)(0, x)
    assert 0 < active.mean() < 1  # some neurons really are skipped
    assert np.array_equal(ffn_selected(lw, x, active), ffn_selected(lw, x, np.ones_like(active)))
    assert np.allclose(ffn_selected(lw, x, active), ffn_dense(lw, x)[0], rtol=1e-5, atol=1e-6)


# -- the predictor ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["init_sparsity", "fc1_bias_shift"])
def activations(request, tmp_path_factory):
    """(train, held-out) per-layer (x, pre) from distinct random token windows of a hidden-256 OPT."""
    path = str(tmp_path_factory.mktemp(request.param))
    save_hf_opt(path, PREDICTOR_CONFIG, fc1_shift=request.param == "fc1_bias_shift")
    model = OPTModel.from_dir(path)
    rng = np.random.default_rng(2)
    windows = [rng.integers(0, VOCAB, 64) for _ in range(80)]
    return request.param, model, collect(model, windows[:64]), collect(model, windows[64:])


def test_predictor_recall_on_held_out_tokens(activations):
    name, model, train, held = activations
    seen = []
    for rank in (RANK, 32):
        options = TrainOptions(rank=rank, epochs=3, seed=0)
        predictors = [train_predictor(x, pre, options, layer=i, progress=seen.append)
                      for i, (x, pre) in enumerate(train)]
        quality = pooled_quality(predictors, held)
        print(f"{name}, rank {rank}: held-out {quality}; epochs kept {[p.epoch for p in predictors]}")
        assert quality.recall >= 0.95
        assert quality.precision > quality.active_fraction  # better than selecting at random
    assert [(p.layer, p.epoch) for p in seen[:3]] == [(0, 1), (0, 2), (0, 3)]
    # predicted neurons only: the output stays close to dense (what recall buys)
    ids = np.random.default_rng(3).integers(0, VOCAB, 16)
    sparse, dense = model.logits(ids, as_selector(predictors)), model.logits(ids)
    print(f"{name}: rank-32 predicted sparse vs dense logits: max relative difference "
          f"{relative_difference(sparse, dense):.2e}")


def test_predictor_is_reproducible_and_round_trips(activations):
    _, _, train, _ = activations
    x, pre = train[0][0][:1024], train[0][1][:1024]
    options = TrainOptions(rank=16, epochs=2, seed=7, init="random")
    a, b = train_predictor(x, pre, options), train_predictor(x, pre, options)
    assert all(np.array_equal(a.to_arrays()[k], b.to_arrays()[k]) for k in a.to_arrays())
    c = ReluPredictor.from_arrays(a.to_arrays())
    assert np.array_equal(c.predict(x), a.predict(x)) and c.rank == 16
    assert evaluate(a, x, pre > 0, threshold=-np.inf).recall == 1.0  # at a chosen threshold: select everything
    (d,) = layers_from_arrays(layers_to_arrays([a]), 1)
    assert np.array_equal(d.predict(x), a.predict(x))
    with pytest.raises(ModelFileError):
        ReluPredictor.from_arrays({**a.to_arrays(), "bias": a.bias[:-1]})


# -- the tool -----------------------------------------------------------------------------------------------------

def test_opt_sparsity_tool(hf_models, tmp_path, capsys):
    text = " ".join(np.random.default_rng(4).choice(WORDS, 600))
    (tmp_path / "text.txt").write_text(text)
    assert main([hf_models["base"][0], "--text", str(tmp_path / "text.txt"), "--rank", "32", "--epochs", "1",
                 "--window", "100"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "oracle sparse == dense (bit for bit, 64 tokens): True" in out
    assert "max relative logit difference" in out and "pooled" in out
    assert main([hf_models["base"][0], "--text", str(tmp_path / "missing.txt")]) == 2


# -- the directory reader's errors (numpy-written directories: no torch needed) ---------------------------------

def write_numpy_opt(path, config: dict, prefix: str = "model.decoder.", drop: str | None = None) -> None:
    """An OPT directory written from the model's own tensor table, random float32 weights."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    args = opt.ModelArgs.from_config(ConfigReader(config, "config.json"))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in [None] + list(range(args.n_layers)):
        for name, spec in (opt.TENSORS if i is None else opt.LAYER_TENSORS).values():
            shape = tuple(getattr(args, s) for s in spec)
            tensors[prefix + name.format(i=i)] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    tensors.pop(drop, None)
    save_file(tensors, os.path.join(path, "model.safetensors"))


NUMPY_CONFIG = dict(BASE, model_type="opt", word_embed_proj_dim=32)


def test_numpy_written_directory_runs_with_old_prefix(tmp_path):
    write_numpy_opt(tmp_path, NUMPY_CONFIG, prefix="decoder.")  # the facebook/opt-* checkpoints' names
    model = OPTModel.from_dir(str(tmp_path))
    assert np.array_equal(model.logits(IDS[:12], oracle(model)), model.logits(IDS[:12], all_neurons(model)))
    with pytest.raises(ContextLengthError):
        model.logits(np.zeros(129, np.int64))


def test_config_errors(tmp_path):
    with pytest.raises(ModelFileError, match="config.json: file not found"):
        HFModelDir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json: not valid JSON"):
        HFModelDir(str(tmp_path))
    write_numpy_opt(tmp_path, NUMPY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(dict(NUMPY_CONFIG, hidden_size="64")))
    with pytest.raises(ModelFileError, match="config.json: hidden_size = '64' is not an integer"):
        OPTModel.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(NUMPY_CONFIG, model_type="llama")))
    with pytest.raises(UnsupportedModelError, match="'llama' is not OPT"):
        OPTModel.from_dir(str(tmp_path))
    with pytest.raises(ModelFileError, match="tokenizer.json: file not found"):
        HFModelDir(str(tmp_path)).tokenizer()


def test_tensor_errors(tmp_path):
    write_numpy_opt(tmp_path, NUMPY_CONFIG, drop="model.decoder.layers.1.fc2.bias")
    with pytest.raises(ModelFileError, match=r"missing tensor 'model.decoder.layers.1.fc2.bias' .*\(64,\)"):
        OPTModel.from_dir(str(tmp_path))
    write_numpy_opt(tmp_path, NUMPY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(dict(NUMPY_CONFIG, ffn_dim=300)))
    with pytest.raises(ModelFileError, match=r"'model.decoder.layers.0.fc1.weight' has shape \(256, 64\), "
                                             r"expected \(300, 64\)"):
        OPTModel.from_dir(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelFileError, match="model.safetensors"):
        HFModelDir(str(tmp_path))
