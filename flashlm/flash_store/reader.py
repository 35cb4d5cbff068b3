"""Opening a .flash file: the GGUF container plus the flashlm.* layout, validated before anything is read from it.

Integrity (every section has a CRC32, format.py): on load, FlashStore checks the header checksum (magic, metadata,
tensor infos), the resident tensors' checksum and the file's length against its layout; the streaming FFN then
reads every layer's bundle once at load and checks it (runtime/streaming.py, check_layer) before generation
starts. Later per-token reads of the same records are not re-checked (a CRC per read would cost a pass over every
streamed byte); `flashlm verify FILE` (verify_file) checks every section and every padding byte with bounded
memory and names the failing section and its byte range.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from flashlm.errors import ModelFileError
from flashlm.loaders.gguf_reader import GGML_QUANT_SIZES, GGUFFile, GGMLQuantizationType as QT
from flashlm.flash_store import format as fmt



def is_flash_store(f: GGUFFile) -> bool:
    return fmt.KEY_VERSION in f.metadata


@dataclass
class LayerBundle:
    offset: int  # absolute file offset of record 0
    n_records: int
    order: np.ndarray  # (n,) stored position -> original neuron index
    crc32: int


@dataclass(frozen=True)
class Section:
    """One checksummed (or zero-filled) byte range of the file, as `flashlm verify` reports it."""

    name: str
    start: int
    end: int
    ok: bool
    detail: str = ""


VERIFY_CHUNK = 1 << 20


def crc_of_range(fd: int, start: int, end: int, crc: int = 0, path: str = "") -> int:
    """CRC32 of bytes [start, end) of an open file, read in VERIFY_CHUNK pieces with pread (bounded memory, and
    through no mapping: the pages would count in this process's RSS)."""
    for pos in range(start, end, VERIFY_CHUNK):
        n = min(VERIFY_CHUNK, end - pos)
        chunk = os.pread(fd, n, pos)
        if len(chunk) != n:
            raise ModelFileError(f"{path}: truncated: bytes {pos}-{pos + n} are past the end of the file")
        crc = zlib.crc32(chunk, crc)
    return crc


def _first_nonzero(fd: int, start: int, end: int) -> int | None:
    for pos in range(start, end, VERIFY_CHUNK):
        chunk = os.pread(fd, min(VERIFY_CHUNK, end - pos), pos)
        nz = np.flatnonzero(np.frombuffer(chunk, np.uint8))
        if len(nz):
            return pos + int(nz[0])
        if not chunk:
            return None
    return None


class FlashStore:
    """Layout of a .flash file opened as `f` (a GGUFFile). Checks versions, shapes, permutations, the file's length
    and (verify=True) the header and resident checksums."""

    def __init__(self, f: GGUFFile, n_layers: int, n_ff: int, d_model: int, verify: bool = True):
        self.file = f
        version = f.get(fmt.KEY_VERSION)
        if type(version) is not int or version != fmt.FORMAT_VERSION:
            raise ModelFileError(f"{f.path}: flash store version {version!r:.40}{f.where(fmt.KEY_VERSION)} is not "
                                 f"supported (this flashlm reads version {fmt.FORMAT_VERSION})")
        self.layout = self._layout(d_model, n_ff)
        self.record_bytes = self.layout.record_bytes
        self.group = G = self.layout.group
        self.n_records = n_records = n_ff // G  # records per layer (neurons, or blocks of G neurons)
        self.layers: list[LayerBundle] = []
        for i in range(n_layers):
            name = fmt.bundle_name(i)
            info = f.tensors.get(name)
            if info is None or info.shape != (n_records, self.layout.record_bytes):
                raise ModelFileError(f"{f.path}: bundle tensor of layer {i} is missing or has the wrong shape "
                                     f"({info.shape if info else 'absent'}{self._at(name)}, expected "
                                     f"{(n_records, self.layout.record_bytes)})")
            key = fmt.layer_key(i, "neuron_order")
            order = f.get(key)
            if not isinstance(order, np.ndarray) or order.dtype.kind not in "iu" or len(order) != n_ff or \
                    not np.array_equal(np.sort(order), np.arange(n_ff)):
                raise ModelFileError(f"{f.path}: {key}{f.where(key)} is not a permutation of {n_ff} neurons")
            if G > 1 and not (order.reshape(-1, G) - order[::G, None] == np.arange(G)).all():
                raise ModelFileError(f"{f.path}: {key}{f.where(key)} does not keep blocks of {G} neurons together")
            if info.offset % fmt.DATA_ALIGN:
                raise ModelFileError(f"{f.path}: bundle of layer {i} (data at byte {info.offset}) is not "
                                     f"{fmt.DATA_ALIGN}-aligned")
            self.layers.append(LayerBundle(info.offset, n_records, order.astype(np.int64),
                                           self._uint(fmt.layer_key(i, "crc32"), 32)))
        self.bundle_names = {fmt.bundle_name(i) for i in range(n_layers)}
        self.resident_crc = self._uint(fmt.KEY_RESIDENT_CRC, 32)
        self._check_length()
        if verify:
            self.verify_header()
            self.verify_resident()

    # -- typed metadata ----------------------------------------------------------------------------------------
    def _at(self, tensor: str) -> str:
        info = self.file.tensors.get(tensor)
        return f", data at byte {info.offset}" if info else f", absent from the header, bytes 0-{self.file.data_offset}"

    def _uint(self, key: str, bits: int = 63) -> int:
        value = self.file.get(key)
        if isinstance(value, np.integer):
            value = int(value)
        if type(value) is not int or not 0 <= value < (1 << bits):
            raise ModelFileError(f"{self.file.path}: {key} = {value!r:.40}{self.file.where(key)} is missing or "
                                 f"not an unsigned {bits}-bit integer")
        return value

    def _layout(self, d_model: int, n_ff: int) -> fmt.RecordLayout:
        f = self.file
        types = {}
        for part in ("gate", "up", "down"):
            key = f"flashlm.bundle.{part}_type"
            try:
                types[part] = QT(self._uint(key, 32))
            except ValueError:
                raise ModelFileError(f"{f.path}: {key} = {f.get(key)}{f.where(key)} is not a GGML type") from None
            along = n_ff if part == "down" and fmt.KEY_GROUP in f.metadata else d_model  # block layout: along n_ff
            if types[part] not in GGML_QUANT_SIZES or along % GGML_QUANT_SIZES[types[part]][0]:
                raise ModelFileError(f"{f.path}: {key} = {types[part].name}{f.where(key)} does not fit "
                                     f"{along} values")
        stored_d = self._uint("flashlm.bundle.d_model")
        if stored_d != d_model:
            raise ModelFileError(f"{f.path}: flashlm.bundle.d_model {stored_d}{f.where('flashlm.bundle.d_model')} "
                                 f"!= model d_model {d_model}")
        group = self._uint(fmt.KEY_GROUP, 32) if fmt.KEY_GROUP in f.metadata else 1
        if group != 1 and (group != GGML_QUANT_SIZES[types["down"]][0] or n_ff % group):
            raise ModelFileError(f"{f.path}: {fmt.KEY_GROUP} = {group}{f.where(fmt.KEY_GROUP)} is neither 1 nor the "
                                 f"block size of {types['down'].name} dividing n_ff {n_ff}")
        layout = fmt.RecordLayout(d_model, types["gate"], types["up"], types["down"], group)
        if self._uint("flashlm.bundle.record_bytes") != layout.record_bytes:
            raise ModelFileError(f"{f.path}: flashlm.bundle.record_bytes{f.where('flashlm.bundle.record_bytes')} "
                                 f"does not match the record layout ({layout.record_bytes} bytes)")
        return layout

    # -- integrity ---------------------------------------------------------------------------------------------
    def _check_length(self) -> None:
        """The writer pads the last tensor to DATA_ALIGN: a shorter file lost bytes (a longer one gained some)."""
        f = self.file
        last = max((t.offset + t.nbytes for t in f.tensors.values()), default=f.data_offset)
        end = -(-last // fmt.DATA_ALIGN) * fmt.DATA_ALIGN
        if f.file_size < end:
            raise ModelFileError(f"{f.path}: truncated: the file ends at byte {f.file_size}, its layout at byte {end}")
        if f.file_size > end:
            raise ModelFileError(f"{f.path}: {f.file_size - end} unexpected bytes after the layout's end at byte {end}")

    def resident_tensors(self):
        return [t for name, t in self.file.tensors.items()
                if name not in self.bundle_names and name != fmt.HEADER_CRC_TENSOR]

    def _open(self) -> int:
        try:
            return os.open(self.file.path, os.O_RDONLY)
        except OSError as e:
            raise ModelFileError(f"{self.file.path}: cannot open: {e.strerror}") from None

    def header_section(self, fd: int) -> Section:
        """Bytes [0, data offset) against the CRC in HEADER_CRC_TENSOR (files converted before it: not covered)."""
        f, end = self.file, self.file.data_offset
        info = f.tensors.get(fmt.HEADER_CRC_TENSOR)
        if info is None:
            return Section("header + metadata", 0, end, True, "no header checksum (converted by an older flashlm)")
        if info.ggml_type != fmt.HEADER_CRC_TYPE or info.nbytes != 4:
            return Section("header + metadata", 0, end, False, f"{fmt.HEADER_CRC_TENSOR} is not one I32")
        (stored,) = np.frombuffer(os.pread(fd, 4, info.offset), "<u4")
        if crc_of_range(fd, 0, end, path=f.path) != stored:
            return Section("header + metadata", 0, end, False,
                           f"checksum mismatch (or in the stored checksum at bytes {info.offset}-{info.offset + 4})")
        return Section("header + metadata", 0, end, True)

    def verify_header(self) -> None:
        fd = self._open()
        try:
            s = self.header_section(fd)
        finally:
            os.close(fd)
        if not s.ok:
            raise ModelFileError(f"{self.file.path}: {s.name}, bytes {s.start}-{s.end}: {s.detail} (file is corrupt)")

    def resident_section(self, fd: int) -> Section:
        tensors = self.resident_tensors()
        start = min((t.offset for t in tensors), default=0)
        end = max((t.offset + t.nbytes for t in tensors), default=0)
        crc = 0
        for t in tensors:
            crc = crc_of_range(fd, t.offset, t.offset + t.nbytes, crc, self.file.path)
        if crc != self.resident_crc:
            return Section("resident section", start, end, False,
                           f"checksum mismatch (or in {fmt.KEY_RESIDENT_CRC}{self.file.where(fmt.KEY_RESIDENT_CRC)})")
        return Section("resident section", start, end, True)

    def verify_resident(self) -> None:
        """CRC of every non-bundle tensor, read in chunks with pread: through the file's mapping, the pages would
        count in this process's RSS until released (measured: a 298 MB load peak for Gemma 3, whose 178 MB
        embedding sits in the resident section, under a 230 MB budget)."""
        fd = self._open()
        try:
            s = self.resident_section(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nor keep them in the page cache
        finally:
            os.close(fd)
        if not s.ok:
            raise ModelFileError(f"{self.file.path}: {s.name}, bytes {s.start}-{s.end}: {s.detail} (file is corrupt)")

    # -- the trained sparsity predictor (format.predictor_names), if `flashlm calibrate` stored one -------------
    @property
    def predictor_rank(self) -> int | None:
        return self._uint(fmt.KEY_PREDICTOR_RANK, 32) if fmt.KEY_PREDICTOR_RANK in self.file.metadata else None

    def predictor(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer i's predictor as copies: a rows (rank, bytes), b rows (n_ff, bytes) in PREDICTOR_TYPE, bias (n_ff,)
        float32, b and bias in stored neuron order. Raises ModelFileError when absent or mis-shaped."""
        f, rank = self.file, self.predictor_rank
        if rank is None:
            raise ModelFileError(f"{f.path}: has no sparsity predictor (train one with `flashlm calibrate "
                                 f"{os.path.basename(f.path)} --text FILE`)")
        n_ff = self.n_records * self.group
        expected = ((rank, fmt.row_bytes(fmt.PREDICTOR_TYPE, self.layout.d_model)), fmt.PREDICTOR_TYPE), \
            ((n_ff, fmt.row_bytes(fmt.PREDICTOR_TYPE, rank)), fmt.PREDICTOR_TYPE), ((n_ff * 4,), QT.F32)
        out = []
        for name, (shape, qtype) in zip(fmt.predictor_names(i), expected):
            info = f.tensors.get(name)
            data = f.tensor_bytes(name) if info is not None and info.ggml_type == qtype else None
            if data is None or data.reshape(-1).size != int(np.prod(shape)) or \
                    (qtype != QT.F32 and data.shape != shape):
                raise ModelFileError(f"{f.path}: predictor tensor {name}{self._at(name)} is missing or is not "
                                     f"{qtype.name} of {shape} bytes")
            out.append(np.array(data).reshape(shape))
        return out[0], out[1], out[2].view(np.float32)

    def active_share(self) -> float | None:
        """The mean share of each layer's neurons that fired per calibration token (the conversion's activation
        statistics; for a ReLU FFN, the neurons whose activation is not zero); None if the store has none."""
        shares = []
        for i in range(len(self.layers)):
            freq = self.file.get(fmt.layer_key(i, "frequency"))
            if not isinstance(freq, np.ndarray) or not np.isfinite(freq).all() or not freq.any():
                return None
            shares.append(float(freq.mean()))
        return float(np.mean(shares))

    def predictor_thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per layer: the predictor's score threshold for its target recall, and the share of neurons it selected
        on held-out tokens (calibration metadata)."""
        out = []
        for key in (fmt.KEY_PREDICTOR + ".threshold", fmt.KEY_PREDICTOR + ".selected"):
            value = self.file.get(key)
            if not isinstance(value, np.ndarray) or value.shape != (len(self.layers),) or \
                    not np.isfinite(value).all():
                raise ModelFileError(f"{self.file.path}: {key}{self.file.where(key)} is missing or not "
                                     f"{len(self.layers)} finite numbers (calibrate again: flashlm calibrate)")
            out.append(value.astype(np.float32))
        return out[0], out[1]

    def layer_range(self, i: int) -> tuple[int, int]:
        start = self.layers[i].offset
        return start, start + self.layers[i].n_records * self.record_bytes

    def check_layer(self, i: int, records: np.ndarray) -> None:
        """records: the layer's full bundle as read from storage."""
        if zlib.crc32(records) != self.layers[i].crc32:
            start, end = self.layer_range(i)
            raise ModelFileError(f"{self.file.path}: checksum mismatch in the FFN bundle of layer {i}, bytes "
                                 f"{start}-{end} (file is corrupt)")

    def verify_file(self, progress=None) -> list[Section]:
        """Every section's checksum and every padding byte, in file order (`flashlm verify`)."""
        f = self.file
        fd = self._open()
        try:
            sections = [self.header_section(fd), self.resident_section(fd)]
            for i, layer in enumerate(self.layers):
                start, end = self.layer_range(i)
                ok = crc_of_range(fd, start, end, path=f.path) == layer.crc32
                sections.append(Section(f"FFN bundle of layer {i}", start, end, ok, "" if ok else "checksum mismatch"))
                if progress:
                    progress(i + 1, len(self.layers))
            pos = f.data_offset
            for t in sorted(f.tensors.values(), key=lambda t: t.offset) + [None]:
                end = t.offset if t is not None else f.file_size
                bad = _first_nonzero(fd, pos, end) if end > pos else None
                if bad is not None:
                    after = "the header" if pos == f.data_offset else "a tensor"
                    sections.append(Section(f"padding before {t.name!r}" if t else "padding at the end", pos, end,
                                            False, f"byte {bad} is not zero (padding after {after})"))
                if t is not None:
                    pos = max(pos, t.offset + t.nbytes)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return sections


def verify_store(path: str, progress=None) -> list[Section]:
    """`flashlm verify`: open and validate the file (a truncated or malformed one raises ModelFileError), then check
    every section and padding byte. Raises InvalidOptionError for a GGUF that is not a flash store."""
    from flashlm.errors import InvalidOptionError
    from flashlm.models import read_model

    f, _, args = read_model(path)
    try:
        if not is_flash_store(f):
            raise InvalidOptionError(f"{path}: not a flash store (a GGUF carries no checksums; its header and "
                                     "tensor table parsed without error)")
        return FlashStore(f, args.n_layers, args.n_ff, args.d_model, verify=False).verify_file(progress)
    finally:
        f.close()
