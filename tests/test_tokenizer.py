"""Tokenization equals llama.cpp's own (full model load) on the real SmolLM2 vocabulary; streaming is UTF-8 safe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flashlm.loaders.tokenizer import StreamDecoder

STRINGS = [
    "Hello world",
    " leading space and trailing space ",
    "Ünïcödé àccents: café, naïve, façade, Øresund, ÅÄÖ",
    "中文字符测试，日本語のテキスト、한국어 문장",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "runs   of    spaces\t\ttabs\n\n\nnewlines",
    "          ten leading spaces",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token",
    "Numbers 1234567890 3.14159 -42 1e-9",
    "MiXeD CaSe AND UPPERCASE words",
    "URL https://example.com/path?query=1&b=2#frag",
    "email: someone@example.org",
    "Punctuation!!! ??? ... --- ;;; :::",
    "Quotes “curly” ‘single’ «guillemets» „low“",
    "Русский текст и ελληνικά",
    "Arabic العربية and Hebrew עברית",
    "Math: ∑ᵢ xᵢ² ≤ ∞, √2 ≈ 1.414, α→β",
    "a",
    "",
    "\n",
    "don't won't I'm you're they've",
    "   ",
]


@pytest.mark.parametrize("text", STRINGS)
def test_token_ids_equal_llama_cpp(model, reference, text):
    expected = reference.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    assert model.tokenize(text) == expected


def test_at_least_twenty_strings():
    assert len(STRINGS) >= 20


@pytest.mark.parametrize("text", STRINGS[:10])
def test_detokenize_round_trips(model, text):
    assert model.detokenize(model.tokenize(text, parse_special=False)) == text


def test_stream_decoder_never_emits_half_a_character(model):
    text = "Emoji 😀🎉👩‍👩‍👧‍👦 and CJK 中文字符 and ü"
    ids = model.tokenize(text, parse_special=False)
    decoder = StreamDecoder(model.tokenizer)
    pieces = [decoder.add(t) for t in ids] + [decoder.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == text
    # some token must have ended inside a multi-byte character, or this test checks nothing
    assert any(model.tokenizer.piece(t).decode("utf-8", errors="replace").count("\ufffd") for t in ids)


def test_bos_and_eog_come_from_the_vocabulary(model, reference):
    tok = model.tokenizer
    assert tok.bos_id == reference.token_bos() and tok.eos_id == reference.token_eos()
    assert tok.is_eog(tok.eos_id)
    assert not tok.is_eog(model.tokenize("hello")[0])


def test_generation_imports_no_package_it_does_not_use(smollm_path):
    """A lean baseline: tokenizing and generating loads llama.cpp's ctypes bindings, not llama_cpp's package
    (jinja2, diskcache: ~10 MB), and gguf's constants, not its writer and yaml (flashlm/_bare_import.py)."""
    code = ("import sys, flashlm; m = flashlm.load(sys.argv[1], threads=1, ctx_size=64);"
            "print(m.generate('Hi', max_tokens=2, temperature=0) is not None,"
            " sorted(n for n in ('llama_cpp.llama', 'jinja2', 'diskcache', 'gguf.gguf_writer', 'yaml')"
            " if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, smollm_path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "[]"], out.stdout
