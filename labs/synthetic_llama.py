"""A synthetic Llama-7B-shaped GGUF (random Q4_0 weights) for scale tests: no real 7B model can be fetched here.

    python -m labs.synthetic_llama OUT.gguf [--layers 32 --d-model 4096 --ffn 11008 --heads 32]

Shapes follow Llama-2-7B (32 layers, d_model 4096, FFN 11008, 32 heads); the vocabulary (and so the tokenizer)
is SmolLM2's, copied from the default model, so both engines can tokenize. Written tensor by tensor with gguf-py's
writer, never holding the ~3.8 GB in memory. Weights are random but well-scaled (the output is gibberish, the
work per token is real).
"""

from __future__ import annotations

import argparse

import numpy as np
import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from flashlm.flash_store.writer import copy_metadata
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.loaders.keys import KEY_FFN_ACTIVATION

TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]


def add_llama_header(w: gguf.GGUFWriter, vocab_src: GGUFFile, n_layers: int, n_ctx: int, d_model: int, n_ff: int,
                     n_heads: int, n_kv_heads: int) -> None:
    """Llama hyperparameters, and the tokenizer of `vocab_src` (so llama.cpp can tokenize for the file)."""
    w.add_block_count(n_layers)
    w.add_context_length(n_ctx)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d_model // n_heads)
    copy_metadata(w, vocab_src, TOKENIZER_KEYS)


def random_q4_0(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """(rows, cols/32*18) bytes of valid Q4_0 blocks: f16 scale ~ scale/8, random nibbles."""
    nb = cols // 32
    out = np.empty((rows, nb, 18), np.uint8)
    d = (scale / 8 * (0.5 + rng.random((rows, nb)))).astype(np.float16)
    out[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    return out.reshape(rows, nb * 18)


def write(path: str, vocab_src: str, n_layers: int = 32, d_model: int = 4096, n_ff: int = 11008,
          n_heads: int = 32, seed: int = 0, activation: str = "silu") -> None:
    """activation "relu": a ReLU-fied llama (flashlm.ffn_activation), for sparsity at scale."""
    src = GGUFFile(vocab_src)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    add_llama_header(w, src, n_layers, 4096, d_model, n_ff, n_heads, n_heads)
    if activation != "silu":
        w.add_string(KEY_FFN_ACTIVATION, activation)
    n_vocab = len(src.get("tokenizer.ggml.tokens"))
    src.close()
    q4 = GGML_QUANT_SIZES[QT.Q4_0]
    mats = [("token_embd.weight", n_vocab, d_model, 1.0)]
    vecs = []
    for i in range(n_layers):
        vecs.append(f"blk.{i}.attn_norm.weight")
        mats += [(f"blk.{i}.attn_{k}.weight", d_model, d_model, d_model ** -0.5) for k in ("q", "k", "v", "output")]
        vecs.append(f"blk.{i}.ffn_norm.weight")
        mats += [(f"blk.{i}.ffn_gate.weight", n_ff, d_model, d_model ** -0.5),
                 (f"blk.{i}.ffn_up.weight", n_ff, d_model, d_model ** -0.5),
                 (f"blk.{i}.ffn_down.weight", d_model, n_ff, n_ff ** -0.5)]
    vecs.append("output_norm.weight")
    mats.append(("output.weight", n_vocab, d_model, d_model ** -0.5))
    for name, rows, cols, _ in mats:
        w.add_tensor_info(name, (rows, cols // q4[0] * q4[1]), np.dtype(np.uint8), rows * cols // q4[0] * q4[1], QT.Q4_0)
    for name in vecs:
        w.add_tensor_info(name, (d_model,), np.dtype(np.float32), d_model * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, rows, cols, scale in mats:
        w.write_padding(w.fout[0], w.fout[0].tell())
        for start in range(0, rows, 4096):  # bounded memory per write
            chunk = random_q4_0(rng, min(4096, rows - start), cols, scale)
            w.fout[0].write(chunk.tobytes())
        w.write_padding(w.fout[0], rows * cols // q4[0] * q4[1])
        w.tensors[0].pop(name)
    for name in vecs:
        w.write_tensor_data(np.ones(d_model, np.float32))
    w.close()


def main() -> None:
    from flashlm.loaders.default_model import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab-from", default=None, help="GGUF whose tokenizer to copy (default: SmolLM2)")
    p.add_argument("--activation", choices=["silu", "relu"], default="silu", help="the FFN's gate activation")
    a = p.parse_args()
    write(a.output, a.vocab_from or default_model_path(), a.layers, a.d_model, a.ffn, a.heads,
          activation=a.activation)


if __name__ == "__main__":
    main()
