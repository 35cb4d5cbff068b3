"""A validating reader of a Hugging Face model directory: config.json, *.safetensors (one or sharded), tokenizer.json.

Family-independent, like gguf_reader: an architecture file builds its ModelArgs from `config` (typed access through
`ConfigReader`) and asks for tensors by name with the shape it expects; every mismatch is a ModelFileError naming the
file and the tensor. Tensors come back as float32 numpy arrays. safetensors' numpy backend has no bfloat16, so BF16
tensors are read as raw bytes at the offsets in the file's header and widened (bf16 is the top half of a float32).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError, safe_open

from flashlm.errors import ModelFileError, UnsupportedModelError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype the safetensors package returns; BF16 is widened by hand (see _read_bf16).
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}
_MISSING = object()
# Bounds on config integers: above them a value is corrupt, not a model (the widest vocabularies are ~256k, the
# deepest models ~128 layers); they keep loops over layers and shape products finite on a hostile config.json.
MAX_DIMENSION = 1 << 24
MAX_LAYERS = 4096


def _read_json(path: str) -> object:
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # json's int() of a number too long to convert (sys.get_int_max_str_digits)
        raise ModelFileError(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None


class ConfigReader:
    """Typed access to config.json, so a bad value is a clear error and not a crash deep in the forward pass."""

    def __init__(self, config: dict, path: str):
        self.config, self.path = config, path

    def raw(self, key: str, default=_MISSING):
        if key in self.config and self.config[key] is not None:
            return self.config[key]
        if default is _MISSING:
            raise ModelFileError(f"{self.path}: missing key {key!r}")
        return default

    def int(self, key: str, default=_MISSING, minimum: int = 1, maximum: int = MAX_DIMENSION) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ModelFileError(f"{self.path}: {key} = {value!r:.40} is not an integer in [{minimum}, {maximum}]")
        return value

    def float(self, key: str, default=_MISSING) -> float:
        value = self.raw(key, default)
        # abs() <= max float: false for nan and inf, and for ints too large to be a float (no OverflowError)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
            raise ModelFileError(f"{self.path}: {key} = {value!r:.40} is not a finite number")
        return float(value)

    def bool(self, key: str, default=_MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ModelFileError(f"{self.path}: {key} = {value!r} is not true or false")
        return value

    def str(self, key: str, default=_MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ModelFileError(f"{self.path}: {key} = {value!r} is not a string")
        return value


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The file's JSON header and where its data section starts (the offsets in the header are relative to it)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path) - 8:
                raise ModelFileError(f"{path}: safetensors header length {n} (byte 0) runs past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, struct.error, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: not a safetensors file (header at byte 8: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def _shard_files(root: str) -> list[str]:
    """The weight files: those named by the sharding index when there is one, else every *.safetensors."""
    index_path = os.path.join(root, INDEX_FILE)
    if os.path.exists(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(f"{index_path}: no weight_map of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if os.path.basename(name) != name or not os.path.isfile(os.path.join(root, name)):
                raise ModelFileError(f"{index_path}: shard {name!r} is not a file in {root}")
        return [os.path.join(root, n) for n in names]
    files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if not files:
        raise ModelFileError(f"{root}: no *.safetensors weights (and no {INDEX_FILE})")
    return files


class HFModelDir:
    """One Hugging Face model directory, validated on open; tensors are read (and converted) on request."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ModelFileError(f"{path}: not a directory")
        self.path = path
        self.config_path = os.path.join(path, CONFIG_FILE)
        config = _read_json(self.config_path)
        if not isinstance(config, dict):
            raise ModelFileError(f"{self.config_path}: not a JSON object")
        self.config: dict = config
        self.cfg = ConfigReader(config, self.config_path)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[str, object] = {}
        self._headers: dict[str, tuple[dict, int]] = {}  # parsed once per file, for BF16 reads
        for file in _shard_files(path):
            self._index_file(file)

    def _index_file(self, file: str) -> None:
        try:  # safe_open checks the header against the file (offsets, sizes, overlaps)
            handle = safe_open(file, framework="numpy")
            entries = {name: handle.get_slice(name) for name in handle.keys()}
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{file}: not a valid safetensors file ({e})") from None
        self._handles[file] = handle
        for name, view in entries.items():
            if name in self.tensors:
                raise ModelFileError(f"{file}: tensor {name!r} is also in {self.tensors[name].file}")
            self.tensors[name] = TensorInfo(file, view.get_dtype(), tuple(view.get_shape()))

    @property
    def model_type(self) -> str:
        return self.cfg.str("model_type")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """The tensor's entry, checked to exist (and to have `shape` when given)."""
        info = self.tensors.get(name)
        want = f" with shape {shape}" if shape is not None else ""
        if info is None:
            raise ModelFileError(f"{self.path}: missing tensor {name!r} (expected{want or ' it'} from {CONFIG_FILE})")
        if shape is not None and info.shape != tuple(shape):
            raise ModelFileError(f"{info.file}: tensor {name!r} has shape {info.shape}, "
                                 f"expected {tuple(shape)} from {CONFIG_FILE}")
        return info

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as a float32 array (a fresh, writable copy), checked against the expected shape."""
        info = self.info(name, shape)
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(f"{info.file}: tensor {name!r} has type {info.dtype} "
                                        f"(supported: {', '.join(FLOAT_DTYPES)})")
        if info.dtype == "BF16":
            if info.file not in self._headers:
                self._headers[info.file] = _safetensors_header(info.file)
            return _read_bf16(info.file, *self._headers[info.file], name, info.shape)
        try:
            return np.asarray(self._handles[info.file].get_tensor(name), dtype=np.float32).copy()
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{info.file}: cannot read tensor {name!r} ({e})") from None

    def json_file(self, name: str, required: bool = False) -> dict | None:
        """Another JSON object of the directory (tokenizer_config.json, generation_config.json...); None when the
        file is absent and not required."""
        path = os.path.join(self.path, name)
        if not required and not os.path.exists(path):
            return None
        value = _read_json(path)
        if not isinstance(value, dict):
            raise ModelFileError(f"{path}: not a JSON object")
        return value

    def text_file(self, name: str) -> str | None:
        """A text file of the directory (chat_template.jinja, tokenizer.json), None when absent."""
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{path}: cannot read ({e})") from None

    def tokenizer(self):
        """tokenizer.json through the `tokenizers` library (the same file transformers' fast tokenizers use)."""
        from tokenizers import Tokenizer  # here, not at the top: reading weights alone does not need it

        path = os.path.join(self.path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: file not found")
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception for a malformed file
            raise ModelFileError(f"{path}: not a valid tokenizer ({e})") from None


def _read_bf16(file: str, header: dict, data_start: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    start, stop = header[name]["data_offsets"]
    count = math.prod(shape)
    if stop - start != 2 * count:
        raise ModelFileError(f"{file}: tensor {name!r} holds {stop - start} bytes, "
                             f"expected {2 * count} for BF16 {shape}")
    raw = np.fromfile(file, dtype="<u2", count=count, offset=data_start + start)
    # bf16 is the high 16 bits of a float32: shifting them up is exact
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
