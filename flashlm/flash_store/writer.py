"""Writing a flash store (GGUF -> .flash; layout in format.py): row-column bundling lives here.

Two passes over the FFN: the first builds each layer's bundle to checksum it (checksums go in the header, which
is written before the data), the second builds it again and writes it, so memory holds one layer at a time. The
output goes to a temporary file beside the target and is renamed into place only when complete: an interrupted or
failed conversion leaves no output file, and one killed outright leaves a temporary that the next conversion to the
same target removes (atomic_file.py). The source is only ever opened read-only.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import gguf

from flashlm.atomic_file import discard, finish_gguf, remove_stale_temps, temp_path
from flashlm.errors import InvalidOptionError, UnsupportedModelError
from flashlm.loaders.gguf_reader import GGML_QUANT_SIZES, GGUFFile, GGMLQuantizationType as QT, StringArray
from flashlm.models import read_model
from flashlm.loaders.keys import KEY_FFN_ACTIVATION
from flashlm.quant.formats import codec_for, dequantize
from flashlm.flash_store import format as fmt
from flashlm.flash_store.calibrate import Calibration


@dataclass
class ConvertReport:
    path: str
    n_layers: int
    record_bytes: int
    resident_bytes: int
    bundle_bytes: int
    down_rel_rms_error: float  # RMS error of the requantized down columns over RMS of the source weights
    calibration: str
    group: int = 1  # neurons per record
    down_type: str = "Q8_0"


def _ffn_name(i: int, key: str) -> str:
    return f"blk.{i}.{key}.weight"


BUNDLES = ("auto", "neuron", "block")
BLOCK_DOWN_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)  # the CPU kernel's
# "auto" takes the block layout where every backend runs it (the GPU's down_block kernel reads these) and --sparsity
# is not the point (a dense gated FFN reads whole records anyway). SmolLM2 Q4_1: FFN 61.9 -> 49.8 MB, no
# requantization error, CPU FFN 6.0-6.6 -> 4.2-4.5 ms per token (commit message of the block layout).
AUTO_BLOCK_DOWN_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q8_0)
# Other ffn_down types are requantized to Q8_0 blocks of this many neurons. Gemma 3 270M Q4_K_M (ffn_down Q4_K and
# Q6_K) as neuron records ran a 128-token prompt at 0.53x llama.cpp and busy decode at 0.56x (its down columns
# computed in float); as Q8_0 blocks a resident layer is three int8 row products, as in the GGUF itself.
REQUANT_BLOCK_GROUP = 32


def _layout(f: GGUFFile, n_layers: int, d_model: int, n_ff: int, bundle: str = "neuron") -> fmt.RecordLayout:
    types = {(f.tensors[_ffn_name(i, "ffn_gate")].ggml_type, f.tensors[_ffn_name(i, "ffn_up")].ggml_type)
             for i in range(n_layers)}
    if len(types) != 1:
        raise UnsupportedModelError(f"{f.path}: FFN gate/up formats differ between layers; not supported yet")
    gate_type, up_type = types.pop()
    for qt, name in ((gate_type, "ffn_gate"), (up_type, "ffn_up")):
        codec_for(qt, name)
    if bundle not in BUNDLES:
        raise InvalidOptionError(f"--bundle must be one of {', '.join(BUNDLES)}, got {bundle!r}")
    down_types = {QT(f.tensors[_ffn_name(i, "ffn_down")].ggml_type) for i in range(n_layers)}
    requantize = False  # ffn_down requantized to Q8_0 blocks of REQUANT_BLOCK_GROUP neurons
    if bundle == "auto":  # a ReLU FFN is sparse: per-neuron records, which --sparsity needs
        if f.get(KEY_FFN_ACTIVATION, "silu") == "relu" or n_ff % REQUANT_BLOCK_GROUP:
            bundle = "neuron"
        else:  # K-quants' blocks of 256 neurons: 8 records per layer of Gemma 3, too coarse to stream in part
            bundle, requantize = "block", len(down_types) != 1 or not down_types <= set(AUTO_BLOCK_DOWN_TYPES)
    if bundle == "neuron":
        return fmt.RecordLayout(d_model, gate_type, up_type, fmt.DOWN_TYPE)
    if len(down_types) != 1 or requantize:  # e.g. Q4_K_M: Q4_K and Q6_K layers
        if n_ff % REQUANT_BLOCK_GROUP:
            types = ", ".join(sorted(t.name for t in down_types))
            raise UnsupportedModelError(f"{f.path}: --bundle block: ffn_down is {types} and n_ff {n_ff} is not a "
                                        f"multiple of {REQUANT_BLOCK_GROUP}; use --bundle neuron")
        return fmt.RecordLayout(d_model, gate_type, up_type, fmt.DOWN_TYPE, REQUANT_BLOCK_GROUP)
    down_type = QT(down_types.pop())
    if down_type not in BLOCK_DOWN_TYPES:
        raise UnsupportedModelError(f"{f.path}: --bundle block: no kernel for ffn_down in {down_type.name}; "
                                    f"use --bundle neuron")
    group = GGML_QUANT_SIZES[down_type][0]
    if n_ff % group:
        raise UnsupportedModelError(f"{f.path}: --bundle block: n_ff {n_ff} is not a multiple of {down_type.name}'s "
                                    f"block of {group}; use --bundle neuron")
    return fmt.RecordLayout(d_model, gate_type, up_type, down_type, group)


def build_bundle(f: GGUFFile, i: int, layout: fmt.RecordLayout, order: np.ndarray) -> tuple[np.ndarray, float]:
    """(records, record_bytes) uint8 records in `order`, and the relative RMS error of the down requantization
    (0 for the block layout, which copies the source bytes)."""
    gate = f.tensor_bytes(_ffn_name(i, "ffn_gate"))  # (n_ff, gate_bytes)
    up = f.tensor_bytes(_ffn_name(i, "ffn_up"))
    if layout.group > 1:
        return _build_blocks(f, i, layout, order, gate, up)
    down_info = f.tensors[_ffn_name(i, "ffn_down")]
    down_t = dequantize(f.tensor_bytes(down_info.name), down_info.ggml_type).T  # (n_ff, d_model), column i = row i
    down_q = gguf.quants.quantize(np.ascontiguousarray(down_t, dtype=np.float32), layout.down_type)
    err = dequantize(down_q, layout.down_type) - down_t
    rel_err = float(np.sqrt((err ** 2).mean() / max((down_t ** 2).mean(), 1e-30)))
    records = np.zeros((len(order), layout.record_bytes), np.uint8)
    g, u, d = layout.slices()
    records[:, g] = gate[order]
    records[:, u] = up[order]
    records[:, d] = down_q[order]
    return records, rel_err


def _build_blocks(f: GGUFFile, i: int, layout: fmt.RecordLayout, order: np.ndarray, gate, up
                  ) -> tuple[np.ndarray, float]:
    """Block layout: record k holds the G neurons order[k*G:(k+1)*G] (consecutive in the source, block_order).
    ffn_down's blocks are the source bytes, or requantized where its type is not the layout's (and the error)."""
    G, d_model = layout.group, layout.d_model
    groups = order[::G] // G
    info = f.tensors[_ffn_name(i, "ffn_down")]
    down, rel_err = f.tensor_bytes(info.name), 0.0
    if QT(info.ggml_type) != layout.down_type:
        values = dequantize(down, info.ggml_type).reshape(d_model, -1)
        down = gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), layout.down_type)
        err = dequantize(down, layout.down_type).reshape(values.shape) - values
        rel_err = float(np.sqrt((err ** 2).mean() / max((values ** 2).mean(), 1e-30)))
    down = down.reshape(d_model, -1, layout.down_block_bytes)  # (d, n_ff/G, block bytes)
    records = np.zeros((len(groups), layout.record_bytes), np.uint8)
    g, u, dn = layout.slices()
    records[:, g] = gate.reshape(-1, G * layout.gate_bytes)[groups]
    records[:, u] = up.reshape(-1, G * layout.up_bytes)[groups]
    records[:, dn] = down[:, groups, :].transpose(1, 0, 2).reshape(len(groups), -1)
    return records, rel_err


def copy_metadata(w: gguf.GGUFWriter, f: GGUFFile, keys=None, skip=lambda key: key.startswith("flashlm.")) -> None:
    """Copy metadata values with their GGUF types (all but architecture, alignment and the keys `skip` names
    (flashlm.*), or only `keys`)."""
    for key, value in f.metadata.items():
        if keys is not None and key not in keys:
            continue
        if key in ("general.architecture", "general.alignment") or skip(key):
            continue
        vtype, item_type = f.value_types[key]
        if isinstance(value, StringArray):
            value = list(value)
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                        None if item_type is None else gguf.GGUFValueType(item_type))


def _progress(done: int, total: int, what: str) -> None:
    if sys.stderr.isatty() or os.environ.get("FLASHLM_PROGRESS"):
        bar = "#" * int(30 * done / total)
        print(f"\r{what:<12} [{bar:<30}] {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def check_destination(dst: str, force: bool) -> None:
    """Refuse an existing output (unless force) or a directory, before any work; remove a killed run's temporary."""
    remove_stale_temps(dst)
    if os.path.exists(dst) and not force:
        raise InvalidOptionError(f"{dst}: already exists (use --force to overwrite)")
    if os.path.isdir(dst):
        raise InvalidOptionError(f"{dst}: is a directory")


def write_store(src: str, dst: str, calibration: Calibration | None, force: bool = False,
                bundle: str = "auto") -> ConvertReport:
    """GGUF src -> flash store dst, each layer's neurons in calibration's order (None: the source order)."""
    check_destination(dst, force)
    f, family, args = read_model(src)
    try:
        if any(_ffn_name(i, k) not in f.tensors for i in range(args.n_layers) for k in fmt.FFN_KEYS):
            raise UnsupportedModelError(f"{src}: not a gated FFN model with ffn_gate/ffn_up/ffn_down per layer")
        layout = _layout(f, args.n_layers, args.d_model, args.n_ff, bundle)
        if calibration is None:
            zeros = np.zeros((args.n_layers, args.n_ff), np.float32)
            calibration = Calibration(zeros, zeros, "none (source neuron order)")
        orders = [calibration.order(i) if layout.group == 1 else
                  fmt.block_order(layout.group, calibration.frequency[i])
                  for i in range(args.n_layers)]
        return _write(f, args, layout, orders, calibration, src, dst)
    finally:
        f.close()


def _header_crc(w: gguf.GGUFWriter, tmp: str) -> int:
    """CRC32 of the header as written (magic to tensor infos) and the zero padding up to the tensor data: read back
    from the file, so it covers exactly the bytes a reader will see (format.HEADER_CRC_TENSOR)."""
    w.fout[0].flush()
    with open(tmp, "rb") as f:
        header = f.read()
    return zlib.crc32(bytes(-len(header) % fmt.DATA_ALIGN), zlib.crc32(header))


def _write(f, args, layout, orders, calibration, src, dst) -> ConvertReport:
    ffn = {_ffn_name(i, k) for i in range(args.n_layers) for k in fmt.FFN_KEYS}
    resident = [t for name, t in f.tensors.items() if name not in ffn]
    crcs, errors = [], []
    for i in range(args.n_layers):  # pass 1: checksums
        records, err = build_bundle(f, i, layout, orders[i])
        crcs.append(zlib.crc32(records))
        errors.append(err)
        _progress(i + 1, args.n_layers, "bundling")
    resident_crc = 0
    for t in resident:
        resident_crc = zlib.crc32(f.tensor_bytes(t.name), resident_crc)

    tmp = temp_path(dst)
    try:
        w = gguf.GGUFWriter(tmp, args.arch)
        w.data_alignment = fmt.DATA_ALIGN
        w.add_custom_alignment(fmt.DATA_ALIGN)
        copy_metadata(w, f, skip=lambda key: key.startswith("flashlm.") and key != KEY_FFN_ACTIVATION)
        w.add_uint32(fmt.KEY_VERSION, fmt.FORMAT_VERSION)
        w.add_string(fmt.KEY_SOURCE, os.path.basename(src))
        w.add_string(fmt.KEY_CALIBRATION, calibration.description)
        w.add_uint32(fmt.KEY_RESIDENT_CRC, resident_crc)
        for key, value in layout.to_metadata().items():
            w.add_uint32(key, value)
        for i in range(args.n_layers):
            w.add_array(fmt.layer_key(i, "neuron_order"), orders[i].tolist())
            w.add_array(fmt.layer_key(i, "frequency"), calibration.frequency[i][orders[i]].tolist())
            w.add_uint32(fmt.layer_key(i, "crc32"), crcs[i])
        for t in resident:
            w.add_tensor_info(t.name, f.tensor_bytes(t.name).shape, np.dtype(np.uint8), t.nbytes, t.ggml_type)
        n_records = len(orders[0]) // layout.group
        for i in range(args.n_layers):
            w.add_tensor_info(fmt.bundle_name(i), (n_records, layout.record_bytes), np.dtype(np.int8),
                              n_records * layout.record_bytes, fmt.BUNDLE_TYPE)
        w.add_tensor_info(fmt.HEADER_CRC_TENSOR, (1,), np.dtype(np.int32), 4, fmt.HEADER_CRC_TYPE)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        header_crc = _header_crc(w, tmp)
        for t in resident:
            w.write_tensor_data(f.tensor_bytes(t.name))
        for i in range(args.n_layers):  # pass 2: write
            records, _ = build_bundle(f, i, layout, orders[i])
            w.write_tensor_data(records.view(np.int8))
            _progress(i + 1, args.n_layers, "writing")
        w.write_tensor_data(np.array([header_crc], np.uint32).view(np.int32))
        finish_gguf(w, tmp, dst)
    except BaseException:
        discard(tmp)
        raise
    return ConvertReport(dst, args.n_layers, layout.record_bytes, sum(t.nbytes for t in resident),
                         args.n_layers * n_records * layout.record_bytes, float(np.sqrt(np.mean(np.square(errors)))),
                         calibration.description, layout.group, QT(layout.down_type).name)


def add_resident_tensors(path: str, tensors: list[tuple[str, np.ndarray, QT]], metadata: dict[str, tuple],
                         dst: str | None = None, replace=lambda name: False) -> None:
    """Rewrite the .flash at `path` (to `dst`, default in place, atomically) with more resident tensors and keys.

    tensors: (name, raw bytes (rows, row bytes) uint8, GGML type), placed after the existing resident tensors;
    metadata: key -> (value, GGUFValueType[, item type]). Existing tensors and keys that `replace` names (or that
    are named as new ones) are dropped. Everything else is copied byte for byte: the bundles, their
    checksums, the neuron orders; the resident and header checksums are computed again."""
    dst = dst or path
    remove_stale_temps(dst)
    f = GGUFFile(path)
    try:
        new_names = {name for name, _, _ in tensors}
        drop = lambda key: key in new_names or key in metadata or key == fmt.KEY_RESIDENT_CRC or replace(key)  # noqa
        bundles = [t for name, t in f.tensors.items() if name.endswith(".ffn_bundle")]
        kept = {t.name for t in bundles} | {fmt.HEADER_CRC_TENSOR}  # written after the resident section
        resident = [(name, f.tensor_bytes(name), QT(t.ggml_type)) for name, t in f.tensors.items()
                    if name not in kept and not drop(name)] + list(tensors)
        resident_crc = 0
        for _, data, _ in resident:
            resident_crc = zlib.crc32(np.ascontiguousarray(data), resident_crc)
        tmp = temp_path(dst)
        try:
            w = gguf.GGUFWriter(tmp, f.get("general.architecture"))
            w.data_alignment = fmt.DATA_ALIGN
            w.add_custom_alignment(fmt.DATA_ALIGN)
            copy_metadata(w, f, skip=drop)
            w.add_uint32(fmt.KEY_RESIDENT_CRC, resident_crc)
            for key, (value, *types) in metadata.items():
                w.add_key_value(key, value, *types)
            for name, data, qtype in resident:
                w.add_tensor_info(name, data.shape, np.dtype(np.uint8), data.nbytes, qtype)
            for t in bundles:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.int8), t.nbytes, fmt.BUNDLE_TYPE)
            w.add_tensor_info(fmt.HEADER_CRC_TENSOR, (1,), np.dtype(np.int32), 4, fmt.HEADER_CRC_TYPE)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            header_crc = _header_crc(w, tmp)
            for _, data, _ in resident:
                w.write_tensor_data(np.ascontiguousarray(data))
            for t in bundles:
                w.write_tensor_data(f.tensor_bytes(t.name).view(np.int8))
            w.write_tensor_data(np.array([header_crc], np.uint32).view(np.int32))
            f.close()  # the source's map, before the rename replaces it
            finish_gguf(w, tmp, dst)
        except BaseException:
            discard(tmp)
            raise
    finally:
        f.close()
