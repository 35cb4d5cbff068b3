"""OPT (Meta's Open Pre-trained Transformers), read from a Hugging Face directory and computed in numpy float32.

llama.cpp has no OPT GGUF, so OPT comes from config.json + safetensors (loaders/hf_dir.py). Unlike the Llama
family: LayerNorm with biases, learned positional embeddings (row = position + 2, fairseq's padding offset), ReLU
FFN with biases (fc1, fc2; the ReLU is what makes skipping neurons exact), project_in/project_out around the decoder
when word_embed_proj_dim != hidden_size, a post-LayerNorm variant (opt-350m), and a tied lm_head.

The FFN runs one of two ways:
  dense     (select=None)  all neurons, one BLAS matmul per matrix over all tokens: the fast path.
  selected  (a Selector)   per token only the neurons the selector names: those rows of fc1 and of `down` (fc2
                           transposed: a neuron's output column is one contiguous row, as the flash store bundles it).
The selected kernel sums neuron by neuron in index order, so leaving out neurons whose ReLU output is exactly zero
cannot change a bit: with the true active set it equals the all-neurons selection exactly. BLAS regroups the sums in
blocks, so the dense path agrees with the selected kernel to float rounding only (~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from flashlm.errors import ContextLengthError, InvalidOptionError, ModelFileError, UnsupportedModelError
from flashlm.loaders.hf_dir import ConfigReader, HFModelDir
from flashlm.runtime.kv_cache import KVCache

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (fairseq reserved rows for padding)
NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; OPT's config has no eps key

# Tensor-name table: key -> (name under the decoder prefix, shape as ModelArgs attributes).
PREFIXES = ("model.decoder.", "decoder.")  # OPTForCausalLM saves / OPTModel saves (the facebook/opt-* files)
TENSORS = {
    "embed_tokens": ("embed_tokens.weight", ("vocab_size", "embed_dim")),
    "embed_positions": ("embed_positions.weight", ("position_rows", "hidden_size")),
    "project_in": ("project_in.weight", ("hidden_size", "embed_dim")),
    "project_out": ("project_out.weight", ("embed_dim", "hidden_size")),
    "final_norm.weight": ("final_layer_norm.weight", ("hidden_size",)),
    "final_norm.bias": ("final_layer_norm.bias", ("hidden_size",)),
}
LAYER_TENSORS = {
    "attn_norm.weight": ("layers.{i}.self_attn_layer_norm.weight", ("hidden_size",)),
    "attn_norm.bias": ("layers.{i}.self_attn_layer_norm.bias", ("hidden_size",)),
    **{f"{p}{suffix}": (f"layers.{{i}}.self_attn.{p}_proj.{part}", shape)
       for p in ("q", "k", "v", "out")
       for suffix, part, shape in ((".weight", "weight", ("hidden_size", "hidden_size")),
                                   (".bias", "bias", ("hidden_size",)))},
    "ffn_norm.weight": ("layers.{i}.final_layer_norm.weight", ("hidden_size",)),
    "ffn_norm.bias": ("layers.{i}.final_layer_norm.bias", ("hidden_size",)),
    "fc1.weight": ("layers.{i}.fc1.weight", ("ffn_dim", "hidden_size")),
    "fc1.bias": ("layers.{i}.fc1.bias", ("ffn_dim",)),
    "fc2.weight": ("layers.{i}.fc2.weight", ("hidden_size", "ffn_dim")),
    "fc2.bias": ("layers.{i}.fc2.bias", ("hidden_size",)),
}
LM_HEAD = ("lm_head.weight", ("vocab_size", "embed_dim"))  # outside the decoder; read only when not tied

# (layer, x (T, hidden)) -> (T, ffn_dim) bool: the neurons to compute for each token
Selector = Callable[[int, np.ndarray], np.ndarray]
# (layer, x (T, hidden) the FFN input, pre (T, ffn_dim) the fc1 pre-activation), called by the dense path
Recorder = Callable[[int, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    n_layers: int
    ffn_dim: int
    n_heads: int
    max_positions: int
    embed_dim: int  # word_embed_proj_dim: the token embedding width, projected in/out when != hidden_size
    pre_norm: bool  # do_layer_norm_before (False in opt-350m: LayerNorm after each residual add)
    final_norm: bool
    bias: bool  # enable_bias: attention projections, fc1 and fc2
    norm_affine: bool  # layer_norm_elementwise_affine
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def position_rows(self) -> int:
        return self.max_positions + POSITION_OFFSET

    @property
    def projected(self) -> bool:
        return self.embed_dim != self.hidden_size

    @classmethod
    def from_config(cls, cfg: ConfigReader) -> "ModelArgs":
        model_type = cfg.str("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(f"{cfg.path}: model_type {model_type!r} is not OPT")
        activation = cfg.str("activation_function", "relu")
        if activation != "relu":
            raise UnsupportedModelError(f"{cfg.path}: activation_function {activation!r} (only relu is supported)")
        hidden, n_heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
        if hidden % n_heads:
            raise ModelFileError(f"{cfg.path}: hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}")
        pre_norm = cfg.bool("do_layer_norm_before", True)
        return cls(
            vocab_size=cfg.int("vocab_size"), hidden_size=hidden, n_layers=cfg.int("num_hidden_layers"),
            ffn_dim=cfg.int("ffn_dim"), n_heads=n_heads, max_positions=cfg.int("max_position_embeddings"),
            embed_dim=cfg.int("word_embed_proj_dim", hidden), pre_norm=pre_norm,
            final_norm=pre_norm and not cfg.bool("_remove_final_layer_norm", False),
            bias=cfg.bool("enable_bias", True), norm_affine=cfg.bool("layer_norm_elementwise_affine", True),
            tied=cfg.bool("tie_word_embeddings", True))


@dataclass
class LayerNorm:
    weight: np.ndarray | None  # None without elementwise affine
    bias: np.ndarray | None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        centered = x - mean
        y = centered / np.sqrt(np.square(centered).mean(-1, keepdims=True) + np.float32(NORM_EPS))
        return y if self.weight is None else y * self.weight + self.bias


@dataclass
class Linear:
    weight: np.ndarray  # (out, in), as stored
    bias: np.ndarray | None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


@dataclass
class LayerWeights:
    attn_norm: LayerNorm
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    ffn_norm: LayerNorm
    fc1: np.ndarray  # (ffn_dim, hidden): one row per neuron
    fc1_bias: np.ndarray  # (ffn_dim,), zeros without biases (adding +0 is exact)
    down: np.ndarray  # (ffn_dim, hidden): fc2 transposed, one row per neuron
    fc2_bias: np.ndarray  # (hidden,)


@dataclass
class Weights:
    embed_tokens: np.ndarray  # (vocab, embed_dim)
    embed_positions: np.ndarray  # (max_positions + 2, hidden)
    project_in: np.ndarray | None  # (hidden, embed_dim)
    project_out: np.ndarray | None  # (embed_dim, hidden)
    final_norm: LayerNorm | None
    lm_head: np.ndarray  # (vocab, embed_dim); the embedding itself when tied
    layers: list[LayerWeights]


class _TensorSource:
    """Reads table entries from the directory, with the decoder prefix its checkpoint uses."""

    def __init__(self, hf: HFModelDir, a: ModelArgs):
        self.hf, self.a = hf, a
        embed = TENSORS["embed_tokens"][0]
        self.prefix = next((p for p in PREFIXES if p + embed in hf), PREFIXES[0])  # a miss is reported on read

    def _shape(self, spec: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(getattr(self.a, field) for field in spec)

    def get(self, key: str, layer: int | None = None) -> np.ndarray:
        name, spec = TENSORS[key] if layer is None else LAYER_TENSORS[key]
        return self.hf.tensor(self.prefix + name.format(i=layer), self._shape(spec))

    def get_lm_head(self) -> np.ndarray:
        return self.hf.tensor(LM_HEAD[0], self._shape(LM_HEAD[1]))

    def norm(self, key: str, layer: int | None = None) -> LayerNorm:
        if not self.a.norm_affine:
            return LayerNorm(None, None)
        return LayerNorm(self.get(f"{key}.weight", layer), self.get(f"{key}.bias", layer))

    def linear(self, key: str, layer: int) -> Linear:
        return Linear(self.get(f"{key}.weight", layer), self.get(f"{key}.bias", layer) if self.a.bias else None)

    def layer(self, i: int) -> LayerWeights:
        a = self.a
        return LayerWeights(
            attn_norm=self.norm("attn_norm", i), q=self.linear("q", i), k=self.linear("k", i),
            v=self.linear("v", i), out=self.linear("out", i), ffn_norm=self.norm("ffn_norm", i),
            fc1=self.get("fc1.weight", i),
            fc1_bias=self.get("fc1.bias", i) if a.bias else np.zeros(a.ffn_dim, np.float32),
            down=np.ascontiguousarray(self.get("fc2.weight", i).T),
            fc2_bias=self.get("fc2.bias", i) if a.bias else np.zeros(a.hidden_size, np.float32))


def load_weights(hf: HFModelDir, a: ModelArgs) -> Weights:
    src = _TensorSource(hf, a)
    embed = src.get("embed_tokens")
    return Weights(
        embed_tokens=embed, embed_positions=src.get("embed_positions"),
        project_in=src.get("project_in") if a.projected else None,
        project_out=src.get("project_out") if a.projected else None,
        final_norm=src.norm("final_norm") if a.final_norm else None,
        lm_head=embed if a.tied else src.get_lm_head(),
        layers=[src.layer(i) for i in range(a.n_layers)])


# -- the FFN ---------------------------------------------------------------------------------------------------

def ffn_dense(lw: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (T, hidden) -> (output (T, hidden), fc1 pre-activation (T, ffn_dim)) over every neuron, through BLAS."""
    pre = x @ lw.fc1.T + lw.fc1_bias
    return np.maximum(pre, 0) @ lw.down + lw.fc2_bias, pre


def neuron_preactivations(lw: LayerWeights, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """fc1 rows idx . x (one token): each dot product is summed along its own row, whatever other rows are chosen."""
    return np.add.reduce(lw.fc1[idx] * x, axis=1) + lw.fc1_bias[idx]


def ffn_selected(lw: LayerWeights, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x (T, hidden), mask (T, ffn_dim) bool -> (T, hidden), reading only the selected neurons of each token."""
    y = np.empty_like(x)
    for t in range(len(x)):
        idx = np.flatnonzero(mask[t])
        act = np.maximum(neuron_preactivations(lw, x[t], idx), 0)
        # reducing axis 0 of a C-contiguous array, numpy adds row after row: a fixed neuron order, in which an
        # exact-zero term leaves the running sum unchanged
        y[t] = np.add.reduce(act[:, None] * lw.down[idx], axis=0) + lw.fc2_bias
    return y


# -- attention -------------------------------------------------------------------------------------------------

def attention(a: ModelArgs, lw: LayerWeights, x: np.ndarray, kv: KVCache, layer: int, start: int) -> np.ndarray:
    """Causal multi-head attention of x (T, hidden) at positions start.., appending its keys/values to the cache."""
    t, h, hd = len(x), a.n_heads, a.head_dim
    q = (lw.q(x) * np.float32(hd ** -0.5)).reshape(t, h, hd).transpose(1, 0, 2)  # scaled before, as transformers
    keys, values = kv.keys[layer][0], kv.values[layer][0]  # (heads, capacity, head_dim)
    keys[:, start:start + t] = lw.k(x).reshape(t, h, hd).transpose(1, 0, 2)
    values[:, start:start + t] = lw.v(x).reshape(t, h, hd).transpose(1, 0, 2)
    scores = q @ keys[:, :start + t].transpose(0, 2, 1)  # (heads, T, start + T)
    future = np.arange(start + t)[None, :] > (start + np.arange(t))[:, None]
    scores[:, future] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return lw.out((probs @ values[:, :start + t]).transpose(1, 0, 2).reshape(t, h * hd))


# -- the model -------------------------------------------------------------------------------------------------

class OPTModel:
    def __init__(self, args: ModelArgs, weights: Weights):
        self.args, self.weights = args, weights

    @classmethod
    def from_dir(cls, path: str | HFModelDir) -> "OPTModel":
        hf = path if isinstance(path, HFModelDir) else HFModelDir(path)
        args = ModelArgs.from_config(hf.cfg)
        return cls(args, load_weights(hf, args))

    def new_cache(self) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_heads, a.head_dim, a.max_positions)

    def _check_ids(self, ids: np.ndarray, start: int) -> None:
        if start + len(ids) > self.args.max_positions:
            raise ContextLengthError(f"{start + len(ids)} positions exceed OPT's {self.args.max_positions}")
        bad = ids[(ids < 0) | (ids >= self.args.vocab_size)]
        if len(bad):
            raise InvalidOptionError(f"token id {bad[0]} is outside the vocabulary (0..{self.args.vocab_size - 1})")

    def _embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        w = self.weights
        tokens = w.embed_tokens[ids]
        if w.project_in is not None:
            tokens = tokens @ w.project_in.T
        return tokens + w.embed_positions[start + POSITION_OFFSET + np.arange(len(ids))]

    def _layer(self, i: int, h: np.ndarray, kv: KVCache, start: int,
               select: Selector | None, record: Recorder | None) -> np.ndarray:
        a, lw = self.args, self.weights.layers[i]
        h = h + attention(a, lw, lw.attn_norm(h) if a.pre_norm else h, kv, i, start)
        if not a.pre_norm:
            h = lw.attn_norm(h)
        x = lw.ffn_norm(h) if a.pre_norm else h  # the FFN input: what a sparsity predictor sees
        if select is None:
            y, pre = ffn_dense(lw, x)
            if record is not None:
                record(i, x, pre)
        else:
            y = ffn_selected(lw, x, select(i, x))
        h = h + y
        return h if a.pre_norm else lw.ffn_norm(h)

    def _head(self, h: np.ndarray) -> np.ndarray:
        w = self.weights
        if w.final_norm is not None:
            h = w.final_norm(h)
        if w.project_out is not None:
            h = h @ w.project_out.T
        return h @ w.lm_head.T

    def forward(self, ids, cache: KVCache, select: Selector | None = None,
                record: Recorder | None = None) -> np.ndarray:
        """Append ids at position cache.n_past; returns logits (len(ids), vocab). `record` sees the dense FFNs."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        start = cache.n_past
        self._check_ids(ids, start)
        cache.reserve(start + len(ids))
        h = self._embed(ids, start)
        for i in range(self.args.n_layers):
            h = self._layer(i, h, cache, start, select, record)
        cache.n_past = start + len(ids)
        return self._head(h)

    def logits(self, ids, select: Selector | None = None) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab) from an empty context."""
        return self.forward(ids, self.new_cache(), select)

    def greedy(self, ids, max_tokens: int, select: Selector | None = None) -> Iterator[int]:
        """Greedy continuation of ids, one token at a time through the KV cache."""
        cache = self.new_cache()
        logits = self.forward(ids, cache, select)
        for _ in range(max_tokens):
            token = int(logits[-1].argmax())
            yield token
            if cache.n_past >= self.args.max_positions:
                return
            logits = self.forward([token], cache, select)

    def ffn_activations(self, ids) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (FFN input x (T, hidden), fc1 pre-activation (T, ffn_dim)) for ids from an empty context."""
        seen: list[tuple[np.ndarray, np.ndarray]] = []
        self.forward(ids, self.new_cache(), record=lambda i, x, pre: seen.append((x, pre)))
        return seen


# -- selectors -------------------------------------------------------------------------------------------------

def all_neurons(model: OPTModel) -> Selector:
    """Every neuron through the selected kernel: the dense output in the kernel's summation order."""
    return lambda layer, x: np.ones((len(x), model.args.ffn_dim), dtype=bool)


def oracle(model: OPTModel) -> Selector:
    """The true active set (pre-activation > 0), computed as the kernel computes it, so it is exact."""
    def select(layer: int, x: np.ndarray) -> np.ndarray:
        lw, every = model.weights.layers[layer], np.arange(model.args.ffn_dim)
        return np.stack([neuron_preactivations(lw, row, every) > 0 for row in x])
    return select
