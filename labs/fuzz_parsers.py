"""Fuzzing the three readers' validate-on-open step with mutated copies of real files.

    python -m labs.fuzz_parsers --parser gguf|flash|hf --inputs 100000 [--seed 0] [--save-findings DIR]

Seeds: a small GGUF carrying the default model's (SmolLM2) metadata with its arrays cut to 256 items and 2 layers of
SmolLM2's tensor types at small shapes, the real SmolLM2 file itself (its 1.8 MB header mutated, the tensor data
left as a sparse hole: a parse only reads the header), the small GGUF converted to a .flash, and an HF directory
(config.json written from the same metadata, random float32 safetensors, single-file and sharded with an index).
Mutations know the formats' fields: byte flips, truncation at field boundaries, counts and lengths set to huge
values, offsets past the end, misaligned and overlapping tensor ranges, wrong value types; for HF, config.json
values replaced, safetensors headers rewritten, the index pointing at missing or foreign shards.

An input passes when the reader accepts it or rejects it with a FlashLMError; anything else (IndexError,
ValueError, struct.error, MemoryError, RecursionError, a hang past --timeout-s) is a finding, printed with the
mutation that made it. "open" is what a load does before any weight is used: GGUFFile + the family's ModelArgs;
for .flash also FlashStore (layout, permutations, header and resident checksums, file size); for HF the config,
every safetensors header and every tensor the config implies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import gguf
from gguf.constants import GGMLQuantizationType as QT

from flashlm.errors import FlashLMError

VOCAB = 256  # items kept of each metadata array in the small seed
HUGE = (2**63 - 1, 2**64 - 1, 2**32 - 1, 2**32, 2**31, 2**40, 2**62, 1 << 48)


class Hang(BaseException):
    """Raised by the per-input alarm; a BaseException so a parser's `except Exception` cannot swallow it."""


@dataclass
class FuzzReport:
    parser: str
    tried: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # FlashLMError subclass name -> count
    no_offset: Counter = field(default_factory=Counter)  # GGUF / flash rejection messages naming no byte offset
    findings: list[tuple[str, str]] = field(default_factory=list)  # (mutation, error)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"parser {self.parser}: {self.tried} inputs in {self.seconds:.0f} s, {self.accepted} accepted, "
               f"{sum(self.rejected.values())} rejected, {len(self.findings)} findings"]
        out += [f"  rejected {name}: {n}" for name, n in self.rejected.most_common()]
        if self.parser != "hf":
            out.append(f"  rejections without a byte offset in the message: {sum(self.no_offset.values())}")
            out += [f"    {n} x {msg}" for msg, n in self.no_offset.most_common(5)]
        kinds = Counter(err.split(":")[0] for _, err in self.findings)
        out += [f"  finding {kind}: {n} (e.g. {next(m for m, e in self.findings if e.startswith(kind))})"
                for kind, n in kinds.most_common()]
        return out


# -- GGUF field map ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # bytes of the integer field (4 or 8)
    kind: str  # count | length | vtype | itype | n_dims | dim | ttype | toffset | value


def _pick(rng: random.Random, seq):
    """rng.choice that refuses an empty sequence before drawing: hypothesis's Random records a draw from an empty
    range and its replay then disagrees (FlakyStrategyDefinition)."""
    if not seq:
        raise IndexError("nothing to choose from")
    return rng.choice(seq)


def gguf_fields(data: bytes, max_array_items: int = 64) -> list[Field]:
    """Every integer field of a valid GGUF header: where a rewrite is interesting."""
    fields = [Field(8, 8, "count"), Field(16, 8, "count")]
    spans = []  # (type + value) of each KV
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos):
        fields.append(Field(pos, 8, "length"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        pos = string(pos)
        value_start = pos
        fields.append(Field(pos, 4, "vtype"))
        (vtype,), pos = struct.unpack_from("<I", data, pos), pos + 4
        if vtype in sizes:
            if sizes[vtype] in (4, 8):
                fields.append(Field(pos, sizes[vtype], "value"))
            pos += sizes[vtype]
        elif vtype == 8:
            pos = string(pos)
        else:
            fields += [Field(pos, 4, "itype"), Field(pos + 4, 8, "count")]
            itype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if itype == 8:
                for k in range(count):
                    if k < max_array_items:
                        pos = string(pos)
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
            else:
                pos += count * sizes[itype]
        spans.append(Field(value_start, pos - value_start, "kv"))
    for _ in range(n_tensors):
        pos = string(pos)
        fields.append(Field(pos, 4, "n_dims"))
        (n_dims,), pos = struct.unpack_from("<I", data, pos), pos + 4
        fields += [Field(pos + 8 * j, 8, "dim") for j in range(n_dims)]
        pos += 8 * n_dims
        fields += [Field(pos, 4, "ttype"), Field(pos + 4, 8, "toffset")]
        pos += 12
    return fields + spans + [Field(pos, 0, "ti_end")]


def _put(data: bytearray, f: Field, value: int) -> None:
    data[f.offset: f.offset + f.size] = (value % (1 << (8 * f.size))).to_bytes(f.size, "little")


def _get(data: bytes, f: Field) -> int:
    return int.from_bytes(data[f.offset: f.offset + f.size], "little")


def mutate_gguf(rng: random.Random, seed: bytes, fields: list[Field], header_end: int,
                alignment: int) -> tuple[bytes, str]:
    """One mutated copy of `seed` and a description of what was changed."""
    data = bytearray(seed)
    what = []
    spans = [f for f in fields if f.kind == "kv"]
    ti_end = next(f.offset for f in fields if f.kind == "ti_end")
    fields = [f for f in fields if f.kind not in ("kv", "ti_end")]
    if rng.random() < 0.2:  # one KV's value re-encoded as another type (header re-padded: tensor data still found)
        span = _pick(rng, spans)
        value, desc = _random_value(rng)
        shift = len(value) - span.size
        new_end = ti_end + shift
        pad = -new_end % alignment
        data = data[: span.offset] + value + data[span.offset + span.size: ti_end] + bytes(pad) + data[header_end:]
        header_end = new_end + pad
        fields = [Field(f.offset + shift, f.size, f.kind) if f.offset > span.offset else f for f in fields]
        what.append(f"KV at {span.offset} -> {desc}")
    for _ in range(rng.choice((0, 1, 1, 2)) if what else rng.choice((1, 1, 2, 3))):
        op = rng.random()
        if op < 0.25:  # byte flips, mostly in the header
            n = rng.choice((1, 1, 2, 8))
            for _ in range(n):
                at = rng.randrange(min(header_end, len(data)) if rng.random() < 0.85 else len(data))
                data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
            what.append(f"flip {n} byte(s) near {at}")
        elif op < 0.35:  # truncation at a field boundary (or one byte either side), or anywhere
            f = _pick(rng, fields)
            at = max(0, f.offset + rng.choice((0, 0, -1, 1, f.size)) if rng.random() < 0.8
                     else rng.randrange(len(data)))
            del data[at:]
            what.append(f"truncate at {at}")
            break
        elif op < 0.75:  # field rewrite
            f = _pick(rng, fields)
            old = _get(data, f) if f.offset + f.size <= len(data) else 0
            r = rng.random()
            if f.kind in ("vtype", "itype", "ttype", "n_dims"):
                value = rng.choice((rng.randrange(0, 45), rng.choice(HUGE), old + 1, 0))
            elif f.kind == "toffset":
                others = [_get(data, g) for g in fields if g.kind == "toffset" and g.offset + 8 <= len(data)]
                value = rng.choice((old + 1, old + alignment // 2, old + alignment, len(data), len(data) * 2,
                                    rng.choice(others) if others else 0, rng.choice(HUGE), old - alignment))
            elif r < 0.5:
                value = rng.choice(HUGE)
            else:
                value = rng.choice((old + 1, old - 1, old * 2, old + rng.randrange(1, 1 << 16), 0, len(data)))
            if f.offset + f.size <= len(data):
                _put(data, f, value)
            what.append(f"{f.kind}@{f.offset} {old}->{value % (1 << (8 * f.size))}")
        elif op < 0.85:  # delete or duplicate a run of header bytes (shifts every later field)
            at, n = rng.randrange(min(header_end, len(data))), rng.choice((1, 4, 8, 13, 100))
            if rng.random() < 0.5:
                del data[at: at + n]
                what.append(f"delete {n} at {at}")
            else:
                data[at:at] = data[at: at + n]
                what.append(f"duplicate {n} at {at}")
        else:  # splice: copy one field's bytes over another's (type ids into lengths, offsets into counts...)
            a, b = _pick(rng, fields), _pick(rng, fields)
            if max(a.offset + a.size, b.offset + b.size) <= len(data):
                _put(data, b, _get(data, a))
            what.append(f"copy {a.kind}@{a.offset} -> {b.kind}@{b.offset}")
    return bytes(data), "; ".join(what)


def _random_value(rng: random.Random) -> tuple[bytes, str]:
    """(GGUF type + value bytes, description): scalars of every type, strings, arrays of scalars or strings."""
    vtype = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 8, 8, 9, 9, 9))
    formats = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    if vtype in formats:
        fmt = formats[vtype]
        if vtype in (6, 12):
            value = rng.choice((0.0, -1.0, 1e30, float("nan"), float("inf"), 1e-30, 10000.0))
        elif vtype == 7:
            value = rng.random() < 0.5
        else:
            bits = 8 * struct.calcsize(fmt)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt[1].islower() else (0, (1 << bits) - 1)
            value = min(hi, rng.choice((lo, hi, 0, 1, 4096, rng.randint(lo, hi))))
        return struct.pack("<I", vtype) + struct.pack(fmt, value), f"type {vtype} {value!r}"
    if vtype == 8:
        text = rng.choice((b"", b"llama", b"\xff\xfe", b"x" * 300))
        return struct.pack("<IQ", 8, len(text)) + text, f"string {text[:20]!r}"
    itype = rng.choice((0, 4, 5, 6, 10, 11, 8, 9, 13))
    count = rng.choice((0, 1, 3, 128, 129))
    if itype == 8:
        body = b"".join(struct.pack("<Q", 1) + b"a" for _ in range(count))
    elif itype in formats:
        size = struct.calcsize(formats[itype])
        body = bytes(rng.getrandbits(8) for _ in range(count * size)) if rng.random() < 0.5 else \
            np.arange(count).astype(np.dtype(formats[itype])).tobytes()
    else:
        body = b""
    return struct.pack("<IIQ", 9, itype, count) + body, f"array of {count} type {itype}"


# -- seeds ---------------------------------------------------------------------------------------------------
def _tiny_tensor(rng: np.random.Generator, qtype: QT, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) random weights in qtype; a norm vector (rows == 1) as 1-D float32."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == QT.F32:
        return w.reshape(-1) if rows == 1 else w
    return gguf.quants.quantize(w * 0.05, qtype)


def write_small_gguf(path: str, src_path: str, n_layers: int = 2, d_model: int = 64, n_ff: int = 128,
                     n_heads: int = 4, n_kv_heads: int = 2) -> None:
    """SmolLM2's metadata (arrays cut to VOCAB items, sizes rewritten) and tensors of its types at small shapes."""
    from flashlm.loaders.gguf_reader import GGUFFile, StringArray

    src = GGUFFile(src_path)
    arch = src.get("general.architecture")
    w = gguf.GGUFWriter(path, arch)
    sizes = {"block_count": n_layers, "embedding_length": d_model, "feed_forward_length": n_ff,
             "attention.head_count": n_heads, "attention.head_count_kv": n_kv_heads,
             "rope.dimension_count": d_model // n_heads, "vocab_size": VOCAB}
    for key, value in src.metadata.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        vtype, item_type = src.value_types[key]
        short = key.removeprefix(f"{arch}.")
        if short in sizes:
            value = sizes[short]
        elif isinstance(value, StringArray):
            value = [value[i] for i in range(min(VOCAB, len(value)))]
        elif isinstance(value, np.ndarray):
            value = value[:VOCAB].tolist()
        w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                        None if item_type is None else gguf.GGUFValueType(item_type))
    types = {name.split(".", 2)[-2] if name.startswith("blk.") else name.split(".")[0]: t.ggml_type
             for name, t in src.tensors.items()}
    src.close()
    rng = np.random.default_rng(0)
    hd = d_model // n_heads
    shapes = {"token_embd": (VOCAB, d_model), "output_norm": (1, d_model)}
    layer = {"attn_norm": (1, d_model), "attn_q": (n_heads * hd, d_model), "attn_k": (n_kv_heads * hd, d_model),
             "attn_v": (n_kv_heads * hd, d_model), "attn_output": (d_model, n_heads * hd), "ffn_norm": (1, d_model),
             "ffn_gate": (n_ff, d_model), "ffn_up": (n_ff, d_model), "ffn_down": (d_model, n_ff)}
    tensors = [(f"{k}.weight", k, s) for k, s in shapes.items()]
    tensors += [(f"blk.{i}.{k}.weight", k, s) for i in range(n_layers) for k, s in layer.items()]
    for name, kind, (rows, cols) in tensors:
        qtype = types.get(kind, QT.F32)
        w.add_tensor(name, _tiny_tensor(rng, qtype, rows, cols), raw_dtype=None if qtype == QT.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_dir(path: str, gguf_path: str, sharded: bool) -> None:
    """config.json from the small GGUF's metadata (gguf_to_hf.hf_config), random float32 safetensors."""
    from safetensors.numpy import save_file

    from flashlm.loaders import hf_families as fam
    from flashlm.loaders.gguf_reader import GGUFFile
    from flashlm.loaders.hf_dir import ConfigReader
    from flashlm.tools.gguf_to_hf import hf_config

    f = GGUFFile(gguf_path)
    config = hf_config(f)
    f.close()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as out:
        json.dump(config, out, indent=2)
    cfg = ConfigReader(config, "config.json")
    family = fam.family_for_config(cfg)
    args = fam.HFArgs.from_config(cfg, family)
    shapes = fam.expected_shapes(args)
    rng = np.random.default_rng(0)
    tensors = {hf: rng.standard_normal(shapes[gg]).astype(np.float32) for hf, gg in fam.tensor_plan(family, args)}
    if not sharded:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(path, shard))
        weight_map.update({n: shard for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as out:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                  out, indent=2)


# -- targets -------------------------------------------------------------------------------------------------


class GGUFTarget:
    """The small SmolLM2-derived GGUF; every REAL_EVERY-th input mutates the real SmolLM2 header instead."""

    REAL_EVERY = 40

    def __init__(self, workdir: str, src_path: str):
        self.path = os.path.join(workdir, "input.gguf")
        small = os.path.join(workdir, "seed.gguf")
        write_small_gguf(small, src_path)
        self.seeds = [self._seed(open(small, "rb").read())]
        from flashlm.loaders.gguf_reader import GGUFFile

        src = GGUFFile(src_path)
        size, header_bytes = src.file_size, src.data_offset
        src.close()
        with open(src_path, "rb") as f:
            self.real = self._seed(f.read(header_bytes))
        self.real_size = size

    @staticmethod
    def _seed(data: bytes, alignment: int = 32) -> tuple[bytes, list[Field], int, int]:
        """(bytes, their fields, start of the tensor data, alignment)"""
        fields = gguf_fields(data)
        ti_end = next(f.offset for f in fields if f.kind == "ti_end")
        return data, fields, -(-ti_end // alignment) * alignment, alignment

    def make_input(self, rng: random.Random, i: int) -> str:
        use_real = i % self.REAL_EVERY == self.REAL_EVERY - 1
        data, fields, end, align = self.real if use_real else self.seeds[0]
        if use_real:
            data = data[:end]
        mutated, what = mutate_gguf(rng, data, fields, end, align)
        with open(self.path, "wb") as f:
            f.write(mutated)
            if use_real and len(mutated) >= end - 64:  # the tensor data as a hole: sizes as in the real file
                f.truncate(self.real_size + len(mutated) - end)
        return ("real: " if use_real else "") + what

    def open(self) -> None:
        from flashlm.models import read_model

        f, _, _ = read_model(self.path)
        f.close()


class FlashTarget(GGUFTarget):
    """The small GGUF converted to a .flash (4096-aligned data); mutations reach the flashlm.* layout keys."""

    def __init__(self, workdir: str, src_path: str):
        from flashlm.tools.convert import convert_gguf

        self.path = os.path.join(workdir, "input.flash")
        small = os.path.join(workdir, "seed.gguf")
        write_small_gguf(small, src_path)
        flash = os.path.join(workdir, "seed.flash")
        convert_gguf(small, flash, calibration_text="none", force=True)
        self.seeds = [self._seed(open(flash, "rb").read(), 4096)]

    def make_input(self, rng: random.Random, i: int) -> str:
        data, fields, end, align = self.seeds[0]
        mutated, what = mutate_gguf(rng, data, fields, end, align)
        with open(self.path, "wb") as f:
            f.write(mutated)
        return what

    def open(self) -> None:
        from flashlm.flash_store.reader import FlashStore
        from flashlm.models import read_model

        f, _, args = read_model(self.path)
        try:
            FlashStore(f, args.n_layers, args.n_ff, args.d_model)
        finally:
            f.close()


CONFIG_VALUES = (0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**400, 1.5, -0.0, 1e308, float("nan"), float("inf"), True, False,
                 None, "", "llama", "qwen2", "gemma3_text", "mistral", "x" * 100, [], [1, 2], {}, {"rope_type": 1},
                 {"rope_type": "llama3", "factor": "x"}, {"full_attention": [1]},
                 {"sliding_attention": {"rope_theta": "a"}}, "default", "linear")


def _json_for_mutation(raw: bytes):
    """json.loads for a mutator, refusing deep nesting up front: whether the C parser hits the recursion limit
    depends on the caller's stack depth (hypothesis replays at another depth), and a mutator's draws must not."""
    if raw.count(b"[") + raw.count(b"{") > 256:
        raise ValueError("nested too deep to mutate")
    return json.loads(raw)


class HFTarget:
    def __init__(self, workdir: str, src_path: str):
        small = os.path.join(workdir, "seed.gguf")
        write_small_gguf(small, src_path)
        self.seeds = []
        for sharded in (False, True):
            d = os.path.join(workdir, f"seed-hf-{int(sharded)}")
            write_hf_dir(d, small, sharded)
            self.seeds.append({n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))})
        self.path = os.path.join(workdir, "input-hf")

    def make_input(self, rng: random.Random, i: int) -> str:
        files = dict(self.seeds[i % 2])
        what = []
        mutators = (self._mutate_config, self._mutate_safetensors, self._mutate_index, self._mutate_bytes)
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutate = rng.choices(mutators, (35, 40, 15, 10))[0]
            try:
                what.append(mutate(rng, files))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError, struct.error):
                continue  # an earlier mutation left the file unparsable for this mutator: skip it
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        for name, data in files.items():
            if data is not None:
                with open(os.path.join(self.path, name), "wb") as f:
                    f.write(data)
        return "; ".join(what)

    @staticmethod
    def _mutate_bytes(rng: random.Random, files: dict) -> str:
        """Raw bytes of any file: a flip in its first 4 KiB (headers, config) or a truncation."""
        name = _pick(rng, sorted(files))
        data = bytearray(files[name])
        if rng.random() < 0.5 and data:
            at = rng.randrange(min(len(data), 4096))
            data[at] ^= rng.randrange(1, 256)
            what = f"{name}: flip byte {at}"
        else:
            at = rng.randrange(len(data) + 1)
            del data[at:]
            what = f"{name}: truncate at {at}"
        files[name] = bytes(data)
        return what

    @staticmethod
    def _mutate_config(rng: random.Random, files: dict) -> str:
        config = _json_for_mutation(files["config.json"])
        key = rng.choice(sorted(config) + ["rope_scaling", "sliding_window", "layer_types", "rope_parameters"])
        r = rng.random()
        if r < 0.15:
            config.pop(key, None)
            what = f"config: drop {key}"
        elif r < 0.25:
            depth = rng.choice((10, 1000, 100000))
            files["config.json"] = json.dumps(config)[:-1].encode() + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
            return f"config: nested {depth} deep"
        elif r < 0.3:
            files["config.json"] = json.dumps(config).replace("64", "6" * 5000, 1).encode()
            return "config: a 5000-digit integer"
        else:
            value = rng.choice(CONFIG_VALUES)
            config[key] = value
            what = f"config: {key} = {value!r:.40}"
        files["config.json"] = json.dumps(config).encode()
        return what

    @staticmethod
    def _mutate_safetensors(rng: random.Random, files: dict) -> str:
        name = _pick(rng, sorted(n for n in files if n.endswith(".safetensors")))
        data = files[name]
        (n,) = struct.unpack_from("<Q", data)
        header = _json_for_mutation(data[8: 8 + n])
        body = data[8 + n:]
        r = rng.random()
        if r < 0.15:  # the length field
            value = rng.choice(HUGE + (0, 1, n - 1, n + 1, len(data)))
            files[name] = struct.pack("<Q", value % 2**64) + data[8:]
            return f"{name}: header length {n} -> {value}"
        tensor = _pick(rng, sorted(k for k in header if k != "__metadata__"))
        entry = header[tensor]
        if r < 0.4:
            start, stop = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(([start, stop + 4], [start + 1, stop + 1], [stop, start],
                                                [0, stop - start], [start, 2**64 - 1], [start, len(body) + 8],
                                                [-1, stop], [start, "x"], [start]))
            what = f"{name}: {tensor} data_offsets -> {entry['data_offsets']}"
        elif r < 0.6:
            entry["dtype"] = rng.choice(("BF16", "F16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "Q4", 7, None))
            what = f"{name}: {tensor} dtype -> {entry['dtype']}"
        elif r < 0.8:
            shape = entry["shape"]
            entry["shape"] = rng.choice(([2**40] + shape[1:], shape[::-1], shape + [1], [], [-1] + shape[1:],
                                         [0] * len(shape), [2**62, 2**62], ["a"]))
            what = f"{name}: {tensor} shape -> {entry['shape']}"
        elif r < 0.9:
            header[rng.choice(("model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight", "x"))] = entry
            what = f"{name}: duplicate entry of {tensor}"
        else:
            header[tensor] = rng.choice((None, 1, "x", [], {"dtype": "F32"}))
            what = f"{name}: {tensor} entry -> {header[tensor]!r}"
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        files[name] = struct.pack("<Q", len(raw)) + raw + body
        return what

    @staticmethod
    def _mutate_index(rng: random.Random, files: dict) -> str:
        index_name = "model.safetensors.index.json"
        index = _json_for_mutation(files[index_name]) if index_name in files else {"weight_map": {}}
        shards = sorted(n for n in files if n.endswith(".safetensors"))
        r = rng.random()
        wm = index.setdefault("weight_map", {})
        if r < 0.3 and shards:
            del files[rng.choice(shards)]
            files[index_name] = json.dumps(index).encode()
            return "a shard removed"
        if r < 0.6 and wm:
            name = rng.choice(sorted(wm))
            wm[name] = rng.choice(("missing.safetensors", "../config.json", "/etc/passwd", "config.json", "", 5,
                                   None, "model-00001-of-00002.safetensors"))
            what = f"index: {name} -> {wm[name]!r}"
        else:
            index["weight_map"] = rng.choice(([], "x", None, {"a": []}, {}))
            what = f"index: weight_map -> {index['weight_map']!r}"
        files[index_name] = json.dumps(index).encode()
        return what

    def open(self) -> None:
        from flashlm.loaders import hf_families as fam
        from flashlm.loaders.hf_dir import HFModelDir

        hf = HFModelDir(self.path)
        family = fam.family_for_config(hf.cfg)
        args = fam.HFArgs.from_config(hf.cfg, family)
        shapes = fam.expected_shapes(args)
        for hf_name, gguf_name in fam.tensor_plan(family, args):
            hf.info(hf_name, shapes[gguf_name])


TARGETS = {"gguf": GGUFTarget, "flash": FlashTarget, "hf": HFTarget}


@contextlib.contextmanager
def _alarm(seconds: float):
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fuzz(parser: str, n_inputs: int, seed: int = 0, src_path: str | None = None, timeout_s: float = 5.0,
         save_dir: str | None = None, progress=None) -> FuzzReport:
    """Run `n_inputs` mutated inputs through one parser's open step, in this process."""
    if src_path is None:
        from flashlm.loaders.default_model import default_model_path

        src_path = default_model_path()
    report = FuzzReport(parser)
    rng = random.Random(seed)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="flashlm-fuzz-", dir=base) as workdir:
        target = TARGETS[parser](workdir, src_path)
        t0 = time.perf_counter()
        with _alarm(timeout_s):
            for i in range(n_inputs):
                what = target.make_input(rng, i)
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    target.open()
                    report.accepted += 1
                except FlashLMError as e:
                    report.rejected[type(e).__name__] += 1
                    if parser != "hf" and "byte" not in str(e):
                        report.no_offset[re.sub(r"\d+", "N", str(e).replace(target.path, "FILE"))[:100]] += 1
                except (Exception, Hang) as e:  # a finding: record it, with where it came from
                    frame = traceback.extract_tb(e.__traceback__)[-1]
                    err = f"{type(e).__name__}: {str(e)[:120]} [{os.path.basename(frame.filename)}:{frame.lineno}]"
                    report.findings.append((what, err))
                    if save_dir:
                        _save(save_dir, parser, len(report.findings), target, what, err)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                report.tried += 1
                if progress and (i + 1) % 1000 == 0:
                    progress(report, time.perf_counter() - t0)
        report.seconds = time.perf_counter() - t0
    return report


def _save(save_dir: str, parser: str, k: int, target, what: str, err: str) -> None:
    dst = os.path.join(save_dir, f"{parser}-{k:04d}")
    if os.path.isdir(target.path):
        shutil.copytree(target.path, dst, dirs_exist_ok=True)
    else:
        os.makedirs(save_dir, exist_ok=True)
        shutil.copyfile(target.path, dst + os.path.splitext(target.path)[1])
    with open(dst + ".txt", "w") as f:
        f.write(f"{what}\n{err}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parser", choices=sorted(TARGETS), required=True)
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="the real GGUF the seeds come from (default: the default model)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="per input; longer is a hang (a finding)")
    p.add_argument("--memory-limit-mb", type=int, default=2048,
                   help="heap (RLIMIT_DATA) above the start: an unbounded allocation fails as MemoryError")
    p.add_argument("--save-findings", metavar="DIR")
    a = p.parse_args(argv)
    if a.memory_limit_mb:
        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        limit = used + (a.memory_limit_mb << 20) + (1 << 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))

    def progress(r: FuzzReport, s: float) -> None:
        print(f"  {r.tried} inputs, {s:.0f} s, {len(r.findings)} findings", file=sys.stderr, flush=True)

    report = fuzz(a.parser, a.inputs, a.seed, a.model, a.timeout_s, a.save_findings, progress)
    print("\n".join(report.lines()))
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
