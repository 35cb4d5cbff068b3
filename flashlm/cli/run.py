"""`flashlm generate`, `chat` and `perplexity`: running a model."""

from __future__ import annotations

import sys

import click

from flashlm.cli.common import (
    EXIT_INTERRUPTED,
    _fail,
    _gen_options,
    _load,
    _peak_mib,
    _print_stats,
    cli,
    model_options,
    sampling_options,
)
from flashlm.options import GenerationOptions


@cli.command()
@model_options
@sampling_options
@click.option("-p", "--prompt", type=str, default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Read the prompt from a file (-: standard input).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object at the end (text, tokens, finish reason, timings) instead of streaming.")
def generate(prompt, prompt_file, as_json, **kw):
    """Generate a continuation of a prompt, streaming it to stdout; stats go to stderr."""
    if prompt is None and prompt_file is None:
        _fail("give a prompt with -p TEXT or -f FILE")
    if prompt_file is not None:
        prompt = (prompt or "") + _read_prompt(prompt_file)
    opts = _gen_options(kw)
    m = _load(kw)
    if as_json:
        _generate_json(m, prompt, opts)
        return
    timings, interrupted = None, False
    try:
        for r in m.stream(prompt, opts):
            click.echo(r.text, nl=False)
            sys.stdout.flush()
            timings = r.timings
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        interrupted = True
    click.echo()
    if timings is not None:
        _print_stats(m, timings)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)


def _read_prompt(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{path}: cannot read prompt file ({getattr(e, 'strerror', None) or e})")


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

    On a terminal: line editing and history (~/.flashlm_history), /help for commands, three double quotes to start
    and end a multi-line message. Ctrl-C stops the current answer (twice at the prompt quits, status 130); Ctrl-D or /exit ends the
    session. A model without a chat template chats in a plain User:/Assistant: transcript, with a warning.
    """
    from flashlm.tools.chat_repl import run_repl

    opts = _gen_options(kw)
    m = _load(kw)
    status = run_repl(m, opts, system_prompt, stats=kw["verbose"])
    if status:
        sys.exit(status)


@cli.command()
@model_options
@click.option("-f", "--file", "text_file", type=click.Path(dir_okay=False), required=True, help="Text to score.")
@click.option("--chunks", type=int, default=0, help="Score at most this many chunks (0: all).")
def perplexity(text_file, chunks, **kw):
    """Perplexity of a text, as llama-perplexity computes it (chunks of -c tokens, second halves scored)."""
    from flashlm.tools.perplexity import perplexity as run

    try:
        with open(text_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"{text_file}: cannot read ({getattr(e, 'strerror', None) or e})")
    n_ctx = kw["ctx_size"] if kw["ctx_size"] else 512
    kw = {**kw, "ctx_size": n_ctx}
    m = _load(kw)
    r = run(m, text, n_ctx, chunks or None,
            progress=lambda c, n, p: click.echo(f"[{c}/{n}] running PPL {p:.4f}", err=True))
    click.echo(f"PPL = {r.ppl:.4f} +/- {r.stderr:.4f} ({r.n_chunks} chunks of {n_ctx} tokens, {r.n_scored} scored)")
