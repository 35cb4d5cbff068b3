"""The flash-aware I/O engine: positional reads, O_DIRECT where the filesystem allows, a pool of reader threads,
adjacent records coalesced into one read, reads issued ahead (the next layer's while this one computes), and,
through Linux AIO (aio_reads.c) where the kernel allows it, a token's scattered selective reads (read_runs) and the
output head's rows (read_rows) all in flight at once, and a layer's records submitted ahead (read_ahead) and reaped
when the layer needs them, so no reader thread has to be woken on cores the kernels keep busy.

O_DIRECT keeps the model out of the page cache, so memory use is what the planner budgets and nothing silently
grows beside it; where O_DIRECT is refused (tmpfs, some network filesystems) reads are buffered and followed by
posix_fadvise(DONTNEED). Reads land in page-aligned buffers (anonymous mmap), as O_DIRECT requires.
Measured on this project's machines (virtio disk, host-cached): 4 KiB random reads ~0.3-0.6 GB/s, 64 KiB ~2.0-2.5 GB/s, 256 KiB+ 2.4-4.5 GB/s:
so each read is at least `min_read_bytes` and a large range is split across threads in chunks of `chunk_bytes`.

Faults: a failed read (I/O error, end of file in a file truncated while in use) raises StorageError naming the
file and byte, through the request's future to the thread that waits on it. The reader then refuses every further
read (a failed device or a truncated file does not heal, and the caller cannot know which bytes of its buffers are
stale): load the model again. Short reads continue where they stopped; EINTR is retried (os.preadv does so itself,
PEP 475; a retry here covers wrappers that surface it).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from flashlm.errors import ModelFileError, StorageError
from flashlm.flash_store.aio import AIO_MAX_EVENTS, AioContext

ALIGN = 4096
DIRECT_IO_ALIGN = 512  # O_DIRECT offsets must be multiples of the logical block size (512 on every disk we meet)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (anonymous mmap): valid for O_DIRECT reads."""
    size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


@dataclass
class IOStats:
    bytes_read: int = 0  # bytes requested by callers (what the model needed)
    bytes_transferred: int = 0  # bytes actually read from storage (aligned supersets)
    reads: int = 0  # positional read calls issued
    read_s: float = 0.0  # summed time inside read calls (across threads)
    request_s: float = 0.0  # summed wall time from issuing each request to its last byte (effective throughput)

    def snapshot(self) -> "IOStats":
        return IOStats(self.bytes_read, self.bytes_transferred, self.reads, self.read_s, self.request_s)

    def restore(self, before: "IOStats | None" = None) -> None:
        """Set the counters back (to zero, or to a snapshot) in place: others hold this object as live counters."""
        src = before or IOStats()
        self.bytes_read, self.bytes_transferred, self.reads = src.bytes_read, src.bytes_transferred, src.reads
        self.read_s, self.request_s = src.read_s, src.request_s

    def since(self, before: "IOStats") -> "IOStats":
        return IOStats(self.bytes_read - before.bytes_read, self.bytes_transferred - before.bytes_transferred,
                       self.reads - before.reads, self.read_s - before.read_s, self.request_s - before.request_s)

    @property
    def effective_mb_s(self) -> float:
        return self.bytes_read / self.request_s / 1e6 if self.request_s > 0 else 0.0


class FlashReader:
    def __init__(self, path: str, threads: int = 4, chunk_bytes: int = 1 << 20, direct: bool = True):
        self.path, self.chunk_bytes = path, chunk_bytes
        self.direct = False
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                fd = -1
        if fd < 0:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ModelFileError(f"{path}: cannot open for reading: {e.strerror}") from None
        self.fd = fd
        self.file_size = os.fstat(fd).st_size
        self.stats = IOStats()
        self._lock = threading.Lock()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashlm-io")
        self._row_pages: list[np.ndarray] = []  # read_rows' page buffers, one per thread (grown on demand)
        self.failure: StorageError | None = None  # the first failed read; no read is issued after it
        self._buffered_fd = -1  # opened without O_DIRECT to finish a read that a short read left unaligned
        self._outstanding: set[Future] = set()  # requests not finished yet (drain waits for them)
        # read_runs' reads all in flight at once (Linux AIO on the O_DIRECT descriptor), where the kernel allows it
        self._aio, self._aio_lock = None, threading.Lock()
        # read_ahead's reads: submitted to a second context and reaped when their layer needs them
        self._ahead = None
        self._ahead_parts: dict[int, tuple] = {}  # tag -> (request, buffer, position in it, length, file offset)
        self._next_tag = 0
        if self.direct:
            self._aio, self._ahead = AioContext.open(), AioContext.open()

    def _fail(self, message: str) -> StorageError:
        error = StorageError(f"{self.path}: {message}")
        with self._lock:
            if self.failure is None:
                self.failure = error
        return error

    def check(self) -> None:
        """Raise StorageError if the reader cannot be used: closed, or a read failed before."""
        if self.failure is not None:
            raise StorageError(f"{self.failure}; no further reads after a storage error (load the model again)")
        if self.fd < 0:
            raise StorageError(f"{self.path}: the reader is closed")

    def _fd_for(self, offset: int) -> int:
        if not self.direct or offset % DIRECT_IO_ALIGN == 0:
            return self.fd
        with self._lock:
            if self._buffered_fd < 0:
                self._buffered_fd = os.open(self.path, os.O_RDONLY)
        return self._buffered_fd

    def _read_chunk(self, buf: memoryview, file_offset: int) -> int:
        """Fill buf (aligned length) from file_offset; at the end of the file a short read is expected."""
        t = time.perf_counter()
        total, needed = 0, min(len(buf), self.file_size - file_offset)
        while total < needed:
            if self.failure is not None:  # another read failed: the request fails, do not keep the disk busy
                raise StorageError(f"{self.path}: read at byte {file_offset + total} abandoned after an earlier "
                                   f"failure ({self.failure})")
            pos = file_offset + total
            try:
                n = os.preadv(self._fd_for(pos), [buf[total:]], pos)
            except InterruptedError:
                continue
            except OSError as e:
                raise self._fail(f"read failed at byte {pos}: {e.strerror or errno.errorcode.get(e.errno, e)}") \
                    from None
            except Exception as e:  # anything else a reader thread meets still names the file and byte
                raise self._fail(f"read failed at byte {pos}: {type(e).__name__}: {e}") from e
            if n == 0:
                raise self._fail(f"unexpected end of file at byte {pos} (expected {self.file_size} bytes; "
                                 "file truncated while in use?)")
            total += n
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, file_offset, total, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_transferred += total
            self.stats.read_s += time.perf_counter() - t
        return total

    def read_now(self, file_offset: int, nbytes: int, page_buf: np.ndarray) -> np.ndarray:
        """A small read on the calling thread (no pool round trip), counted in the stats like any other: the aligned
        pages around [file_offset, file_offset + nbytes) into page_buf; returns a view of exactly those bytes."""
        start = file_offset // ALIGN * ALIGN
        span = -(-(file_offset + nbytes) // ALIGN) * ALIGN - start
        self.check()
        if file_offset < 0 or file_offset + nbytes > self.file_size or page_buf.nbytes < span:
            raise ModelFileError(f"{self.path}: read of bytes {file_offset}..{file_offset + nbytes} is past the end "
                                 f"of the file ({self.file_size} bytes; truncated?)")
        t = time.perf_counter()
        self._read_chunk(memoryview(page_buf)[:span], start)
        with self._lock:
            self.stats.bytes_read += nbytes
            self.stats.request_s += time.perf_counter() - t
        return page_buf[file_offset - start:file_offset - start + nbytes]

    def read_rows(self, offsets, nbytes: int, dests) -> None:
        """Scattered small reads (a row each: [offsets[i], offsets[i] + nbytes) into dests[i]) on the pool's
        threads, one task per thread reading its share one after another through its own page buffer; returns
        when all are in (a failure raises StorageError after every task has stopped). Latency-bound reads gain
        from the parallelism: SmolLM2's sketch head, 145 candidate rows of 612 bytes per token, 11 ms one by one."""
        n = len(offsets)
        if n == 0:
            return
        if self._aio is not None:
            offsets = np.asarray(offsets, np.int64)
            for a in range(0, n, AIO_MAX_EVENTS):  # at most AIO_MAX_EVENTS rows' sectors buffered at a time
                self._read_rows_aio(offsets[a:a + AIO_MAX_EVENTS], nbytes, dests[a:a + AIO_MAX_EVENTS])
            return
        k = min(self.threads, n)
        span = -(-(nbytes + ALIGN) // ALIGN) * ALIGN  # the aligned pages around any row
        with self._lock:
            while len(self._row_pages) < k or self._row_pages[0].nbytes < span:
                if self._row_pages and self._row_pages[0].nbytes < span:
                    self._row_pages.clear()
                self._row_pages.append(aligned_buffer(span))
            pages = self._row_pages[:k]

        def task(idx, page):
            for i in idx:
                dests[i][:] = self.read_now(int(offsets[i]), nbytes, page)

        futures = [self._pool.submit(task, idx, page)
                   for idx, page in zip(np.array_split(np.arange(n), k), pages)]
        wait(futures)
        for f in futures:
            if f.exception() is not None:
                raise f.exception()

    def _read_rows_aio(self, offsets: np.ndarray, nbytes: int, dests) -> None:
        """read_rows with every row's sectors in flight at once (aio_reads.c), each into its own slot of one
        aligned buffer, then copied out; a row that came back short or failed is read again on this thread (which
        names the byte if it fails)."""
        self.check()
        if offsets.min() < 0 or offsets.max() + nbytes > self.file_size:
            raise ModelFileError(f"{self.path}: a row read at byte {offsets.max()} is past the end of the file "
                                 f"({self.file_size} bytes; truncated?)")
        unit = DIRECT_IO_ALIGN
        starts = offsets // unit * unit
        lengths = -(-(offsets + nbytes) // unit) * unit - starts
        span = int(lengths.max())
        with self._lock:
            if not self._row_pages or self._row_pages[0].nbytes < len(offsets) * span:
                self._row_pages[:1] = [aligned_buffer(len(offsets) * span)]
            pages = self._row_pages[0]
        dest = (pages.ctypes.data + np.arange(len(offsets), dtype=np.uint64) * np.uint64(span))
        t = time.perf_counter()
        with self._aio_lock:
            status, res = self._aio.read_all(self.fd, starts, lengths, dest)
        if status != 0:
            raise self._fail(f"reads at bytes {starts.min()}..{starts.max()} failed: {os.strerror(-status)}")
        lead = offsets - starts
        for i in range(len(offsets)):
            a = i * span + int(lead[i])
            if res[i] >= lead[i] + nbytes:
                dests[i][:] = pages[a:a + nbytes]
            else:
                dests[i][:] = self.read_now(int(offsets[i]), nbytes, aligned_buffer(span + ALIGN))
        with self._lock:
            self.stats.reads += len(offsets)
            self.stats.bytes_read += len(offsets) * nbytes
            self.stats.bytes_transferred += int(np.maximum(res, 0).sum())
            self.stats.read_s += time.perf_counter() - t
            self.stats.request_s += time.perf_counter() - t

    @property
    def read_unit(self) -> int:
        """The granularity of an aligned read: a disk sector with O_DIRECT, a page through the page cache."""
        return DIRECT_IO_ALIGN if self.direct else ALIGN

    def read_runs(self, base: int, runs: list[tuple[int, int]], out: np.ndarray) -> None:
        """Scattered reads, [base + a, base + b) into out[a:b] for each run (base, a, b and out's address multiples
        of read_unit), on the pool's threads, one task per thread reading its share one after another: a token's
        dozens of small selective reads cost a pool round trip per thread, not one each. Returns when all are in (a
        failure raises StorageError after every task has stopped)."""
        if not runs:
            return
        self.check()
        if base < 0 or base + runs[-1][0] >= self.file_size:
            raise ModelFileError(f"{self.path}: read at byte {base + runs[-1][0]} is past the end of the file "
                                 f"({self.file_size} bytes; truncated?)")
        if self._aio is not None:
            self._read_runs_aio(base, runs, out)
            return
        view, k = memoryview(out), min(self.threads, len(runs))

        def task(share):
            for a, b in share:
                self._read_chunk(view[a:b], base + a)

        t = time.perf_counter()
        futures = [self._pool.submit(task, runs[j::k]) for j in range(k)]
        wait(futures)
        with self._lock:
            self.stats.bytes_read += sum(min(b, self.file_size - base) - a for a, b in runs)
            self.stats.request_s += time.perf_counter() - t
        for f in futures:
            if f.exception() is not None:
                raise f.exception()

    def _read_runs_aio(self, base: int, runs: list[tuple[int, int]], out: np.ndarray) -> None:
        """read_runs with every read submitted at once (aio_reads.c). A read that failed names its byte; one that
        came back short inside the file is finished by a positional read."""
        bounds = np.asarray(runs, np.int64).reshape(-1, 2)  # one conversion of page_runs' list
        starts = bounds[:, 0].copy()
        lengths = bounds[:, 1] - starts
        offsets = base + starts
        dests = (out.ctypes.data + starts).astype(np.uint64)
        t = time.perf_counter()
        with self._aio_lock:
            status, res = self._aio.read_all(self.fd, offsets, lengths, dests)
        if status != 0:  # a submission or the wait failed: some buffers may be stale or still being written
            raise self._fail(f"reads at bytes {offsets[0]}..{offsets[-1] + lengths[-1]} failed: "
                             f"{os.strerror(-status)}")
        failed = np.flatnonzero(res < 0)
        if len(failed):
            j = failed[0]
            raise self._fail(f"read failed at byte {offsets[j]}: {os.strerror(int(-res[j]))}")
        needed = np.minimum(lengths, self.file_size - offsets)
        view = memoryview(out)
        for j in np.flatnonzero(res < needed):  # short: go on from where it stopped (the end of the file fails there)
            a, got = int(starts[j]), int(res[j])
            self._read_chunk(view[a + got:a + int(lengths[j])], base + a + got)
        dt = time.perf_counter() - t
        with self._lock:
            self.stats.reads += len(runs)
            self.stats.bytes_transferred += int(res.sum())
            self.stats.read_s += dt
            self.stats.bytes_read += int(needed.sum())
            self.stats.request_s += dt

    def read(self, file_offset: int, nbytes: int, out: np.ndarray | None = None) -> Future:
        """Read [file_offset, file_offset + nbytes) in parallel chunks. The future's result is a uint8 view of
        exactly those bytes (inside `out`, an aligned buffer of at least nbytes + 2*ALIGN, if given). A failed
        read sets StorageError on the future, after every chunk of the request has stopped writing into `out`."""
        self.check()
        if file_offset < 0 or file_offset + nbytes > self.file_size:
            raise ModelFileError(f"{self.path}: read of bytes {file_offset}..{file_offset + nbytes} is past the end "
                                 f"of the file ({self.file_size} bytes; truncated?)")
        start = file_offset // ALIGN * ALIGN
        stop = min(-(-(file_offset + nbytes) // ALIGN) * ALIGN, -(-self.file_size // ALIGN) * ALIGN)
        span = stop - start
        if out is None:
            out = aligned_buffer(span)
        elif out.nbytes < span:
            raise ValueError("read buffer too small")
        view = memoryview(out)
        with self._lock:
            self.stats.bytes_read += nbytes
        futures = [self._pool.submit(self._read_chunk, view[off:off + min(self.chunk_bytes, span - off)], start + off)
                   for off in range(0, span, self.chunk_bytes)]
        result: Future = Future()
        with self._lock:
            self._outstanding.add(result)
        lead = file_offset - start
        issued = time.perf_counter()
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            with self._lock:
                self.stats.request_s += time.perf_counter() - issued
                self._outstanding.discard(result)
            if any(f.cancelled() for f in futures):
                result.set_exception(StorageError(f"{self.path}: read of bytes {file_offset}..{file_offset + nbytes}"
                                                  " cancelled (the reader was closed)"))
                return
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:  # the failure itself rather than a chunk abandoned because of it
                result.set_exception(next((e for e in errors if e is self.failure), errors[0]))
            else:
                result.set_result(out[lead:lead + nbytes])

        for f in futures:
            f.add_done_callback(done)
        if not futures:
            with self._lock:
                self._outstanding.discard(result)
            result.set_result(out[lead:lead + nbytes])
        return result

    def read_ahead(self, file_offset: int, nbytes: int, out: np.ndarray) -> "AheadRead | Future":
        """read() for a range its caller waits on later (the next layer's streamed records): through Linux AIO the
        kernel reads it while this thread computes, with no reader thread to wake on a machine whose cores the
        kernels' workers keep busy; where AIO is refused, read() itself. result() gives the same view as read()'s
        future and raises its StorageError."""
        if self._ahead is None:
            return self.read(file_offset, nbytes, out)
        self.check()
        if file_offset < 0 or file_offset + nbytes > self.file_size:
            raise ModelFileError(f"{self.path}: read of bytes {file_offset}..{file_offset + nbytes} is past the end "
                                 f"of the file ({self.file_size} bytes; truncated?)")
        start = file_offset // ALIGN * ALIGN
        stop = min(-(-(file_offset + nbytes) // ALIGN) * ALIGN, -(-self.file_size // ALIGN) * ALIGN)
        if out.nbytes < stop - start:
            raise ValueError("read buffer too small")
        lead = file_offset - start
        request = AheadRead(self, out[lead:lead + nbytes], file_offset, nbytes)
        positions = np.arange(0, stop - start, self.chunk_bytes, dtype=np.int64)
        lengths = np.minimum(self.chunk_bytes, stop - start - positions)
        offsets = start + positions
        dests = (out.ctypes.data + positions).astype(np.uint64)
        tags = np.arange(self._next_tag, self._next_tag + len(positions), dtype=np.int64)
        self._next_tag += len(positions)
        with self._aio_lock:
            for tag, pos, length, offset in zip(tags.tolist(), positions.tolist(), lengths.tolist(), offsets.tolist()):
                self._ahead_parts[tag] = (request, out, pos, length, offset)
            request.remaining = len(tags)
            submitted = self._ahead.submit(self.fd, offsets, lengths, dests, tags)
            for tag in tags[max(0, submitted):].tolist():  # refused by the kernel: read here, now
                _, _, pos, length, offset = self._ahead_parts.pop(tag)
                request.remaining -= 1
                try:
                    self._read_chunk(memoryview(out)[pos:pos + length], offset)
                except StorageError as e:
                    request.error = request.error or e
        with self._lock:
            self.stats.bytes_read += nbytes
        return request

    def _reap_ahead(self, request: "AheadRead | None") -> None:
        """Collect read_ahead completions until `request` has all of its own (None: until none is in flight)."""
        tags, res = np.zeros(AIO_MAX_EVENTS, np.int64), np.zeros(AIO_MAX_EVENTS, np.int64)
        with self._aio_lock:
            while self._ahead_parts and (request is None or request.remaining):
                n = self._ahead.reap(tags, res)
                if n < 0:  # cannot wait: buffers may still be written
                    self._ahead_parts.clear()
                    raise self._fail(f"waiting for reads failed: {os.strerror(-n)}")
                with self._lock:
                    self.stats.reads += n
                    self.stats.bytes_transferred += int(np.maximum(res[:n], 0).sum())
                for tag, got in zip(tags[:n].tolist(), res[:n].tolist()):
                    owner, out, pos, length, offset = self._ahead_parts.pop(tag)
                    owner.remaining -= 1
                    try:
                        if got < 0:
                            raise self._fail(f"read failed at byte {offset}: {os.strerror(-got)}")
                        if got < length:  # short: go on from where it stopped (the end of the file fails there)
                            end = min(length, self.file_size - offset)
                            if got < end:
                                self._read_chunk(memoryview(out)[pos + got:pos + end], offset + got)
                    except StorageError as e:
                        owner.error = owner.error or e

    def drain(self) -> None:
        """Wait until no request is in flight (however its caller lost track of it: an interrupted pass)."""
        with self._lock:
            outstanding = list(self._outstanding)
        wait(outstanding)
        if self._ahead is not None and self._ahead_parts:
            self._reap_ahead(None)

    def close(self) -> None:
        """Cancel the chunks not started (their requests fail with StorageError), wait for those being read,
        close the file: no reader thread is left behind, no future is left unset."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ahead is not None:
            try:
                self._reap_ahead(None)
            except StorageError:
                pass
            with self._aio_lock:
                self._ahead.close()
                self._ahead = None
        if self._aio is not None:
            with self._aio_lock:  # no read_runs call in flight
                self._aio.close()
                self._aio = None
        for fd in (self.fd, self._buffered_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._buffered_fd = -1


class AheadRead:
    """A read_ahead request: result() waits for its reads (reaping others' on the way) and returns its bytes."""

    def __init__(self, reader: FlashReader, view: np.ndarray, file_offset: int, nbytes: int):
        self.reader, self.view, self.file_offset, self.nbytes = reader, view, file_offset, nbytes
        self.remaining = 0
        self.error: StorageError | None = None

    def result(self) -> np.ndarray:
        if self.remaining:
            t = time.perf_counter()
            self.reader._reap_ahead(self)
            with self.reader._lock:
                self.reader.stats.request_s += time.perf_counter() - t
        if self.error is not None:
            raise self.error
        return self.view


def wait_all(futures) -> list:
    """Results of all the futures, in order; if any failed, wait for the rest first (so no read is still writing
    into a buffer the caller reuses), then raise the first failure."""
    futures = list(futures)
    try:
        return [f.result() for f in futures]
    except BaseException:
        wait(futures)
        raise
