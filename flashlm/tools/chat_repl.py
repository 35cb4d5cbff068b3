"""The `flashlm chat` loop: one user turn per input line, answers streamed; works on a terminal and on a pipe.

Ctrl-C while the model answers stops that answer (the partial answer stays in the history) and the session goes on;
Ctrl-C or Ctrl-D at the prompt ends it. /clear forgets the conversation, /exit ends it.
"""

from __future__ import annotations

import sys

import click

from flashlm.errors import ContextLengthError
from flashlm.options import GenerationOptions


def _read_turn(interactive: bool) -> str | None:
    try:
        line = input("> ") if interactive else sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        return None
    if not interactive and line == "":
        return None
    return line.rstrip("\n")


def run_repl(model, opts: GenerationOptions, system_prompt: str | None, stats: bool = False) -> None:
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(base)
    while True:
        line = _read_turn(interactive)
        if line is None or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        if line.strip() == "/clear":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        answer, timings, r = [], None, None
        try:
            responses = model.chat(messages, stream=True, options=opts)
        except ContextLengthError as e:  # the history no longer fits ("stop"): say so, keep the session
            click.echo(f"flashlm: {e}; /clear starts over, --ctx-overflow shift drops the oldest turns", err=True)
            messages.pop()
            continue
        try:
            for r in responses:
                click.echo(r.text, nl=False)
                sys.stdout.flush()
                answer.append(r.text)
                timings = r.timings
        except KeyboardInterrupt:
            click.echo(" [stopped]", err=True, nl=False)
        click.echo()
        if r is not None and r.finish_reason == "length" and r.timings.eval_tokens != opts.max_tokens:
            click.echo(f"[the context of {model.n_ctx} tokens is full: the answer was cut; --ctx-overflow shift "
                       "goes on]", err=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
        if stats and timings is not None:
            click.echo(f"[prompt {timings.prompt_tokens} tokens ({timings.cached_tokens} cached), "
                       f"{timings.prompt_tps:.1f} tok/s; {timings.eval_tokens} tokens, {timings.eval_tps:.1f} tok/s]",
                       err=True)
