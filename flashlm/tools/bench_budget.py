"""`flashlm bench-budget`: both engines under the same hard memory limit, side by side.

For each budget B: the page cache is dropped, a cgroup (v1 memory controller; v2 where present) is limited to B,
and each engine runs in it in a fresh process: llama.cpp (llama-cpp-python, default mmap) on the GGUF, flashlm on
the .flash with --memory-budget B. Each generates n greedy tokens after a short prompt. Reported: decode tok/s,
the cgroup's peak usage, whether the limit was hit (OOM kill), and the ratio. Needs root (cgroups, drop_caches).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

PROMPT = "The history of the printing press begins"


def _cgroup_root() -> tuple[str, str]:
    """(directory to create limits under, 'v1' | 'v2')."""
    with open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "memory":
                return f"/sys/fs/cgroup/memory{path}", "v1"
    return "/sys/fs/cgroup" + open("/proc/self/cgroup").read().split("::", 1)[1].strip(), "v2"


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_limited(cmd: list[str], limit: int | None, timeout: float) -> dict:
    """Run cmd inside a fresh memory cgroup limited to `limit` bytes; returns its JSON line, peak and status."""
    root, version = _cgroup_root()
    group = os.path.join(root, f"flashlm-bench-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(group)
    try:
        if limit is not None:
            name = "memory.limit_in_bytes" if version == "v1" else "memory.max"
            with open(os.path.join(group, name), "w") as f:
                f.write(str(limit))
        if version == "v1":  # no swap here, but make the limit cover swap too where there is some
            try:
                with open(os.path.join(group, "memory.memsw.limit_in_bytes"), "w") as f:
                    f.write(str(limit) if limit is not None else "-1")
            except OSError:
                pass
        procs = os.path.join(group, "cgroup.procs")
        wrapper = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
        t = time.perf_counter()
        try:
            proc = subprocess.run(wrapper, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(procs)  # the engine's own children too (a compiler), or they hold the group
            raise
        wall = time.perf_counter() - t
        peak_name = "memory.max_usage_in_bytes" if version == "v1" else "memory.peak"
        with open(os.path.join(group, peak_name)) as f:
            peak = int(f.read())
        result = {"returncode": proc.returncode, "peak_bytes": peak, "wall_s": wall}
        if proc.returncode == 0:
            result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            result["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]
        return result
    finally:
        for _ in range(50):
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


def _kill_group(procs: str) -> None:
    """SIGKILL every process left in a cgroup (its cgroup.procs file) and wait until it is empty."""
    for _ in range(50):
        with open(procs) as f:
            pids = [int(p) for p in f.read().split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def build_kernels() -> None:
    """Compile flashlm's C kernels into the user's cache now, outside any limit. Built at first use otherwise, the
    compiler would run inside the engine's cgroup: at 175 MB, cc1 (125 MB) beside the engine thrashed for over
    300 s, and every run timed out."""
    from flashlm.flash_store.aio import AIO_SOURCE
    from flashlm.flash_store.head_sketch import SKETCH_SOURCE
    from flashlm.quant.bundle_kernel import SOURCE, build_library

    for source in (SOURCE, SKETCH_SOURCE, AIO_SOURCE):
        build_library(source)


def worker(engine: str, path: str, n_gen: int, threads: int, ctx: int, budget: int | None,
           output_head: str = "exact", sparsity: str = "off", sparsity_score: str = "exact", window: int = 0) -> dict:
    """Inside the cgroup: load, prompt, n_gen greedy tokens; prints decode tok/s."""
    import numpy as np

    if engine == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)

        def logits():
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

        llm.eval(ids)
        step = lambda tok: llm.eval([tok])  # noqa: E731
    else:
        import flashlm

        m = flashlm.load(path, threads=threads, ctx_size=ctx, memory_budget=budget, output_head=output_head,
                         sparsity=sparsity, sparsity_score=sparsity_score, window=window)
        ids = m.tokenize(PROMPT)
        holder = {"logits": m.engine.prefill(ids)}
        logits = lambda: holder["logits"]  # noqa: E731

        def step(tok):
            holder["logits"] = m.engine.step(tok)
    tok = int(np.argmax(logits()))
    out = [tok]
    ffn = m.engine.executor.ffn if engine == "flashlm" and m.plan is not None else None
    before = ffn.stats.copy() if ffn else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    for _ in range(n_gen - 1):
        step(tok)
        tok = int(np.argmax(logits()))
        out.append(tok)
    dt = time.perf_counter() - t
    # major page faults per token: pages of code or an mmap'd model read back from disk after the limit evicted them
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = {"decode_tps": (n_gen - 1) / dt, "tokens": out,
              "major_faults_per_token": (after.ru_majflt - usage.ru_majflt) / (n_gen - 1),
              "minor_faults_per_token": (after.ru_minflt - usage.ru_minflt) / (n_gen - 1),
              "cpu_ms_per_token": {"user": (after.ru_utime - usage.ru_utime) * 1e3 / (n_gen - 1),
                                   "sys": (after.ru_stime - usage.ru_stime) * 1e3 / (n_gen - 1)}}
    if ffn:
        d = ffn.stats.since(before)
        io = d.io
        plan = m.plan
        result.update(read_mb_per_token=io.bytes_read / (n_gen - 1) / 1e6, reads_per_token=io.reads / (n_gen - 1),
                      effective_read_mb_s=io.effective_mb_s, hot_neurons=plan.hot_neurons * plan.group,
                      head_resident=plan.head_resident, ffn_computed=d.neurons_used / max(1, d.calls * plan.n_ff),
                      window_rows=plan.window_rows,
                      window_hit_rate=d.window_hits / d.window_lookups if d.window_lookups else None,
                      ms_per_token={
                          "io_wait": d.io_wait_s * 1e3 / (n_gen - 1), "ffn": d.compute_s * 1e3 / (n_gen - 1),
                          "manage": d.manage_s * 1e3 / (n_gen - 1), "all": dt * 1e3 / (n_gen - 1)})
    return result


def run_budget_bench(gguf: str, flash: str, budgets: list[int | None], n_gen: int, threads: int, ctx: int,
                     timeout: float, plot: str | None, as_json: bool, output_head: str = "exact",
                     repetitions: int = 1) -> dict:
    """Per budget, `repetitions` rounds of llama.cpp then flashlm (a fresh process each, caches dropped before
    each); each engine's row is its run of median decode speed (or its first failure)."""
    build_kernels()
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        runs: dict[str, list[dict]] = {"llama.cpp": [], "flashlm": []}
        for _ in range(repetitions):
            for engine, path in (("llama.cpp", gguf), ("flashlm", flash)):
                drop_caches()
                cmd = [sys.executable, "-m", "flashlm.tools.bench_budget", engine, path, str(n_gen), str(threads),
                       str(ctx), str(budget or 0), output_head]
                try:
                    runs[engine].append(run_limited(cmd, budget, timeout))
                except subprocess.TimeoutExpired:
                    runs[engine].append({"returncode": None, "error": f"timed out after {timeout:.0f} s"})
        for engine, results in runs.items():
            failed = [r for r in results if not r.get("decode_tps")]
            if failed:
                row[engine] = failed[0]
                continue
            results.sort(key=lambda r: r["decode_tps"])
            row[engine] = dict(results[(len(results) - 1) // 2], decode_tps_all=[r["decode_tps"] for r in results])
        a, b = row["flashlm"], row["llama.cpp"]
        if a.get("decode_tps") and b.get("decode_tps"):
            row["ratio"] = a["decode_tps"] / b["decode_tps"]
        rows.append(row)
        if not as_json:
            _print_row(row)
    report = {"gguf": gguf, "flash": flash, "n_gen": n_gen, "threads": threads, "ctx": ctx, "rows": rows}
    for engine in ("llama.cpp", "flashlm"):
        ok = [r["budget"] for r in rows if r[engine].get("decode_tps") and r["budget"]]
        report[f"smallest_workable_{engine}"] = min(ok) if ok else None
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        for engine in ("llama.cpp", "flashlm"):
            b = report[f"smallest_workable_{engine}"]
            print(f"smallest workable budget tried, {engine}: {b / 1e6:.0f} MB" if b else
                  f"smallest workable budget tried, {engine}: none of those tried")
    if plot:
        _plot(rows, plot)
        if not as_json:
            print(f"plot: {plot}")
    return report


def _fmt(r: dict) -> str:
    if r.get("decode_tps"):
        reads = (f", reads {r['read_mb_per_token']:.1f} MB/token at {r['effective_read_mb_s']:.0f} MB/s"
                 if "read_mb_per_token" in r else "")
        return f"{r['decode_tps']:7.2f} tok/s, peak {r['peak_bytes'] / 1e6:5.0f} MB{reads}"
    return f"failed ({r.get('error', 'rc ' + str(r.get('returncode')))[:60]})"


def _print_row(row: dict) -> None:
    b = f"{row['budget'] / 1e6:.0f} MB" if row["budget"] else "no limit"
    ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
    print(f"{b:>9} | llama.cpp {_fmt(row['llama.cpp'])} | flashlm {_fmt(row['flashlm'])} | flashlm/llama.cpp {ratio}",
          flush=True)


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    limited = [r for r in rows if r["budget"]]
    for engine, style in (("llama.cpp", "o-"), ("flashlm", "s-")):
        pts = [(r["budget"] / 1e6, r[engine].get("decode_tps")) for r in limited if r[engine].get("decode_tps")]
        if pts:
            ax.plot(*zip(*pts), style, label=engine)
        free = [r for r in rows if not r["budget"] and r[engine].get("decode_tps")]
        if free:
            ax.axhline(free[0][engine]["decode_tps"], ls=":", color=ax.lines[-1].get_color() if pts else None,
                       label=f"{engine}, no limit")
    ax.set_xlabel("memory budget (cgroup limit), MB")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed under a memory limit")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    engine, path, n_gen, threads, ctx, budget, head = sys.argv[1:8]
    extra = sys.argv[8:11]  # optional: sparsity, sparsity score, window
    print(json.dumps(worker(engine, path, int(n_gen), int(threads), int(ctx), int(budget) or None, head,
                            *extra[:2], *[int(w) for w in extra[2:]])))
