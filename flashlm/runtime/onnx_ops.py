"""The ONNX backend of models/base.py's Ops: a family's layer and head become onnxruntime graph nodes.

A model runs as a chain of graphs: segments of consecutive decoder layers, then the head (in vocabulary slices),
so the loader can compile piece by piece. Interfaces:
  segment  inputs   hidden (1, S, d) float32, seqlens_k (1,) int32 = past + S - 1, total_len () int32 = past + S,
                    rope_cos / rope_sin (positions, rot_dim/2) float32 (and rope_cos_local / rope_sin_local when a
                    layer has its own RoPE base), past_key_{i} / past_value_{i} (1, n_kv, capacity, hd) per layer i
           outputs  hidden_out (1, S, d); present_key_{i} / present_value_{i} bound to the same buffers as the
                    past (onnxruntime's GroupQueryAttention then appends the new keys in place)
  head     inputs   hidden (1, S, d), logit_rows (R,) int64      outputs  logits (R, vocab slice)
Values are graph tensor names. Attention is GroupQueryAttention (RoPE, cache append and softmax in one op); matrix
products are MatMulNBits on the file's quantized blocks (quant/kernels.py).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from flashlm.quant.kernels import emit_linears
from flashlm.quant.onnx_graph import MS_DOMAIN, GraphBuilder


class _QKV:
    """q, k and v of one packed projection, split only when one of them is used on its own (QK-norm): attention
    takes the packed tensor directly otherwise."""

    def __init__(self, gb: GraphBuilder, packed: str, sizes: list[int]):
        self.gb, self.packed, self.sizes, self.parts = gb, packed, sizes, None

    def part(self, k: int) -> str:
        if self.parts is None:
            split = self.gb.const("split", np.array(self.sizes, np.int64))
            self.parts = self.gb.op("Split", [self.packed, split], n_out=3, axis=-1)
        return self.parts[k]


class OnnxOps:
    def __init__(self, gb: GraphBuilder, args, activation: str):
        self.gb, self.args, self.activation = gb, args, activation

    def norm(self, x: str, weight: np.ndarray, eps: float) -> str:
        return self.gb.op("SimplifiedLayerNormalization", [x, self.gb.const("norm", weight)], axis=-1, epsilon=eps,
                          stash_type=1)

    def add(self, x: str, y: str) -> str:
        return self.gb.op("Add", [x, y])

    def add_norm(self, x: str, residual: str, weight: np.ndarray, eps: float) -> tuple[str, str]:
        gb = self.gb
        normed, total = gb.fresh("normed"), gb.fresh("resid")
        gb.op("SkipSimplifiedLayerNormalization", [x, residual, gb.const("norm", weight)], domain=MS_DOMAIN,
              out=[normed, "", "", total], epsilon=eps)
        return normed, total

    def qkv(self, i: int, w, x: str):
        a = self.args
        packed = _QKV(self.gb, emit_linears(self.gb, x, w.qkv, f"l{i}_qkv"),
                      [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim])
        return (packed, 0), (packed, 1), (packed, 2)

    def head_norm(self, t, weight: np.ndarray, eps: float) -> str:
        """(1, S, H*hd) -> (1, S, H, hd) -> norm -> (1, S, H*hd)."""
        gb = self.gb
        name = t[0].part(t[1]) if isinstance(t, tuple) else t
        heads = gb.op("Reshape", [name, gb.const("heads_shape", np.array([0, 0, -1, self.args.head_dim], np.int64))])
        return gb.op("Reshape", [self.norm(heads, weight, eps), gb.const("flat_shape", np.array([0, 0, -1], np.int64))])

    def attend(self, i: int, q, k, v) -> str:
        a, gb = self.args, self.gb
        if all(isinstance(t, tuple) and t[0] is q[0] and t[0].parts is None for t in (q, k, v)):
            qkv = [q[0].packed, "", ""]  # packed q|k|v, as GroupQueryAttention takes it
        else:
            qkv = [t[0].part(t[1]) if isinstance(t, tuple) else t for t in (q, k, v)]
        cos, sin = a.rope_names(i)
        window = {}
        if a.is_local(i):
            # onnxruntime's local_window_size W keeps keys at distance < W from the query (checked against numpy in
            # the tests), which is llama.cpp's and transformers' sliding window
            window = {"local_window_size": a.sliding_window}
        if cos not in gb.declared:
            gb.input(cos, np.float32, ["positions", "half_rot"])
            gb.input(sin, np.float32, ["positions", "half_rot"])
        out = gb.fresh("attn")
        gb.op("GroupQueryAttention", [*qkv, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_len", cos, sin],
              domain=MS_DOMAIN, out=[out, f"present_key_{i}", f"present_value_{i}"],
              num_heads=a.n_heads, kv_num_heads=a.n_kv_heads, do_rotary=1, rotary_interleaved=int(a.rope.interleaved),
              scale=float(a.head_dim ** -0.5), **window)
        return out

    def linear(self, x: str, matrix) -> str:
        return emit_linears(self.gb, x, matrix, "o")

    def ffn(self, i: int, w, x: str, residual: str | None = None) -> str:
        gb, n_ff = self.gb, self.args.n_ff
        gate_up = emit_linears(gb, x, w.gate_up, f"l{i}_gate_up")
        gate, up = gb.op("Split", [gate_up, gb.const("split", np.array([n_ff, n_ff], np.int64))], n_out=2, axis=-1)
        if self.activation == "relu":
            gated = gb.op("Relu", [gate])
        elif self.activation == "gelu_tanh":
            gated = gb.op("Gelu", [gate], approximate="tanh")
        else:
            gated = gb.op("Mul", [gate, gb.op("Sigmoid", [gate])])
        act = gb.op("Mul", [gated, up])
        gb.taps[("ffn_act", i)] = act  # (1, S, n_ff): what calibration looks at
        y = emit_linears(gb, act, w.down, f"l{i}_down")
        return y if residual is None else gb.op("Add", [y, residual])

    def output(self, x: str, w) -> str:
        return emit_linears(self.gb, x, w.output, "output")

    def softcap(self, logits: str, cap: float) -> str:
        c = self.gb.const("softcap", np.array(cap, np.float32))
        return self.gb.op("Mul", [self.gb.op("Tanh", [self.gb.op("Div", [logits, c])]), c])


def build_segment(gb: GraphBuilder, family: ModuleType, args, layers: range, weights: list,
                  taps: tuple[str, ...]) -> None:
    """Decoder layers `layers` (their weights in order) as one graph."""
    f32 = np.float32
    gb.input("hidden", f32, [1, "S", args.d_model])
    gb.input("seqlens_k", np.int32, [1])
    gb.input("total_len", np.int32, [])
    gb.output("hidden_out", f32, [1, "S", args.d_model])
    kv_shape = [1, args.n_kv_heads, "capacity", args.head_dim]
    for i in layers:
        for kind in ("key", "value"):
            gb.input(f"past_{kind}_{i}", f32, kv_shape)
            gb.output(f"present_{kind}_{i}", f32, kv_shape)
    ops = OnnxOps(gb, args, family.ffn_activation(args))
    hidden = "hidden"
    for i, w in zip(layers, weights):
        hidden = family.layer(ops, args, w, i, hidden)
    gb.op("Identity", [hidden], out=["hidden_out"])
    gb.expose_taps(taps)


def build_head(gb: GraphBuilder, family: ModuleType, args, w) -> None:
    """Final norm and a slice [w.start, w.stop) of the output matrix for the positions asked for."""
    gb.input("hidden", np.float32, [1, "S", args.d_model])
    gb.input("logit_rows", np.int64, ["R"])
    gb.output("logits", np.float32, ["R", w.stop - w.start])
    rows = gb.op("Gather", ["hidden", "logit_rows"], axis=1)  # (1, R, d)
    logits = family.head(OnnxOps(gb, args, family.ffn_activation(args)), args, w, rows)
    gb.op("Squeeze", [logits, gb.const("axis0", np.array([0], np.int64))], out=["logits"])
