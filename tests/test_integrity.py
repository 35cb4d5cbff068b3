"""A flipped byte anywhere in a .flash file is found and named (section and byte range); a truncated file fails at
load, before any generation. Most cases run on a small store (SmolLM2's metadata, 2 small layers); the load-time
checks also run on SmolLM2 converted whole."""

from __future__ import annotations

import os
import random
import shutil

import pytest

import flashlm
from flashlm.tools.convert import convert_gguf
from flashlm.errors import InvalidOptionError, ModelFileError
from flashlm.flash_store import format as fmt
from flashlm.flash_store.reader import FlashStore, verify_store
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.models import read_model
from labs.fuzz_parsers import write_small_gguf

from .test_bad_input import run_cli

SAMPLES_PER_SECTION = 4


@pytest.fixture(scope="module")
def small_flash(tmp_path_factory, smollm_path) -> str:
    d = tmp_path_factory.mktemp("integrity")
    write_small_gguf(str(d / "small.gguf"), smollm_path)
    path = str(d / "small.flash")
    convert_gguf(str(d / "small.gguf"), path, calibration_text="none")
    return path


@pytest.fixture(scope="module")
def smollm_flash(tmp_path_factory, smollm_path) -> str:
    path = str(tmp_path_factory.mktemp("integrity-full") / "smollm2.flash")
    convert_gguf(smollm_path, path, calibration_text="none")
    return path


def _regions(path: str) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of each kind of section: header (fixed part), metadata KVs, tensor infos, header padding,
    resident tensors, each bundle, padding between tensors and at the end, the stored header checksum."""
    f = GGUFFile(path)
    try:
        kv_start = min(f.key_offsets.values())
        ti_start = max(f.key_offsets.values())  # the last KV, then the tensor infos
        kv_end = ti_start + 8
        regions = {"header": [(0, 24)], "metadata": [(kv_start, kv_end)], "tensor infos": [(ti_start, f.data_offset)]}
        tensors = sorted(f.tensors.values(), key=lambda t: t.offset)
        regions["resident"] = [(t.offset, t.offset + t.nbytes) for t in tensors
                               if "ffn_bundle" not in t.name and t.name != fmt.HEADER_CRC_TENSOR]
        for t in tensors:
            if "ffn_bundle" in t.name:
                regions[t.name] = [(t.offset, t.offset + t.nbytes)]
        gaps, pos = [], f.data_offset
        for t in tensors:
            if t.offset > pos:
                gaps.append((pos, t.offset))
            pos = t.offset + t.nbytes
        gaps.append((pos, f.file_size))
        regions["padding"] = [g for g in gaps if g[1] > g[0]]
        crc = f.tensors[fmt.HEADER_CRC_TENSOR]
        regions["stored header checksum"] = [(crc.offset, crc.offset + 4)]
        return regions
    finally:
        f.close()


def _flip(src: str, dst, offset: int, xor: int = 0x40) -> str:
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ xor]))
    return str(dst)


def _rejected_at_open(path: str) -> str | None:
    """The load-time checks (GGUF parse, layout, header and resident checksums, length): the error, or None."""
    try:
        f, _, args = read_model(path)
    except ModelFileError as e:
        return str(e)
    except Exception as e:  # flashlm.errors.UnsupportedModelError and friends: still typed
        assert isinstance(e, flashlm.errors.FlashLMError), repr(e)
        return str(e)
    try:
        FlashStore(f, args.n_layers, args.n_ff, args.d_model)
    except flashlm.errors.FlashLMError as e:
        return str(e)
    finally:
        f.close()
    return None


def test_clean_store_verifies(small_flash):
    sections = verify_store(small_flash)
    names = [s.name for s in sections]
    assert all(s.ok for s in sections), sections
    assert names[:2] == ["header + metadata", "resident section"]
    assert names[2:] == [f"FFN bundle of layer {i}" for i in range(2)]
    assert not sections[0].detail  # the header is checksummed (not an older file)


@pytest.mark.parametrize("kind", ["header", "metadata", "tensor infos", "resident", "blk.0.ffn_bundle",
                                  "blk.1.ffn_bundle", "padding", "stored header checksum"])
def test_every_flipped_byte_is_found_and_named(small_flash, tmp_path, kind):
    rng = random.Random(kind)
    ranges = _regions(small_flash)[kind]
    for k in range(SAMPLES_PER_SECTION):
        start, end = rng.choice(ranges)
        offset = rng.randrange(start, end)
        bad = _flip(small_flash, tmp_path / f"{k}.flash", offset)
        at_open = _rejected_at_open(bad)
        if kind in ("header", "metadata", "tensor infos", "resident", "stored header checksum"):
            assert at_open is not None, (kind, offset)  # caught when loading, before any weight is used
            assert "byte" in at_open, at_open
        if at_open is None or kind.startswith("blk.") or kind == "padding":
            sections = verify_store(bad)
            failed = [s for s in sections if not s.ok]
            assert failed, (kind, offset)
            s = failed[0]
            assert s.start <= offset < s.end, (kind, offset, s)
            if kind.startswith("blk."):
                assert s.name == f"FFN bundle of layer {kind.split('.')[1]}"
            if kind == "padding":
                assert s.name.startswith("padding") and f"byte {offset} " in s.detail


def test_bundle_flip_fails_at_load_with_layer_and_range(smollm_flash, tmp_path):
    f = GGUFFile(smollm_flash)
    info = f.tensors[fmt.bundle_name(7)]
    f.close()
    bad = _flip(smollm_flash, tmp_path / "bad.flash", info.offset + 12345)
    with pytest.raises(ModelFileError, match=rf"layer 7, bytes {info.offset}-{info.offset + info.nbytes}"):
        flashlm.load(bad, ctx_size=128)


def test_metadata_flip_fails_at_load(smollm_flash, tmp_path):
    f = GGUFFile(smollm_flash)
    at = f.key_offsets["tokenizer.chat_template"] + 200  # inside the template text: parses fine, checksum does not
    f.close()
    bad = _flip(smollm_flash, tmp_path / "bad.flash", at, 0x01)
    with pytest.raises(ModelFileError, match=r"header \+ metadata, bytes 0-\d+: checksum mismatch"):
        flashlm.load(bad, ctx_size=128)


@pytest.mark.parametrize("cut", ["in the header", "in a bundle", "in the final padding"])
def test_truncated_store_fails_before_generation(small_flash, tmp_path, cut):
    f = GGUFFile(small_flash)
    size, last = f.file_size, max(t.offset + t.nbytes for t in f.tensors.values())
    bundle = f.tensors[fmt.bundle_name(1)]
    f.close()
    keep = {"in the header": 5000, "in a bundle": bundle.offset + 100, "in the final padding": last + 1}[cut]
    assert keep < size
    short = tmp_path / "short.flash"
    with open(small_flash, "rb") as src:
        short.write_bytes(src.read(keep))
    error = _rejected_at_open(str(short))
    assert error is not None and "truncated" in error and "byte" in error, error


def test_truncated_smollm_store_fails_at_load(smollm_flash, tmp_path):
    short = tmp_path / "short.flash"
    with open(smollm_flash, "rb") as src:
        short.write_bytes(src.read(os.path.getsize(smollm_flash) - 2000))  # only the final padding is cut
    with pytest.raises(ModelFileError, match="truncated"):
        flashlm.load(str(short), ctx_size=128)


def test_cli_verify(small_flash, tmp_path):
    ok = run_cli("verify", small_flash)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("OK ") == 4 and "all 4 sections verified" in ok.stdout
    f = GGUFFile(small_flash)
    info = f.tensors[fmt.bundle_name(1)]
    f.close()
    bad = _flip(small_flash, tmp_path / "bad.flash", info.offset + 77)
    proc = run_cli("verify", bad)
    assert proc.returncode == 1, proc
    assert "BAD FFN bundle of layer 1" in proc.stdout and f"bytes {info.offset}-{info.offset + info.nbytes}" \
        in proc.stdout
    assert proc.stderr.startswith("flashlm: error: ") and "layer 1" in proc.stderr


def test_verify_refuses_plain_gguf(smollm_path):
    with pytest.raises(InvalidOptionError, match="not a flash store"):
        verify_store(smollm_path)


def test_verify_reads_in_bounded_chunks(smollm_flash, monkeypatch):
    """No read larger than 1 MiB: memory stays bounded whatever the section sizes."""
    sizes = []
    real = os.pread

    def pread(fd, n, offset):
        sizes.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    assert all(s.ok for s in verify_store(smollm_flash))
    assert max(sizes) <= 1 << 20 and sum(sizes) >= os.path.getsize(smollm_flash) * 0.99
