"""The .flash file: a GGUF container (so gguf tools and llama.cpp's vocabulary loader read it) holding

  - every tensor the model needs each token (embeddings, attention, norms, output) unchanged, in its source
    quantization: 4-bit weights are not quantized a second time;
  - per layer one tensor `blk.{i}.ffn_bundle` of records (row-column bundling, the paper's Sec. 3.2), in one of two
    layouts (flashlm.bundle.group, RecordLayout below):
      neuron (group 1, the default): one record per neuron: gate row i and up row i in their source block format,
        then down column i, which GGUF stores strided across rows and is therefore transposed and requantized (to
        DOWN_TYPE, chosen by measured error);
      block (group G = the block size of ffn_down's type, `convert --bundle block`): one record per G consecutive
        neurons: their G gate rows, their G up rows, then for each of the d_model rows of ffn_down the one block
        covering these neurons: every byte as in the source GGUF, nothing requantized (a dense FFN reads whole
        records anyway; per-neuron sparsity needs the neuron layout);
  - neurons of each layer ordered hot first by activation frequency on calibration text, so a hot set is one
    contiguous range; `flashlm.layer.{i}.neuron_order` maps stored position -> original neuron index;
  - records padded to RECORD_ALIGN bytes, tensor data aligned to DATA_ALIGN (general.alignment) for direct I/O;
  - a CRC32 per section: the resident tensors and each layer's bundle under flashlm.* keys, and the header (bytes 0
    to the start of the tensor data: magic, counts, every metadata KV, every tensor info, the padding) in the last
    tensor, HEADER_CRC_TENSOR, since a key could not hold a checksum of the bytes it sits in; padding is zeros;
  - all source metadata (architecture, tokenizer, chat template) carried over, so the file is self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlm.loaders.gguf_reader import GGML_QUANT_SIZES, GGMLQuantizationType as QT

FORMAT_VERSION = 1
DATA_ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size (<= 4096)
RECORD_ALIGN = 64  # records start on cache-line boundaries; runs of records are read as aligned supersets
DOWN_TYPE = QT.Q8_0  # measured: an 8-bit down column keeps the loss near zero (see README)
BUNDLE_TYPE = QT.I8  # the bundle tensor's GGUF type: raw bytes

KEY_VERSION = "flashlm.format_version"
KEY_SOURCE = "flashlm.source"
KEY_CALIBRATION = "flashlm.calibration"
KEY_RESIDENT_CRC = "flashlm.checksum.resident"
FFN_KEYS = ("ffn_gate", "ffn_up", "ffn_down")
HEADER_CRC_TENSOR = "flashlm.checksum.header"  # (1,) I32: CRC32 of bytes [0, data offset); absent in older files
HEADER_CRC_TYPE = QT.I32


def bundle_name(i: int) -> str:
    return f"blk.{i}.ffn_bundle"


def layer_key(i: int, what: str) -> str:
    return f"flashlm.layer.{i}.{what}"  # neuron_order, frequency, crc32


def row_bytes(qtype: QT, n: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one record. group 1: one neuron, [gate row | up row | down column | padding]. group G > 1:
    G neurons, [G gate rows | G up rows | d_model blocks of ffn_down (row r's block over these neurons) | padding];
    G is then the block size of down_type."""

    d_model: int
    gate_type: QT
    up_type: QT
    down_type: QT
    group: int = 1  # neurons per record

    @property
    def gate_bytes(self) -> int:
        return row_bytes(self.gate_type, self.d_model)

    @property
    def up_bytes(self) -> int:
        return row_bytes(self.up_type, self.d_model)

    @property
    def down_bytes(self) -> int:
        """A record's down part: its column (group 1), or d_model blocks of G values."""
        if self.group == 1:
            return row_bytes(self.down_type, self.d_model)
        return self.d_model * self.down_block_bytes

    @property
    def down_block_bytes(self) -> int:  # group > 1: the bytes of one of ffn_down's rows in a record
        return row_bytes(self.down_type, self.group)

    @property
    def used_bytes(self) -> int:
        return self.group * (self.gate_bytes + self.up_bytes) + self.down_bytes

    @property
    def record_bytes(self) -> int:
        return -(-self.used_bytes // RECORD_ALIGN) * RECORD_ALIGN

    def slices(self) -> tuple[slice, slice, slice]:
        """gate rows, up rows, down part of a record (group > 1: G rows each)."""
        g, u, d = self.group * self.gate_bytes, self.group * self.up_bytes, self.down_bytes
        return slice(0, g), slice(g, g + u), slice(g + u, g + u + d)

    def matrices(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block records (n, record_bytes) -> the layer's three matrices as GGUF rows, neurons in stored order:
        gate and up (n * G, row bytes), ffn_down (d_model, n * down_block_bytes). A byte shuffle, nothing
        requantized: a whole resident layer runs as three row products (quant/bundle_kernel_i8.c: dense_ffn_i8)."""
        if self.group == 1:
            raise ValueError("neuron records hold requantized down columns, not ffn_down's rows")
        n, (g, u, dn) = len(records), self.slices()
        gate = np.ascontiguousarray(records[:, g]).reshape(n * self.group, self.gate_bytes)
        up = np.ascontiguousarray(records[:, u]).reshape(n * self.group, self.up_bytes)
        down = records[:, dn].reshape(n, self.d_model, self.down_block_bytes).transpose(1, 0, 2)
        return gate, up, np.ascontiguousarray(down).reshape(self.d_model, -1)

    def to_metadata(self) -> dict[str, int]:
        meta = {"flashlm.bundle.d_model": self.d_model, "flashlm.bundle.gate_type": int(self.gate_type),
                "flashlm.bundle.up_type": int(self.up_type), "flashlm.bundle.down_type": int(self.down_type),
                "flashlm.bundle.record_bytes": self.record_bytes}
        if self.group > 1:  # absent: group 1 (files written before the block layout existed)
            meta[KEY_GROUP] = self.group
        return meta


KEY_GROUP = "flashlm.bundle.group"


def block_order(group: int, score: np.ndarray) -> np.ndarray:
    """The block layout's neuron order: groups of `group` consecutive source neurons, hottest group first (by the
    sum of its neurons' `score`, ties by index), neurons within a group in source order."""
    sums = score.reshape(-1, group).sum(1)
    groups = np.lexsort((np.arange(len(sums)), -sums))
    return (groups[:, None] * group + np.arange(group)).ravel().astype(np.uint32)


# A trained sparsity predictor per layer (`flashlm calibrate`, predictor_train.py), optional: scores for the
# layer's neurons in stored order are b_rows . (a_rows . x) + bias. a: (rank, d_model) and b: (n_ff, rank) rows in
# PREDICTOR_TYPE, bias (n_ff,) F32. They sit among the resident tensors (the resident checksum covers them).
KEY_PREDICTOR = "flashlm.predictor"  # what trained it: text, tokens, seed, epochs, held-out recall and precision
KEY_PREDICTOR_RANK = "flashlm.predictor.rank"
PREDICTOR_TYPE = QT.Q8_0


def predictor_names(i: int) -> tuple[str, str, str]:
    return f"blk.{i}.ffn_predictor_a", f"blk.{i}.ffn_predictor_b", f"blk.{i}.ffn_predictor_bias"
