"""Tokenization identical to llama.cpp's: its own tokenizer over the file's vocabulary (vocab_only load).

BOS/EOS handling comes from the GGUF metadata through llama.cpp (add_bos_token etc.); end of generation is
llama.cpp's "end of generation" set (EOS, EOT, <|im_end|>-style tokens). `StreamDecoder` turns token ids into text
incrementally and never emits half a UTF-8 character.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os

from ..errors import ModelFileError


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
    def __init__(self, path: str, verbose: bool = False):
        import llama_cpp

        self._llama_cpp = llama_cpp
        try:
            ctx = contextlib.nullcontext() if verbose else _quiet_stderr()
            with ctx:
                self._llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=verbose)
        except (ValueError, RuntimeError) as e:
            raise ModelFileError(f"{path}: llama.cpp could not load the vocabulary ({e})") from None
        self._vocab = self._llm._model.vocab
        self.n_vocab = self._llm.n_vocab()
        self.bos_id = self._llm.token_bos()
        self.eos_id = self._llm.token_eos()
        self._piece_buf = ctypes.create_string_buffer(256)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. add_special adds BOS (and EOS) where the model's metadata asks for them; parse_special
        turns text like "<|im_start|>" into its special token, as llama.cpp's tools do for prompts."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for in generated text (special tokens render as nothing)."""
        lib, buf = self._llama_cpp, self._piece_buf
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
        return self._llm._model.token_get_text(token) if token >= 0 else ""


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
