"""Options grouped in dataclasses: one set of defaults, shared by the CLI and the Python API.

Defaults follow llama.cpp's (common/common.h) where flashlm has the same knob.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace

from flashlm.errors import InvalidOptionError


def _check(cond: bool, message: str) -> None:
    """message starts with the option's field name: InvalidOptionError.field carries it (the CLI names its flag)."""
    if not cond:
        name = message.split(" ", 1)[0]
        raise InvalidOptionError(message, field=name if name in _OPTION_FIELDS else None)


def _is_int(value: object) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite real number (numpy's too), not a bool; a string such as "hot" or "0.5" is not: the comparisons
    after it would raise TypeError, which is not a flashlm error."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


MB = 1_000_000
DEFAULT_CTX = 4096  # tokens, or the model's training context where that is shorter
SCORES = ("cats", "exact", "predictor")  # how --sparsity ranks a store's neurons (flash_store/predictor.py)


def parse_size(text: str | int | None) -> int | None:
    """'150MB', '1.5GB', '800MiB', '123456B' -> bytes; a number without a unit is MB ('150': 150 MB, as a user
    typing --memory-budget 150 means); an int is bytes."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "KB": 1000, "MB": MB, "GB": 1000 * MB,
             "K": 1000, "M": MB, "G": 1000 * MB, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, MB
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 150MB, 1.5GB, 800MiB)") from None
    if value <= 0:
        raise ValueError(f"memory budget must be positive, got {text!r}")
    return int(value * factor)


def parse_sparsity(value) -> float | str:
    """'off' | fraction in [0, 0.95] (of neurons skipped per token) -> float; 'auto' stays "auto" (resolve_sparsity
    decides per store at load)."""
    if value is None or value == "off":
        return 0.0
    if value == "auto":
        return "auto"
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"sparsity must be off, auto or a fraction in [0, 0.95], got {value!r}",
                                 field="sparsity") from None
    if not 0.0 <= f <= 0.95:
        raise InvalidOptionError(f"sparsity must be off, auto or a fraction in [0, 0.95], got {value!r}",
                                 field="sparsity")
    return f


# Prompt tokens per forward call. CPU kernels, 128-token prompt, 2 threads, idle AMD EPYC, median of 7 interleaved:
# Gemma 3 GGUF 190.6 / 158.4 / 162.8 ms at batches of 32 / 64 / 128, SmolLM2 GGUF 193.4 / 177.9 / 190.0 (int8 GEMM
# tiles reuse each unpacked row across more tokens; past 64 the activations outgrow the caches). Under a budget,
# 32: the plan's activation scratch was measured at it.
DEFAULT_BATCH = 64
BUDGET_BATCH = 32


@dataclass(frozen=True)
class LoadOptions:
    threads: int = 0  # 0: the cores available to this process less those other processes keep busy (default_threads)
    ctx_size: int | None = None  # None: min(DEFAULT_CTX, the model's training context); 0: the training context
    # Prompt tokens per forward call (llama.cpp's micro-batch); 0: DEFAULT_BATCH, or BUDGET_BATCH under a memory
    # budget (activation memory grows with the batch).
    batch_size: int = 0
    memory_budget: int | str | None = None  # cap on the whole process's memory: bytes, or "150MB" ("150": MB); None: no cap
    io_threads: int = 4  # reader threads for flash-store streaming
    # FFN neurons skipped per token on a flash store: "off", "auto" or a fraction; ranked by sparsity_score
    # (flash_store/predictor.py: "exact" or "cats").
    sparsity: float | str = "off"
    sparsity_score: str = "exact"
    # With sparsity: neurons used by the last `window` tokens stay in memory (the paper's sliding window), so a
    # token reads only the selected neurons not among them; 0: none kept beyond the hot ones. 3 by default: on the
    # ReLU SmolLM2 at its half-model budget (labs.sparse_budget, reads through Linux AIO), windows of 1-8 tokens
    # read 6.0-6.7 MB per token instead of 9.4 and ran 21.9-27.9 tok/s against 19.8 with none; 3 tokens: 26.0 and
    # 26.4 in two runs (docs/RESULTS.md)
    window: int = 3
    # Output matrix of a flash store: "exact" (resident, or streamed in full where the budget says so), "sketch"
    # (flash_store/head_sketch.py: a 1-bit sketch picks candidates, their exact rows give their logits) or "auto"
    # (exact where the budget keeps the whole matrix resident, else sketch).
    output_head: str = "exact"
    # "cpu", or "cuda" (runtime/cuda_executor.py; a .flash store, CuPy and an NVIDIA GPU): attention, output matrix
    # and the hot neurons on the GPU within gpu_memory_budget (bytes or "2GB"; None: all of it on the GPU).
    device: str = "cpu"
    gpu_memory_budget: int | str | None = None
    verbose: bool = False

    def validate(self) -> "LoadOptions":
        _check(_is_int(self.threads) and self.threads >= 0, f"threads must be an integer >= 0, got {self.threads!r}")
        _check(self.ctx_size is None or (_is_int(self.ctx_size) and self.ctx_size >= 0),
               f"ctx_size must be an integer >= 0, got {self.ctx_size!r}")
        _check(_is_int(self.batch_size) and self.batch_size >= 0,
               f"batch_size must be an integer >= 0, got {self.batch_size!r}")
        _check(_is_int(self.window) and self.window >= 0, f"window must be an integer >= 0, got {self.window!r}")
        _check(_is_int(self.io_threads) and self.io_threads >= 1,
               f"io_threads must be an integer >= 1, got {self.io_threads!r}")
        _check(isinstance(self.verbose, bool), f"verbose must be True or False, got {self.verbose!r}")
        for name in ("memory_budget", "gpu_memory_budget"):
            if isinstance(getattr(self, name), str):
                try:
                    object.__setattr__(self, name, parse_size(getattr(self, name)))
                except ValueError as e:
                    raise InvalidOptionError(f"{name}: {e}", field=name) from None
        _check(self.device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {self.device!r}")
        _check(self.gpu_memory_budget is None or (isinstance(self.gpu_memory_budget, int) and
                                                  self.gpu_memory_budget > 0),
               f"gpu_memory_budget must be a positive size, got {self.gpu_memory_budget!r}")
        object.__setattr__(self, "sparsity", parse_sparsity(self.sparsity))
        _check(self.sparsity_score in SCORES,
               f"sparsity_score must be one of {', '.join(SCORES)}, got {self.sparsity_score!r}")
        _check(self.output_head in ("exact", "sketch", "auto"),
               f"output_head must be 'exact', 'sketch' or 'auto', got {self.output_head!r}")
        _check(self.memory_budget is None or (isinstance(self.memory_budget, int) and self.memory_budget > 0),
               f"memory_budget must be a positive size, got {self.memory_budget!r}")
        return self

    def resolved_ctx(self, n_ctx_train: int) -> int:
        """The context in tokens for a model trained on n_ctx_train (as llama.cpp: 0 means the training context)."""
        if self.ctx_size is None:
            return min(DEFAULT_CTX, n_ctx_train)
        return self.ctx_size or n_ctx_train

    def resolved_batch(self) -> int:
        if self.batch_size:
            return self.batch_size
        return BUDGET_BATCH if self.memory_budget is not None else DEFAULT_BATCH

    def resolved_threads(self) -> int:
        return self.threads or default_threads()


# Cores other processes keep busy, measured over this long when the thread count is chosen (at load).
BUSY_SAMPLE_S = 0.1


def default_threads() -> int:
    """The cores this process may use, less the ones other processes keep busy right now. A kernel thread that
    shares its core with another program holds up every parallel region; measured on 2 cores, SmolLM2 .flash
    decode (flashlm bench --busy 1, docs/RESULTS.md): idle 185 tok/s with 2 threads, 116 with 1; beside one
    CPU-bound process 54 with 2 threads, 128 with 1. Threads spin between regions (libgomp's default): letting
    them sleep (OMP_WAIT_POLICY=PASSIVE) cost 59% of idle decode there (185 -> 77 tok/s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores <= 1:
        return 1
    try:
        import psutil

        busy = psutil.cpu_percent(interval=BUSY_SAMPLE_S) / 100 * (os.cpu_count() or cores)
    except Exception:  # no reading (a restricted /proc): every core
        return cores
    return max(1, min(cores, cores - int(busy + 0.4)))


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1  # -1: a fresh random seed

    def validate(self) -> "SamplingOptions":
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0.0 <= self.top_p <= 1.0, f"top_p must be in [0, 1], got {self.top_p!r}")
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.repeat_penalty) and self.repeat_penalty > 0,
               f"repeat_penalty must be a number > 0, got {self.repeat_penalty!r}")
        _check(_is_int(self.repeat_last_n) and self.repeat_last_n >= -1,
               f"repeat_last_n must be an integer >= -1, got {self.repeat_last_n!r}")
        _check(_is_int(self.seed) and self.seed >= -1, f"seed must be an integer >= -1, got {self.seed!r}")
        return self


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 256  # -1: until EOS or the context is full (with ctx_overflow="shift": until EOS)
    stop: tuple[str, ...] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # A full context: "stop" ends with finish_reason "length"; "shift" keeps the first 4 tokens (attention sinks)
    # plus the most recent ones, half the context in all, and goes on (chat first drops the oldest turns).
    ctx_overflow: str = "stop"
    ignore_eos: bool = False  # go on past end-of-generation tokens (llama.cpp's --ignore-eos), e.g. for benchmarks

    def validate(self) -> "GenerationOptions":
        _check(_is_int(self.max_tokens) and self.max_tokens >= -1,
               f"max_tokens must be an integer >= -1, got {self.max_tokens!r}")
        _check(isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
               f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # GenerationOptions(stop=[...]) as well
        _check(isinstance(self.sampling, SamplingOptions),
               f"sampling must be a SamplingOptions, got {type(self.sampling).__name__}")
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        _check(self.ctx_overflow in ("stop", "shift"),
               f"ctx_overflow must be 'stop' or 'shift', got {self.ctx_overflow!r}")
        self.sampling.validate()
        return self


_SAMPLING_KEYS = {f.name for f in fields(SamplingOptions)}
_OPTION_FIELDS = {f.name for cls in (LoadOptions, SamplingOptions, GenerationOptions) for f in fields(cls)}


def generation_options(base: GenerationOptions | None = None, **overrides) -> GenerationOptions:
    """Build GenerationOptions from keyword overrides (sampling keys accepted at the top level)."""
    _check(base is None or isinstance(base, GenerationOptions),
           f"options must be a GenerationOptions, got {type(base).__name__}")
    opts = base or GenerationOptions()
    _check(isinstance(opts.sampling, SamplingOptions),
           f"sampling must be a SamplingOptions, got {type(opts.sampling).__name__}")
    sampling = {k: overrides.pop(k) for k in list(overrides) if k in _SAMPLING_KEYS}
    unknown = set(overrides) - {f.name for f in fields(GenerationOptions)}
    _check(not unknown, f"unknown option(s): {', '.join(sorted(unknown))}")
    if "stop" in overrides:
        stop = overrides["stop"]
        _check(stop is None or isinstance(stop, (str, list, tuple)),
               f"stop must be a string or a list of strings, got {stop!r}")
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    base_sampling = overrides.pop("sampling", opts.sampling)  # a whole SamplingOptions may be given, keys on top
    _check(isinstance(base_sampling, SamplingOptions),
           f"sampling must be a SamplingOptions, got {type(base_sampling).__name__}")
    opts = replace(opts, sampling=replace(base_sampling, **sampling), **overrides)
    return opts.validate()
