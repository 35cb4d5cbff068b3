"""Storage faults while streaming (issue 6, item 3), on the real SmolLM2 flash store under the smallest workable
budget (every FFN neuron and every output row streams): an injected I/O error or end of file stops generation
with StorageError naming the file and byte, after emitting only tokens the undisturbed run emits; the model then
refuses further steps; closing leaves no reader thread. Short reads and EINTR resume, and signals arriving during
generation change nothing. A file truncated while in use fails the same way (in a child process, with a timeout).

Faults are injected by replacing os.preadv (only the I/O engine and the embedding table call it) with a wrapper
that misbehaves on the Nth call inside a chosen byte range of the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import flashlm
from flashlm.errors import BudgetError, StorageError
from flashlm.flash_store.io_engine import FlashReader, aligned_buffer

PROMPT = "The capital of France is"
N_TOKENS = 8
TIMEOUT_S = 60


def load_streaming(path: str, **kw) -> flashlm.Model:
    """Near the smallest workable budget (plus 4 MB): the FFN and the output matrix stream from the file. The plan
    measures the baseline as this process's RSS, which moves between loads in a long pytest process (a model freed
    by the previous test): a budget refused is raised to the smallest it names, one that leaves the output matrix
    resident is lowered, until both stream."""
    budget = 1_000_000
    for _ in range(12):
        try:
            m = flashlm.load(path, threads=2, ctx_size=256, memory_budget=budget, **kw)
        except BudgetError as e:
            budget = int(re.search(r"smallest workable budget is (\d+) MB", str(e)).group(1)) * 10 ** 6 + 4_000_000
            continue
        ex = m.engine.executor
        if ex.ffn.hot < ex.ffn.n_ff and not getattr(ex.head_stream, "resident", False):  # the sketch head: never
            reader = ex.ffn.reader
            for name in ("_ahead", "_aio"):  # the faults below reach os.preadv: reads ahead and row reads go
                if getattr(reader, name) is not None:  # through the reader threads here (Linux AIO: tests at the end)
                    getattr(reader, name).close()
                    setattr(reader, name, None)
            return m
        m.close()
        budget -= 8_000_000
    raise AssertionError("no budget made both the FFN and the output matrix stream")


def greedy(m: flashlm.Model, tokens: list[int]) -> list[int]:
    """Appends each token as it is emitted, so a failure leaves in `tokens` what came before it."""
    for r in m.stream(PROMPT, max_tokens=N_TOKENS, temperature=0.0):
        if r.token is not None:
            tokens.append(r.token)
    return tokens


def run_with_timeout(fn, timeout: float = TIMEOUT_S):
    """fn() on a worker thread; fails the test if it has not returned after `timeout` seconds (a hang)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout} s (hang)"
    return box


def io_threads(m) -> list[str]:
    """The reader threads of model m still alive (other tests' models in this process keep theirs)."""
    return [t.name for t in m.engine.executor.ffn.reader._pool._threads if t.is_alive()]


class FaultyPreadv:
    """os.preadv that misbehaves on calls at offsets in [lo, hi): the `at`-th such call (1-based) and then every
    `every`-th after it (every=0: once). Kinds: 'eio' raises EIO, 'eof' returns 0 (what a read past the end of a
    truncated file returns), 'short' returns half the bytes (an unaligned count), 'eintr' raises InterruptedError."""

    def __init__(self, kind: str, lo: int, hi: int, at: int, every: int = 0, fds: set[int] | None = None):
        self.real = os.preadv
        self.kind, self.lo, self.hi, self.at, self.every, self.fds = kind, lo, hi, at, every, fds
        self.calls = self.faults = 0
        self.fault_offsets: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, fd, buffers, offset, *flags):
        if self.lo <= offset < self.hi and (self.fds is None or fd in self.fds):
            with self.lock:
                self.calls += 1
                n = self.calls
                hit = n == self.at or (self.every > 0 and n > self.at and (n - self.at) % self.every == 0)
                if hit:
                    self.faults += 1
                    self.fault_offsets.append(offset)
            if hit:
                if self.kind == "eio":
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                if self.kind == "eof":
                    return 0
                if self.kind == "eintr":
                    raise InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
                # short: the bytes land (an O_DIRECT read must be whole blocks) but fewer are reported
                got = self.real(fd, buffers, offset, *flags)
                return min(got, max(1, sum(len(b) for b in buffers) // 2 - 100))
        return self.real(fd, buffers, offset, *flags)


def ranges(m: flashlm.Model) -> dict[str, tuple[int, int]]:
    """Byte ranges of the file that stream per token: the FFN bundles and the output matrix."""
    ex = m.engine.executor
    layers, rb, n_ff = ex.ffn.store.layers, ex.ffn.record_bytes, ex.ffn.n_ff
    head = ex.head_stream
    return {"ffn": (layers[0].offset - 4096, layers[-1].offset + n_ff * rb),
            "head": (head.offset, head.offset + head.n_rows * head.row_bytes),
            "file": (0, os.path.getsize(m.path))}


@pytest.fixture(scope="module")
def baseline(flash_path) -> list[int]:
    m = load_streaming(flash_path)
    tokens = greedy(m, [])
    m.engine.executor.ffn.close()
    m.close()
    assert len(tokens) == N_TOKENS
    return tokens


# (kind, where, at): the first read of the FFN, one in a later token, the first and a later head read; the
# embedding table (SmolLM2's output matrix is tied to it) reads rows on the generating thread through its own fd.
FAULTS = [("eio", "ffn", 1), ("eio", "ffn", 200), ("eof", "ffn", 90), ("eio", "head", 1), ("eof", "head", 100),
          ("eio", "embedding", 2)]


@pytest.mark.parametrize("kind,where,at", FAULTS)
def test_read_fault_stops_generation_naming_file_and_byte(flash_path, baseline, monkeypatch, kind, where, at):
    m = load_streaming(flash_path)
    lo, hi = ranges(m)["head" if where == "embedding" else where]
    reader = m.engine.executor.ffn.reader
    fds = None if where == "embedding" else {reader.fd}
    fault = FaultyPreadv(kind, lo, hi, at, fds=fds)
    monkeypatch.setattr(os, "preadv", fault)
    tokens: list[int] = []
    box = run_with_timeout(lambda: greedy(m, tokens))
    print(f"{kind} at {where} read {at}: {len(tokens)} tokens, then {box.get('error')}")
    assert fault.faults == 1
    error = box.get("error")
    assert isinstance(error, StorageError), f"expected StorageError, got {error!r}"
    message = str(error)
    assert "\n" not in message and m.path in message
    byte = int(re.search(r"at byte (\d+)", message).group(1))
    assert byte == fault.fault_offsets[0] and lo <= byte < hi
    assert ("Input/output error" if kind == "eio" else "end of file") in message
    assert len(tokens) < N_TOKENS and tokens == baseline[:len(tokens)]  # nothing from a partly read buffer

    # The streaming reader refuses further steps, saying why (its buffers' state is unknown); an embedding row
    # read keeps no state, so only its step failed. Closing waits for nothing that hangs and leaves no thread.
    again = run_with_timeout(lambda: greedy(m, []))
    if where == "embedding":
        assert again.get("value") == baseline and reader.failure is None
    else:
        assert isinstance(again.get("error"), StorageError) and "no further reads" in str(again["error"])
        assert f"at byte {byte}" in str(again["error"])
    assert "error" not in run_with_timeout(m.engine.executor.ffn.close, 10)
    m.close()
    assert io_threads(m) == []


@pytest.mark.parametrize("kind", ["short", "eintr"])
def test_short_reads_and_eintr_resume(flash_path, baseline, monkeypatch, kind):
    m = load_streaming(flash_path)
    lo, hi = ranges(m)["file"]
    fault = FaultyPreadv(kind, lo, hi, at=1, every=3)
    monkeypatch.setattr(os, "preadv", fault)
    box = run_with_timeout(lambda: greedy(m, []))
    monkeypatch.undo()
    print(f"{kind}: {fault.faults} faults in {fault.calls} reads")
    assert box.get("value") == baseline, box.get("error")
    assert fault.faults >= 100 and m.engine.executor.ffn.reader.failure is None
    m.engine.executor.ffn.close()
    m.close()


def test_signals_during_streamed_generation_change_nothing(flash_path, baseline):
    """SIGALRM every 0.5 ms to the process (setitimer) and to each reader thread (pthread_kill): Python installs
    handlers without SA_RESTART, so a blocked read returns EINTR and os.preadv retries it (PEP 475)."""
    m = load_streaming(flash_path)
    handled, sent = [0], [0]
    stop = threading.Event()

    def at_reader_threads():
        while not stop.is_set():
            for t in threading.enumerate():
                if t.name.startswith("flashlm-io") and t.ident is not None:
                    try:
                        signal.pthread_kill(t.ident, signal.SIGALRM)
                        sent[0] += 1
                    except ProcessLookupError:  # the thread ended between enumerate and kill
                        pass
            time.sleep(0.0005)

    previous = signal.signal(signal.SIGALRM, lambda *_: handled.__setitem__(0, handled[0] + 1))
    sender = threading.Thread(target=at_reader_threads, daemon=True)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        sender.start()
        tokens = greedy(m, [])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        stop.set()
        sender.join(5)
        signal.signal(signal.SIGALRM, previous)
    print(f"signals: {sent[0]} sent to reader threads, {handled[0]} handled in the main thread")
    assert tokens == baseline
    assert sent[0] > 100 and handled[0] > 100
    m.engine.executor.ffn.close()
    m.close()


def test_sketch_head_row_read_fault(flash_path, monkeypatch):
    """--output-head sketch: its single-row reads (FlashReader.read_rows, on the reader's threads; read 60: among
    the first token's candidates, after the 48 slices of the sketch's one pass over the matrix) fail the same
    way."""
    for at in (60,):
        m = load_streaming(flash_path, output_head="sketch")
        ex = m.engine.executor
        lo, hi = ranges(m)["head"]
        fault = FaultyPreadv("eio", lo, hi, at, fds={ex.ffn.reader.fd})
        monkeypatch.setattr(os, "preadv", fault)
        box = run_with_timeout(lambda: greedy(m, []))
        monkeypatch.undo()
        print(f"sketch head, eio at head read {at}: {box.get('error')}")
        assert isinstance(box.get("error"), StorageError) and f"at byte {fault.fault_offsets[0]}" in str(box["error"])
        again = run_with_timeout(lambda: greedy(m, []))
        assert isinstance(again.get("error"), StorageError) and "no further reads" in str(again["error"])
        ex.ffn.close()
        m.close()
        assert io_threads(m) == []


@pytest.mark.parametrize("where", ["ffn", "head"])
def test_interrupted_pass_leaves_no_read_in_flight(flash_path, monkeypatch, where):
    """A KeyboardInterrupt (Ctrl-C in chat) while layer 14 computes leaves layer 15's read in flight (into buffer
    1), or while head slice 5 is multiplied leaves slice 8's (into buffer 0). That read is held here until the
    next pass is about to compute from the same buffer (layer 1 / slice 0), or 2 s: without draining, it would
    land there first and change the logits. Interrupted in the 2nd decode step, then teacher-forced logits
    equal those from before, bit for bit."""
    from flashlm.runtime import streaming

    m = load_streaming(flash_path)
    ex = m.engine.executor
    ids = m.tokenize(PROMPT)
    reference = m.logits(ids)
    if where == "ffn":
        ffn, layer, at, target = ex.ffn, 15, 45, "run"  # kernel.run calls: 30 per pass, the 45th is layer 14
        start = ffn.store.layers[layer].offset + ffn.hot * ffn.record_bytes
        owner, rerun_call = ffn.kernel, 2  # the next pass's layer 1 computes from buffer 1
    else:
        head, slice_, at, target = ex.head_stream, 8, 30, "rows_matvec"  # 12 slices per pass: the 30th is slice 5
        start = head.offset + head.bounds[slice_] * head.row_bytes
        owner, rerun_call = streaming, 1  # the next head's slice 0 computes from buffer 0
    held_offset = start // 4096 * 4096
    real_preadv, real_call = os.preadv, getattr(owner, target)
    armed, release, landed, lock = threading.Event(), threading.Event(), threading.Event(), threading.Lock()

    def holding_preadv(fd, buffers, offset, *flags):
        with lock:
            hold = armed.is_set() and offset == held_offset
            if hold:
                armed.clear()
        if not hold:
            return real_preadv(fd, buffers, offset, *flags)
        release.wait(2)
        n = real_preadv(fd, buffers, offset, *flags)
        landed.set()
        return n

    calls = [0]

    def interrupting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at - 1:  # the read of layer 15 / slice 8 is issued after this call
            armed.set()
        if calls[0] == at:
            raise KeyboardInterrupt
        return real_call(*args, **kwargs)

    def rerun(*args, **kwargs):
        calls[0] += 1
        if calls[0] == rerun_call:  # let the held read land now, if it is still out
            release.set()
            landed.wait(2)
        return real_call(*args, **kwargs)

    monkeypatch.setattr(os, "preadv", holding_preadv)
    monkeypatch.setattr(owner, target, interrupting)
    with pytest.raises(KeyboardInterrupt):
        greedy(m, [])
    calls[0] = 0
    monkeypatch.setattr(owner, target, rerun)
    box = run_with_timeout(lambda: m.logits(ids))
    monkeypatch.undo()
    assert landed.is_set()
    assert np.array_equal(box.get("value"), reference), box.get("error") or "logits differ"
    ex.ffn.close()
    m.close()


def test_cli_generate_on_file_truncated_while_in_use(flash_path, tmp_path):
    """The user's view: `flashlm generate` streaming under a budget, the file truncated after its first output;
    one line on stderr naming file and byte, exit status 1 (a runtime failure), within the timeout."""
    copy = str(tmp_path / "cli.flash")
    shutil.copy(flash_path, copy)
    cmd = [sys.executable, "-m", "flashlm.cli", "generate", "-m", copy, "-c", "256", "-p", PROMPT, "-n", "64",
           "--temp", "0", "-t", "2", "--memory-budget"]
    probe = subprocess.run(cmd + ["1MB"], capture_output=True, text=True, timeout=TIMEOUT_S)
    smallest = int(re.search(r"smallest workable budget is (\d+) MB", probe.stderr).group(1))
    proc = subprocess.Popen(cmd + [f"{smallest + 4}MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(1)  # the first streamed byte
        os.truncate(copy, os.path.getsize(copy) // 2)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.decode().strip().splitlines()
    print(f"exit {proc.returncode}: {lines[-1] if lines else ''}")
    assert first and proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("flashlm: error: ") and "Traceback" not in err.decode()
    assert copy in lines[0] and re.search(r"end of file at byte \d+", lines[0])


TRUNCATE_CHILD = r"""
import json, os, shutil, sys, threading
sys.path.insert(0, os.getcwd())
from tests.test_storage_faults import load_streaming, PROMPT, N_TOKENS
from flashlm.errors import StorageError
src, copy, keep = sys.argv[1], sys.argv[2], float(sys.argv[3])
shutil.copy(src, copy)
m = load_streaming(copy)
tokens, error = [], None
try:
    for r in m.stream(PROMPT, max_tokens=N_TOKENS, temperature=0.0):
        if r.token is not None:
            tokens.append(r.token)
            if len(tokens) == 2:
                os.truncate(copy, int(os.path.getsize(copy) * keep))
except StorageError as e:
    error = str(e)
try:
    next(iter(m.stream("Another prompt", max_tokens=1)))  # not the memoized prefill of PROMPT
    again = None
except StorageError as e:
    again = str(e)
m.engine.executor.ffn.close()
threads = [t.name for t in threading.enumerate() if t.name.startswith("flashlm-io")]
print(json.dumps({"tokens": tokens, "error": error, "again": again, "threads": threads}))
"""


@pytest.mark.parametrize("keep", [0.5])
def test_file_truncated_while_in_use(flash_path, baseline, tmp_path, keep):
    """Truncated after the 2nd token to 50% of its size: inside layer 3's FFN bundle (the bundles follow the
    resident tensors, SmolLM2's tied output matrix included; 97%, inside layer 28's, fails the same way)."""
    copy = tmp_path / "in_use.flash"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_CHILD, flash_path, str(copy), str(keep)],
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"truncated to {keep:.0%}: {len(out['tokens'])} tokens, then {out['error']}")
    assert out["error"] is not None and str(copy) in out["error"] and "\n" not in out["error"]
    assert re.search(r"end of file at byte \d+.*truncated", out["error"])
    assert 2 <= len(out["tokens"]) < N_TOKENS and out["tokens"] == baseline[:len(out["tokens"])]
    assert out["again"] is not None and "no further reads" in out["again"]
    assert out["threads"] == []


# -- the I/O engine alone, on a small file --------------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return str(path), data


def test_failed_chunk_fails_the_request_after_all_its_chunks_stop(data_file, monkeypatch):
    path, data = data_file
    reader = FlashReader(path, threads=4, chunk_bytes=256 << 10)
    fault = FaultyPreadv("eio", 3 << 20, 3 << 20 | 1, at=1)  # the chunk starting at 3 MiB
    monkeypatch.setattr(os, "preadv", fault)
    fut = reader.read(100, (6 << 20) - 100)
    with pytest.raises(StorageError, match=rf"{re.escape(path)}: read failed at byte {3 << 20}: Input/output"):
        fut.result(TIMEOUT_S)
    with pytest.raises(StorageError, match="no further reads"):
        reader.read(0, 4096)
    with pytest.raises(StorageError, match="no further reads"):
        reader.read_now(0, 10, aligned_buffer(8192))
    run_with_timeout(reader.close, 10)


def test_close_cancels_queued_reads(data_file):
    path, data = data_file
    reader = FlashReader(path, threads=1, chunk_bytes=4096)
    futures = [reader.read(0, 8 << 20) for _ in range(4)]  # 8192 chunks queued on one thread
    run_with_timeout(reader.close, 10)
    outcomes = [f.exception(TIMEOUT_S) for f in futures]  # every future is set: nobody waits forever
    assert any(isinstance(e, StorageError) and "cancelled" in str(e) for e in outcomes)
    with pytest.raises(StorageError, match="closed"):
        reader.read(0, 4096)


def test_unaligned_short_reads_complete_on_o_direct(data_file, monkeypatch):
    path, data = data_file
    reader = FlashReader(path, threads=2, chunk_bytes=1 << 20)
    fault = FaultyPreadv("short", 0, 8 << 20, at=1, every=1)
    monkeypatch.setattr(os, "preadv", fault)
    got = reader.read(12345, 5 << 20).result(TIMEOUT_S)
    assert np.array_equal(got, data[12345:12345 + (5 << 20)]) and fault.faults >= 5
    page = aligned_buffer(3 * 4096)
    assert np.array_equal(reader.read_now(7000, 5000, page), data[7000:12000])
    reader.close()


def _runs(size: int, n: int, length: int, seed: int = 1) -> list[tuple[int, int]]:
    """n non-overlapping sector-aligned runs of `length` bytes in [0, size), ascending."""
    starts = np.sort(np.random.default_rng(seed).choice((size - length) // 512, n, replace=False)) * 512
    runs, end = [], -1
    for a in starts:
        if a >= end:
            runs.append((int(a), int(a) + length))
            end = int(a) + length
    return runs


def test_selective_reads_all_in_flight_give_the_files_bytes(data_file):
    """read_runs through Linux AIO (every run submitted at once) and through the reader threads: the same bytes,
    the file's; more runs than one submission holds go in batches."""
    from flashlm.flash_store.aio import AIO_MAX_EVENTS

    path, data = data_file
    reader = FlashReader(path, threads=4)
    if reader._aio is None:
        reader.close()
        pytest.skip("no Linux AIO on an O_DIRECT descriptor here (tmpfs, or the kernel refuses io_setup)")
    runs = _runs(len(data), AIO_MAX_EVENTS + 90, 3072)
    assert len(runs) > AIO_MAX_EVENTS
    out = aligned_buffer(len(data))
    before = reader.stats.snapshot()
    reader.read_runs(0, runs, out)
    assert all(np.array_equal(out[a:b], data[a:b]) for a, b in runs)
    st = reader.stats.since(before)
    assert st.reads == len(runs) and st.bytes_read == sum(b - a for a, b in runs)
    threaded = aligned_buffer(len(data))
    aio, reader._aio = reader._aio, None  # the reader threads' path
    reader.read_runs(0, runs, threaded)
    reader._aio = aio
    assert all(np.array_equal(threaded[a:b], out[a:b]) for a, b in runs)
    reader.close()


def test_selective_reads_past_a_truncated_end_fail_naming_the_byte(data_file, tmp_path):
    """The file shrinks while open: the run that now passes its end fails with StorageError naming the byte, and the
    reader refuses further reads."""
    path, data = data_file
    copy = tmp_path / "shrinking.bin"
    shutil.copy(path, copy)
    reader = FlashReader(str(copy), threads=4)
    runs = [(4096, 8192), (len(data) - 8192, len(data) - 4096)]
    os.truncate(copy, len(data) - 6144)  # the second run now ends 2 KiB past the end
    out = aligned_buffer(len(data))
    with pytest.raises(StorageError, match=rf"{re.escape(str(copy))}: .*byte {len(data) - 6144}"):
        reader.read_runs(0, runs, out)
    with pytest.raises(StorageError):
        reader.read_runs(0, runs[:1], out)
    reader.close()


def test_reads_ahead_in_flight_together_give_the_files_bytes(data_file):
    """read_ahead (a streamed layer's records, submitted through Linux AIO and collected later): several requests in
    flight at once, unaligned and longer than a chunk, collected in the other order, give the file's bytes."""
    path, data = data_file
    reader = FlashReader(path, threads=2, chunk_bytes=256 << 10)
    if reader._ahead is None:
        reader.close()
        pytest.skip("no Linux AIO on an O_DIRECT descriptor here (tmpfs, or the kernel refuses io_setup)")
    spans = [(12345, 1 << 20), (3 << 20, 700_001), (len(data) - 5000, 5000)]
    buffers = [aligned_buffer(n + 2 * 4096) for _, n in spans]
    requests = [reader.read_ahead(a, n, buf) for (a, n), buf in zip(spans, buffers)]
    for (a, n), req in reversed(list(zip(spans, requests))):
        assert np.array_equal(req.result(), data[a:a + n])
    reader.drain()
    assert not reader._ahead_parts
    reader.close()


def test_a_read_ahead_past_a_truncated_end_fails_naming_the_byte(data_file, tmp_path):
    path, data = data_file
    copy = tmp_path / "shrinking.bin"
    shutil.copy(path, copy)
    reader = FlashReader(str(copy), threads=2)
    if reader._ahead is None:
        reader.close()
        pytest.skip("no Linux AIO on an O_DIRECT descriptor here")
    os.truncate(copy, len(data) - 6144)
    request = reader.read_ahead(len(data) - 65536, 65536, aligned_buffer(65536 + 2 * 4096))
    with pytest.raises(StorageError, match=rf"{re.escape(str(copy))}: .*byte {len(data) - 6144}"):
        request.result()
    with pytest.raises(StorageError):
        reader.read_ahead(0, 4096, aligned_buffer(3 * 4096))
    reader.close()


def test_row_reads_all_in_flight_give_the_files_bytes(data_file):
    """read_rows (the sketch head's candidate rows) through Linux AIO, more rows than one submission holds, at
    unaligned offsets: the file's bytes, as through the reader threads."""
    from flashlm.flash_store.aio import AIO_MAX_EVENTS

    path, data = data_file
    reader = FlashReader(path, threads=4)
    if reader._aio is None:
        reader.close()
        pytest.skip("no Linux AIO on an O_DIRECT descriptor here")
    offsets = np.random.default_rng(2).choice(len(data) - 612, AIO_MAX_EVENTS + 40, replace=False)
    rows = [np.zeros(612, np.uint8) for _ in offsets]
    reader.read_rows(offsets, 612, rows)
    assert all(np.array_equal(r, data[o:o + 612]) for o, r in zip(offsets, rows))
    threaded = [np.zeros(612, np.uint8) for _ in offsets]
    aio, reader._aio = reader._aio, None
    reader.read_rows(offsets, 612, threaded)
    reader._aio = aio
    assert all(np.array_equal(a, b) for a, b in zip(rows, threaded))
    reader.close()
