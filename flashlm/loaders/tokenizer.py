"""Tokenization, by the backend the model file asks for: `Tokenizer(path)` returns one of two classes.

- LlamaCppTokenizer: identical to llama.cpp's, its own tokenizer over the GGUF vocabulary (vocab_only load).
  BOS/EOS handling comes from the GGUF metadata through llama.cpp (add_bos_token etc.); end of generation is
  llama.cpp's "end of generation" set (EOS, EOT, <|im_end|>-style tokens).
- HFTokenizer: identical to transformers' AutoTokenizer, for files converted from a Hugging Face directory
  (tools/hf_convert.py): tokenizer.json's text is in the GGUF under `tokenizer.huggingface.json` and the
  `tokenizers` library runs it. BOS/EOS ids come from tokenizer.ggml.*; end of generation is EOS, EOT/EOM and
  the special tokens llama.cpp counts as end of generation.
`StreamDecoder` turns token ids into text incrementally and never emits half a UTF-8 character.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import weakref

from flashlm._bare_import import bare_import
from flashlm.errors import ModelFileError
from flashlm.loaders.gguf_reader import GGUFFile

HF_TOKENIZER_KEY = "tokenizer.huggingface.json"  # gguf-py's Keys.Tokenizer.HF_JSON
# Special tokens llama.cpp counts as end of generation besides EOS (llama-vocab.cpp's list, abridged).
EOG_TEXTS = frozenset(("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                       "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>"))


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 while loading; keep the user's terminal clean (restored even on error)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Tokenizer:
    """The interface: n_vocab, bos_id, eos_id (-1: none), encode, piece, decode, is_eog, token_text.
    `Tokenizer(path)` picks the backend from the file's metadata."""

    n_vocab: int
    bos_id: int
    eos_id: int

    def __new__(cls, path: str, verbose: bool = False):
        if cls is Tokenizer:
            cls = HFTokenizer if _has_hf_tokenizer(path) else LlamaCppTokenizer
        return super().__new__(cls)


def _has_hf_tokenizer(path: str) -> bool:
    try:
        with GGUFFile(path) as f:
            return HF_TOKENIZER_KEY in f.metadata
    except ModelFileError:
        return False  # llama.cpp then reports what is wrong with the file, as before


_LIB_LOCK = threading.Lock()
_BACKEND_READY = False


def llama_lib():
    """llama-cpp-python's ctypes bindings, without its package __init__ (see _bare_import), backend initialized."""
    global _BACKEND_READY
    lib = bare_import("llama_cpp.llama_cpp")
    with _LIB_LOCK:
        if not _BACKEND_READY:
            with _quiet_stderr():
                lib.llama_backend_init()
            _BACKEND_READY = True
    return lib


class LlamaCppTokenizer(Tokenizer):
    def __init__(self, path: str, verbose: bool = False):
        lib = self._llama_cpp = llama_lib()
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: no such model file")
        params = lib.llama_model_default_params()
        params.vocab_only = True
        with contextlib.nullcontext() if verbose else _quiet_stderr():
            model = lib.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            raise ModelFileError(f"{path}: llama.cpp could not load the vocabulary (run with --verbose for its log)")
        weakref.finalize(self, lib.llama_model_free, model)
        self._model = model  # the vocabulary lives as long as the model handle
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.bos_id = lib.llama_vocab_bos(self._vocab)
        self.eos_id = lib.llama_vocab_eos(self._vocab)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. add_special adds BOS (and EOS) where the model's metadata asks for them; parse_special
        turns text like "<|im_start|>" into its special token, as llama.cpp's tools do for prompts."""
        lib, raw = self._llama_cpp, text.encode("utf-8")
        size = len(raw) + 2  # llama.cpp never makes more tokens than bytes, plus BOS and EOS
        for _ in range(2):
            out = (lib.llama_token * size)()
            n = lib.llama_tokenize(self._vocab, raw, len(raw), out, size, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            size = -n  # too small: llama.cpp returns the count it needs, negated
        raise RuntimeError(f"llama_tokenize failed on a text of {len(raw)} bytes")

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for in generated text (special tokens render as nothing)."""
        lib, buf = self._llama_cpp, ctypes.create_string_buffer(256)  # per call: threads decode concurrently
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # buffer too small: llama.cpp returns the size it needs, negated
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, as llama.cpp's llama_detokenize renders it (special tokens removed)."""
        lib = self._llama_cpp
        arr = (lib.llama_token * len(ids))(*ids)
        size = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise RuntimeError("llama_detokenize failed")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        """The token's own text (special tokens included), e.g. the BOS/EOS strings a chat template needs."""
        if not 0 <= token < self.n_vocab:
            return ""
        return self._llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _decoder_types(spec: dict) -> set[str]:
    dec = spec.get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return {d.get("type") for d in parts if isinstance(d, dict)}


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library: the same ids as transformers' fast tokenizers."""

    def __init__(self, path: str, verbose: bool = False):
        import json

        from tokenizers import Tokenizer as HFBackend

        with GGUFFile(path) as f:
            text = f.get(HF_TOKENIZER_KEY)
            ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom")}
        if not isinstance(text, str):
            raise ModelFileError(f"{path}: {HF_TOKENIZER_KEY} is not a string")
        try:
            self._tok = HFBackend.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception for a malformed file
            raise ModelFileError(f"{path}: {HF_TOKENIZER_KEY} is not a valid tokenizer ({e})") from None
        self._encode_lock = threading.Lock()
        spec = json.loads(text)
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = int(ids["bos"]) if ids["bos"] is not None else -1
        self.eos_id = int(ids["eos"]) if ids["eos"] is not None else -1
        added = spec.get("added_tokens") or []
        self._special = {t["id"] for t in added if t.get("special")}
        self._added = {t["id"]: t["content"] for t in added}
        self._eog = {int(i) for i in ids.values() if i is not None and i != ids["bos"]}
        self._eog |= {i for i in self._special if self._added[i] in EOG_TEXTS}
        kinds = _decoder_types(spec)
        self._bytes_of = _byte_decoder() if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds
        self._spaces = "Metaspace" in kinds or "Replace" in kinds  # sentencepiece's U+2581 stands for a space

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids, as transformers' tokenizer(text) gives them (add_special: its add_special_tokens;
        parse_special=False: special-token text is tokenized as plain text, transformers' split_special_tokens)."""
        with self._encode_lock:  # encode_special_tokens is the tokenizer's state, shared by threads
            self._tok.encode_special_tokens = not parse_special
            return self._tok.encode(text, add_special_tokens=add_special).ids

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for in generated text (special tokens render as nothing)."""
        if token in self._special:
            return b""
        if token in self._added:
            return self._added[token].encode("utf-8")
        text = self._tok.id_to_token(token)
        if text is None:
            return b""
        if self._bytes_of is not None:
            return bytes(self._bytes_of[c] for c in text)
        if self._byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        if self._spaces:
            return text.replace("\u2581", " ").encode("utf-8")
        return self._tok.decode([token], skip_special_tokens=True).encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, as transformers' decode(ids, skip_special_tokens=True) renders it."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def token_text(self, token: int) -> str:
        """The token's own text (special tokens included), e.g. the BOS/EOS strings a chat template needs."""
        return (self._tok.id_to_token(token) or "") if token >= 0 else ""


class StreamDecoder:
    """Ids in, text out, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._utf8.decode(self.tokenizer.piece(token), final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
