"""`flashlm probe-disk`: read throughput by chunk size x threads on the user's storage (the paper's Fig. 2b).

Random aligned O_DIRECT reads (buffered + DONTNEED where O_DIRECT is refused) from a scratch file written next to
PATH (or from PATH itself when it is a file of at least 256 MiB); the table is saved as JSON in the cache directory
for the I/O cost model, keyed by the device holding PATH.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from flashlm.flash_store.io_engine import ALIGN, aligned_buffer

CHUNKS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
THREADS = [1, 2, 4, 8, 16]
SCRATCH_BYTES = 256 << 20


def _scratch(path: str) -> tuple[str, bool]:
    if os.path.isfile(path) and os.path.getsize(path) >= SCRATCH_BYTES:
        return path, False
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    scratch = os.path.join(folder, f".flashlm-probe-{os.getpid()}")
    block = os.urandom(1 << 20)
    with open(scratch, "wb") as f:
        for _ in range(SCRATCH_BYTES >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return scratch, True


def _open(path: str) -> tuple[int, bool]:
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def probe(path: str, seconds: float = 0.5, progress=None) -> dict:
    target, temporary = _scratch(path)
    fd, direct = _open(target)
    size = os.fstat(fd).st_size
    results = {"path": os.path.abspath(path), "direct": direct, "mb_per_s": {}}
    try:
        for chunk in CHUNKS:
            for threads in THREADS:
                buffers = [aligned_buffer(chunk) for _ in range(threads)]
                deadline = time.perf_counter() + seconds
                done = [0] * threads

                def worker(k: int) -> None:
                    rng, view = random.Random(k), memoryview(buffers[k])
                    while time.perf_counter() < deadline:
                        offset = rng.randrange(0, (size - chunk) // ALIGN) * ALIGN
                        done[k] += os.preadv(fd, [view], offset)
                        if not direct:
                            os.posix_fadvise(fd, offset, chunk, os.POSIX_FADV_DONTNEED)

                t = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(worker, range(threads)))
                mbps = sum(done) / (time.perf_counter() - t) / 1e6
                results["mb_per_s"][f"{chunk}x{threads}"] = round(mbps, 1)
                if progress:
                    progress(f"{chunk >> 10:5d} KiB x {threads:2d} threads: {mbps:8.1f} MB/s")
    finally:
        os.close(fd)
        if temporary:
            os.unlink(target)
    return results


def cache_file(path: str) -> str:
    from flashlm.quant.bundle_kernel import _cache_dir

    dev = os.stat(path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))).st_dev
    return os.path.join(_cache_dir(), f"disk-{dev}.json")


def save(path: str, table: dict) -> str:
    out = cache_file(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    return out


def load(path: str) -> dict | None:
    try:
        with open(cache_file(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
