"""Bad input: a one-line error naming the problem (and the file), exit status 2 for usage errors and 1 for bad files,
a typed exception in the API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gguf.constants import GGMLQuantizationType as QT

import flashlm
from flashlm.errors import (ContextLengthError, InvalidOptionError, ModelFileError, UnsupportedModelError)
from flashlm.loaders.gguf_reader import GGUFFile

from .ggufs import write_tiny_llama


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlm.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flashlm: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, smollm_path):
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    with open(smollm_path, "rb") as f:
        head = f.read(5_000_000)
    truncated = d / "truncated.gguf"
    truncated.write_bytes(head)
    header_only = d / "header_only.gguf"
    header_only.write_bytes(head[:20_000])
    arch = d / "mamba.gguf"
    write_tiny_llama(arch, smollm_path, arch="mamba")
    ktype = d / "q2k.gguf"
    write_tiny_llama(ktype, smollm_path, qtype=QT.Q2_K, d_model=256, n_heads=4, n_ff=256)
    return {"text": str(text), "truncated": str(truncated), "header_only": str(header_only), "arch": str(arch),
            "ktype": str(ktype), "missing": str(d / "nope.gguf"), "dir": str(d)}


CASES = [  # (file key, exception, words the message must contain)
    ("missing", ModelFileError, ["nope.gguf", "no such file"]),
    ("dir", ModelFileError, ["directory"]),
    ("text", ModelFileError, ["notes.gguf", "not a GGUF"]),
    ("truncated", ModelFileError, ["truncated.gguf", "truncated"]),
    ("header_only", ModelFileError, ["header_only.gguf", "truncated"]),
    ("arch", UnsupportedModelError, ["mamba.gguf", "'mamba'", "not supported"]),
    ("ktype", UnsupportedModelError, ["q2k.gguf", "Q2_K", "not supported"]),
]


@pytest.mark.parametrize("key,exc,words", CASES)
def test_api_raises_typed_error(bad_files, key, exc, words):
    with pytest.raises(exc) as info:
        flashlm.load(bad_files[key])
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("key,exc,words", CASES)
def test_cli_one_line_exit_2(bad_files, key, exc, words):
    """A bad model file is the user's to fix: exit status 2, as for bad flags."""
    assert_one_line_error(run_cli("generate", "-m", bad_files[key], "-p", "hi", "-n", "4"), *words, code=2)


def test_info_rejects_bad_file_too(bad_files):
    assert_one_line_error(run_cli("info", bad_files["truncated"]), "truncated", code=2)


def test_verbose_shows_traceback(bad_files):
    proc = run_cli("generate", "-m", bad_files["text"], "-p", "hi", "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_prompt_longer_than_context(model, smollm_path):
    long_prompt = "word " * 100
    with pytest.raises(ContextLengthError, match="does not fit"):
        model.generate(long_prompt * 30, max_tokens=1)  # ~3000 tokens > ctx 2048
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-c", "32", "-p", long_prompt, "-n", "4"),
                          "context of 32 tokens")


@pytest.mark.parametrize("flags,words", [
    (["--temp", "-1"], ["--temp"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--min-p", "2"], ["--min-p"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--repeat-penalty", "0"], ["--repeat-penalty"]),
    (["-n", "-7"], ["-n/--n-predict"]),
    (["--temp", "hot"], ["'hot'"]),
    (["--no-such-flag"], ["no-such-flag"]),
])
def test_invalid_sampling_values_cli(smollm_path, flags, words):
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-p", "hi", *flags), *words)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_p=7.0), dict(max_tokens=-9), dict(seed=-3),
                                    dict(bogus=1)])
def test_invalid_sampling_values_api(model, kwargs):
    with pytest.raises(InvalidOptionError):
        model.generate("hi", **kwargs)


def test_invalid_load_options_api(smollm_path):
    with pytest.raises(InvalidOptionError):
        flashlm.load(smollm_path, threads=-1)
    with pytest.raises(InvalidOptionError):
        flashlm.load(smollm_path, not_an_option=True)


def test_missing_prompt_file(smollm_path, tmp_path):
    assert_one_line_error(run_cli("generate", "-m", smollm_path, "-f", str(tmp_path / "absent.txt")), "absent.txt",
                          code=2)


def test_reader_rejects_hostile_counts(tmp_path):
    import struct

    p = tmp_path / "hostile.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + b"\0" * 64)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        GGUFFile(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**50) + b"k" * 16)
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(p)
    p.write_bytes(b"GGUF" + struct.pack("<I", 1) + b"\0" * 32)
    with pytest.raises(ModelFileError, match="version 1"):
        GGUFFile(p)
    assert os.path.exists(p)  # nothing of the user's is touched
