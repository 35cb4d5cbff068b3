"""`flashlm sparsify`: making a model's FFN sparse (needs PyTorch: the `train` extra)."""

from __future__ import annotations

import click

from flashlm.cli.common import cli


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
@click.option("--stop-after-minutes", type=float, default=0.0,
              help="End this run after so many minutes of training (checkpointed; run again to resume).")
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
    from flashlm.tools.sparsify import SparsifyOptions, run as run_sparsify

    r = run_sparsify(SparsifyOptions(model=model, texts=list(texts), doc_dirs=list(doc_dirs), **kw))
    if r.get("stopped"):
        click.echo(f"stopped at {r['tokens'] / 1e6:.1f}M tokens trained; the same command resumes")
        return
    figures = f", held-out ppl {r['eval']['ppl']:.3f} (original {r['baseline']['ppl']:.3f}), zeros mean " \
        f"{r['eval']['sparsity_mean']:.3f} min {r['eval']['sparsity_min']:.3f}" if r.get("eval") else ""
    click.echo(f"wrote {kw['output']}: {r['tokens'] / 1e6:.1f}M tokens trained{figures}")
