"""Hugging Face directories -> GGUF (tools/hf_convert.py): tiny random-weight models saved by transformers, per
family, against transformers' float32 logits; tokenization equal to AutoTokenizer; typed errors; -m HF_DIR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashlm  # noqa: E402
from flashlm.errors import FlashLMError, ModelFileError, UnsupportedModelError  # noqa: E402
from flashlm.loaders.tokenizer import HFTokenizer, StreamDecoder  # noqa: E402
from flashlm.loaders import hf_convert  # noqa: E402
from flashlm.tools.convert import convert_hf  # noqa: E402

from .test_bad_input import assert_one_line_error  # noqa: E402
from .test_tokenizer import STRINGS  # noqa: E402

VOCAB = 384
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, initializer_range=0.1)
# family -> (config class, extra config, save_pretrained kwargs, dtype the weights are saved in)
FAMILIES = {
    "llama": ("LlamaConfig", {}, {"max_shard_size": "200KB"}, torch.float32),  # sharded, with an index
    "mistral": ("MistralConfig", {"sliding_window": 4096}, {}, torch.bfloat16),
    # transformers' Qwen2Tokenizer adds <|endoftext|>: the vocabulary is padded, as real Qwen2 checkpoints pad it
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "vocab_size": 400}, {}, torch.float16),
    # QK-norm, no biases, head_dim (32) other than hidden / heads (16)
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True}, {}, torch.bfloat16),
    # 7 layers: local ones (window 8, shorter than the prompt) and global layer 5; scale 1/sqrt(head_dim)
    "gemma3_text": ("Gemma3TextConfig", {"num_hidden_layers": 7, "num_key_value_heads": 1, "head_dim": 32,
                                         "query_pre_attn_scalar": 32, "sliding_window": 8, "pad_token_id": 3,
                                         "vocab_size": 400}, {}, torch.float32),
}
# max |flashlm - transformers| / max |transformers| over the logits; q8_0 / q4_0 bounds are loose on purpose
BOUNDS = {"f32": 1e-4, "q8_0": 0.1, "q4_0": 0.5}


def _training_text() -> str:
    path = "/usr/share/common-licenses/GPL-3"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return " ".join(STRINGS) * 50


def _tokenizer(add_bos: bool):
    """A small byte-level BPE trained here, wrapped as transformers saves real ones (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_training_text()], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", add_bos_token=add_bos)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_model(path: str, family: str, add_bos: bool) -> str:
    config_class, extra, save_kwargs, dtype = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SHAPE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.to(dtype).save_pretrained(path, safe_serialization=True, **save_kwargs)
    _tokenizer(add_bos).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {family: _save_model(str(root / family), family, add_bos=family != "qwen2") for family in FAMILIES}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """(family, quant) -> GGUF path, converted on first use."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(family: str, quant: str) -> str:
        if (family, quant) not in cache:
            path = str(root / f"{family}.{quant}.gguf")
            convert_hf(hf_dirs[family], path, quant)
            cache[family, quant] = path
        return cache[family, quant]

    return get


@pytest.fixture(scope="module")
def reference(hf_dirs):
    """family -> (prompt ids from AutoTokenizer, transformers' float32 logits)."""
    out = {}
    for family, path in hf_dirs.items():
        ids = transformers.AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[family] = ids, model(torch.tensor([ids])).logits[0].numpy()
    return out


@pytest.mark.parametrize("quant", list(BOUNDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, quant, converted, reference):
    ids, ref = reference[family]
    with flashlm.load(converted(family, quant), threads=2, ctx_size=128) as model:
        assert model.tokenize(PROMPT) == ids
        got = model.logits(ids)
    scale = np.abs(ref).max()
    err = float(np.abs(got - ref).max() / scale)
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    line = f"\n{family} {quant}: max |diff| / max |ref| = {err:.2e}, top-1 agreement {top1:.0%}"
    if quant != "f32":  # split the error: the weights' quantization vs flashlm's kernels (int8 activations)
        kernel = float(np.abs(got - _dequantized_reference(family, converted(family, quant), ids)).max() / scale)
        line += f"; vs transformers on the dequantized weights {kernel:.2e}"
    print(line)
    if quant != "f32":
        assert kernel <= 0.05  # onnxruntime's int8-activation kernels (accuracy_level 4), not the conversion
    assert err <= BOUNDS[quant]


def _dequantized_reference(family: str, gguf_path: str, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits with the GGUF's own (dequantized, un-permuted) weights loaded."""
    from flashlm.loaders.gguf_reader import GGUFFile
    from flashlm.tools.gguf_to_hf import hf_tensors

    config_class, extra, _, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SHAPE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with GGUFFile(gguf_path) as f:
        weights = hf_tensors(f, config.to_dict())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def test_gguf_metadata_follows_llama_cpp(converted):
    from flashlm.loaders.gguf_reader import GGUFFile

    with GGUFFile(converted("qwen2", "q8_0")) as f:
        assert f.get("general.architecture") == "qwen2"
        assert f.get("qwen2.block_count") == 2 and f.get("qwen2.attention.head_count_kv") == 2
        assert f.get("qwen2.rope.freq_base") == 10000.0 and f.get("qwen2.context_length") > 0
        assert "output.weight" not in f.tensors  # tied: llama.cpp reuses token_embd.weight
        assert f.tensors["blk.0.attn_q.bias"].type_name == "F32"
        assert f.tensors["blk.0.attn_norm.weight"].type_name == "F32"
        assert f.tensors["blk.0.ffn_up.weight"].type_name == "Q8_0"
        assert f.get("tokenizer.chat_template") == CHAT_TEMPLATE
        assert f.get("tokenizer.ggml.model") == "gpt2" and len(f.get("tokenizer.ggml.tokens")) == 400
    with GGUFFile(converted("gemma3_text", "f32")) as f:
        assert f.get("general.architecture") == "gemma3" and f.get("gemma3.attention.sliding_window") == 8
        assert f.get("gemma3.rope.freq_base") == 1e6 and f.get("gemma3.attention.key_length") == 32
        assert "output.weight" not in f.tensors and "blk.6.post_ffw_norm.weight" in f.tensors


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # with and without BOS added
def test_tokenization_equals_auto_tokenizer(family, hf_dirs, converted):
    ref = transformers.AutoTokenizer.from_pretrained(hf_dirs[family])
    strings = STRINGS + ["<s>text</s>", "<|im_start|>user\nHi<|im_end|>\n", " <|im_end|> spaced "]
    with flashlm.load(converted(family, "q8_0"), threads=2, ctx_size=128) as model:
        tok = model.tokenizer
        assert isinstance(tok, HFTokenizer)
        assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
        for text in strings:
            ids = ref(text)["input_ids"]
            assert model.tokenize(text) == ids, text
            assert model.tokenize(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
            assert model.tokenize(text, parse_special=False) == ref(text, split_special_tokens=True)["input_ids"]
            assert model.detokenize(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.is_eog(ref.eos_token_id) and tok.is_eog(tok.encode("<|im_end|>", add_special=False)[0])
        assert not tok.is_eog(tok.encode("hello", add_special=False)[0])
        messages = [{"role": "user", "content": "Hi"}]
        rendered = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert model.chat_template.render(messages, add_generation_prompt=True) == rendered
        # llama.cpp's convention, kept: BOS is added (where the tokenizer adds one) unless the template writes it
        assert model.chat_prompt_ids(messages) == ref(rendered)["input_ids"]


def test_stream_decoder_on_hf_tokenizer(converted):
    with flashlm.load(converted("llama", "q8_0"), threads=2, ctx_size=128) as model:
        text = "Emoji 😀🎉 and CJK 中文字符 and ü"
        ids = model.tokenize(text, add_bos=False)
        decoder = StreamDecoder(model.tokenizer)
        assert "".join([decoder.add(t) for t in ids] + [decoder.flush()]) == text


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flash_output(family, hf_dirs, tmp_path, reference):
    """The .flash runs on the kernel executor: the family's layer over KernelOps (models/base.py)."""
    path = str(tmp_path / f"{family}.flash")
    report = convert_hf(hf_dirs[family], path, "q8_0", calibration_text="none")
    assert report.path == path and not [p for p in os.listdir(tmp_path) if p != f"{family}.flash"]  # temp GGUF gone
    ids, ref = reference[family]
    with flashlm.load(path, threads=2, ctx_size=128) as model:
        err = float(np.abs(model.logits(ids) - ref).max() / np.abs(ref).max())
    print(f"\n{family} q8_0 .flash: max |diff| / max |ref| = {err:.2e}")
    assert err <= BOUNDS["q8_0"]
    with pytest.raises(FlashLMError, match="already exists"):
        convert_hf(hf_dirs[family], path, "q8_0")


# -- errors ----------------------------------------------------------------------------------------------------
def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_wrong_tensor_shape_names_tensor_and_expected_shape(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_dirs["llama"], tmp_path / "bad")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(os.path.join(d, shard))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]
    save_file(tensors, os.path.join(d, shard), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(100, 64\), "
                                             r"expected \(128, 64\)"):
        hf_convert.write_gguf(d, str(tmp_path / "x.gguf"), "f32")
    assert not os.path.exists(tmp_path / "x.gguf")


def _edit_config(d: str, **changes) -> None:
    path = os.path.join(d, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_typed_errors(hf_dirs, tmp_path):
    out = str(tmp_path / "x.gguf")
    d = _copy(hf_dirs["mistral"], tmp_path / "d")
    _edit_config(d, model_type="gpt_neox")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neox' is not supported"):
        hf_convert.write_gguf(d, out)
    _edit_config(d, model_type="mistral", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="RoPE type 'yarn'"):
        hf_convert.write_gguf(d, out)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        hf_convert.write_gguf(d, out)
    os.unlink(os.path.join(d, "config.json"))
    with pytest.raises(ModelFileError, match="config.json: file not found"):
        hf_convert.write_gguf(d, out)
    d2 = _copy(hf_dirs["qwen2"], tmp_path / "d2")
    os.unlink(os.path.join(d2, "tokenizer.json"))
    with pytest.raises(ModelFileError, match="tokenizer.json: file not found"):
        hf_convert.write_gguf(d2, out)
    assert not os.path.exists(out)


def test_unsupported_dtype(tmp_path, hf_dirs):
    from safetensors.numpy import load_file, save_file

    d = _copy(hf_dirs["llama"], tmp_path / "d")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(os.path.join(d, shard))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(np.int8)
    save_file(tensors, os.path.join(d, shard), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="'model.embed_tokens.weight' has type I8"):
        hf_convert.write_gguf(d, str(tmp_path / "x.gguf"))


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlm.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_convert_and_model_directory(hf_dirs, tmp_path):
    out = str(tmp_path / "m.gguf")
    proc = _cli("convert", hf_dirs["qwen2"], "-o", out, "--quant", "q4_1")
    assert proc.returncode == 0 and "qwen2" in proc.stdout and os.path.exists(out), proc.stderr
    assert_one_line_error(_cli("convert", hf_dirs["qwen2"], "-o", out), "already exists")
    bad = _copy(hf_dirs["qwen2"], tmp_path / "bad")
    _edit_config(bad, model_type="bert")
    assert_one_line_error(_cli("convert", bad, "-o", str(tmp_path / "b.gguf")), "model_type 'bert'", code=2)

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ("generate", "-m", hf_dirs["mistral"], "-p", "The", "-n", "4", "--temp", "0", "-c", "8192")
    first, second = _cli(*args, env=env), _cli(*args, env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    assert "converting it (q8_0)" in first.stderr and "cached" in second.stderr
    assert first.stdout == second.stdout
    assert "4096-token sliding window" in first.stderr  # Mistral's window < -c 8192: said, not silently ignored
    assert len(os.listdir(tmp_path / "cache" / "flashlm" / "hf")) == 1


@pytest.mark.skipif(not os.environ.get("FLASHLM_SLOW_TESTS"), reason="~1 minute: set FLASHLM_SLOW_TESTS=1")
def test_smollm2_round_trip_keeps_perplexity(smollm_path, tmp_path):
    """GGUF -> HF directory -> `flashlm convert --quant q8_0` -> GGUF: perplexity within 1% of the original's."""
    import re

    from flashlm.tools.gguf_to_hf import gguf_to_hf

    hf = gguf_to_hf(smollm_path, str(tmp_path / "hf"))
    out = str(tmp_path / "rt.gguf")
    assert _cli("convert", hf, "-o", out, "--quant", "q8_0").returncode == 0
    ppl = []
    for path in (smollm_path, out):
        proc = _cli("perplexity", "-m", path, "-f", "/usr/share/common-licenses/GPL-3", "-c", "512", "--chunks", "4",
                    "-b", "512")
        assert proc.returncode == 0, proc.stderr
        ppl.append(float(re.search(r"PPL = ([0-9.]+)", proc.stdout).group(1)))
    print(f"\nPPL original {ppl[0]:.4f}, round trip {ppl[1]:.4f} ({ppl[1] / ppl[0] - 1:+.2%})")
    assert abs(ppl[1] / ppl[0] - 1) < 0.01
