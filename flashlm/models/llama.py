"""The Llama family: grouped-query attention, RoPE, RMSNorm, SwiGLU, tied or separate output matrix.

Also serves GGUF architectures with the same tensors and math (ARCHITECTURES below). One file per family, as in
mlx-lm: ModelArgs from the file's metadata only, the tensor-name table, weight loading, and the decoder layer and
head written once over models/base.py's Ops (every backend runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlm.errors import ModelFileError
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.loaders.keys import FFN_ACTIVATIONS, KEY_FFN_ACTIVATION
from flashlm.quant.weights import EmbeddingTable, linear, vector
from flashlm.quant.kernels import Linear
from flashlm.models.base import Metadata, Ops, RopeConfig

# GGUF architecture -> RoPE pairing (llama.cpp's rope type: NORM rotates adjacent pairs, NEOX halves).
ARCHITECTURES = {"llama": {"rope_interleaved": True}, "qwen2": {"rope_interleaved": False}}

# Tensor-name table: one place that knows GGUF's names for this family.
TENSORS = {
    "embed": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",  # absent when tied to the embedding
    "rope_freqs": "rope_freqs.weight",  # optional llama3-style frequency factors
}
LAYER_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias", "k_bias": "blk.{i}.attn_k.bias", "v_bias": "blk.{i}.attn_v.bias",
    "o": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
}




DEFAULT_CHAT_TEMPLATE = None  # for a file without tokenizer.chat_template (a family may name its own)


def _ffn_activation(f: GGUFFile) -> str:
    value = f.get(KEY_FFN_ACTIVATION, "silu")
    if value not in FFN_ACTIVATIONS:
        raise ModelFileError(f"{f.path}: {KEY_FFN_ACTIVATION} = {value!r:.40}{f.where(KEY_FFN_ACTIVATION)} is "
                             f"not one of {', '.join(FFN_ACTIVATIONS)}")
    return value


def layer_name(key: str, i: int) -> str:
    return LAYER_TENSORS[key].format(i=i)


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int
    norm_eps: float
    rope: RopeConfig
    # the FFN's gate activation: "silu" (SwiGLU), or "relu" for ReLU-fied models (ProSparse, TurboSparse), which
    # GGUF has no key for: flashlm's conversion of such a Hugging Face directory writes KEY_FFN_ACTIVATION
    ffn_activation: str = "silu"

    @classmethod
    def from_gguf(cls, f: GGUFFile, pairing: dict | None = None) -> "ModelArgs":
        """pairing: a family's ARCHITECTURES table, for families that extend this one."""
        meta = Metadata(f)
        pairing = pairing or ARCHITECTURES
        d_model = meta.int("embedding_length")
        n_heads = meta.int("attention.head_count")
        n_kv_heads = meta.int("attention.head_count_kv", n_heads)
        if n_heads % n_kv_heads:
            raise ModelFileError(f"{f.path}: {n_heads} attention heads are not a multiple of {n_kv_heads} KV heads"
                                 f"{f.where(meta.arch + '.attention.head_count_kv')}")
        head_dim = meta.int("attention.key_length", d_model // n_heads)
        if meta.int("attention.value_length", head_dim) != head_dim:
            raise ModelFileError(f"{f.path}: key and value head sizes differ")
        embed = f.tensors.get(TENSORS["embed"])
        if embed is None:
            raise ModelFileError(f"{f.path}: missing tensor {TENSORS['embed']!r} (not among the tensor infos, header "
                                 f"bytes 0-{f.data_offset})")
        return cls(
            arch=meta.arch,
            n_layers=meta.int("block_count"),
            d_model=d_model,
            n_ff=meta.int("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=embed.shape[0],
            n_ctx_train=meta.int("context_length", 4096),
            norm_eps=meta.float("attention.layer_norm_rms_epsilon", 1e-5),
            rope=RopeConfig.from_metadata(meta, head_dim, pairing[meta.arch]["rope_interleaved"]),
            ffn_activation=_ffn_activation(f),
        )

    def is_local(self, i: int) -> bool:
        """Whether layer i attends within a sliding window (families with local layers override this)."""
        return False

    def rope_names(self, i: int) -> tuple[str, str]:
        """The RoPE table inputs layer i reads."""
        return ("rope_cos", "rope_sin")

    def facts(self) -> list[tuple[str, str]]:
        """Family-specific lines for `flashlm info`."""
        return []


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    qkv: list[Linear]
    o: list[Linear]
    ffn_norm: np.ndarray
    gate_up: list[Linear] | None  # None when the FFN is streamed from a flash store
    down: list[Linear] | None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for part in (self.qkv, self.o, self.gate_up, self.down) if part for m in part)


@dataclass
class HeadWeights:
    """Final norm and a slice [start, stop) of the output matrix's rows (vocabulary entries)."""

    output_norm: np.ndarray
    output: list[Linear]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.output)


def load_layer(f: GGUFFile, a: ModelArgs, i: int, ffn: bool = True) -> LayerWeights:
    d, q_out, kv_out = a.d_model, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    has_bias = layer_name("q_bias", i) in f.tensors
    return LayerWeights(
        attn_norm=vector(f, layer_name("attn_norm", i), d),
        qkv=linear(f, [layer_name(k, i) for k in ("q", "k", "v")], d, [q_out, kv_out, kv_out],
                   [layer_name(k, i) for k in ("q_bias", "k_bias", "v_bias")] if has_bias else None),
        o=linear(f, [layer_name("o", i)], q_out, [d]),
        ffn_norm=vector(f, layer_name("ffn_norm", i), d),
        gate_up=linear(f, [layer_name("gate", i), layer_name("up", i)], d, [a.n_ff, a.n_ff]) if ffn else None,
        down=linear(f, [layer_name("down", i)], a.n_ff, [d]) if ffn else None,
    )


def load_head(f: GGUFFile, a: ModelArgs, start: int, stop: int) -> HeadWeights:
    output_name = TENSORS["output"] if TENSORS["output"] in f.tensors else TENSORS["embed"]
    return HeadWeights(vector(f, TENSORS["output_norm"], a.d_model),
                       linear(f, [output_name], a.d_model, [a.vocab_size], rows=(start, stop)), start, stop)


def load_embedding(f: GGUFFile, a: ModelArgs) -> EmbeddingTable:
    return EmbeddingTable(f, TENSORS["embed"], a.d_model)


def rope_tables(f: GGUFFile, a: ModelArgs, n_positions: int) -> dict[str, np.ndarray]:
    """Graph input name -> (positions, rot_dim/2) table; every layer of this family reads the same pair."""
    freqs = vector(f, TENSORS["rope_freqs"], a.head_dim // 2) if TENSORS["rope_freqs"] in f.tensors else None
    cos, sin = a.rope.tables(n_positions, freqs)
    return {"rope_cos": cos, "rope_sin": sin}


def ffn_activation(a: ModelArgs) -> str:
    """The FFN gate's activation: silu (SwiGLU) or relu (ReLU-fied models)."""
    return a.ffn_activation


def attention(ops: Ops, a: ModelArgs, w, i: int, x):
    q, k, v = ops.qkv(i, w, x)
    return ops.linear(ops.attend(i, q, k, v), w.o)


def attention_qk_norm(ops: Ops, a: ModelArgs, w, i: int, x):
    """QK-norm (Gemma 3, Qwen3): each head of q and k normed before RoPE."""
    q, k, v = ops.qkv(i, w, x)
    q, k = ops.head_norm(q, w.q_norm, a.norm_eps), ops.head_norm(k, w.k_norm, a.norm_eps)
    return ops.linear(ops.attend(i, q, k, v), w.o)


def layer(ops: Ops, a: ModelArgs, w, i: int, h, attention=attention):
    """Decoder layer i on the residual stream h (pre-norm attention, then pre-norm FFN)."""
    x = ops.norm(h, w.attn_norm, a.norm_eps)
    x, h = ops.add_norm(attention(ops, a, w, i, x), h, w.ffn_norm, a.norm_eps)
    return ops.ffn(i, w, x, residual=h)


def head(ops: Ops, a: ModelArgs, w, h):
    """Logits of the hidden states h: final norm, output matrix."""
    return ops.output(ops.norm(h, w.output_norm, a.norm_eps), w)
