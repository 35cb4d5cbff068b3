"""Python side of the bundle FFN kernel (bundle_kernel.c): build it once per machine, call it through ctypes.

The shared library is compiled at first use with the system C compiler (-O3 -march=native -fopenmp) into the
user's cache directory, keyed by the source, the compiler and the CPU's feature flags, so a cache shared between
machines never runs code built for another CPU. Without a compiler the numpy reference below is used (slow, same
math) and `BundleKernel.native` is False.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zlib

import numpy as np

from flashlm.loaders.gguf_reader import GGMLQuantizationType as QT

from flashlm.quant.formats import dequantize

SOURCE = os.path.join(os.path.dirname(__file__), "bundle_kernel.c")
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "relu": 2}  # the C and CUDA kernels' act codes
_char_at = ctypes.c_char.from_buffer


def address(a: np.ndarray) -> int:
    """The address of a's first element, for a C call: through ctypes' buffer view where the array is writable and
    C-contiguous (0.24 us), else a.ctypes.data (1.2 us; a SmolLM2 token made ~600 of these calls)."""
    try:
        return ctypes.addressof(_char_at(a))
    except (TypeError, ValueError):
        return a.ctypes.data


SUPPORTED_ROW_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashlm")


def _source_files(source: str) -> list[str]:
    """source, then the local files it #includes ("name"), recursively: all of what the build's cache key covers."""
    files, todo = [], [source]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        with open(path, encoding="utf-8") as f:
            for name in re.findall(r'^\s*#include\s+"([^"]+)"', f.read(), flags=re.M):
                todo.append(os.path.join(os.path.dirname(path), name))
    return files


def build_library(source: str = SOURCE) -> str | None:
    """Path of the compiled C source (this kernel's by default), building it if needed; None without a C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    # -ffast-math lets the float reductions vectorize (a fixed reassociation, chosen at compile time: results stay
    # deterministic); -fno-finite-math-only keeps inf/nan semantics. It is given to the compile step only: on the
    # link line GCC adds crtfastmath.o, which sets flush-to-zero for the whole process when the library loads
    # (numpy's subnormals became 0 and hypothesis refused to run in the same process).
    # OpenMP's workers spin between parallel regions (libgomp's default). Measured letting them sleep instead
    # (OMP_WAIT_POLICY=PASSIVE), SmolLM2 .flash in a cgroup, 2 cores, 4 interleaved runs each: user CPU per token
    # 81-91 -> 22-27 ms at 120 MB, but decode 13.0-14.8 -> 13.2-15.7 tok/s at 120 MB, 37.5-40.4 -> 32.9-37.8 at 165
    # MB and 100-105 -> 58-64 unlimited: not set (a user who wants the CPU back can set it).
    flags = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC"]
    flags += os.environ.get("FLASHLM_KERNEL_CFLAGS", "").split()  # e.g. "-mno-avx512vnni -mno-avxvnni" (tests)
    text = b""
    for part in _source_files(source):  # the source and the files it #includes from its own directory
        with open(part, "rb") as f:
            text += f.read()
    # zlib's two checksums, not hashlib: importing hashlib loads OpenSSL's libcrypto, 3.75 MB of resident memory
    # (measured, psutil RSS) in every process that runs a model, for a cache key
    keyed = text + " ".join([cc, *flags, "link-apart", _cpu_flags()]).encode()
    key = f"{zlib.crc32(keyed):08x}{zlib.adler32(keyed):08x}"
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(_cache_dir(), f"{stem}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    obj = tmp + ".o"
    try:
        subprocess.run([cc, *flags, "-c", "-o", obj, source], check=True, capture_output=True)
        subprocess.run([cc, "-shared", "-fopenmp", "-o", tmp, obj, "-lm"], check=True, capture_output=True)
        os.replace(tmp, path)
    except (OSError, subprocess.CalledProcessError):
        if os.path.exists(tmp):
            os.unlink(tmp)
        return None
    finally:
        if os.path.exists(obj):
            os.unlink(obj)
    return path


def dequantize_records(records: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy: records (n, record_bytes) -> float64 gate, up, down (n * group, d), one row per neuron in stored
    order (down: the neuron's column of ffn_down)."""
    g, u, dn = layout.slices()
    G, d = layout.group, layout.d_model
    n = len(records) * G
    gate = dequantize(np.ascontiguousarray(records[:, g]), layout.gate_type).reshape(n, d).astype(np.float64)
    up = dequantize(np.ascontiguousarray(records[:, u]), layout.up_type).reshape(n, d).astype(np.float64)
    down = dequantize(np.ascontiguousarray(records[:, dn]), layout.down_type).astype(np.float64)
    if G > 1:  # (records, d, G) -> (records, G, d)
        down = down.reshape(len(records), d, G).transpose(0, 2, 1)
    return gate, up, down.reshape(n, d)


def reference_ffn(records: np.ndarray, layout, x: np.ndarray, activation: str = "silu",
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: records (n, record_bytes) uint8, x (S, d) -> (y (S, d), act (S, n * group)); float64
    inside."""
    gate, up, down = dequantize_records(records, layout)
    xg, xu = x.astype(np.float64) @ gate.T, x.astype(np.float64) @ up.T
    if activation == "silu":
        act = xg / (1.0 + np.exp(-xg)) * xu
    elif activation == "relu":
        act = np.maximum(xg, 0.0) * xu
    else:
        act = 0.5 * xg * (1.0 + np.tanh(0.7978845608 * (xg + 0.044715 * xg ** 3))) * xu
    if mask is not None:
        act = act * mask
    return (act @ down).astype(np.float32), act.astype(np.float32)


def _openblas_local_threads():
    """numpy's bundled OpenBLAS `openblas_set_num_threads_local` (None for other BLAS builds). The prompt path runs
    OpenMP (dequantization) and BLAS back to back; both thread pools spin-wait for work, and on 2 cores each one's
    spinning starves the other: a 64-token SmolLM2 prompt took 4.3 s with OpenBLAS threaded, 0.82 s with one BLAS
    thread (measured; the OpenMP kernels keep both cores busy)."""
    import glob

    libs = os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas*.so*")
    for path in sorted(glob.glob(libs)):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
        return fn
    return None


class _OneBlasThread:
    """with _OneBlasThread(fn): BLAS calls from this thread run single-threaded (restored afterwards). Nests: the
    forward pass holds it and the BLAS prompt paths inside take it again."""

    def __init__(self, fn):
        self.fn, self._local = fn, threading.local()

    def __enter__(self):
        if self.fn is not None:
            self._local.__dict__.setdefault("saved", []).append(self.fn(1))

    def __exit__(self, *exc):
        if self.fn is not None:
            self.fn(self._local.saved.pop())


BLAS_MIN_TOKENS = 8  # without bundle_ffn_i8: from this many tokens on, dequantize records and use BLAS products
BLAS_CHUNK_NEURONS = 256  # bounds the float scratch: 3 * 256 * d floats
# rows_matvec for up to this many tokens quantizes x to int8 per 32-block and takes integer dot products
# (rows_matvec_i8 in bundle_kernel.c, which has the measurements); INT8_ACTIVATIONS = False (environment:
# FLASHLM_INT8_ACTIVATIONS=0) keeps float32 x.
INT8_ACTIVATIONS = os.environ.get("FLASHLM_INT8_ACTIVATIONS", "1") != "0"
INT8_MAX_TOKENS = BLAS_MIN_TOKENS - 1  # up to the BLAS path: S = 5..7 ran 7-25x faster than float x (measured)
INT8_ROW_TYPES = SUPPORTED_ROW_TYPES
# The FFN itself with int8 activations (bundle_ffn_i8), for any number of tokens; FLASHLM_FFN_INT8=0 (or
# FLASHLM_INT8_ACTIVATIONS=0) keeps the float-x decode path and the dequantize + BLAS prompt path. Measured on
# SmolLM2's layer 0 (1536 records, Q4_1 gate/up, Q8_0 down), AMD EPYC 2 threads, best of 15, ms per call:
#   tokens            1      2      7      8     16     32    128
#   float x / BLAS  0.124  0.383  0.852  2.602  2.907  4.070  13.04
#   int8 x          0.081  0.133  0.418  0.416  0.904  2.071   9.12
# max |difference| / max |float result| 0.4-0.75% (as rows_matvec_i8's; llama.cpp quantizes x the same way).
FFN_INT8 = INT8_ACTIVATIONS and os.environ.get("FLASHLM_FFN_INT8", "1") != "0"


_I, _I64, _P = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_BUNDLE_FFN = [_P, _I64, _I, _I, _I, _I64, _I64, _I, _P, _I, _P, _P, _I]
_ROWS_MATVEC = [_P, _I64, _I64, _I, _I, _P, _I, _P, _I64, _I]
# The C library's functions (all return an int status) and their argument types.
SIGNATURES = {
    "bundle_ffn": _BUNDLE_FFN,
    "bundle_ffn_i8": _BUNDLE_FFN[:10] + [_P, _I, _P],
    "bundle_ffn_block_i8": [_P, _I64] + [_I] * 5 + [_I64, _I64, _I, _P, _I, _P, _I],
    "rows_matvec": _ROWS_MATVEC,
    "rows_matvec_i8": _ROWS_MATVEC,
    "rows_gemm_i8": _ROWS_MATVEC,
    "dequant_records": [_P, _I64, _I, _I, _I, _I64, _I64, _P, _P, _P, _I],
    "dequant_rows": [_P, _I64, _I64, _I, _I, _P, _I],
    "dequant_block_records": [_P, _I64] + [_I] * 5 + [_I64, _I64, _P, _P, _P, _I],
    "dense_ffn_i8": [_P, _I64, _I] * 3 + [_I, _I, _I, _P, _I, _P, _I],
    "attention_decode": [_P] * 5 + [_I64, _I, _P, _P, _I, _I, _I, _I, ctypes.c_float, _P, _P, _I],
    "attention_batch": [_P] * 5 + [_I64, _I64, _I, _P, _P, _I, _I, _I, _I, ctypes.c_float, _I, _P, _I],
}


def _bind(lib: ctypes.CDLL, name: str):
    """The library's function `name` with its signature, or None where this build lacks it (x86-only kernels)."""
    fn = getattr(lib, name, None)
    if fn is not None:
        fn.restype, fn.argtypes = ctypes.c_int, SIGNATURES[name]
    return fn


class BundleKernel:
    """y += FFN(x) over the given records (addresses), in the given order."""

    def __init__(self, layout=None, activation: str = "silu", threads: int = 1):
        """layout: the records' (flash_store/format.py RecordLayout); None for row products only (a GGUF's own
        matrices: dense_ffn, rows_matvec), where run() is not available."""
        if layout is not None:
            for t in (layout.gate_type, layout.up_type):
                if t not in SUPPORTED_ROW_TYPES:
                    raise ValueError(f"bundle kernel: unsupported row type {t.name}")
            if layout.group == 1 and layout.down_type != QT.Q8_0:
                raise ValueError("bundle kernel: down columns must be Q8_0")
            if layout.group > 1 and layout.down_type not in SUPPORTED_ROW_TYPES:
                raise ValueError(f"bundle kernel: unsupported ffn_down blocks {layout.down_type.name}")
        self.layout, self.activation, self.threads = layout, activation, threads
        self.attention_decode = self.attention_batch = self._ffn_i8 = self._block_i8 = self._dense_ffn = None
        path = build_library()
        self.native = path is not None
        if self.native:
            lib = ctypes.CDLL(path)
            self._lib = lib
            self._fn, self._matvec, self._matvec_i8, self._gemm_i8 = (
                _bind(lib, n) for n in ("bundle_ffn", "rows_matvec", "rows_matvec_i8", "rows_gemm_i8"))
            self._dequant_records, self._dequant_rows, self._dequant_blocks = (
                _bind(lib, n) for n in ("dequant_records", "dequant_rows", "dequant_block_records"))
            # x86 (AVX2) builds only: None elsewhere
            self._ffn_i8, self._block_i8, self._dense_ffn, self.attention_decode, self.attention_batch = (
                _bind(lib, n) for n in ("bundle_ffn_i8", "bundle_ffn_block_i8", "dense_ffn_i8", "attention_decode",
                                        "attention_batch"))
        self._up_offset = self._down_offset = 0
        if layout is not None:
            g, u, dn = layout.slices()
            self._up_offset, self._down_offset = u.start, dn.start
        self.one_blas_thread = _OneBlasThread(_openblas_local_threads() if self.native else None)

    def run(self, row_addresses: np.ndarray, x: np.ndarray, y: np.ndarray, act_out: np.ndarray | None = None,
            rows: np.ndarray | None = None, mask: np.ndarray | None = None) -> None:
        """row_addresses: (n,) uint64 addresses of records; x, y: (S, d) float32 C-contiguous (y accumulated).
        `rows` (n, record_bytes) is needed only by the numpy fallback. mask (S, n) bool: per token, the neurons
        that count (sparsity over a prompt batch)."""
        n, S = len(row_addresses), x.shape[0]
        if self.layout.group > 1:
            self._run_blocks(row_addresses, x, y, act_out, rows, mask)
            return
        if self.native and self._ffn_i8 is not None and FFN_INT8 and act_out is None:
            # a mask (S, n) zeroes each token's skipped neurons: the same int8 arithmetic as a dense batch
            m = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
            status = self._ffn_i8(address(row_addresses), n, self.layout.d_model, int(self.layout.gate_type),
                                  int(self.layout.up_type), self._up_offset, self._down_offset,
                                  ACTIVATIONS[self.activation], address(x), S, address(y), self.threads,
                                  None if m is None else address(m))
            if status == 0:
                return
            if status != -3:
                raise RuntimeError(f"bundle kernel (int8) failed ({status})")
        if self.native and (S >= BLAS_MIN_TOKENS or mask is not None) and act_out is None:
            with self.one_blas_thread:
                self._run_blas(row_addresses, x, y, mask)
            return
        if not self.native:
            dy, act = reference_ffn(self._rows(row_addresses, rows), self.layout, x, self.activation, mask)
            y += dy
            if act_out is not None:
                act_out[...] = act
            return
        status = self._fn(address(row_addresses), n, self.layout.d_model, int(self.layout.gate_type),
                          int(self.layout.up_type), self._up_offset, self._down_offset,
                          ACTIVATIONS[self.activation], address(x), S, address(y),
                          None if act_out is None else address(act_out), self.threads)
        if status != 0:
            raise RuntimeError(f"bundle kernel failed ({status})")

    def _run_blocks(self, row_addresses: np.ndarray, x: np.ndarray, y: np.ndarray, act_out, rows, mask) -> None:
        """Block-layout records (format.RecordLayout, group > 1): the fused int8 kernel, else dequantize + BLAS,
        else (no compiler) numpy. Per-neuron outputs (act_out, mask) need neuron records (refused at load)."""
        if act_out is not None or mask is not None:
            raise ValueError("block-layout records: no per-neuron activations or masks")
        L = self.layout
        if self.native and self._block_i8 is not None and FFN_INT8:
            status = self._block_i8(address(row_addresses), len(row_addresses), L.d_model, int(L.gate_type),
                                    int(L.up_type), int(L.down_type), L.group, self._up_offset, self._down_offset,
                                    ACTIVATIONS[self.activation], address(x), x.shape[0], address(y),
                                    self.threads)
            if status != 0:
                raise RuntimeError(f"bundle kernel (blocks) failed ({status})")
        elif self.native:
            with self.one_blas_thread:
                self._run_blas(row_addresses, x, y)
        else:
            y += reference_ffn(self._rows(row_addresses, rows), L, x, self.activation)[0]

    def _rows(self, row_addresses: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """The records as an (n, record_bytes) array for the numpy fallback: `rows` if given, else a copy."""
        if rows is not None:
            return rows
        rb = self.layout.record_bytes
        return np.stack([np.frombuffer((ctypes.c_uint8 * rb).from_address(int(a)), np.uint8) for a in row_addresses])

    def _dequantize(self, addr: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
        """Records at addr -> float32 gate, up, down rows (one per neuron: len(addr) * group each)."""
        L = self.layout
        if L.group > 1:
            status = self._dequant_blocks(address(addr), len(addr), L.d_model, int(L.gate_type), int(L.up_type),
                                          int(L.down_type), L.group, self._up_offset, self._down_offset,
                                          address(gate), address(up), address(down), self.threads)
        else:
            status = self._dequant_records(address(addr), len(addr), L.d_model, int(L.gate_type),
                                           int(L.up_type), self._up_offset, self._down_offset, address(gate),
                                           address(up), address(down), self.threads)
        if status != 0:
            raise RuntimeError(f"dequantizing records failed ({status})")

    def _run_blas(self, row_addresses: np.ndarray, x: np.ndarray, y: np.ndarray, mask=None) -> None:
        """Prompt path: per chunk of records, dequantize (C) then three BLAS products. mask: neuron records only."""
        G, d = self.layout.group, self.layout.d_model
        chunk = max(1, BLAS_CHUNK_NEURONS // G)  # records
        gate, up, down = (np.empty((chunk * G, d), np.float32) for _ in range(3))
        for lo in range(0, len(row_addresses), chunk):
            addr = np.ascontiguousarray(row_addresses[lo:lo + chunk])
            m = len(addr) * G
            self._dequantize(addr, gate, up, down)
            act = activate(x @ gate[:m].T, self.activation) * (x @ up[:m].T)
            if mask is not None:
                act *= mask[:, lo:lo + m]
            y += act @ down[:m]


def activate(g: np.ndarray, activation: str) -> np.ndarray:
    if activation == "silu":
        return g / (1.0 + np.exp(-g))
    if activation == "relu":
        return np.maximum(g, 0)
    return 0.5 * g * (1.0 + np.tanh(0.7978845608 * (g + 0.044715 * g * g * g)))


def dense_ffn(kernel: "BundleKernel", gate: np.ndarray, gate_type: QT, up: np.ndarray, up_type: QT, down: np.ndarray,
              down_type: QT, x: np.ndarray, y: np.ndarray) -> None:
    """y (S, d) += down . (act(gate . x) * (up . x)) for a layer's FFN kept as its three matrices of GGUF rows
    (gate, up: (n_ff, row bytes); down: (d, row bytes)); x, y float32 C-contiguous. One C call with int8
    activations (dense_ffn_i8), else three rows_matvec products."""
    S, d, n_ff = x.shape[0], x.shape[1], gate.shape[0]
    if kernel.native and kernel._dense_ffn is not None and FFN_INT8:
        status = kernel._dense_ffn(address(gate), gate.shape[1], int(gate_type), address(up), up.shape[1],
                                   int(up_type), address(down), down.shape[1], int(down_type), d, n_ff,
                                   ACTIVATIONS[kernel.activation], address(x), S, address(y), kernel.threads)
        if status == 0:
            return
        if status != -3:
            raise RuntimeError(f"dense_ffn_i8 failed ({status})")
    g, u, out = np.empty((S, n_ff), np.float32), np.empty((S, n_ff), np.float32), np.empty((S, d), np.float32)
    rows_matvec(kernel, gate, gate_type, x, g)
    rows_matvec(kernel, up, up_type, x, u)
    rows_matvec(kernel, down, down_type, np.ascontiguousarray(activate(g, kernel.activation) * u, np.float32), out)
    y += out


def rows_matvec(kernel: "BundleKernel", rows: np.ndarray, qtype: QT, x: np.ndarray, out: np.ndarray) -> None:
    """out (S, n) = x (S, d) @ W.T for W given as n quantized rows (n, row_bytes); out may be a column slice."""
    n, d, S = rows.shape[0], x.shape[1], x.shape[0]
    if not kernel.native:
        out[...] = x @ dequantize(rows, qtype).reshape(n, d).T
        return
    if INT8_ACTIVATIONS and qtype in INT8_ROW_TYPES and S > INT8_MAX_TOKENS:
        # a prompt's tokens in one int8 product (rows_gemm_i8: each token's sums as rows_matvec_i8 gives them)
        status = kernel._gemm_i8(address(rows), n, rows.shape[1], int(qtype), d, address(x), S,
                                 address(out), out.strides[0] // 4, kernel.threads)
        if status != 0:
            raise RuntimeError(f"rows_gemm_i8 failed ({status})")
        return
    if S >= BLAS_MIN_TOKENS:
        w = np.empty((min(n, 1024), d), np.float32)  # 2.4 MB at d 576 (4096 rows: +7 MB of peak RSS, no faster)
        with kernel.one_blas_thread:
            _dequant_matmul(kernel, rows, qtype, x, out, w)
        return
    fn = kernel._matvec_i8 if INT8_ACTIVATIONS and S <= INT8_MAX_TOKENS and qtype in INT8_ROW_TYPES else kernel._matvec
    status = fn(address(rows), n, rows.shape[1], int(qtype), d, address(x), S, address(out),
                out.strides[0] // 4, kernel.threads)
    if status != 0:
        raise RuntimeError(f"rows_matvec failed ({status})")


def _dequant_matmul(kernel: "BundleKernel", rows: np.ndarray, qtype: QT, x: np.ndarray, out: np.ndarray,
                    w: np.ndarray) -> None:
    """The many-token path of rows_matvec: dequantize slices of rows into w, one BLAS product each."""
    n, d = rows.shape[0], x.shape[1]
    for lo in range(0, n, len(w)):
        m = min(len(w), n - lo)
        if kernel._dequant_rows(address(rows[lo:]), m, rows.shape[1], int(qtype), d, address(w),
                                kernel.threads) != 0:
            raise RuntimeError("dequant_rows failed")
        out[:, lo:lo + m] = x @ w[:m].T
