"""The Gemma 3 family (GGUF architecture `gemma3`), as llama.cpp runs it.

What differs from Llama (llama.py, whose tensor loading and norms this file reuses):
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
from flashlm.quant.kernels import emit_linears
from flashlm.quant.onnx_graph import MS_DOMAIN, GraphBuilder
from flashlm.models import llama
from flashlm.models.base import Metadata, RopeConfig, declare_head_io

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
    """What the bundle kernel applies to the gate when the FFN is streamed."""
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


def _declare_local_rope(gb: GraphBuilder) -> None:
    if ("rope_local",) not in gb.memo:
        gb.memo[("rope_local",)] = "declared"
        gb.input("rope_cos_local", np.float32, ["positions", "half_rot"])
        gb.input("rope_sin_local", np.float32, ["positions", "half_rot"])


def _head_norm(gb: GraphBuilder, x: str, weight: np.ndarray, head_dim: int, eps: float) -> str:
    """RMSNorm over each head: (1, S, H*hd) -> (1, S, H, hd) -> norm -> (1, S, H*hd)."""
    heads = gb.op("Reshape", [x, gb.const("heads_shape", np.array([0, 0, -1, head_dim], np.int64))])
    normed, _ = llama._rms_norm(gb, heads, weight, eps)
    return gb.op("Reshape", [normed, gb.const("flat_shape", np.array([0, 0, -1], np.int64))])


def _attention(gb: GraphBuilder, a: ModelArgs, lw: LayerWeights, x: str, i: int) -> str:
    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    qkv = emit_linears(gb, x, lw.qkv, f"l{i}_qkv")
    q, k, v = gb.op("Split", [qkv, gb.const("split", np.array([nq, nkv, nkv], np.int64))], n_out=3, axis=-1)
    q = _head_norm(gb, q, lw.q_norm, a.head_dim, a.norm_eps)
    k = _head_norm(gb, k, lw.k_norm, a.head_dim, a.norm_eps)
    cos, sin = a.rope_names(i)
    if a.is_local(i):
        _declare_local_rope(gb)
    # onnxruntime's local_window_size W keeps keys at distance < W from the query (checked against numpy in the
    # tests), which is llama.cpp's and transformers' sliding window
    window = {"local_window_size": a.sliding_window} if a.is_local(i) else {}
    out = gb.fresh("attn")
    gb.op("GroupQueryAttention", [q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_len", cos, sin],
          domain=MS_DOMAIN, out=[out, f"present_key_{i}", f"present_value_{i}"],
          num_heads=a.n_heads, kv_num_heads=a.n_kv_heads, do_rotary=1, rotary_interleaved=int(a.rope.interleaved),
          scale=float(a.head_dim ** -0.5), **window)
    return emit_linears(gb, out, lw.o, f"l{i}_o")


def _geglu(gb: GraphBuilder, a: ModelArgs, lw: LayerWeights, x: str, i: int) -> str:
    gate_up = emit_linears(gb, x, lw.gate_up, f"l{i}_gate_up")
    gate, up = gb.op("Split", [gate_up, gb.const("split", np.array([a.n_ff, a.n_ff], np.int64))], n_out=2, axis=-1)
    act = gb.op("Mul", [gb.op("Gelu", [gate], approximate="tanh"), up])
    gb.taps[("ffn_act", i)] = act
    return emit_linears(gb, act, lw.down, f"l{i}_down")


def build_attention(gb: GraphBuilder, a: ModelArgs, lw: LayerWeights, i: int, hidden: str) -> tuple[str, str]:
    """The attention half of layer i: returns (normed FFN input, residual stream after attention)."""
    x, _ = llama._rms_norm(gb, hidden, lw.attn_norm, a.norm_eps)
    attn, _ = llama._rms_norm(gb, _attention(gb, a, lw, x, i), lw.post_attn_norm, a.norm_eps)
    return llama._rms_norm(gb, attn, lw.ffn_norm, a.norm_eps, residual=hidden)


def build_layer(gb: GraphBuilder, a: ModelArgs, lw: LayerWeights, i: int, hidden: str) -> str:
    x, residual = build_attention(gb, a, lw, i, hidden)
    ffn, _ = llama._rms_norm(gb, _geglu(gb, a, lw, x, i), lw.post_ffw_norm, a.norm_eps)
    return gb.op("Add", [ffn, residual])


def build_head(gb: GraphBuilder, a: ModelArgs, w: HeadWeights) -> None:
    declare_head_io(gb, a.d_model, w.stop - w.start)
    rows = gb.op("Gather", ["hidden", "logit_rows"], axis=1)
    x, _ = llama._rms_norm(gb, rows, w.output_norm, a.norm_eps)
    logits = emit_linears(gb, x, w.output, "output")
    if a.logit_softcap:
        cap = gb.const("softcap", np.array(a.logit_softcap, np.float32))
        logits = gb.op("Mul", [gb.op("Tanh", [gb.op("Div", [logits, cap])]), cap])
    gb.op("Squeeze", [logits, gb.const("axis0", np.array([0], np.int64))], out=["logits"])
