"""Qwen3 dense models (GGUF architecture `qwen3`), as llama.cpp runs them: Llama's layer with QK-norm (an RMSNorm
over each head of q and k before RoPE), RoPE over halves (NEOX), no attention biases, head_dim from the file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import llama
from flashlm.models.base import Ops
from flashlm.quant.weights import vector

ARCHITECTURES = {"qwen3": {"rope_interleaved": False}}
TENSORS = llama.TENSORS
LAYER_TENSORS = {**llama.LAYER_TENSORS, "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight"}
DEFAULT_CHAT_TEMPLATE = None


def layer_name(key: str, i: int) -> str:
    return LAYER_TENSORS[key].format(i=i)


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf(f, ARCHITECTURES)
        return cls(**{k: getattr(base, k) for k in llama.ModelArgs.__dataclass_fields__})


@dataclass
class LayerWeights(llama.LayerWeights):
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


def load_layer(f: GGUFFile, a: ModelArgs, i: int, ffn: bool = True) -> LayerWeights:
    base = llama.load_layer(f, a, i, ffn)
    return LayerWeights(**vars(base), q_norm=vector(f, layer_name("q_norm", i), a.head_dim),
                        k_norm=vector(f, layer_name("k_norm", i), a.head_dim))


load_head, load_embedding, rope_tables, ffn_activation = (llama.load_head, llama.load_embedding, llama.rope_tables,
                                                          llama.ffn_activation)
head = llama.head


def layer(ops: Ops, a: ModelArgs, w, i: int, h):
    return llama.layer(ops, a, w, i, h, attention=llama.attention_qk_norm)
