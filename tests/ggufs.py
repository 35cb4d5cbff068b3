"""Small GGUF files written with gguf-py's writer, for tests that need a file the real models are not.

`write_tiny_llama` writes a random-weight Llama with SmolLM2's own vocabulary (so llama.cpp can load and run it as
the reference), every matrix in a chosen GGML type.
"""

from __future__ import annotations

import numpy as np
import gguf
from gguf.constants import GGMLQuantizationType as QT

from flashlm.loaders.gguf_reader import GGUFFile
from labs.synthetic_llama import add_llama_header

def _quantize(a: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return a.astype(np.float32)
    if qtype == QT.F16:
        return a.astype(np.float16)
    try:
        return gguf.quants.quantize(a.astype(np.float32), qtype)
    except NotImplementedError:  # gguf-py cannot quantize to this type: random bytes of the right size will do
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = np.random.default_rng(0).integers(0, 256, (a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
        return rows


def write_tiny_llama(path, vocab_src: str, qtype: QT = QT.Q8_0, arch: str = "llama", n_layers: int = 2,
                     d_model: int = 64, n_ff: int = 128, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0,
                     tied: bool = False) -> None:
    src = GGUFFile(vocab_src)
    n_vocab = len(src.get("tokenizer.ggml.tokens"))
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    add_llama_header(w, src, n_layers, 512, d_model, n_ff, n_heads, n_kv_heads)
    src.close()
    hd = d_model // n_heads

    def mat(name, rows, cols, scale=0.08):
        w.add_tensor(name, _quantize(rng.standard_normal((rows, cols)).astype(np.float32) * scale, qtype),
                     raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", n_vocab, d_model, 0.5)
    for i in range(n_layers):
        vec(f"blk.{i}.attn_norm.weight", d_model)
        mat(f"blk.{i}.attn_q.weight", n_heads * hd, d_model)
        mat(f"blk.{i}.attn_k.weight", n_kv_heads * hd, d_model)
        mat(f"blk.{i}.attn_v.weight", n_kv_heads * hd, d_model)
        mat(f"blk.{i}.attn_output.weight", d_model, n_heads * hd)
        vec(f"blk.{i}.ffn_norm.weight", d_model)
        mat(f"blk.{i}.ffn_gate.weight", n_ff, d_model)
        mat(f"blk.{i}.ffn_up.weight", n_ff, d_model)
        mat(f"blk.{i}.ffn_down.weight", d_model, n_ff)
    vec("output_norm.weight", d_model)
    if not tied:
        mat("output.weight", n_vocab, d_model)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
