"""A validating, zero-copy GGUF reader.

gguf-py's GGUFReader builds a numpy object per field and takes ~9 s / 190 MB on SmolLM2's 49k-token vocabulary
(measured on this machine); flashlm needs the metadata scalars and tensor views only, since tokenization goes
through llama.cpp. So this reader parses the header itself, keeps array values lazy (string arrays are decoded
only when asked for) and returns tensors as views of one read-only mmap. Type ids and block sizes come from gguf-py.

Every count, length and offset is checked against the file size before use, so a truncated or hostile file
raises ModelFileError naming the problem instead of reading out of bounds or allocating without limit.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from flashlm._bare_import import bare_import
from flashlm.errors import ModelFileError

_gguf = bare_import("gguf.constants")  # not `import gguf` (yaml, metadata, writer): see _bare_import
GGML_QUANT_SIZES, GGMLQuantizationType = _gguf.GGML_QUANT_SIZES, _gguf.GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# GGUF value type id -> (struct format, numpy dtype); 8 = string and 9 = array are handled apart.
_SCALAR_TYPES = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


class StringArray:
    """A GGUF array of strings, decoded on first access (vocabularies hold ~50k-260k of them)."""

    def __init__(self, buf: memoryview, offset: int, count: int):
        self._buf, self._offset, self._count = buf, offset, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def _decode(self) -> list[str]:
        if self._items is None:
            items, pos = [], self._offset
            for _ in range(self._count):
                (n,) = struct.unpack_from("<Q", self._buf, pos)
                items.append(bytes(self._buf[pos + 8: pos + 8 + n]).decode("utf-8", errors="replace"))
                pos += 8 + n
            self._items = items
        return self._items

    def __getitem__(self, i):
        return self._decode()[i]

    def __iter__(self):
        return iter(self._decode())


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in numpy order (slowest dimension first), unlike GGUF's ne[]."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo) and `tensor_bytes(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelFileError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise ModelFileError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ModelFileError(f"{self.path}: is a directory, not a GGUF file")
            self.file_size = st.st_size
            if self.file_size < 24:
                raise ModelFileError(f"{self.path}: not a GGUF file (only {self.file_size} bytes)")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot map: {e.strerror}") from None
        finally:
            os.close(fd)
        self._buf = memoryview(self._mmap)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------------------------------
    def _need(self, pos: int, n: int, what: str) -> None:
        if n < 0 or pos + n > self.file_size:
            raise ModelFileError(f"{self.path}: truncated GGUF ({what} at byte {pos} needs {n} bytes, "
                                 f"file has {self.file_size})")

    def _read(self, fmt: str, pos: int, what: str):
        size = struct.calcsize(fmt)
        self._need(pos, size, what)
        return struct.unpack_from(fmt, self._buf, pos), pos + size

    def _read_string(self, pos: int, what: str) -> tuple[str, int]:
        (n,), pos = self._read("<Q", pos, what)
        self._need(pos, n, what)
        try:
            return bytes(self._buf[pos: pos + n]).decode("utf-8"), pos + n
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: {what} at byte {pos} is not valid UTF-8") from None

    def _read_value(self, vtype: int, pos: int, what: str):
        if vtype in _SCALAR_TYPES:
            fmt, _ = _SCALAR_TYPES[vtype]
            (v,), pos = self._read(fmt, pos, what)
            return v, pos
        if vtype == _STRING:
            return self._read_string(pos, what)
        if vtype == _ARRAY:
            start = pos
            (itype, count), pos = self._read("<IQ", pos, what)
            if itype in _SCALAR_TYPES:
                _, dtype = _SCALAR_TYPES[itype]
                n = count * np.dtype(dtype).itemsize
                self._need(pos, n, f"{what} ({count} items)")
                return np.frombuffer(self._buf, dtype=dtype, count=count, offset=pos), pos + n
            if itype == _STRING:
                items = pos
                self._need(pos, count * 8, f"{what} ({count} strings)")  # each string takes >= 8 bytes
                for _ in range(count):  # walk the lengths to find the end; strings are decoded lazily
                    (n,), pos = self._read("<Q", pos, what)
                    self._need(pos, n, what)
                    pos += n
                return StringArray(self._buf, items, count), pos
            raise ModelFileError(f"{self.path}: {what} at byte {start}: unsupported GGUF array item type {itype}")
        raise ModelFileError(f"{self.path}: {what} at byte {pos}: unknown GGUF value type {vtype}")

    def _parse(self) -> None:
        magic = bytes(self._buf[:4])
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r} at byte 0, expected b'GGUF')")
        (version,), pos = self._read("<I", 4, "version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
                raise ModelFileError(f"{self.path}: big-endian GGUF is not supported (version at byte 4)")
            raise ModelFileError(f"{self.path}: unsupported GGUF version {version} at byte 4 (supported: 2, 3)")
        self.version = version
        (n_tensors, n_kv), pos = self._read("<QQ", pos, "header counts")
        # Each KV takes >= 13 bytes and each tensor info >= 28: bound the counts before looping on them.
        if n_kv * 13 > self.file_size or n_tensors * 28 > self.file_size:
            raise ModelFileError(f"{self.path}: truncated or corrupt GGUF (header counts at byte 8 claim {n_kv} keys "
                                 f"and {n_tensors} tensors in a {self.file_size}-byte file)")
        self.metadata: dict[str, object] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}  # key -> (GGUF value type, array item type)
        self.key_offsets: dict[str, int] = {}  # key -> byte offset of its KV entry, for error messages
        for i in range(n_kv):
            start = pos
            key, pos = self._read_string(pos, f"key #{i}")
            (vtype,), pos = self._read("<I", pos, f"type of {key!r}")
            item_type = struct.unpack_from("<I", self._buf, pos)[0] if vtype == _ARRAY and pos + 4 <= self.file_size \
                else None
            value, pos = self._read_value(vtype, pos, f"value of {key!r}")
            if key in self.metadata:
                raise ModelFileError(f"{self.path}: duplicate metadata key {key!r} at byte {start}")
            self.metadata[key] = value
            self.value_types[key] = (vtype, item_type)
            self.key_offsets[key] = start
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFileError(f"{self.path}: general.alignment {alignment!r}{self.where('general.alignment')} "
                                 "is not a power of two")
        self.alignment = alignment
        infos = []
        for i in range(n_tensors):
            start = pos
            name, pos = self._read_string(pos, f"tensor #{i} name")
            (n_dims,), pos = self._read("<I", pos, f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise ModelFileError(f"{self.path}: tensor {name!r} (info at byte {start}) has {n_dims} dimensions "
                                     f"(max {GGML_MAX_DIMS})")
            ne, pos = self._read(f"<{n_dims}Q", pos, f"tensor {name!r} dims")
            (type_id, offset), pos = self._read("<IQ", pos, f"tensor {name!r} type/offset")
            infos.append((name, ne, type_id, offset, start))
        self.data_offset = -(-pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset, start in infos:
            self.tensors[name] = self._tensor_info(name, ne, type_id, offset, start)
        self._check_overlaps()

    def where(self, key: str) -> str:
        """Where a key is, for error messages: ' (metadata at byte N)', or that the header lacks it."""
        if key in self.key_offsets:
            return f" (metadata at byte {self.key_offsets[key]})"
        return f" (absent from the header, bytes 0-{getattr(self, 'data_offset', '?')})"

    def _tensor_info(self, name: str, ne: tuple[int, ...], type_id: int, offset: int, at: int) -> TensorInfo:
        where = f"tensor {name!r} (info at byte {at})"
        if name in self.tensors:
            raise ModelFileError(f"{self.path}: duplicate {where}")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelFileError(f"{self.path}: {where} has unknown type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in ne) or ne[0] % block:
            raise ModelFileError(f"{self.path}: {where} has bad dims {list(ne)} for {qtype.name}")
        if offset % self.alignment:
            raise ModelFileError(f"{self.path}: {where}: data offset {offset} is not {self.alignment}-aligned")
        n_elems = math.prod(ne)
        nbytes = n_elems // block * type_size
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            raise ModelFileError(f"{self.path}: truncated GGUF ({where} runs from byte {start} to {start + nbytes}, "
                                 f"file has {self.file_size})")
        return TensorInfo(name, qtype, tuple(int(d) for d in reversed(ne)), start, nbytes)

    def _check_overlaps(self) -> None:
        end, prev = self.data_offset, None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if t.offset < end and t.nbytes:
                raise ModelFileError(f"{self.path}: tensor {t.name!r} (data at byte {t.offset}) overlaps "
                                     f"tensor {prev!r} (ends at byte {end})")
            if t.nbytes:
                end, prev = t.offset + t.nbytes, t.name

    # -- access ----------------------------------------------------------------------------------------
    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view, shaped (rows..., bytes per row)."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block * type_size
        arr = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return arr.reshape(*info.shape[:-1], row_bytes)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            try:
                self._buf.release()
                self._mmap.close()
            except BufferError:
                pass  # live views still point into the map; it closes when they are gone
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
