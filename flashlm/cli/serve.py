"""`flashlm serve`: the OpenAI-compatible HTTP server (tools/serve/)."""

from __future__ import annotations

import importlib.util

import click

from flashlm.cli.common import (
    _fail,
    _gen_options,
    _load,
    _resolve_model,
    cli,
    model_options,
    sampling_options,
)
from flashlm.errors import BudgetError

DEFAULT_PARALLEL = 2  # two conversations progress at once, and one keeps its cached prefix while the other runs
DEFAULT_QUEUE = 16


@cli.command()
@model_options
@sampling_options(n_predict=-1, what="Request default: ")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; anyone who reaches it can use the model).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: a free one, printed at start).")
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=DEFAULT_PARALLEL, show_default=True,
              help="Requests generated at once, each in a session (KV cache) of its own; their tokens interleave "
                   "on the one model, so more slots share the compute rather than add to it.")
@click.option("--queue", type=click.IntRange(0), default=DEFAULT_QUEUE, show_default=True,
              help="Requests that wait for a slot, first come first served; beyond them: HTTP 429.")
@click.option("-a", "--alias", type=str, default=None,
              help="Model name in /v1/models and responses (default: the file name without its extension).")
@click.option("--api-key", type=str, default=None, envvar="FLASHLM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ routes (also from $FLASHLM_API_KEY).")
def serve(host, port, parallel, queue, alias, api_key, **kw):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions and /v1/completions (streaming
    with "stream": true), /v1/models, /health.

    Up to --parallel requests generate at once; the next --queue wait their turn; beyond that a request gets
    HTTP 429. The sampling flags are defaults for requests that leave a field out; -n defaults to -1 (until end of
    generation or a full context). One line per request goes to stderr. Needs `pip install 'flashlm[serve]'`.
    """
    if not all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn", "anyio")):
        _fail("flashlm serve needs Starlette and uvicorn: pip install 'flashlm[serve]'")
    from flashlm.tools.serve import listen, model_id, run_server

    defaults = _gen_options(kw)
    try:
        sock = listen(host, port)  # before loading: a taken port fails at once
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    kw = {**kw, "model": _resolve_model(kw["model"])}
    given = kw["memory_budget"]
    if given is not None and parallel > 1:
        kw["memory_budget"] = _budget_for_slots(kw, parallel)
    try:
        m = _load(kw)  # after the server's imports: a memory budget's baseline counts them
    except BudgetError as e:
        if kw["memory_budget"] == given:
            raise
        _fail(f"--memory-budget {given} less the KV caches of --parallel {parallel} slots is too small for the "
              f"model ({e}); raise the budget, or lower --parallel or -c")
    with m:
        run_server(m, sock, model_id(m.path, alias), defaults, parallel, queue, api_key)


def _budget_for_slots(kw: dict, parallel: int) -> str:
    """The budget the model is planned in: --memory-budget less the KV caches of the slots beyond the first (the
    plan counts one), so the whole process stays within --memory-budget with every slot's context full."""
    from flashlm.options import LoadOptions
    from flashlm.tools.serve import slot_kv_bytes

    budget = LoadOptions(memory_budget=kw["memory_budget"]).validate().memory_budget
    extra = (parallel - 1) * slot_kv_bytes(kw["model"], LoadOptions(ctx_size=kw["ctx_size"], device=kw["device"]))
    if extra == 0:
        return f"{budget}B"
    if extra >= budget:
        _fail(f"--memory-budget {kw['memory_budget']} cannot hold the KV caches of {parallel} slots "
              f"({extra / 1e6:.1f} MB for the {parallel - 1} beyond the first): lower --parallel or -c")
    click.echo(f"flashlm serve: the model is planned in {(budget - extra) / 1e6:.1f} MB of --memory-budget "
               f"{kw['memory_budget']}: {extra / 1e6:.1f} MB is kept for the KV caches of {parallel - 1} more "
               "slot(s)", err=True)
    return f"{budget - extra}B"
