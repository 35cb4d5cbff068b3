"""`flashlm info`, `convert`, `calibrate`, `verify` and `probe-disk`: model files and flash stores."""

from __future__ import annotations

import os

import click

from flashlm.cli.common import _L, EXIT_RUNTIME, _fail, cli, given_model, model_argument, pick_model


@cli.command()
@model_argument
@click.option("--memory-budget", type=str, default=None, help="Show the memory plan for this budget.")
@click.option("-c", "--ctx-size", type=int, default=None,
              help="Context for the plan (default: 4096, or the model's training context where that is shorter).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Show the plan for this device (cuda: what lives on the GPU, in pinned host memory, on flash).")
@click.option("--gpu-memory-budget", type=str, default=None, help="GPU memory for the cuda plan.")
@click.option("--output-head", type=click.Choice(["exact", "sketch", "auto"]), default=_L.output_head,
              show_default=True, help="The output head the plan is for (see generate --help).")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as one JSON document.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def info(model, model_opt, memory_budget, ctx_size, device, gpu_memory_budget, output_head, as_json, verbose):
    """Architecture, hyperparameters, size per tensor group and quant types; for a .flash, the memory plan."""
    from flashlm.tools.model_info import describe

    click.echo(describe(pick_model(model, model_opt), memory_budget, ctx_size, device, gpu_memory_budget, output_head,
                        as_json))


@cli.command()
@model_argument
@click.option("-o", "--output", required=True,
              help="Output .flash file; from a Hugging Face directory, a .gguf or a .flash file.")
@click.option("--quant", type=click.Choice(["f32", "f16", "q8_0", "q4_0", "q4_1"]), default="q8_0",
              show_default=True, help="Weight format when converting a Hugging Face directory.")
@click.option("--calibration-text", type=click.Path(dir_okay=False), default=None,
              help="Text whose activations order each layer's neurons hot first (default: a built-in paragraph).")
@click.option("--no-calibration", is_flag=True, help="Keep the source neuron order (no calibration run).")
@click.option("--bundle", type=click.Choice(["auto", "neuron", "block"]), default="auto", show_default=True,
              help="FFN records: one per block of ffn_down's neurons (32 or 256, as in the source; requantized to Q8_0 "
                   "blocks of 32 where layers differ in type), or one per neuron (down column requantized to Q8_0; "
                   "needed for --sparsity). auto: block unless the FFN is ReLU (sparse); ffn_down kept where it is "
                   "Q4_0/Q4_1/Q8_0 in every layer, else requantized to Q8_0 blocks of 32.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def convert(model, model_opt, output, quant, calibration_text, no_calibration, bundle, force, verbose):
    """Convert a GGUF model into a flash store (row-column bundled FFN, hot neurons first), or a Hugging Face
    directory (config.json, *.safetensors, tokenizer.json) into a GGUF or a flash store."""
    from flashlm.tools.convert import convert_gguf, convert_hf

    model = given_model(model, model_opt)
    if model is None or not os.path.isdir(model):  # a Hugging Face directory converts as it is, not from the cache
        model = pick_model(model, None)
    if os.path.isdir(model):
        r = convert_hf(model, output, quant, force, "none" if no_calibration else calibration_text)
        fallback = f"; F16 for {len(r.f16_fallbacks)} matrices whose rows do not divide into {quant} blocks" \
            if r.f16_fallbacks else ""
        click.echo(f"wrote {r.path}: {r.model_type} as GGUF architecture {r.arch!r}, {r.n_tensors} tensors, "
                   f"{quant}{fallback}, {r.nbytes / 1e6:.1f} MB")
        return

    r = convert_gguf(model, output, "none" if no_calibration else calibration_text, force=force, bundle=bundle)
    if r.group == 1:
        down = f"down columns requantized to {r.down_type} with {r.down_rel_rms_error:.2%} relative RMS error"
    elif r.down_rel_rms_error:
        down = f"ffn_down requantized to {r.down_type} blocks with {r.down_rel_rms_error:.2%} relative RMS error"
    else:
        down = f"ffn_down blocks ({r.down_type}) as in the source"
    click.echo(f"wrote {r.path}: {r.n_layers} layers, {r.record_bytes}-byte records of {r.group} neuron"
               f"{'s' if r.group > 1 else ''}, resident section {r.resident_bytes / 1e6:.1f} MB, FFN bundles "
               f"{r.bundle_bytes / 1e6:.1f} MB; {down}; calibrated on {r.calibration}")


@cli.command()
@model_argument
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="Calibration text (not the text you evaluate on).")
@click.option("--rank", type=int, default=128, show_default=True, help="Predictor rank (a multiple of 32).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokens", type=int, default=4096, show_default=True, help="Calibration tokens used (at most).")
@click.option("--recall", type=float, default=0.96, show_default=True,
              help="Share of the active neurons each layer's threshold keeps on validation tokens (higher: fewer "
                   "misses, more neurons read).")
@click.option("-t", "--threads", type=int, default=0, help="Compute threads (0: all cores).")
@click.option("-o", "--output", default=None, help="Write the result here instead of rewriting MODEL in place.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def calibrate(model, model_opt, text_file, rank, epochs, seed, tokens, recall, threads, output, verbose):
    """Train a low-rank sparsity predictor per layer on a .flash model's own activations and store it in the file
    (for --sparsity-score predictor); prints held-out recall and precision per layer."""
    from flashlm.tools.calibrate import calibrate_predictor

    def progress(what, done, total):
        click.echo(f"\r{what:<9} {done}/{total}", nl=done >= total, err=True)

    r = calibrate_predictor(pick_model(model, model_opt), text_file, rank, epochs, seed, tokens, threads, output, progress,
                            recall=recall)
    for i, (rc, pr, sel) in enumerate(zip(r.recall, r.precision, r.selected)):
        click.echo(f"layer {i:>3}: held-out recall {rc:.4f}, precision {pr:.4f}, selects {sel:.1%}")
    click.echo(f"wrote {r.path} in {r.seconds:.0f} s: {r.description}")


@cli.command()
@model_argument
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
def verify(model, model_opt, verbose):
    """Check every section of a .flash file against its checksum (header and metadata, resident tensors, each
    layer's FFN bundle) and every padding byte, reading in 1 MiB chunks; exit status 1 on corruption."""
    from flashlm.flash_store.reader import verify_store

    file = pick_model(model, model_opt)
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
    from flashlm.flash_store.probe import probe, save

    table = probe(path, seconds=seconds, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"saved to {save(path, table)}")
