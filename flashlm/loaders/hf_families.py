"""Hugging Face model families -> GGUF, declaratively: tensor names, metadata keys and per-family transforms.

Everything here mirrors what llama.cpp's convert_hf_to_gguf.py writes for the family, so the GGUF loaders (and
llama.cpp itself) run the result unchanged:
  - metadata: `{arch}.context_length`, `embedding_length`, `feed_forward_length`, `block_count`,
    `attention.head_count(_kv)`, `attention.layer_norm_rms_epsilon`, `rope.freq_base` (its TextModel base class),
    plus `vocab_size`, `rope.dimension_count`, linear RoPE scaling and llama3 `rope_freqs` (its LlamaModel);
  - tensor names: gguf-py's tensor_mapping for these checkpoints (model.layers.{i}.self_attn.q_proj -> blk.{i}.attn_q);
  - "llama" (Llama, Mistral) runs RoPE on adjacent pairs where HF rotates halves, so q and k rows are permuted
    (LlamaModel.permute); qwen2 runs NEOX RoPE (halves) and keeps them as they are;
  - tied embeddings: no output.weight (the loaders fall back to token_embd.weight).
Adding a family is one HFFamily entry; a family whose math differs also needs its file under flashlm/models.
gemma3_text (GGUF "gemma3"): norms + 1 as Gemma3Model writes them, q/k norms and post-norms, sliding window, the
global RoPE base as rope.freq_base (the local 10000 is implied by the arch), tied embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from flashlm.errors import UnsupportedModelError
from flashlm.loaders.keys import FFN_ACTIVATIONS, KEY_FFN_ACTIVATION
from flashlm.loaders.hf_dir import MAX_LAYERS, ConfigReader

# HF tensor name -> GGUF tensor name, shared by the Llama-shaped families ({i}: the layer).
LLAMA_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LLAMA_LAYER_TENSORS = {
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
QKV_BIASES = {
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
}
GEMMA3_LAYER_TENSORS = {
    **LLAMA_LAYER_TENSORS,
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}
QK_NORMS = {
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some checkpoints save; recomputed from the config


@dataclass(frozen=True)
class HFFamily:
    gguf_arch: str
    global_tensors: dict[str, str]
    layer_tensors: dict[str, str]
    permute_qk: bool  # GGUF arch rotates adjacent pairs: permute HF's q/k rows (and biases) as LlamaModel.permute
    norm_offset: float = 0.0  # added to every *_norm.weight (gemma stores w where the model computes 1 + w)
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    # config keys that must hold a given value because the GGUF arch cannot express anything else
    required_config: dict[str, object] = field(default_factory=dict)
    # config.json hidden_act values the family runs (other than SiLU, written as flashlm's own GGUF key); empty:
    # the activation is fixed (required_config)
    hidden_acts: tuple[str, ...] = ()
    check: Callable[[ConfigReader, "HFArgs"], None] | None = None  # what a value table cannot say


def _check_gemma3(cfg: ConfigReader, args: "HFArgs") -> None:
    """What llama.cpp's gemma3 (and models/gemma3.py) hard-code: every 6th layer global, local RoPE base 10000,
    attention scale head_dim^-0.5."""
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(args.n_layers)]
    layer_types = cfg.raw("layer_types", pattern)
    if layer_types != pattern:
        raise UnsupportedModelError(f"{cfg.path}: layer_types {layer_types} are not Gemma 3's (every 6th global)")
    if args.rope.get("local_theta", 10000.0) != 10000.0:
        raise UnsupportedModelError(f"{cfg.path}: local RoPE base {args.rope['local_theta']} is not 10000")
    if cfg.raw("query_pre_attn_scalar", args.head_dim) != args.head_dim:
        raise UnsupportedModelError(f"{cfg.path}: query_pre_attn_scalar {cfg.raw('query_pre_attn_scalar')} differs "
                                    f"from head_dim {args.head_dim} (llama.cpp's gemma3 scales by head_dim)")


FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily("llama", LLAMA_GLOBAL_TENSORS, LLAMA_LAYER_TENSORS, permute_qk=True,
                      required_config={"attention_bias": False, "mlp_bias": False}, hidden_acts=FFN_ACTIVATIONS),
    "mistral": HFFamily("llama", LLAMA_GLOBAL_TENSORS, LLAMA_LAYER_TENSORS, permute_qk=True,
                        hidden_acts=FFN_ACTIVATIONS),
    "qwen2": HFFamily("qwen2", LLAMA_GLOBAL_TENSORS, {**LLAMA_LAYER_TENSORS, **QKV_BIASES}, permute_qk=False,
                      rope_types=("default", "linear"), hidden_acts=FFN_ACTIVATIONS),
    # Qwen3 dense models: QK-norm, no attention biases, NEOX RoPE (models/qwen3.py)
    "qwen3": HFFamily("qwen3", LLAMA_GLOBAL_TENSORS, {**LLAMA_LAYER_TENSORS, **QK_NORMS}, permute_qk=False,
                      rope_types=("default", "linear"), required_config={"attention_bias": False,
                                                                        "use_sliding_window": False},
                      hidden_acts=FFN_ACTIVATIONS),
    # Gemma 3 text models (Gemma3ForCausalLM; the multimodal "gemma3" nests them under language_model): norms
    # stored as w where the model computes (1 + w), q/k norms and post-norms, tied embeddings (models/gemma3.py).
    "gemma3_text": HFFamily("gemma3", LLAMA_GLOBAL_TENSORS, GEMMA3_LAYER_TENSORS, permute_qk=False, norm_offset=1.0,
                            rope_types=("default", "linear"),
                            required_config={"attention_bias": False, "attn_logit_softcapping": None,
                                             "hidden_activation": "gelu_pytorch_tanh"},
                            check=_check_gemma3),
}


def family_for_config(cfg: ConfigReader) -> HFFamily:
    model_type = cfg.str("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(f"{cfg.path}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(sorted(FAMILIES))})")
    for key, want in family.required_config.items():
        if cfg.config.get(key, want) != want:
            raise UnsupportedModelError(f"{cfg.path}: {key} = {cfg.raw(key)!r} is not supported for {model_type} "
                                        f"(llama.cpp's {family.gguf_arch!r} architecture needs {want!r})")
    return family


@dataclass(frozen=True)
class HFArgs:
    """The hyperparameters a conversion needs, read and checked from config.json."""

    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope: dict  # rope_type and its parameters
    tied: bool
    sliding_window: int  # 0: none
    explicit_head_dim: bool = False  # config.json names head_dim: key_length / value_length are written
    logit_softcap: float = 0.0
    ffn_activation: str = "silu"  # llama-family hidden_act: silu, or relu (ReLU-fied: ProSparse, TurboSparse)

    @classmethod
    def from_config(cls, cfg: ConfigReader, family: HFFamily) -> "HFArgs":
        d_model, n_heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
        n_kv_heads = cfg.int("num_key_value_heads", n_heads)
        if n_heads % n_kv_heads:
            raise UnsupportedModelError(f"{cfg.path}: {n_heads} attention heads are not a multiple of "
                                        f"{n_kv_heads} key/value heads")
        rope = rope_parameters(cfg)
        if rope["rope_type"] not in family.rope_types:
            raise UnsupportedModelError(f"{cfg.path}: RoPE type {rope['rope_type']!r} is not supported for "
                                        f"{cfg.str('model_type')} (supported: {', '.join(family.rope_types)})")
        activation = cfg.raw("hidden_act", "silu") if family.hidden_acts else "silu"
        if family.hidden_acts and activation not in family.hidden_acts:
            raise UnsupportedModelError(f"{cfg.path}: hidden_act = {activation!r:.40} is not supported for "
                                        f"{cfg.str('model_type')} (supported: {', '.join(family.hidden_acts)})")
        window = 0
        if cfg.raw("sliding_window", None) is not None and cfg.raw("use_sliding_window", True):
            window = cfg.int("sliding_window")
        args = cls(
            n_layers=cfg.int("num_hidden_layers", maximum=MAX_LAYERS), d_model=d_model,
            n_ff=cfg.int("intermediate_size"),
            n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=cfg.int("head_dim", d_model // n_heads),
            vocab_size=cfg.int("vocab_size"), n_ctx_train=cfg.int("max_position_embeddings", maximum=1 << 31),
            norm_eps=cfg.float("rms_norm_eps"), rope_base=float(rope["rope_theta"]), rope=rope,
            tied=cfg.bool("tie_word_embeddings", False), sliding_window=window,
            explicit_head_dim="head_dim" in cfg.config, logit_softcap=cfg.float("final_logit_softcapping", 0.0),
            ffn_activation=activation,
        )
        if family.check is not None:
            family.check(cfg, args)
        return args


def rope_parameters(cfg: ConfigReader) -> dict:
    """RoPE settings from either config layout: transformers 5's `rope_parameters` (per layer type for Gemma 3)
    or 4's `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`). Returns a dict with at least rope_type and
    rope_theta (the global layers'), and local_theta where local layers have their own base."""
    params = cfg.raw("rope_parameters", None) or cfg.raw("rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise UnsupportedModelError(f"{cfg.path}: rope_parameters is not a JSON object")
    local = params.get("sliding_attention")
    params = params.get("full_attention", params)
    if not isinstance(params, dict):
        raise UnsupportedModelError(f"{cfg.path}: rope_parameters.full_attention is not a JSON object")
    params = dict(params)
    if isinstance(local, dict) and "rope_theta" in local:
        params["local_theta"] = _positive(cfg, "rope_parameters.sliding_attention.rope_theta", local["rope_theta"])
    elif cfg.raw("rope_local_base_freq", None) is not None:
        params["local_theta"] = cfg.float("rope_local_base_freq")
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params["rope_theta"] = _positive(cfg, "rope_theta", params.get("rope_theta", cfg.raw("rope_theta", 10000.0)))
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key in params:  # read by metadata() and llama3_rope_factors() when converting
            params[key] = _positive(cfg, f"rope_parameters.{key}", params[key])
    return params


def _positive(cfg: ConfigReader, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e300:
        raise UnsupportedModelError(f"{cfg.path}: {key} = {value!r:.40} is not a positive number")
    return float(value)


def metadata(args: HFArgs, arch: str) -> list[tuple[str, str, object]]:
    """(type, key, value) for the GGUF header: the keys convert_hf_to_gguf.py writes for these families."""
    keys = [
        ("u32", "context_length", args.n_ctx_train),
        ("u32", "embedding_length", args.d_model),
        ("u32", "feed_forward_length", args.n_ff),
        ("u32", "block_count", args.n_layers),
        ("u32", "attention.head_count", args.n_heads),
        ("u32", "attention.head_count_kv", args.n_kv_heads),
        ("f32", "attention.layer_norm_rms_epsilon", args.norm_eps),
        ("f32", "rope.freq_base", args.rope_base),
        ("u32", "vocab_size", args.vocab_size),
        ("u32", "rope.dimension_count", args.head_dim),
    ]
    if args.explicit_head_dim or args.head_dim != args.d_model // args.n_heads:
        keys += [("u32", "attention.key_length", args.head_dim), ("u32", "attention.value_length", args.head_dim)]
    if args.logit_softcap:
        keys.append(("f32", "final_logit_softcapping", args.logit_softcap))
    if args.rope["rope_type"] == "linear":
        keys += [("str", "rope.scaling.type", "linear"), ("f32", "rope.scaling.factor", float(args.rope["factor"]))]
    if args.sliding_window:
        keys.append(("u32", "attention.sliding_window", args.sliding_window))
    out = [(t, f"{arch}.{k}", v) for t, k, v in keys]
    if args.ffn_activation != "silu":  # GGUF has no key for it (llama.cpp would run SiLU): flashlm's own
        out.append(("str", KEY_FFN_ACTIVATION, args.ffn_activation))
    return out


def llama3_rope_factors(args: HFArgs) -> np.ndarray | None:
    """rope_freqs.weight for llama3-style RoPE scaling (as LlamaModel.generate_extra_tensors computes it)."""
    rope = args.rope
    if rope["rope_type"] != "llama3":
        return None
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (args.rope_base ** (np.arange(0, args.head_dim, 2, dtype=np.float32) / args.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-halves q/k layout -> llama.cpp's adjacent pairs, per head (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows (GGUF -> HF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_shapes(args: HFArgs) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (numpy order, as in the HF checkpoint) the config implies."""
    d, q, kv, ff = args.d_model, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_ff
    shapes = {"token_embd.weight": (args.vocab_size, d), "output_norm.weight": (d,),
              "output.weight": (args.vocab_size, d)}
    per_layer = {"attn_norm.weight": (d,), "attn_q.weight": (q, d), "attn_k.weight": (kv, d),
                 "attn_v.weight": (kv, d), "attn_output.weight": (d, q), "ffn_norm.weight": (d,),
                 "ffn_gate.weight": (ff, d), "ffn_up.weight": (ff, d), "ffn_down.weight": (d, ff),
                 "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                 "attn_q_norm.weight": (args.head_dim,), "attn_k_norm.weight": (args.head_dim,),
                 "post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)}
    for i in range(args.n_layers):
        shapes.update({f"blk.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def tensor_plan(family: HFFamily, args: HFArgs) -> list[tuple[str, str]]:
    """(HF name, GGUF name) for every tensor to convert, in GGUF order (globals first, then layer by layer)."""
    plan = [(hf, gg) for hf, gg in family.global_tensors.items() if not (args.tied and gg == "output.weight")]
    for i in range(args.n_layers):
        plan += [(hf.format(i=i), gg.format(i=i)) for hf, gg in family.layer_tensors.items()]
    return plan


def transform(family: HFFamily, args: HFArgs, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """The family's per-tensor changes on the way to GGUF (q/k permutation, norm offsets)."""
    if family.permute_qk and ".attn_q." in gguf_name:
        w = permute_rows(w, args.n_heads)
    elif family.permute_qk and ".attn_k." in gguf_name:
        w = permute_rows(w, args.n_kv_heads)
    if family.norm_offset and gguf_name.endswith("_norm.weight"):
        w = w + np.float32(family.norm_offset)
    return w
