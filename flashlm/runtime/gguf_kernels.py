"""A GGUF on the CPU kernels: the flash store's resident path (kernel_executor.KernelExecutor) over the GGUF's own
matrices, so both file kinds decode through one kernel path.

Attention matrices are copied as a flash store keeps them (flash_loader.load_attention); the FFN's three matrices
and the output matrix are the mapped file's rows, used in place (as llama.cpp maps them): a layer's FFN is three
row products (quant/bundle_kernel.py: dense_ffn), the head one. Files the kernels cannot run (float matrices, a
type they lack, no C compiler) load through onnxruntime instead (model_loader._gguf_executor).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from flashlm.flash_store.planner import KV_DTYPE, attention_names
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import output_matrix
from flashlm.quant.bundle_kernel import SUPPORTED_ROW_TYPES, BundleKernel, dense_ffn, rows_matvec
from flashlm.quant.weights import vector
from flashlm.runtime.flash_loader import load_attention
from flashlm.runtime.kernel_executor import KernelExecutor
from flashlm.runtime.kv_cache import KVCache

FFN_KEYS = ("gate", "up", "down")


@dataclass
class MatrixFFN:
    """An FFN source (kernel_executor.FFNSource) of per-layer (gate, up, down) GGUF row matrices with their
    types: y += down . (act(gate . x) * (up . x)), all in memory."""

    kernel: BundleKernel
    layers: list[tuple[np.ndarray, int, np.ndarray, int, np.ndarray, int]]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def begin(self, n_tokens: int = 1) -> None:
        pass

    def run(self, i: int, x: np.ndarray, y: np.ndarray) -> None:
        gate, gate_type, up, up_type, down, down_type = self.layers[i]
        dense_ffn(self.kernel, gate, gate_type, up, up_type, down, down_type, x, y)

    def close(self) -> None:
        self.layers = []


@dataclass
class RowsHead:
    """An output head (kernel_executor.OutputHead) of quantized rows in memory: one row product."""

    kernel: BundleKernel
    rows: np.ndarray
    qtype: int
    output_norm: np.ndarray
    io_wait_s: float = 0.0

    def run(self, normed: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        x = np.ascontiguousarray(normed[rows], dtype=np.float32)
        rows_matvec(self.kernel, self.rows, self.qtype, x, out)


def runs_on_kernels(f: GGUFFile, family: ModuleType, args) -> bool:
    """Whether every FFN and output matrix is of a type the row kernels take, and the kernels compiled."""
    names = [family.layer_name(k, i) for i in range(args.n_layers) for k in FFN_KEYS] + [output_matrix(f).name]
    if any(n not in f.tensors or f.tensors[n].ggml_type not in SUPPORTED_ROW_TYPES for n in names):
        return False
    if any(n not in f.tensors for i in range(args.n_layers) for n in attention_names(family, i)):
        return False
    from flashlm.quant.bundle_kernel import build_library

    return build_library() is not None


def load_gguf_kernel_executor(f: GGUFFile, family: ModuleType, args, n_ctx: int, threads: int
                              ) -> tuple[KernelExecutor, int]:
    """The executor and the bytes of weights it holds (attention copies; mapped FFN and head counted too)."""
    kernel = BundleKernel(None, family.ffn_activation(args), threads)
    layers, ffn = [], []
    for i in range(args.n_layers):
        layers.append(load_attention(f, family, args, i))
        f._mmap.madvise(mmap.MADV_DONTNEED)  # the copies are ours; the file's pages need not stay
        ffn.append(tuple(part for k in FFN_KEYS for part in (f.tensor_bytes(family.layer_name(k, i)),
                                                              f.tensors[family.layer_name(k, i)].ggml_type)))
    info = output_matrix(f)
    head = RowsHead(kernel, f.tensor_bytes(info.name).reshape(info.shape[0], -1), info.ggml_type,
                    vector(f, family.TENSORS["output_norm"], args.d_model))
    kv = KVCache(args.n_layers, args.n_kv_heads, args.head_dim, n_ctx, KV_DTYPE)
    executor = KernelExecutor(family, args, layers, kernel, MatrixFFN(kernel, ffn), head,
                              family.load_embedding(f, args), kv, family.rope_tables(f, args, n_ctx))
    held = sum(w.nbytes for w in layers) + sum(m.nbytes for layer in ffn for m in layer[::2]) + head.rows.nbytes
    return executor, held
