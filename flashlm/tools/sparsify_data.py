"""Training text for `flashlm sparsify`: the user's files, documentation found on the machine, and the teacher's
own samples (chat turns it writes itself, answers to instructions about a text, continuations).

Everything becomes rows of `seq_len` token ids; half the document rows start with BOS, half mid-text. License
texts are kept out: a file under a common-licenses folder, named like a license, or holding a full license text is
skipped, so a license can serve as held-out evaluation text.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

from flashlm.errors import InvalidOptionError

DOC_SUFFIXES = (".md", ".rst", ".txt", ".html")
CODE_SUFFIXES = (".py",)
LICENSE_NAME = re.compile(r"copyright|licen[cs]e|copying|notice|patents|authors", re.IGNORECASE)
LICENSE_TEXT = ("GNU GENERAL PUBLIC LICENSE", "GNU LESSER GENERAL PUBLIC LICENSE", "GNU AFFERO GENERAL PUBLIC",
                "GNU Free Documentation License", "TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                "Mozilla Public License", "Permission is hereby granted, free of charge")
HTML_TAG = re.compile(r"<[^>]{0,300}>")
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INSTRUCTIONS = ("Summarize the following text.", "Explain this in simple words:", "What is this text about?",
                "List the key points of this text.", "Write three questions a reader might ask about this:",
                "Rewrite this more clearly:", "What would a beginner need to know to understand this?")


def excluded(path: str, text: str | None = None) -> bool:
    """License texts: by folder, by file name, or by content."""
    if "common-licenses" in path.split(os.sep) or LICENSE_NAME.search(os.path.basename(path)):
        return True
    return text is not None and any(marker in text for marker in LICENSE_TEXT)


def read_text(path: str) -> str | None:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read(4 << 20)
        else:
            with open(path, "rb") as fh:
                raw = fh.read(4 << 20)
    except (OSError, EOFError):
        return None
    if b"\0" in raw[:4096]:
        return None
    text = raw.decode("utf-8", errors="ignore")
    return HTML_TAG.sub(" ", text) if path.endswith((".html", ".html.gz")) else text


def _wanted(name: str, suffixes: tuple[str, ...]) -> bool:
    base = name.removesuffix(".gz")
    return base.endswith(suffixes) or (suffixes is DOC_SUFFIXES and base.upper().startswith(("README", "NEWS", "FAQ"))
                                       or name == "METADATA")


def collect_texts(roots: list[str], suffixes: tuple[str, ...], max_bytes: int) -> list[str]:
    """Text files under `roots` (sorted walk, duplicates and license texts dropped), up to max_bytes in all."""
    seen, out, total = set(), [], 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not _wanted(name, suffixes) or excluded(path):
                    continue
                text = read_text(path)
                if not text or len(text) < 200 or excluded(path, text):
                    continue
                digest = hashlib.sha1(text.encode("utf-8", errors="ignore")).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                out.append(text)
                total += len(text)
                if total >= max_bytes:
                    return out
    return out


def read_user_texts(paths: list[str], held_out: str | None) -> list[str]:
    """--text files; a file that is the held-out evaluation text is refused."""
    out = []
    for path in paths:
        if held_out and os.path.exists(held_out) and os.path.samefile(path, held_out):
            raise InvalidOptionError(f"{path}: is the held-out evaluation text; it cannot also be training text")
        text = read_text(path)
        if text is None:
            raise InvalidOptionError(f"{path}: cannot be read as text")
        out.append(text)
    return out


class TextEncoder:
    """Token ids for text, through a tokenizer.json (`tokenizers`) or flashlm's tokenizer of the model file."""

    def __init__(self, model_path: str, tokenizer_json: str | None):
        if tokenizer_json:
            from tokenizers import Tokenizer as HFTok
            self._hf = HFTok.from_file(tokenizer_json)
        else:
            from flashlm.loaders.tokenizer import Tokenizer
            self._hf, self._tok = None, Tokenizer(model_path)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return [self._tok.encode(t, add_special=False, parse_special=False) for t in texts]

    def encode_chat(self, text: str) -> list[int]:
        """Text with ChatML markers parsed as special tokens."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special=False, parse_special=True)

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False) if self._hf is not None else self._tok.decode(ids)


def doc_rows(encoded: list[list[int]], seq_len: int, bos: int) -> np.ndarray:
    """Documents joined end to end and cut into rows of seq_len ids: (N, seq_len) int32. Every other row starts
    with BOS; the rest start mid-text, as chunks do where the tokenizer adds no BOS (llama-perplexity on SmolLM2),
    so the student does not come to need a BOS at position 0."""
    flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32)
    n = len(flat) // seq_len
    rows = flat[:n * seq_len].reshape(n, seq_len).copy()
    rows[::2, 0] = bos
    return rows


@dataclass
class PromptBatch:
    kind: str
    ids: np.ndarray  # (B, P) int32, one prompt length per batch


class PromptMaker:
    """Prompts for teacher sampling, in turn: a chat the teacher writes itself (user turn included), an
    instruction about a document snippet, and a plain continuation of a snippet."""

    KINDS = ("chat", "instruct", "continue")

    def __init__(self, enc: TextEncoder, doc_tokens: np.ndarray, bos: int, prompt_len: int, seed: int):
        self.enc, self.docs, self.bos, self.prompt_len = enc, doc_tokens, bos, prompt_len
        self.rng = np.random.default_rng(seed)
        self.system = enc.encode_chat(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
        self.assistant = enc.encode_chat("<|im_end|>\n<|im_start|>assistant\n")
        self.instructions = [enc.encode_chat(s + "\n\n") for s in INSTRUCTIONS]
        self.turn = 0

    def _snippets(self, batch: int, length: int) -> np.ndarray:
        if len(self.docs) <= length:
            raise InvalidOptionError("not enough document text to draw prompts from (give --text or --doc-dir)")
        starts = self.rng.integers(0, len(self.docs) - length, size=batch)
        return self.docs[starts[:, None] + np.arange(length)]

    def next_batch(self, batch: int) -> PromptBatch:
        kind = self.KINDS[self.turn % len(self.KINDS)]
        self.turn += 1
        if kind == "chat" or len(self.docs) <= self.prompt_len:
            return PromptBatch("chat", np.tile(np.array(self.system, np.int32), (batch, 1)))
        if kind == "continue":
            ids = self._snippets(batch, self.prompt_len)
            ids[:, 0] = self.bos
            return PromptBatch(kind, ids)
        rows = []
        for snippet in self._snippets(batch, self.prompt_len):
            head = self.system + self.instructions[self.rng.integers(len(self.instructions))]
            rows.append(head + snippet.tolist() + self.assistant)
        width = min(len(r) for r in rows)  # instructions differ by a few tokens: trim the snippet's end
        return PromptBatch(kind, np.array([r[:width - len(self.assistant)] + self.assistant for r in rows], np.int32))
