"""GPU checks and benchmarks (needs CuPy and an NVIDIA GPU).

    python -m labs.gpu_bench kernels                 # kernels vs references; 4096 x 11008 Q4_0 GB/s
    python -m labs.gpu_bench compare MODEL.flash     # GPU vs CPU backend: greedy 3 x 64, teacher-forced
    python -m labs.gpu_bench speed MODEL.flash -n 128 --runs 3   # decode tok/s: GPU (graphs, and op by op) vs CPU
    python -m labs.gpu_bench naive MODEL.flash --gpu-memory-budget 2GB --memory-budget 4GB -n 8
                                                              # flashlm's tiers vs copying every layer every token
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from types import SimpleNamespace

import numpy as np
from gguf.constants import GGMLQuantizationType as QT

PROMPTS = ["The history of the printing press", "def fibonacci(n):", "Three things to know about the ocean:"]


def _random_rows(qtype, n: int, k: int, rng) -> np.ndarray:
    """Valid GGUF rows: quantized from random floats by gguf-py's reference quantizer; Q4_K and Q6_K (which it
    cannot quantize): random superblocks with float16 d (and dmin) of 0.01-0.03."""
    import gguf

    if qtype == QT.Q4_K:
        raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
        raw[..., :4] = rng.uniform(0.01, 0.03, (n, k // 256, 2)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, -1)
    if qtype == QT.Q6_K:  # ql, qh, int8 scales, then d
        raw = rng.integers(0, 256, (n, k // 256, 210), dtype=np.uint8)
        raw[..., 208:] = rng.uniform(0.01, 0.03, (n, k // 256, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, -1)
    return gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)


def graph_times(cp, rounds: int, launch, reps: int = 5) -> list[float]:
    """GPU milliseconds per launch(r), r = 0..rounds-1, captured in a CUDA graph and replayed `reps` times once
    warm (a Python launch costs more than these kernels)."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for r in range(rounds):
            launch(r)
        graph = stream.end_capture()
    graph.launch(stream)
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / rounds)
    return times


def _graph_ms(cp, rounds: int, launch) -> float:
    """The median of graph_times."""
    return float(np.median(graph_times(cp, rounds, launch)))


def check_kernels(rounds: int = 50) -> dict:
    """Kernel errors against gguf.quants / the numpy references, then the bandwidth of the 4096 x 11008 Q4_0
    product."""
    rng = np.random.default_rng(0)
    report = _kernel_errors(rng)
    report.update(_matvec_bandwidth(rng, rounds))
    return report


def _kernel_errors(rng) -> dict:
    """errors: max |GPU - float64 reference with float x| / max |reference| (int8 x costs 0.15-0.85%);
    errors_exact: the same against float64 products of the x the kernels use: the dequantized int8 x for up to
    8 tokens, float x for more (float32 rounding only); quantize_equal_cpu: quantize_x equals the CPU's int8
    quantization bit for bit."""
    import cupy as cp
    import gguf

    from flashlm.flash_store.format import RecordLayout
    from flashlm.quant.bundle_kernel import reference_ffn
    from tests.oracles import quantize_x_reference
    from flashlm.quant.cuda_kernels import CudaKernels

    kk = CudaKernels()
    report = {"errors": {}, "errors_exact": {}, "quantize_equal_cpu": True}

    def x_int8(x):  # what the kernels multiply by: the dequantized int8 x, and a check of quantize_x
        q, dx = quantize_x_reference(x)
        gq, gd, gs = (cp.asnumpy(a) for a in kk.quantize(cp.asarray(x)))
        report["quantize_equal_cpu"] &= bool((gq == q).all() and (gd == dx).all() and
                                             (gs == q.reshape(len(x), -1, 32).astype(np.int32).sum(-1)).all())
        return (q.reshape(len(x), -1, 32) * dx[..., None].astype(np.float64)).reshape(x.shape)

    def record(name, got, ref, ref_exact):
        got = cp.asnumpy(got)
        report["errors"][name] = float(np.abs(got - ref).max() / np.abs(ref).max())
        report["errors_exact"][name] = float(np.abs(got - ref_exact).max() / np.abs(ref_exact).max())

    def check_records(name, records, layout, act):
        """kk.bundle over flash-store records (d_model 256) against the numpy reference (float64)."""
        gr = kk.upload_records(records, layout)
        n = len(records)
        for S in (1, 5, 11):
            x = (rng.standard_normal((S, 256)) * 0.1).astype(np.float32)
            ref, _ = reference_ffn(records, layout, x, act)
            exact = reference_ffn(records, layout, x_int8(x).astype(np.float32), act)[0] if S <= 8 else ref
            y = cp.zeros((S, 256), cp.float32)
            kk.bundle(gr.data.ptr, n, layout, act, cp.asarray(x), y, cp.empty(8 * n * layout.group, cp.float32))
            record(f"{name} S={S}", y, ref, exact)

    for qtype in (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q5_0, QT.Q4_K, QT.Q6_K):
        rows = _random_rows(qtype, 301, 512, rng)
        w = gguf.quants.dequantize(rows, qtype).astype(np.float64)
        g = kk.upload_rows(rows, qtype, 512)
        for S in (1, 3, 8, 13):
            x = rng.standard_normal((S, 512)).astype(np.float32)
            x[0, :32] *= 1e-3  # a block of small values
            y = cp.full((S, 301), np.nan, cp.float32)
            kk.matvec(g.data.ptr, g.shape[1], 301, 512, qtype, cp.asarray(x), y)
            exact = (x_int8(x) if S <= 8 else x.astype(np.float64)) @ w.T  # S > 8: float x, cuBLAS
            record(f"{qtype.name} S={S}", y, x.astype(np.float64) @ w.T, exact)
    # bundle records [gate | up | down column] against the numpy reference (float64)
    for gt, ut, act in ((QT.Q4_0, QT.Q4_0, "silu"), (QT.Q4_1, QT.Q4_1, "gelu_tanh"), (QT.Q8_0, QT.Q8_0, "silu"),
                        (QT.Q4_0, QT.Q8_0, "silu"), (QT.Q5_0, QT.Q5_0, "gelu_tanh"), (QT.Q4_K, QT.Q4_K, "silu"),
                        (QT.Q6_K, QT.Q6_K, "gelu_tanh")):
        layout, n = RecordLayout(256, gt, ut, QT.Q8_0), 200
        g, u, dn = layout.slices()
        records = np.zeros((n, layout.record_bytes), np.uint8)
        records[:, g] = _random_rows(gt, n, 256, rng)
        records[:, u] = _random_rows(ut, n, 256, rng)
        records[:, dn] = _random_rows(QT.Q8_0, n, 256, rng)
        check_records(f"bundle {gt.name}/{ut.name} {act}", records, layout, act)
    # block-layout records [32 gate rows | 32 up rows | 256 ffn_down blocks] (format.py, group 32)
    for gt, dt, act in ((QT.Q4_1, QT.Q4_1, "silu"), (QT.Q4_0, QT.Q8_0, "gelu_tanh"), (QT.Q5_0, QT.Q4_0, "silu")):
        layout, n = RecordLayout(256, gt, gt, dt, 32), 7
        g, u, dn = layout.slices()
        records = np.zeros((n, layout.record_bytes), np.uint8)
        records[:, g] = _random_rows(gt, 32 * n, 256, rng).reshape(n, -1)
        records[:, u] = _random_rows(gt, 32 * n, 256, rng).reshape(n, -1)
        down = _random_rows(dt, 256, 32 * n, rng)  # ffn_down: 256 rows of 32n values
        records[:, dn] = down.reshape(256, n, -1).transpose(1, 0, 2).reshape(n, -1)
        check_records(f"blocks {gt.name}/{dt.name} {act}", records, layout, act)
    report["errors_exact"].update(_decode_step_errors(kk, rng))

    def fused_equals_quantize(quantized: list, y) -> bool:  # a kernel's own quantization of y, bit for bit
        return len(quantized) == 1 and all(bool((cp.asnumpy(a) == cp.asnumpy(b)).all())
                                           for a, b in zip(quantized[0], kk.quantize(y)))

    # rms_norm's fused quantization (decode steps) against quantize_x on its result: the same bits
    for residual in (None, cp.asarray(rng.standard_normal((3, 576)).astype(np.float32))):
        quantized: list = []
        out = kk.rms_norm(cp.asarray(rng.standard_normal((3, 576)).astype(np.float32)),
                          cp.asarray(rng.uniform(0.5, 1.5, 576).astype(np.float32)), 1e-5, residual=residual,
                          quantized=quantized)
        report["quantize_equal_cpu"] &= fused_equals_quantize(quantized, out if residual is None else out[0])
    # attend_decode's fused quantization of its output (the o projection's input), likewise
    from flashlm.models.base import RopeConfig

    cos, sin = (cp.asarray(t) for t in RopeConfig(64, 10000.0).tables(32))
    keys, values = (cp.asarray((rng.standard_normal((3, 32, 64)) * 0.5).astype(np.float16)) for _ in range(2))
    q, k, v = (cp.asarray(rng.standard_normal((1, n, 64)).astype(np.float32)) for n in (9, 3, 3))
    quantized = []
    out = kk.attend_decode(q, k, v, keys, values, cp.asarray(np.array([20], np.int32)), cos, sin, False, 0,
                           quantized)
    report["quantize_equal_cpu"] &= fused_equals_quantize(quantized, out)
    return report


def _decode_step_errors(kk, rng) -> dict:
    """rms_norm (with and without the fused residual add) and attend_decode (RoPE, float16 cache append,
    attention; both RoPE pairings, a sliding window) against the numpy references the CPU backend runs: max
    |GPU - numpy| / max |numpy| (float32 rounding only)."""
    import cupy as cp

    from flashlm.models.base import RopeConfig
    from flashlm.runtime.kernel_executor import attend, rms_norm

    errors = {}

    def err(name, got, ref):
        errors[name] = float(np.abs(cp.asnumpy(got) - ref).max() / np.abs(ref).max())

    x, r = rng.standard_normal((3, 576)).astype(np.float32), rng.standard_normal((3, 576)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 576).astype(np.float32)
    err("rms_norm", kk.rms_norm(cp.asarray(x), cp.asarray(w), 1e-5), rms_norm(x, w, 1e-5))
    y, total = kk.rms_norm(cp.asarray(x), cp.asarray(w), 1e-5, residual=cp.asarray(r))
    err("add_rms_norm", y, rms_norm(x + r, w, 1e-5))
    err("add_rms_norm total", total, x + r)
    for interleaved, hd, window in ((True, 64, 0), (False, 256, 0), (False, 128, 5)):
        # the ModelArgs fields attend reads
        A = SimpleNamespace(n_heads=8, n_kv_heads=2, head_dim=hd, rope=RopeConfig(hd, 10000.0, interleaved=interleaved))
        cos, sin = A.rope.tables(32)
        cap, n_past = 32, 20
        keys = (rng.standard_normal((2, cap, hd)) * 0.5).astype(np.float16)
        values = (rng.standard_normal((2, cap, hd)) * 0.5).astype(np.float16)
        q, k, v = (rng.standard_normal((1, n, hd)).astype(np.float32) for n in (8, 2, 2))
        gk, gv = cp.asarray(keys), cp.asarray(values)
        ref = attend(A, q, k, v, keys, values, n_past, cos, sin, window)
        pos = cp.asarray(np.array([n_past], np.int32))
        got = kk.attend_decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), gk, gv, pos, cp.asarray(cos),
                               cp.asarray(sin), interleaved, window)
        name = f"attend_decode hd={hd} {'interleaved' if interleaved else 'halves'} window={window}"
        err(name, got, ref)
        err(name + " cache", gk[:, :n_past + 1].astype(cp.float32), keys[:, :n_past + 1].astype(np.float32))
    return errors


def _matvec_bandwidth(rng, rounds: int) -> dict:
    """W (11008 rows x 4096) Q4_0 = 25.4 MB; 8 copies (203 MB) rotated so no product is served from the 60 MB L2.
    GPU time: the products captured in a CUDA graph and replayed (a Python launch costs more than the kernel):
    the product alone (x quantized once beforehand, as the engine shares one quantization between the products
    of one input), and with the quantization of x in each round."""
    import cupy as cp

    from flashlm.quant.cuda_kernels import CudaKernels

    n, k = 11008, 4096
    rows = _random_rows(QT.Q4_0, n, k, rng)
    kk = CudaKernels()
    copies = [kk.upload_rows(rows, QT.Q4_0, k) for _ in range(8)]
    x = cp.asarray(rng.standard_normal((1, k)).astype(np.float32))
    y = cp.empty((1, n), cp.float32)
    xq = kk.quantize(x)
    stride = copies[0].shape[1]
    kk.matvec(copies[0].data.ptr, stride, n, k, QT.Q4_0, x, y, xq)  # compiled, warm
    ms = _graph_ms(cp, rounds, lambda r: kk.matvec(copies[r % 8].data.ptr, stride, n, k, QT.Q4_0, x, y, xq))
    ms_q = _graph_ms(cp, rounds, lambda r: kk.matvec(copies[r % 8].data.ptr, stride, n, k, QT.Q4_0, x, y))
    # the same bytes read by a plain streaming kernel (16-byte loads, grid-stride, one atomic per block): what a
    # single 25 MB read can reach on this card, launch and ramp included
    read_all = cp.RawKernel(r"""
    extern "C" __global__ void read_all(const uint4* p, long long n, unsigned int* out) {
        unsigned int acc = 0;
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
            uint4 v = __ldg(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
        if (acc == 0x12345678u) atomicAdd(out, 1u);
    }""", "read_all")
    sink = cp.zeros(1, cp.uint32)
    props = cp.cuda.runtime.getDeviceProperties(0)
    blocks = props["multiProcessorCount"] * 16
    read_ms = _graph_ms(cp, rounds, lambda r: read_all((blocks,), (256,), (copies[r % 8], np.int64(rows.nbytes // 16),
                                                                           sink)))
    clock_khz = props["memoryClockRate"]
    peak = 2 * clock_khz * 1e3 * props["memoryBusWidth"] / 8 / 1e9 if clock_khz else float("nan")  # DDR
    gb_s = rows.nbytes / ms / 1e6
    return {"device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "matvec_bytes": int(rows.nbytes), "matvec_ms": ms, "matvec_gb_s": gb_s,
            "matvec_with_quantize_ms": ms_q, "matvec_with_quantize_gb_s": rows.nbytes / ms_q / 1e6,
            "plain_read_ms": read_ms, "plain_read_gb_s": rows.nbytes / read_ms / 1e6,
            "card_peak_gb_s": peak, "fraction_of_peak": gb_s / peak,
            "fraction_of_peak_with_quantize": rows.nbytes / ms_q / 1e6 / peak}


def _greedy(m, prompt: str, n: int) -> list[int]:
    return [r.token for r in m.stream(prompt, max_tokens=n, temperature=0.0) if r.token is not None]


@contextlib.contextmanager
def _cpu_float_x():
    """The CPU backend with float32 activations (FLASHLM_INT8_ACTIVATIONS=0) inside the block."""
    from flashlm.quant import bundle_kernel as bk

    saved = bk.INT8_ACTIVATIONS, bk.FFN_INT8
    bk.INT8_ACTIVATIONS = bk.FFN_INT8 = False
    try:
        yield
    finally:
        bk.INT8_ACTIVATIONS, bk.FFN_INT8 = saved


def _stepped_logits(m, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits through decode steps (one token per forward pass: the decode kernels)."""
    engine = m._loaded.engine
    with engine.lock:
        engine.reset()
    out = [engine.prefill(ids[:1])]
    out += [engine.step(t) for t in ids[1:]]
    return np.concatenate(out)


def _agreement(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    def ppl(lg_):
        z = lg_.astype(np.float64)
        z -= z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))

    return {"top1": float((ref[:-1].argmax(-1) == got[:-1].argmax(-1)).mean()), "ppl_ref": ppl(ref),
            "ppl": ppl(got), "max_rel_logit_diff": float(np.abs(ref - got).max() / np.abs(ref).max())}


def compare(path: str, n_tokens: int = 64, gpu_budget: str | None = None, text: str | None = None,
            n_text: int = 512, n_decode: int = 256) -> dict:
    """GPU vs CPU backend on the same .flash.
    greedy: 3 prompts x n_tokens against the CPU backend as it runs by default (int8 x decode).
    prompt: teacher-forced logits of n_text tokens in one batch (GPU: float x, cuBLAS) against the CPU backend
    with float x (prompt_float) and with its default int8 x (prompt_int8).
    decode: teacher-forced through n_decode single-token steps (GPU: the int8 decode kernels) against the CPU
    backend's own decode steps (int8 x, decode_int8) and the CPU float-x batch (decode_vs_float); beside them
    the CPU backend's decode steps against its own int8 batch (cpu_steps_vs_cpu_batch): int8 x turns float
    rounding differences into different roundings of x, so two int8 paths differ by this much at least."""
    import flashlm

    cpu = flashlm.load(path, threads=4, ctx_size=1024)
    gpu = flashlm.load(path, ctx_size=1024, device="cuda", gpu_memory_budget=gpu_budget)
    report = {"greedy": []}
    for p in PROMPTS:
        a, b = _greedy(cpu, p, n_tokens), _greedy(gpu, p, n_tokens)
        first_diff = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
        report["greedy"].append({"prompt": p, "equal": a == b, "first_difference": first_diff})
    if text:
        with open(text, encoding="utf-8") as fh:
            ids = cpu.tokenize(fh.read())[:n_text]
        with _cpu_float_x():
            cpu_float = cpu.logits(ids)
        gpu_batch = gpu.logits(ids)
        report["prompt_float"] = _agreement(cpu_float, gpu_batch, ids)
        report["prompt_int8"] = _agreement(cpu.logits(ids), gpu_batch, ids)
        d = ids[:n_decode]
        gpu_steps = _stepped_logits(gpu, d)
        cpu_steps = _stepped_logits(cpu, d)
        report["decode_int8"] = _agreement(cpu_steps, gpu_steps, d)
        report["decode_vs_float"] = _agreement(cpu_float[:len(d)], gpu_steps, d)
        # the noise floor of int8 x: the CPU backend's own decode steps against its own int8 batch
        report["cpu_steps_vs_cpu_batch"] = _agreement(cpu.logits(d), cpu_steps, d)
    report["gpu_plan"] = gpu._loaded.engine.executor.gpu_plan.describe()
    return report


def _decode_rate(engine, ids: list[int], n: int) -> tuple[float, dict]:
    ffn = engine.executor.ffn
    logits = engine.prefill(ids)
    tok = int(np.argmax(logits))
    before = ffn.stats.copy()
    transfer0, gpu0 = ffn.transfer_s, ffn.gpu_ffn_s
    t = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(engine.step(tok)))
    dt = time.perf_counter() - t
    d = ffn.stats.since(before)
    split = {"ms_per_token": dt / n * 1e3, "io_wait_ms": d.io_wait_s / n * 1e3,
             "host_ms": (d.manage_s + d.compute_s) / n * 1e3,
             "read_mb_per_token": d.io.bytes_read / n / 1e6}
    split["transfer_ms"] = (ffn.transfer_s - transfer0) / n * 1e3  # host->GPU copies (CUDA events, copy stream)
    split["gpu_ffn_ms"] = (ffn.gpu_ffn_s - gpu0) / n * 1e3  # FFN kernels (CUDA events, compute stream)
    # copies overlap the compute stream: the part of a token neither copying, computing the FFN nor waiting for
    # flash, when they do not overlap (negative where they do)
    split["other_ms"] = split["ms_per_token"] - split["io_wait_ms"] - split["transfer_ms"] - split["gpu_ffn_ms"]
    return n / dt, split


def _decode_tok_s(m, ids: list[int], n: int) -> float:
    """Greedy decode steps after a prompt (the sampler's work, an argmax, included), tokens per second."""
    engine = m._loaded.engine
    with engine.lock:
        engine.reset()
    tok = int(np.argmax(engine.prefill(ids)))
    t = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(engine.step(tok)))
    return n / (time.perf_counter() - t)


def speed(path: str, n_tokens: int = 128, runs: int = 3, gpu_budget: str | None = None) -> dict:
    """Decode tok/s on one .flash: the GPU with each step one CUDA graph, the GPU launching op by op, and the CPU
    backend (default threads), in this process, one after the other; `runs` runs of n_tokens each after a warm-up
    run, 16-token prompt. For the graphs: the GPU time of a replayed step (CUDA events) against the wall time."""
    import flashlm

    ids = list(range(1000, 1016))
    report = {}
    gpu = flashlm.load(path, ctx_size=1024, device="cuda", gpu_memory_budget=gpu_budget)
    ex = gpu._loaded.engine.executor
    report["gpu_plan"] = ex.gpu_plan.describe()
    report["graphable"] = ex.graphable
    for name, graphs in (("gpu_graphs", True), ("gpu_op_by_op", False)):
        ex.use_graphs = graphs
        _decode_tok_s(gpu, ids, 16)  # warm-up (compiles, captures)
        replays, gpu_s = ex.graph_replays, ex.graph_gpu_s
        rates = [_decode_tok_s(gpu, ids, n_tokens) for _ in range(runs)]
        report[name] = {"tok_s": rates, "median": float(np.median(rates))}
        if graphs and ex.graph_replays > replays:
            report[name]["gpu_ms_per_step"] = (ex.graph_gpu_s - gpu_s) / (ex.graph_replays - replays) * 1e3
            report[name]["wall_ms_per_step"] = 1e3 / float(np.median(rates))
    gpu.close()
    cpu = flashlm.load(path, ctx_size=1024)
    report["cpu_threads"] = cpu._loaded.engine.executor.kernel.threads
    _decode_tok_s(cpu, ids, 16)
    rates = [_decode_tok_s(cpu, ids, n_tokens) for _ in range(runs)]
    report["cpu"] = {"tok_s": rates, "median": float(np.median(rates))}
    cpu.close()
    report["ratio_graphs_vs_cpu"] = report["gpu_graphs"]["median"] / report["cpu"]["median"]
    report["ratio_per_run"] = [g / c for g, c in zip(report["gpu_graphs"]["tok_s"], rates)]
    return report


def naive_vs_tiers(path: str, gpu_budget: str, host_budget: str, n_tokens: int) -> dict:
    """Both in this process, one after the other: flashlm's tiers, then the naive baseline (every layer's
    weights copied to the GPU for every token: FFN records read from flash, attention from host memory)."""
    from flashlm.runtime.flash_loader import load_cuda_executor
    from flashlm.models import read_model
    from flashlm.options import LoadOptions
    from flashlm.runtime.executor import Engine

    import cupy as cp

    from flashlm.tools.memory import peak_rss_bytes

    report = {}
    ids = list(range(1000, 1016))
    for name, naive in (("flashlm", False), ("naive", True)):
        opts = LoadOptions(ctx_size=256, memory_budget=host_budget, gpu_memory_budget=gpu_budget,
                           device="cuda").validate()
        f, family, args = read_model(path)
        t = time.perf_counter()
        executor, _ = load_cuda_executor(path, f, family, args, opts, 256, 4, naive=naive)
        load_s = time.perf_counter() - t
        engine = Engine(executor, 256, 32)
        rate, split = _decode_rate(engine, ids, n_tokens)
        report[name] = {"tok_s": rate, "load_s": load_s, "plan": executor.gpu_plan.describe(), **split,
                        "gpu_pool_mb": cp.get_default_memory_pool().total_bytes() / 1e6,
                        "host_peak_rss_mb": peak_rss_bytes() / 1e6}
        executor.ffn.close()
        del engine, executor
        cp.get_default_memory_pool().free_all_blocks()
        f.close()
    report["speedup"] = report["flashlm"]["tok_s"] / report["naive"]["tok_s"]
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kernels")
    c = sub.add_parser("compare")
    c.add_argument("model")
    c.add_argument("-n", type=int, default=64)
    c.add_argument("--gpu-memory-budget", default=None)
    c.add_argument("--text", default=None)
    sp = sub.add_parser("speed")
    sp.add_argument("model")
    sp.add_argument("-n", type=int, default=128)
    sp.add_argument("--runs", type=int, default=3)
    sp.add_argument("--gpu-memory-budget", default=None)
    nv = sub.add_parser("naive")
    nv.add_argument("model")
    nv.add_argument("--gpu-memory-budget", default="2GB")
    nv.add_argument("--memory-budget", default="4GB")
    nv.add_argument("-n", type=int, default=8)
    a = p.parse_args(argv)
    if a.cmd == "kernels":
        out = check_kernels()
    elif a.cmd == "compare":
        out = compare(a.model, a.n, a.gpu_memory_budget, a.text)
    elif a.cmd == "speed":
        out = speed(a.model, a.n, a.runs, a.gpu_memory_budget)
    else:
        out = naive_vs_tiers(a.model, a.gpu_memory_budget, a.memory_budget, a.n)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
