"""The llama block in PyTorch for `flashlm sparsify`: one definition for the teacher (SiLU) and the student (ReLU).

Weights come from a GGUF, dequantized with gguf-py's reference dequantizer, and keep the GGUF's layout: q and k rows
are in llama.cpp's order, so RoPE rotates adjacent pairs (ggml's "normal" mode) and the trained weights go back
into a GGUF unchanged. The forward pass reports, per layer, the FFN's zero fraction and mean ReLU output (the L1
term), which is what training pushes on and what the model card reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

from flashlm.errors import UnsupportedModelError
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import llama
from flashlm.models.base import Metadata

# GGUF tensor name (per layer) -> its role in LlamaLayer
LAYER_TENSORS = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
                 "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass(frozen=True)
class LlamaShape:
    n_layers: int
    d_model: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    norm_eps: float
    tied: bool

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> LlamaShape:
        """From the llama family's own reading of the metadata (models/llama.py), for what this trainer runs."""
        arch = Metadata(f).arch
        if arch != "llama":
            raise UnsupportedModelError(f"{f.path}: sparsify runs llama-family models, not {arch!r}")
        a = llama.ModelArgs.from_gguf(f)
        if "rope_freqs.weight" in f.tensors or a.rope.scaling != "none":
            raise UnsupportedModelError(f"{f.path}: RoPE scaling is not supported by sparsify")
        return cls(n_layers=a.n_layers, d_model=a.d_model, n_ff=a.n_ff, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                   head_dim=a.head_dim, vocab=a.vocab_size, rope_theta=a.rope.base, norm_eps=a.norm_eps,
                   tied="output.weight" not in f.tensors)


def read_tensor(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.tensors[name]
    w = dequantize(f.tensor_bytes(name), info.ggml_type).reshape(info.shape)
    return torch.from_numpy(np.array(w, dtype=np.float32, copy=True))  # a copy: the file's mapping closes


def q4_0_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w through Q4_0 and back (gguf-py's rounding: scale = signed absmax / -8, stored as f16)."""
    blocks = w.float().reshape(-1, 32)
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, idx) / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.clamp(torch.trunc(blocks * inv + 8.5), 0, 15)
    return ((q - 8.0) * d.half().float()).reshape(w.shape).to(w.dtype)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One new position against the whole cache, each KV head shared by its group of query heads through a
    batched matmul (no copy of the cache per group). q (B, H, 1, D), k and v (B, KV, L, D) -> (B, H, 1, D)."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d)
    scores = torch.softmax((qg @ k.transpose(-1, -2)).float() * d ** -0.5, dim=-1).to(v.dtype)
    return (scores @ v).reshape(b, h, 1, d)


class LlamaLayer(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for role, t in tensors.items():
            setattr(self, role, torch.nn.Parameter(t))


class Llama(torch.nn.Module):
    """Embedding and output head are buffers: sparsify trains the blocks and keeps the teacher's vocabulary side."""

    def __init__(self, shape: LlamaShape, layers: list[dict[str, torch.Tensor]], embed: torch.Tensor,
                 output_norm: torch.Tensor, head: torch.Tensor | None, activation: str):
        super().__init__()
        self.shape, self.activation = shape, activation
        self.layers = torch.nn.ModuleList(LlamaLayer(t) for t in layers)
        self.output_norm = torch.nn.Parameter(output_norm)
        self.register_buffer("embed", embed)
        self.register_buffer("head", embed if head is None else head)
        self.fake_quant = False  # Q4_0 forward with straight-through gradients (quantization-aware last steps)
        half = shape.head_dim // 2
        self.register_buffer("inv_freq", shape.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)

    @classmethod
    def from_gguf(cls, path: str, activation: str) -> Llama:
        with GGUFFile(path) as f:
            shape = LlamaShape.from_gguf(f)
            layers = [{role: read_tensor(f, f"blk.{i}.{name}.weight") for name, role in LAYER_TENSORS.items()}
                      for i in range(shape.n_layers)]
            head = None if shape.tied else read_tensor(f, "output.weight")
            return cls(shape, layers, read_tensor(f, "token_embd.weight"), read_tensor(f, "output_norm.weight"),
                       head, activation)

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        return w + (q4_0_roundtrip(w.detach()) - w.detach()) if self.fake_quant else w

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.norm_eps)).to(x.dtype) * weight.to(x.dtype)

    def _rope(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        # x (B, H, T, D): rotate the adjacent pairs (x[2i], x[2i+1]) by pos * theta^(-2i/D)
        t = torch.arange(pos0, pos0 + x.shape[2], device=x.device, dtype=torch.float32)
        ang = torch.outer(t, self.inv_freq)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def _attention(self, layer: LlamaLayer, h: torch.Tensor, cache, pos0: int) -> torch.Tensor:
        s, (b, t, _) = self.shape, h.shape
        q = (h @ self._w(layer.wq).to(h.dtype).T).view(b, t, s.n_heads, s.head_dim).transpose(1, 2)
        k = (h @ self._w(layer.wk).to(h.dtype).T).view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = (h @ self._w(layer.wv).to(h.dtype).T).view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = self._rope(q, pos0), self._rope(k, pos0)
        if cache is not None:  # (k_cache, v_cache), each (B, KV, T_max, D)
            cache[0][:, :, pos0:pos0 + t] = k
            cache[1][:, :, pos0:pos0 + t] = v
        if cache is not None and pos0 > 0:
            out = _decode_attention(q, cache[0][:, :, :pos0 + t], cache[1][:, :, :pos0 + t])
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1) @ self._w(layer.wo).to(h.dtype).T

    def _ffn(self, layer: LlamaLayer, h: torch.Tensor, stats: list | None) -> torch.Tensor:
        gate = h @ self._w(layer.w_gate).to(h.dtype).T
        act = F.relu(gate) if self.activation == "relu" else F.silu(gate)
        if stats is not None:  # (zero fraction, mean ReLU output): the L1 term is the second, with its gradient
            stats.append(((gate <= 0).float().mean().detach(), act.float().mean()))
        return (act * (h @ self._w(layer.w_up).to(h.dtype).T)) @ self._w(layer.w_down).to(h.dtype).T

    def forward(self, ids: torch.Tensor, stats: list | None = None, cache=None, pos0: int = 0,
                dtype=torch.bfloat16, last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab) in float32 (B, 1, vocab with last_only); `cache` is a list of
        per-layer (k, v) for decoding."""
        x = self.embed[ids].to(dtype)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, self._norm(x, layer.attn_norm), None if cache is None else cache[i], pos0)
            x = x + self._ffn(layer, self._norm(x, layer.ffn_norm), stats)
        if last_only:
            x = x[:, -1:]
        return (self._norm(x, self.output_norm) @ self.head.to(dtype).T).float()

    def new_cache(self, batch: int, length: int, dtype=torch.bfloat16) -> list:
        s, dev = self.shape, self.embed.device
        return [tuple(torch.empty(batch, s.n_kv_heads, length, s.head_dim, dtype=dtype, device=dev) for _ in range(2))
                for _ in range(s.n_layers)]

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """GGUF name -> float32 weight (CPU) of layer i."""
        layer = self.layers[i]
        return {f"blk.{i}.{name}.weight": getattr(layer, role).detach().float().cpu()
                for name, role in LAYER_TENSORS.items()}


@torch.no_grad()
def sample(model: Llama, prompts: torch.Tensor, n_new: int, temperature: float, generator=None,
           stop_id: int | None = None) -> torch.Tensor:
    """prompts (B, P) -> (B, P + n_new): KV-cached decoding; temperature 0 is greedy. Rows keep going after
    `stop_id` unless every row has produced it (then the rest is left as stop_id)."""
    b, p = prompts.shape
    cache = model.new_cache(b, p + n_new)
    out = torch.empty(b, p + n_new, dtype=torch.long, device=prompts.device)
    out[:, :p] = prompts
    logits = model(prompts, cache=cache, last_only=True)[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
    for t in range(n_new):
        if temperature > 0:
            u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1.0)
            nxt = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
        else:
            nxt = logits.argmax(-1)
        out[:, p + t] = nxt
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                out[:, p + t + 1:] = stop_id
                break
        if t + 1 < n_new:
            logits = model(nxt[:, None], cache=cache, pos0=p + t)[:, -1]
    return out


@dataclass
class HeldOutScore:
    ppl: float
    n_scored: int
    sparsity: list[float]  # per layer: fraction of (token, neuron) with gate <= 0


@torch.no_grad()
def held_out_score(model: Llama, ids: list[int], n_ctx: int, bos: int | None, dtype=torch.bfloat16) -> HeldOutScore:
    """Perplexity as llama.cpp's llama-perplexity (chunks of n_ctx, BOS first where `bos` is given, second half
    scored) and the per-layer FFN zero fraction over every token of those chunks."""
    dev = model.embed.device
    n_chunks = len(ids) // n_ctx
    chunks = torch.tensor(ids[:n_chunks * n_ctx], device=dev).view(n_chunks, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    nll, n, zeros = 0.0, 0, torch.zeros(model.shape.n_layers, device=dev)
    for row in chunks.split(8):
        stats: list = []
        logits = model(row, stats=stats, dtype=dtype)
        first = n_ctx // 2
        lp = torch.log_softmax(logits[:, first - 1:-1], -1).gather(-1, row[:, first:, None])
        nll -= float(lp.sum())
        n += lp.numel()
        zeros += torch.stack([z for z, _ in stats]) * row.shape[0]
    return HeldOutScore(float(np.exp(nll / n)), n, (zeros / n_chunks).tolist())


def measure(path: str, text: str, n_ctx: int = 512, max_chunks: int = 0) -> HeldOutScore:
    """Perplexity and per-layer FFN zero fraction of a GGUF on a text, in float32 on the CPU (the GGUF's own
    flashlm.ffn_activation decides SiLU or ReLU)."""
    from flashlm.tools.sparsify_data import TextEncoder

    with GGUFFile(path) as f:  # BOS first in each chunk only where the tokenizer adds one, as llama-perplexity
        activation, bos = f.get("flashlm.ffn_activation", "silu"), f.get("tokenizer.ggml.bos_token_id")
        bos = bos if f.get("tokenizer.ggml.add_bos_token", False) else None
    ids = TextEncoder(path, None).encode_many([text])[0]
    if max_chunks:
        ids = ids[:max_chunks * n_ctx]
    return held_out_score(Llama.from_gguf(path, activation).eval(), ids, n_ctx, None if bos is None else int(bos),
                          dtype=torch.float32)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Perplexity and FFN zeros per layer of a llama GGUF on a text (CPU).")
    p.add_argument("model")
    p.add_argument("text")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    a = p.parse_args(argv)
    with open(a.text, encoding="utf-8", errors="ignore") as fh:
        r = measure(a.model, fh.read(), a.ctx_size)
    print(f"ppl {r.ppl:.4f} over {r.n_scored} scored tokens; FFN zeros mean {np.mean(r.sparsity):.4f} "
          f"min {np.min(r.sparsity):.4f}")
    print("per layer: " + " ".join(f"{z:.3f}" for z in r.sparsity))


if __name__ == "__main__":
    main()
