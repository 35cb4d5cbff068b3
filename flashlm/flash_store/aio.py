"""Linux native AIO (aio_reads.c, system calls only: no libaio) through ctypes: many O_DIRECT reads in flight at
once from one thread. FlashReader (io_engine.py) holds two contexts: one for reads it waits on at once (a token's
selective runs, the output head's rows: `read_all`), one for a streamed layer's records submitted ahead and reaped
when the layer needs them (`submit` / `reap`). Offsets, lengths and destinations are aligned as O_DIRECT needs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import numpy as np

AIO_MAX_EVENTS = 256  # reads in flight at once in one context; more are submitted in batches
AIO_SOURCE = os.path.join(os.path.dirname(__file__), "aio_reads.c")


@functools.cache
def load_library():
    """aio_reads.c, built at first use like the bundle kernel (once per process); None off Linux, without a C
    compiler, or with FLASHLM_AIO=0."""
    if not sys.platform.startswith("linux") or os.environ.get("FLASHLM_AIO", "1") == "0":
        return None
    from flashlm.quant.bundle_kernel import build_library

    path = build_library(AIO_SOURCE)
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.aio_open.restype, lib.aio_open.argtypes = ctypes.c_uint64, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.aio_close.restype, lib.aio_close.argtypes = ctypes.c_int, [ctypes.c_uint64]
    lib.aio_read_all.restype = ctypes.c_int
    lib.aio_read_all.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4
    lib.aio_submit.restype = ctypes.c_int
    lib.aio_submit.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4
    lib.aio_reap.restype = ctypes.c_int
    lib.aio_reap.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


class AioContext:
    """One kernel AIO context (io_setup) for up to AIO_MAX_EVENTS reads in flight. The int64 / uint64 arrays are
    passed by address: keep them alive for the call. Errors come back as -errno, for the caller to name the file."""

    def __init__(self, lib, ctx: int):
        self._lib, self._ctx = lib, ctx

    @classmethod
    def open(cls) -> "AioContext | None":
        """A new context; None where the library or the kernel refuses one."""
        lib = load_library()
        if lib is None:
            return None
        err = ctypes.c_int(0)
        ctx = lib.aio_open(AIO_MAX_EVENTS, ctypes.byref(err))
        return cls(lib, ctx) if ctx else None

    def read_all(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, dests: np.ndarray) -> tuple[int, np.ndarray]:
        """Read [offsets[i], offsets[i] + lengths[i]) into the addresses dests[i], all in flight, and wait for all:
        (0 or -errno of a failed submission or wait, per read its byte count or -errno)."""
        res = np.zeros(len(offsets), np.int64)
        status = self._lib.aio_read_all(self._ctx, AIO_MAX_EVENTS, fd, len(offsets), offsets.ctypes.data,
                                        lengths.ctypes.data, dests.ctypes.data, res.ctypes.data)
        return status, res

    def submit(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, dests: np.ndarray, tags: np.ndarray) -> int:
        """Submit reads without waiting; each completion comes back from reap() with its tag. Returns how many the
        kernel took (the rest are the caller's to read), or -errno when it took none."""
        if not len(tags):
            return 0
        return self._lib.aio_submit(self._ctx, fd, len(tags), offsets.ctypes.data, lengths.ctypes.data,
                                    dests.ctypes.data, tags.ctypes.data)

    def reap(self, tags: np.ndarray, res: np.ndarray) -> int:
        """Wait for at least one and at most len(tags) completions: fills tags[:n] and res[:n] (bytes or -errno);
        returns n, or -errno when the wait itself failed."""
        return self._lib.aio_reap(self._ctx, 1, len(tags), tags.ctypes.data, res.ctypes.data)

    def close(self) -> None:
        self._lib.aio_close(self._ctx)
