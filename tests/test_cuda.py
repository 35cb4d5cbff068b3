"""The CUDA backend (runtime/cuda_executor.py). GPU tests skip, with the reason, where CuPy or a GPU is missing
(CI has neither); the error paths run everywhere."""

from __future__ import annotations

import pytest

import flashlm
from flashlm.errors import InvalidOptionError


def _gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install \"flashlm[cuda]\")"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # no driver
        return f"no usable CUDA device ({type(e).__name__})"
    return None


needs_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


@pytest.fixture(scope="module", params=["neuron", "block"])
def smol_flash(tmp_path_factory, smollm_path, request):
    """SmolLM2 as a flash store in each record layout (format.py)."""
    from flashlm.tools.convert import convert_gguf as convert

    path = str(tmp_path_factory.mktemp("cuda") / f"smol_{request.param}.flash")
    convert(smollm_path, path, bundle=request.param)
    return path


def test_device_cuda_needs_a_flash_store(smollm_path):
    with pytest.raises(InvalidOptionError, match="convert it first"):
        flashlm.load(smollm_path, device="cuda")
    with pytest.raises(InvalidOptionError, match="device must be"):
        flashlm.load(smollm_path, device="tpu")


@pytest.mark.skipif(_gpu_reason() is None, reason="a GPU is present")
def test_device_cuda_without_gpu_is_a_clear_error(smol_flash):
    with pytest.raises(InvalidOptionError, match="needs CuPy and an NVIDIA GPU"):
        flashlm.load(smol_flash, device="cuda")


@needs_gpu
def test_gpu_kernels_match_gguf_reference():
    from labs.gpu_bench import check_kernels

    report = check_kernels(rounds=5)
    print(report)
    assert report["quantize_equal_cpu"]  # the CPU decode path's int8 x, bit for bit
    assert max(report["errors_exact"].values()) < 1e-5  # given that x: float32 rounding only
    assert max(report["errors"].values()) < 3e-2  # against float x: int8 x per 32-block (CPU: 0.15-0.85%)


@needs_gpu
def test_gpu_backend_matches_cpu_backend(smol_flash, gpl_text, tmp_path):
    """Teacher-forced on 512 GPL tokens in one batch (float x on both): top-1 >= 97% and perplexity within 1% of
    the CPU backend. Through 256 decode steps (int8 x on both, which turns float rounding differences into
    different roundings of x): perplexity within 2% of the CPU backend's own decode steps (the CPU backend's own
    decode steps differ from its own int8 batch by +1.0%; on the H200 the block store measured -1.19% in one of
    three runs with the fused decode kernels, -1.35% in one of two with the CuPy ops before them)."""
    from labs.gpu_bench import compare

    text = tmp_path / "gpl.txt"
    text.write_text(gpl_text)
    report = compare(smol_flash, 32, None, str(text))
    print(report)
    batch, steps = report["prompt_float"], report["decode_int8"]
    assert batch["top1"] >= 0.97 and abs(batch["ppl"] / batch["ppl_ref"] - 1) <= 0.01
    assert abs(steps["ppl"] / steps["ppl_ref"] - 1) <= 0.02


@needs_gpu
def test_gpu_tiers_stream_and_give_the_resident_logits(smol_flash, gpl_text):
    """A GPU budget that holds part of the FFN and a host budget that holds part of the rest: records come from
    all three tiers, and the logits equal the all-on-GPU run's to float32 rounding (the down projection adds
    partial sums atomically, so GPU runs agree to rounding, not bit for bit). Decode steps (int8 x, where a
    rounding difference can flip a rounding of x) agree to the int8 noise the CPU backend has between its own
    batch and decode paths (gpu_bench.compare: top-1 98%)."""
    import gc

    from labs.gpu_bench import _agreement, _stepped_logits

    import cupy
    import psutil

    cupy.zeros(1)  # CUDA up: its host memory is part of the baseline below
    host = psutil.Process().memory_info().rss + 60_000_000
    tiered = flashlm.load(smol_flash, ctx_size=256, device="cuda", gpu_memory_budget="150MB", memory_budget=host)
    ffn = tiered._loaded.engine.executor.ffn
    print(tiered._loaded.engine.executor.gpu_plan.describe())
    assert 0 < ffn.gpu_hot < ffn.n_ff
    ids = tiered.tokenize(gpl_text)[:64]
    b = tiered.logits(ids)
    before = ffn.stats.io.snapshot()
    long_ids = tiered.tokenize(gpl_text)[:255]  # as compare(): 127 steps put this ratio at -2.3..-2.5% of a 3% bound
    steps_b = _stepped_logits(tiered, long_ids)
    streamed = ffn.stats.io.since(before).bytes_read
    tiered.close()
    del tiered, ffn
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    full = flashlm.load(smol_flash, ctx_size=256, device="cuda")
    a = full.logits(ids)
    # same kernels, two tiers summed in two calls, atomically added partial sums: float32 rounding, amplified over
    # 30 layers (measured 4e-4 of the largest logit)
    assert abs(a - b).max() / abs(a).max() < 2e-3
    assert (a[:-1].argmax(-1) == b[:-1].argmax(-1)).mean() >= 0.97
    steps = _agreement(_stepped_logits(full, long_ids), steps_b, long_ids)
    print(steps)
    # int8 noise: the CPU backend's own batch vs decode steps differ by +0.8% (SmolLM2, 255 tokens) and +1.6%
    # (Gemma 3) in perplexity; tiered vs all-on-GPU measured 2.1% on 63 tokens, 0.7-2.5% on 127
    assert steps["top1"] >= 0.9 and abs(steps["ppl"] / steps["ppl_ref"] - 1) < 0.03
    assert streamed > 0  # some records came from flash


def test_gpu_out_of_memory_at_load_is_a_budget_error(smol_flash, monkeypatch):
    """CuPy's pool refusing an allocation while loading (a transient beyond the plan) becomes a BudgetError naming
    the GPU budget, as an impossible host budget does (no GPU needed: the loader is replaced)."""
    from flashlm.errors import BudgetError
    from flashlm.runtime import model_loader

    class OutOfMemoryError(MemoryError):  # cupy.cuda.memory.OutOfMemoryError's name
        pass

    def refuse(*args, **kw):
        raise OutOfMemoryError("Out of memory allocating 33,553,408 bytes (allocated so far: 161,069,056 bytes, "
                               "limit set to: 150,000,000 bytes).")

    monkeypatch.setattr(model_loader, "load_cuda_executor", refuse)
    with pytest.raises(BudgetError, match=r"GPU memory budget \(150 MB\) ran out while loading .*allocating"):
        flashlm.load(smol_flash, device="cuda", gpu_memory_budget="150MB")
    with pytest.raises(BudgetError, match="the GPU's memory ran out"):
        flashlm.load(smol_flash, device="cuda")
