"""`flashlm bench` and `bench-budget`: flashlm and llama.cpp side by side."""

from __future__ import annotations

import os

import click

from flashlm.cli.common import EXIT_USAGE, _fail, _resolve_model, cli


@cli.command()
@click.option("-m", "--model", "model", type=str, default=None, help="GGUF model file (default: SmolLM2).")
@click.option("-p", "--n-prompt", type=int, default=128, show_default=True, help="Prompt tokens.")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Tokens generated (greedy).")
@click.option("-t", "--threads", type=int, default=2, show_default=True,
              help="Threads for both engines (0: each engine's own default).")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True, help="Timed runs (median reported).")
@click.option("-c", "--ctx-size", type=int, default=1024, show_default=True, help="Context size for both engines.")
@click.option("--engines", default="flashlm,llama.cpp", show_default=True, help="Engines to run, comma-separated.")
@click.option("--flash", "flash", type=str, default=None,
              help="flashlm runs this .flash conversion of the model (llama.cpp still runs the GGUF).")
@click.option("--busy", type=int, default=0, show_default=True,
              help="Then run both engines again with this many CPU-bound processes beside each (a busy machine).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def bench(model, n_prompt, n_gen, threads, repetitions, ctx_size, engines, flash, busy, as_json, verbose):
    """flashlm and llama.cpp side by side: prompt tok/s, decode tok/s, peak memory and their ratios."""
    from flashlm.tools.bench import run_bench

    if flash is not None and not os.path.isfile(flash):
        _fail(f"{flash}: no such file", EXIT_USAGE)
    if min(n_prompt, n_gen, repetitions) < 1:
        _fail("-p/--n-prompt, -n/--n-gen and -r/--repetitions must be >= 1")
    if threads < 0:
        _fail("-t/--threads must be >= 0")
    if busy < 0:
        _fail("--busy must be >= 0")
    if n_prompt + n_gen > ctx_size:
        _fail(f"-p/--n-prompt + -n/--n-gen ({n_prompt} + {n_gen}) must fit in -c/--ctx-size ({ctx_size})")
    run_bench(_resolve_model(model), n_prompt, n_gen, threads, repetitions, ctx_size,
              [e.strip() for e in engines.split(",") if e.strip()], as_json, flash=flash, busy=busy)


@cli.command("bench-budget")
@click.option("-m", "--model", "model", type=str, default=None, help="GGUF model (default: SmolLM2).")
@click.option("--flash", "flash", type=str, required=True, help="The same model converted to .flash.")
@click.option("--budgets", default="none,220MB,200MB,180MB,165MB,150MB,135MB,120MB,100MB", show_default=True,
              help="Comma-separated cgroup limits ('none': unlimited).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Greedy tokens generated.")
@click.option("-t", "--threads", type=int, default=2, show_default=True)
@click.option("-c", "--ctx-size", type=int, default=512, show_default=True)
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds per engine and budget.")
@click.option("-r", "--repetitions", type=int, default=1, show_default=True,
              help="Runs per engine and budget, the engines alternating; the median run is reported.")
@click.option("--plot", type=str, default="budget.png", show_default=True, help="PNG plot of tok/s vs budget.")
@click.option("--output-head", type=click.Choice(["exact", "sketch", "auto"]), default="exact", show_default=True,
              help="flashlm's output head (see generate --help).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verbose", is_flag=True)
def bench_budget(model, flash, budgets, n_gen, threads, ctx_size, timeout, repetitions, plot, output_head, as_json,
                 verbose):
    """Both engines inside the same cgroup memory limit, caches dropped before each run (needs root)."""
    from flashlm.flash_store.planner import parse_size
    from flashlm.tools.bench_budget import run_budget_bench

    try:
        limits = [None if b.strip().lower() == "none" else parse_size(b) for b in budgets.split(",") if b.strip()]
    except ValueError as e:
        _fail(str(e))
    if repetitions < 1:
        _fail(f"-r/--repetitions must be >= 1, got {repetitions}")
    run_budget_bench(_resolve_model(model), flash, limits, n_gen, threads, ctx_size, timeout, plot, as_json,
                     output_head, repetitions)
