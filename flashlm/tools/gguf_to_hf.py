"""A GGUF "llama" / "qwen2" model written out as a Hugging Face directory (the reverse of hf_convert.py).

    python -m flashlm.tools.gguf_to_hf MODEL.gguf OUT_DIR

Weights are dequantized with gguf-py's reference dequantizer and saved as float32 safetensors (q/k rows put back
into HF's rotate-halves order for "llama"), config.json comes from the GGUF metadata, and the tokenizer is the one
transformers builds from a GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), saved with save_pretrained.
Used to test the HF path end to end on a real model: GGUF -> HF -> `flashlm convert` -> GGUF, same perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from gguf.quants import dequantize

from flashlm.errors import FlashLMError, ModelFileError, UnsupportedModelError
from flashlm.loaders import hf_families as fam
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models.base import Metadata

HF_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                    "qwen3": ("qwen3", "Qwen3ForCausalLM")}
# llama.cpp pre-tokenizer (tokenizer.ggml.pre) -> the `tokenizers` pre-tokenizer that splits text the same way, for
# those transformers' GGUF tokenizer conversion renders as plain ByteLevel. "smollm" also splits digits one by one
# (checked: equal ids to llama.cpp's on the GPL-3 text and the tokenizer test strings).
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}


def hf_config(f: GGUFFile) -> dict:
    """config.json for the GGUF's hyperparameters (the keys hf_families.metadata writes, read back)."""
    meta = Metadata(f)
    if meta.arch not in HF_ARCHITECTURES:
        raise UnsupportedModelError(f"{f.path}: architecture {meta.arch!r} cannot be written as an HF directory "
                                    f"(supported: {', '.join(HF_ARCHITECTURES)})")
    model_type, hf_class = HF_ARCHITECTURES[meta.arch]
    d_model, n_heads = meta.int("embedding_length"), meta.int("attention.head_count")
    theta = meta.float("rope.freq_base", 10000.0)
    config = {
        "architectures": [hf_class], "model_type": model_type,
        "hidden_act": f.get("flashlm.ffn_activation", "silu"),
        "hidden_size": d_model, "intermediate_size": meta.int("feed_forward_length"),
        "num_hidden_layers": meta.int("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": meta.int("attention.head_count_kv", n_heads),
        "head_dim": meta.int("attention.key_length", d_model // n_heads),
        "max_position_embeddings": meta.int("context_length", 4096),
        "rms_norm_eps": meta.float("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "vocab_size": f.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "dtype": "float32",
    }
    if meta.str("rope.scaling.type", "none") not in ("none",) or "rope_freqs.weight" in f.tensors:
        raise UnsupportedModelError(f"{f.path}: RoPE scaling is not carried over to an HF directory")
    for key in ("bos", "eos"):
        value = f.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[f"{key}_token_id"] = int(value)
    return config


def hf_tensors(f: GGUFFile, config: dict) -> dict[str, np.ndarray]:
    """HF name -> float32 array, through the family table in reverse."""
    family = fam.FAMILIES[config["model_type"]]
    names = {gg: hf for hf, gg in family.global_tensors.items()}
    for i in range(config["num_hidden_layers"]):
        names.update({gg.format(i=i): hf.format(i=i) for hf, gg in family.layer_tensors.items()})
    out = {}
    for name, info in f.tensors.items():
        if name not in names:
            raise UnsupportedModelError(f"{f.path}: tensor {name!r} has no HF name in the {config['model_type']} "
                                        "table")
        w = dequantize(f.tensor_bytes(name), info.ggml_type).reshape(info.shape).astype(np.float32)
        if family.permute_qk and ".attn_q." in name:
            w = fam.unpermute_rows(w, config["num_attention_heads"])
        elif family.permute_qk and ".attn_k." in name:
            w = fam.unpermute_rows(w, config["num_key_value_heads"])
        if family.norm_offset and name.endswith("_norm.weight"):
            w = w - np.float32(family.norm_offset)
        out[names[name]] = np.ascontiguousarray(w)
    return out


def gguf_to_hf(src: str, out_dir: str) -> str:
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FlashLMError(f"{out_dir}: exists and is not empty")
    with GGUFFile(src) as f:
        config = hf_config(f)
        tensors = hf_tensors(f, config)
        pre = f.get("tokenizer.ggml.pre")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src))
    except Exception as e:  # transformers' GGUF tokenizer conversion raises several types
        raise ModelFileError(f"{src}: transformers could not build a tokenizer from the GGUF ({e})") from None
    tok.save_pretrained(out_dir)
    if pre in PRE_TOKENIZERS:
        path = os.path.join(out_dir, "tokenizer.json")
        with open(path, encoding="utf-8") as fh:
            spec = json.load(fh)
        spec["pre_tokenizer"] = PRE_TOKENIZERS[pre]
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh, ensure_ascii=False)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="GGUF model (llama or qwen2 architecture)")
    p.add_argument("out_dir", help="output directory (created; must be empty)")
    a = p.parse_args(argv)
    try:
        print(f"wrote {gguf_to_hf(a.gguf, a.out_dir)}")
    except FlashLMError as e:
        print(f"flashlm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
