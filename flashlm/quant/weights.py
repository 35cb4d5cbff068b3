"""Weight placement: turns named GGUF tensors into what the compute graph and the embedding lookup consume."""

from __future__ import annotations

import os

import numpy as np

from flashlm.errors import ModelFileError, StorageError, UnsupportedModelError
from flashlm.quant.formats import codec_for, dequantize, to_nbits
from flashlm.quant.kernels import Linear
from flashlm.loaders.gguf_reader import GGUFFile, GGMLQuantizationType as QT


def require(f: GGUFFile, name: str):
    """The tensor's info, checked to exist and to have a format flashlm computes with."""
    info = f.tensors.get(name)
    if info is None:
        raise ModelFileError(f"{f.path}: missing tensor {name!r}")
    try:
        codec_for(info.ggml_type, name)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{f.path}: {e}") from None
    return info


def vector(f: GGUFFile, name: str, length: int) -> np.ndarray:
    """A 1-D tensor (norm weights, biases) as float32, checked against the expected length."""
    info = require(f, name)
    if info.shape != (length,):
        raise ModelFileError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected ({length},)")
    return dequantize(f.tensor_bytes(name), info.ggml_type).reshape(length)


def linear(f: GGUFFile, names: list[str], n_in: int, n_outs: list[int],
           bias_names: list[str] | None = None, rows: tuple[int, int] | None = None) -> list[Linear]:
    """Matrices sharing one input, fused along the output dimension (q|k|v, gate|up) where their formats agree.

    Returns one Linear per run of same-format tensors; the graph concatenates their outputs. `rows` takes a
    slice of the output dimension of a single matrix (the output matrix is compiled in vocabulary slices).
    """
    infos = [require(f, n) for n in names]
    for info, n_out in zip(infos, n_outs):
        if info.shape != (n_out, n_in):
            raise ModelFileError(f"{f.path}: tensor {info.name!r} has shape {info.shape}, expected {(n_out, n_in)}")
    biases = [None] * len(names) if bias_names is None else [vector(f, b, n) for b, n in zip(bias_names, n_outs)]
    groups: list[list[int]] = []
    for i, info in enumerate(infos):
        if groups and infos[groups[-1][0]].ggml_type == info.ggml_type:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        qtype = infos[g[0]].ggml_type
        raw = np.concatenate([f.tensor_bytes(names[i]) for i in g]) if len(g) > 1 else f.tensor_bytes(names[g[0]])
        bias = None if bias_names is None else np.concatenate([biases[i] for i in g])
        n_out = sum(n_outs[i] for i in g)
        if rows is not None:
            raw, n_out = raw[rows[0]:rows[1]], rows[1] - rows[0]
            bias = None if bias is None else bias[rows[0]:rows[1]]
        nb = to_nbits(raw, qtype, n_in, names[g[0]])
        if nb is not None:
            out.append(Linear(n_out, n_in, nbits=nb, bias=bias))
        else:
            out.append(Linear(n_out, n_in, dense=dequantize(raw, qtype), bias=bias))
    return out


class EmbeddingTable:
    """Token embedding rows read per call from the file (positional reads, never dequantized whole).

    Reading through the file's mmap instead would cost memory out of proportion: each page fault maps the pages
    the kernel read ahead around it (measured: 16 rows of SmolLM2's table added 12 MB of RSS).
    """

    def __init__(self, f: GGUFFile, name: str, d_model: int, scale: float = 1.0):
        info = require(f, name)
        if len(info.shape) != 2 or info.shape[1] != d_model:
            raise ModelFileError(f"{f.path}: tensor {name!r} has shape {info.shape}, expected (vocab, {d_model})")
        self.qtype: QT = info.ggml_type
        self.vocab_size, self.d_model = info.shape
        self.row_bytes = info.nbytes // self.vocab_size
        self.offset, self.path = info.offset, f.path
        self.scale = np.float32(scale)  # Gemma multiplies embeddings by sqrt(d_model)
        self._fd = os.open(f.path, os.O_RDONLY)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """(S,) token ids -> (S, d_model) float32."""
        rows = np.empty((len(ids), self.row_bytes), np.uint8)
        for k, token in enumerate(ids):
            self._read_row(int(token), memoryview(rows[k]))
        out = dequantize(rows, self.qtype).reshape(len(ids), self.d_model)
        return out * self.scale if self.scale != 1 else out

    def _read_row(self, token: int, dest: memoryview) -> None:
        """Short reads continue where they stopped; a failed read names the file and byte (StorageError). Stateless:
        a failed row fails its step only."""
        done = 0
        while done < self.row_bytes:
            pos = self.offset + token * self.row_bytes + done
            try:
                n = os.preadv(self._fd, [dest[done:]], pos)
            except InterruptedError:  # os.preadv retries EINTR itself (PEP 475); a wrapper may surface it
                continue
            except OSError as e:
                raise StorageError(f"{self.path}: read of embedding row {token} failed at byte {pos}: "
                                   f"{e.strerror or e}") from None
            if n == 0:
                raise StorageError(f"{self.path}: embedding row {token} is past the end of the file (byte {pos}; "
                                   "file truncated while in use?)")
            done += n

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
