"""The Gemma 3 family (GGUF architecture `gemma3`), as llama.cpp runs it.

What differs from Llama (llama.py, whose tensor loading and attention this file reuses):
  - embeddings scaled by sqrt(d_model); the output matrix tied to them (262k rows for every Gemma 3 size);
  - GeGLU FFN: gelu_tanh(gate) * up;
  - QK-norm: RMSNorm over each head of q and k before RoPE;
  - four norms per layer: pre- and post-attention, pre- and post-FFN (the post-norms apply to the sublayer's output
    before the residual add). GGUF norm weights already hold (1 + w): llama.cpp's converter adds the 1;
  - interleaved attention: layer i is local (sliding window `attention.sliding_window`, RoPE base 10,000) unless
    (i + 1) % 6 == 0, which is global (full causal attention, RoPE base `rope.freq_base`, scaled if the file says so);
    llama.cpp hard-codes that pattern and the local base for gemma3, and so does this file;
  - RoPE pairs halves (NEOX); attention scale head_dim^-0.5 (query_pre_attn_scalar = head_dim below 27B);
  - an optional final logit soft-cap (`final_logit_softcapping`; absent in Gemma 3 files, kept for safety).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.quant.weights import EmbeddingTable, vector
from flashlm.models import llama
from flashlm.models.base import Metadata, Ops, RopeConfig

ARCHITECTURES = {"gemma3": {"rope_interleaved": False}}
SWA_PATTERN = 6  # every 6th layer is global (llama.cpp: hparams.set_swa_pattern(6))
LOCAL_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa for gemma3

TENSORS = llama.TENSORS
LAYER_TENSORS = {
    **llama.LAYER_TENSORS,
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight", "post_ffw_norm": "blk.{i}.post_ffw_norm.weight",
}
FFN_ACTIVATION = "gelu_tanh"


def ffn_activation(a) -> str:
    """GeGLU: the FFN gate's activation is GELU with the tanh approximation."""
    return FFN_ACTIVATION

# Used when the file carries no tokenizer.chat_template (Gemma 3 270M's GGUF has none; llama.cpp then falls back
# to its built-in "gemma" format). This is the template of Google's instruction-tuned Gemma 3 releases (text
# parts): the system prompt is merged into the first user turn, "assistant" is called "model".
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def layer_name(key: str, i: int) -> str:
    return LAYER_TENSORS[key].format(i=i)


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    sliding_window: int = 0  # 0: every layer global
    rope_local: RopeConfig | None = None
    embed_scale: float = 1.0
    logit_softcap: float = 0.0

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf(f, ARCHITECTURES)
        meta = Metadata(f)
        window = meta.int("attention.sliding_window", 0, minimum=0)
        local = RopeConfig(base.rope.dim, LOCAL_ROPE_BASE, "none", 1.0, base.rope.interleaved) if window else None
        fields = {k: getattr(base, k) for k in llama.ModelArgs.__dataclass_fields__}
        return cls(**fields, sliding_window=window, rope_local=local, embed_scale=math.sqrt(base.d_model),
                   logit_softcap=meta.float("final_logit_softcapping", 0.0))

    def is_local(self, i: int) -> bool:
        return self.sliding_window > 0 and (i + 1) % SWA_PATTERN != 0

    def rope_names(self, i: int) -> tuple[str, str]:
        """The RoPE table inputs layer i reads (local layers have their own base)."""
        return ("rope_cos_local", "rope_sin_local") if self.is_local(i) else ("rope_cos", "rope_sin")

    def facts(self) -> list[tuple[str, str]]:
        """Family-specific lines for `flashlm info`."""
        local = [i for i in range(self.n_layers) if self.is_local(i)]
        return [("sliding window", f"{self.sliding_window} tokens on {len(local)} of {self.n_layers} layers "
                                   f"(global: {', '.join(str(i) for i in range(self.n_layers) if i not in local)})"),
                ("RoPE bases", f"global {self.rope.base:g}, local {LOCAL_ROPE_BASE:g}"),
                ("embedding scale", f"sqrt({self.d_model}) = {self.embed_scale:.4f}")]


@dataclass
class LayerWeights(llama.LayerWeights):
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffw_norm: np.ndarray | None = None


HeadWeights = llama.HeadWeights
load_head = llama.load_head


def load_layer(f: GGUFFile, a: ModelArgs, i: int, ffn: bool = True) -> LayerWeights:
    base = llama.load_layer(f, a, i, ffn)
    return LayerWeights(**vars(base), q_norm=vector(f, layer_name("q_norm", i), a.head_dim),
                        k_norm=vector(f, layer_name("k_norm", i), a.head_dim),
                        post_attn_norm=vector(f, layer_name("post_attn_norm", i), a.d_model),
                        post_ffw_norm=vector(f, layer_name("post_ffw_norm", i), a.d_model))


def load_embedding(f: GGUFFile, a: ModelArgs) -> EmbeddingTable:
    return EmbeddingTable(f, TENSORS["embed"], a.d_model, scale=a.embed_scale)


def rope_tables(f: GGUFFile, a: ModelArgs, n_positions: int) -> dict[str, np.ndarray]:
    tables = llama.rope_tables(f, a, n_positions)
    if a.rope_local is not None:
        tables["rope_cos_local"], tables["rope_sin_local"] = a.rope_local.tables(n_positions)
    return tables


def layer(ops: Ops, a: ModelArgs, w, i: int, h):
    """Four norms: pre- and post-attention, pre- and post-FFN (the post-norms before the residual adds)."""
    x = ops.norm(h, w.attn_norm, a.norm_eps)
    attn = ops.norm(llama.attention_qk_norm(ops, a, w, i, x), w.post_attn_norm, a.norm_eps)
    x, h = ops.add_norm(attn, h, w.ffn_norm, a.norm_eps)
    return ops.add(ops.norm(ops.ffn(i, w, x), w.post_ffw_norm, a.norm_eps), h)


def head(ops: Ops, a: ModelArgs, w, h):
    logits = llama.head(ops, a, w, h)
    return ops.softcap(logits, a.logit_softcap) if a.logit_softcap else logits
