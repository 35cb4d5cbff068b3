"""GPU matvec lab, round 1 (H200, 2026-11-30): 11008 x 4096 Q4_0 products, S=1, variants side by side
(correctness against float64, GPU time in a CUDA graph, 8 copies rotated). Run on a GPU machine from the
repository root: python3 benchmarks/gpu_matvec_lab1.py. Figures: the quant/cuda_kernels.py docstring."""
import json
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, ".")

SRC = r"""
#include <cuda_fp16.h>
typedef unsigned char u8;
typedef unsigned short u16;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// x (K floats) -> xq int8 [K], xd [K/32] scales, xsum [K/32] sum of the int8 values of a block
extern "C" __global__ void quant_x(const float* x, int K, signed char* xq, float* xd, int* xsum) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (blk >= (K >> 5)) return;
    float v = x[blk * 32 + lane];
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    float d = amax / 127.f;
    int q = d > 0.f ? __float2int_rn(v / d) : 0;
    xq[blk * 32 + lane] = (signed char)q;
    int s = q;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) { xd[blk] = d; xsum[blk] = s; }
}

// AoS Q4_0 -> SoA: qs [rows][nb] uint4, d [rows][nb] half
extern "C" __global__ void repack_q4_0(const u8* W, int n_rows, int nb, uint4* qs, __half* d) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * nb) return;
    const u8* b = W + t * 18;
    const u16* h = (const u16*)b;
    d[t] = __ushort_as_half(h[0]);
    unsigned int w[4];
    for (int i = 0; i < 4; i++) w[i] = (unsigned int)h[1 + 2 * i] | ((unsigned int)h[2 + 2 * i] << 16);
    qs[t] = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ int dot_q4(uint4 v, int4 x0, int4 x1) {
    int s = __dp4a((int)(v.x & 0x0F0F0F0Fu), x0.x, 0);
    s = __dp4a((int)(v.y & 0x0F0F0F0Fu), x0.y, s);
    s = __dp4a((int)(v.z & 0x0F0F0F0Fu), x0.z, s);
    s = __dp4a((int)(v.w & 0x0F0F0F0Fu), x0.w, s);
    s = __dp4a((int)((v.x >> 4) & 0x0F0F0F0Fu), x1.x, s);
    s = __dp4a((int)((v.y >> 4) & 0x0F0F0F0Fu), x1.y, s);
    s = __dp4a((int)((v.z >> 4) & 0x0F0F0F0Fu), x1.z, s);
    s = __dp4a((int)((v.w >> 4) & 0x0F0F0F0Fu), x1.w, s);
    return s;
}

// 4 blocks of R consecutive rows (repacked: quants, scales apart) per lane; CS: evict-first (streaming) loads
template <int R, bool CS>
__device__ __forceinline__ void load_rows(const uint4* qs, const __half* d, int n_rows, int nb, int row0, int b0,
                                          int lane, uint4 (&v)[R][4], __half (&dd)[R][4]) {
    #pragma unroll
    for (int r = 0; r < R; r++) {
        long long row = min(row0 + r, n_rows - 1);
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int b = b0 + lane + 32 * i;
            if (b < nb) {
                v[r][i] = CS ? __ldcs(qs + row * nb + b) : __ldg(qs + row * nb + b);
                dd[r][i] = CS ? __ldcs(d + row * nb + b) : d[row * nb + b];
            }
        }
    }
}

// K1: SoA, int8 x, a warp per row (R rows per warp, the same blocks of R consecutive rows), 4 blocks per lane in flight
template <int R, bool CS = false>
__device__ __forceinline__ void soa_i8(const uint4* qs, const __half* d, int n_rows, int nb, const int4* xq,
                                       const float* xd, const int* xsum, float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int row0 = warp * R;
    if (row0 >= n_rows) return;
    float acc[R];
    #pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int b0 = 0; b0 < nb; b0 += 128) {
        uint4 v[R][4];
        __half dd[R][4];
        load_rows<R, CS>(qs, d, n_rows, nb, row0, b0, lane, v, dd);
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int b = b0 + lane + 32 * i;
            if (b < nb) {
                int4 x0 = __ldg(xq + 2 * b), x1 = __ldg(xq + 2 * b + 1);
                float dx = __ldg(xd + b);
                int sx = __ldg(xsum + b);
                #pragma unroll
                for (int r = 0; r < R; r++)
                    acc[r] += __half2float(dd[r][i]) * dx * (float)(dot_q4(v[r][i], x0, x1) - 8 * sx);
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < n_rows) y[row0 + r] = s;
    }
}
extern "C" __global__ void k1_r1(const uint4* qs, const __half* d, int n, int nb, const int4* xq, const float* xd,
                                 const int* xs, float* y) { soa_i8<1>(qs, d, n, nb, xq, xd, xs, y); }
extern "C" __global__ void k1_r2(const uint4* qs, const __half* d, int n, int nb, const int4* xq, const float* xd,
                                 const int* xs, float* y) { soa_i8<2>(qs, d, n, nb, xq, xd, xs, y); }

// K2: SoA, float x (L1), a warp per row, R rows per warp
__device__ __forceinline__ float nib(unsigned int v, int k) {  // byte k of v (0..255) as float, via 2^23 bits
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7540 + k)) - 8388616.f;  // minus 2^23 + 8 (Q4_0 offset)
}
template <int R, bool CS = false>
__device__ __forceinline__ void soa_f32(const uint4* qs, const __half* d, int n_rows, int nb, const float4* x,
                                        float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int row0 = warp * R;
    if (row0 >= n_rows) return;
    float acc[R];
    #pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    for (int b0 = 0; b0 < nb; b0 += 128) {
        uint4 v[R][4];
        __half dd[R][4];
        load_rows<R, CS>(qs, d, n_rows, nb, row0, b0, lane, v, dd);
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int b = b0 + lane + 32 * i;
            if (b >= nb) continue;
            float s[R];
            #pragma unroll
            for (int r = 0; r < R; r++) s[r] = 0.f;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                float4 xl = __ldg(x + 8 * b + j), xh = __ldg(x + 8 * b + 4 + j);
                #pragma unroll
                for (int r = 0; r < R; r++) {
                    unsigned int w = j == 0 ? v[r][i].x : j == 1 ? v[r][i].y : j == 2 ? v[r][i].z : v[r][i].w;
                    unsigned int lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
                    s[r] += nib(lo, 0) * xl.x + nib(lo, 1) * xl.y + nib(lo, 2) * xl.z + nib(lo, 3) * xl.w
                          + nib(hi, 0) * xh.x + nib(hi, 1) * xh.y + nib(hi, 2) * xh.z + nib(hi, 3) * xh.w;
                }
            }
            #pragma unroll
            for (int r = 0; r < R; r++) acc[r] += __half2float(dd[r][i]) * s[r];
        }
    }
    #pragma unroll
    for (int r = 0; r < R; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < n_rows) y[row0 + r] = s;
    }
}
extern "C" __global__ void k2_r1(const uint4* qs, const __half* d, int n, int nb, const float4* x, float* y) {
    soa_f32<1>(qs, d, n, nb, x, y); }
extern "C" __global__ void k2_r2(const uint4* qs, const __half* d, int n, int nb, const float4* x, float* y) {
    soa_f32<2>(qs, d, n, nb, x, y); }

// K3: AoS (GGUF bytes as stored, 18-byte blocks), int8 x, a warp per row, 16-bit loads (llama.cpp's mmvq way)
extern "C" __global__ void k3_aos(const u8* W, int n_rows, int nb, const int4* xq, const float* xd, const int* xsum,
                                  float* y) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const u8* wr = W + (long long)row * nb * 18;
    float acc = 0.f;
    #pragma unroll 4
    for (int b = lane; b < nb; b += 32) {
        const u16* h = (const u16*)(wr + b * 18);
        unsigned int w[4];
        #pragma unroll
        for (int i = 0; i < 4; i++) w[i] = (unsigned int)__ldg(h + 1 + 2 * i) | ((unsigned int)__ldg(h + 2 + 2 * i) << 16);
        float dw = __half2float(__ushort_as_half(__ldg(h)));
        int4 x0 = __ldg(xq + 2 * b), x1 = __ldg(xq + 2 * b + 1);
        acc += dw * __ldg(xd + b) * (float)(dot_q4(make_uint4(w[0], w[1], w[2], w[3]), x0, x1) - 8 * __ldg(xsum + b));
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// K4: SoA int8, x quantized by each thread block into shared memory (no separate launch); grid-stride over rows
extern "C" __global__ void k4_fused(const uint4* qs, const __half* d, int n_rows, int nb, const float* x, float* y) {
    extern __shared__ __align__(16) unsigned char sm[];
    signed char* sq = (signed char*)sm;               // nb*32
    float* sd = (float*)(sm + nb * 32);               // nb
    int* ss = (int*)(sm + nb * 36);                   // nb
    int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int blk = wib; blk < nb; blk += nw) {
        float v = x[blk * 32 + lane];
        float amax = fabsf(v);
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
        float dx = amax / 127.f;
        int q = dx > 0.f ? __float2int_rn(v / dx) : 0;
        sq[blk * 32 + lane] = (signed char)q;
        int s = q;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        if (lane == 0) { sd[blk] = dx; ss[blk] = s; }
    }
    __syncthreads();
    const int4* xq = (const int4*)sq;
    for (int row = blockIdx.x * nw + wib; row < n_rows; row += gridDim.x * nw) {
        float acc = 0.f;
        for (int b0 = 0; b0 < nb; b0 += 128) {
            uint4 v[4];
            __half dd[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                int b = b0 + lane + 32 * i;
                if (b < nb) { v[i] = __ldg(qs + (long long)row * nb + b); dd[i] = d[(long long)row * nb + b]; }
            }
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                int b = b0 + lane + 32 * i;
                if (b < nb) acc += __half2float(dd[i]) * sd[b] * (float)(dot_q4(v[i], xq[2 * b], xq[2 * b + 1]) - 8 * ss[b]);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) y[row] = acc;
    }
}

extern "C" __global__ void empty_k(float* y) { if (threadIdx.x == 9999) y[0] = 1.f; }

extern "C" __global__ void read_all(const uint4* p, long long n, unsigned int* out) {
    unsigned int acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        uint4 v = __ldg(p + i); acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) atomicAdd(out, 1u);
}
"""


def graph_us(cp, rounds, launch, reps=5):
    """(median, min, max) microseconds per launch over `reps` CUDA-graph replays (labs.gpu_bench)."""
    from labs.gpu_bench import graph_times

    times = [t * 1e3 for t in graph_times(cp, rounds, launch, reps)]
    return float(np.median(times)), float(min(times)), float(max(times))


NAMES = ("quant_x", "repack_q4_0", "k1_r1", "k1_r2", "k2_r1", "k2_r2", "k3_aos", "k4_fused", "empty_k", "read_all")


def setup(src: str, names):
    """The kernels of src compiled, W (11008 x 4096 Q4_0) in 8 copies as stored and repacked, x and its int8 form,
    the float64 reference, and launches(name, threads) for the round-1 kernels: the variables as a namespace."""
    import cupy as cp
    import gguf

    upload = lambda cp_, a: cp_.asarray(a)  # noqa: E731
    from gguf.constants import GGMLQuantizationType as QT

    mod = cp.RawModule(code=src, options=("--use_fast_math", "-std=c++17"), name_expressions=None)
    F = {n: mod.get_function(n) for n in names}
    props = cp.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    peak = 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8 / 1e9
    rng = np.random.default_rng(1)
    n, k = 11008, 4096
    nb = k // 32
    t = time.time()
    rows = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), QT.Q4_0)
    w = gguf.quants.dequantize(rows, QT.Q4_0).astype(np.float64)
    print("quantized", time.time() - t, flush=True)
    x_h = rng.standard_normal(k).astype(np.float32)
    ref = w @ x_h.astype(np.float64)
    ncopy = 8
    aos = [upload(cp, rows) for _ in range(ncopy)]
    qs = [cp.empty((n * nb * 16,), cp.uint8) for _ in range(ncopy)]
    dd = [cp.empty((n * nb,), cp.float16) for _ in range(ncopy)]
    for c in range(ncopy):
        F["repack_q4_0"](((n * nb + 255) // 256,), (256,), (aos[c], np.int32(n), np.int32(nb), qs[c], dd[c]))
    x = cp.asarray(x_h)
    xq, xd, xs = cp.empty(k, cp.int8), cp.empty(nb, cp.float32), cp.empty(nb, cp.int32)
    quant = lambda: F["quant_x"](((k + 255) // 256,), (256,), (x, np.int32(k), xq, xd, xs))
    quant()
    y = cp.empty(n, cp.float32)
    bytes_ = rows.nbytes
    out = {"device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"], "sms": sms,
           "peak_gb_s": peak, "bytes": bytes_}

    def launches(name, threads=128):
        rpw = 2 if name.endswith("_r2") else 1
        warps = (n + rpw - 1) // rpw
        grid = ((warps * 32 + threads - 1) // threads,)
        if name.startswith("k1"):
            return lambda r: F[name](grid, (threads,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y))
        if name.startswith("k2"):
            return lambda r: F[name](grid, (threads,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), x, y))
        if name == "k3_aos":
            return lambda r: F[name](grid, (threads,), (aos[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y))
        raise KeyError(name)

    return SimpleNamespace(**locals())


def main():
    L = setup(SRC, NAMES)
    cp, F, n, nb, ref, x, y, qs, dd = L.cp, L.F, L.n, L.nb, L.ref, L.x, L.y, L.qs, L.dd
    ncopy, sms, bytes_, out, quant, launches = L.ncopy, L.sms, L.bytes_, L.out, L.quant, L.launches
    results = {}
    rounds = 200
    for name in ("k1_r1", "k1_r2", "k2_r1", "k2_r2", "k3_aos"):
        for threads in (64, 128, 256):
            f = launches(name, threads)
            y.fill(np.nan)
            f(0)
            got = cp.asnumpy(y).astype(np.float64)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            us = graph_us(cp, rounds, f)
            results[f"{name} t{threads}"] = {"us": us[0], "min": us[1], "max": us[2], "err": err,
                                             "gb_s": bytes_ / us[0] / 1e3}
            print(f"{name} t{threads}", results[f"{name} t{threads}"], flush=True)
    # k1 with the quantization of x in the timed graph
    for threads in (128, 256):
        f = launches("k1_r1", threads)
        us = graph_us(cp, rounds, lambda r: (quant(), f(r)))
        results[f"quant+k1_r1 t{threads}"] = {"us": us[0], "gb_s": bytes_ / us[0] / 1e3}
        print(f"quant+k1_r1 t{threads}", results[f"quant+k1_r1 t{threads}"], flush=True)
    # k4 fused quantization, persistent grid
    smem = nb * 40
    for per_sm, threads in ((1, 1024), (2, 1024), (2, 512), (4, 512), (8, 256)):
        g = (sms * per_sm,)
        f = lambda r, g=g, threads=threads: F["k4_fused"](g, (threads,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), x, y), shared_mem=smem)
        y.fill(np.nan)
        f(0)
        err = float(np.abs(cp.asnumpy(y).astype(np.float64) - ref).max() / np.abs(ref).max())
        us = graph_us(cp, rounds, f)
        results[f"k4_fused {per_sm}x{threads}"] = {"us": us[0], "err": err, "gb_s": bytes_ / us[0] / 1e3}
        print(f"k4_fused {per_sm}x{threads}", results[f"k4_fused {per_sm}x{threads}"], flush=True)
    # (the first run also timed the flashlm kernel of the day, a row per staged thread block: 26.9 us)
    sink = cp.zeros(1, cp.uint32)
    for per_sm in (4, 8, 16):
        us = graph_us(cp, rounds, lambda r: F["read_all"]((sms * per_sm,), (256,), (qs[r % ncopy], np.int64(bytes_ // 16 - n * nb // 8), sink)))
        results[f"plain read x{per_sm}"] = {"us": us[0], "gb_s": (bytes_ // 16 - n * nb // 8) * 16 / us[0] / 1e3}
    results["empty"] = {"us": graph_us(cp, rounds, lambda r: F["empty_k"]((1,), (32,), (y,)))[0]}
    results["quant alone"] = {"us": graph_us(cp, rounds, lambda r: quant())[0]}
    # a big copy for the card's practical bandwidth
    big = cp.empty(2 << 30, cp.uint8)
    big2 = cp.empty(2 << 30, cp.uint8)
    us = graph_us(cp, 5, lambda r: big2.__setitem__(slice(None), big), reps=3)
    results["d2d copy 2GiB"] = {"us": us[0], "gb_s_rw": 2 * (2 << 30) / us[0] / 1e3}
    out["results"] = results
    print(json.dumps(out, indent=1))
    print("\nSUMMARY")
    for kname, v in results.items():
        print(f"{kname:28s} {v['us']:8.2f} us  {v.get('gb_s', v.get('gb_s_rw', 0)):8.0f} GB/s  err {v.get('err', '')}")


if __name__ == "__main__":
    main()
