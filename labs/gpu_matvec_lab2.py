"""GPU matvec lab, round 2 (H200, 2026-11-30): streaming loads, 4 rows per warp, a persistent prefetching walk,
warp-staged GGUF rows, against the round-1 winners. Run on a GPU machine from the repository root:
    python3 benchmarks/gpu_matvec_lab2.py
Figures: the quant/cuda_kernels.py docstring."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_matvec_lab1 import NAMES as NAMES1, SRC as SRC1, graph_us, setup  # noqa: E402  (round 1)

EXTRA = r"""
// b: k1 r2 with evict-first (streaming) weight loads
extern "C" __global__ void kb_cs_r2(const uint4* qs, const __half* d, int n, int nb, const int4* xq, const float* xd,
                                 const int* xs, float* y) { soa_i8<2, true>(qs, d, n, nb, xq, xd, xs, y); }
extern "C" __global__ void kc_r4(const uint4* qs, const __half* d, int n, int nb, const int4* xq, const float* xd,
                                 const int* xs, float* y) { soa_i8<4>(qs, d, n, nb, xq, xd, xs, y); }

// d: persistent, nb == 128 only: each warp walks row pairs, the next pair's loads issued before this one computes
extern "C" __global__ void kd_persist(const uint4* qs, const __half* d, int n_rows, int nb, const int4* xq,
                                      const float* xd, const int* xsum, float* y) {
    int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int W = (gridDim.x * blockDim.x) >> 5;
    uint4 v[2][4], nv[2][4];
    __half dd[2][4], nd[2][4];
    int p = gw;
    if (2 * p >= n_rows) return;
    #pragma unroll
    for (int r = 0; r < 2; r++)
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            long long o = (long long)min(2 * p + r, n_rows - 1) * nb + lane + 32 * i;
            v[r][i] = __ldcs(qs + o); dd[r][i] = __ldcs(d + o);
        }
    for (; 2 * p < n_rows; p += W) {
        int q = p + W;
        if (2 * q < n_rows) {
            #pragma unroll
            for (int r = 0; r < 2; r++)
                #pragma unroll
                for (int i = 0; i < 4; i++) {
                    long long o = (long long)min(2 * q + r, n_rows - 1) * nb + lane + 32 * i;
                    nv[r][i] = __ldcs(qs + o); nd[r][i] = __ldcs(d + o);
                }
        }
        float acc[2] = {0.f, 0.f};
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int b = lane + 32 * i;
            int4 x0 = __ldg(xq + 2 * b), x1 = __ldg(xq + 2 * b + 1);
            float dx = __ldg(xd + b);
            int sx = __ldg(xsum + b);
            #pragma unroll
            for (int r = 0; r < 2; r++) acc[r] += __half2float(dd[r][i]) * dx * (float)(dot_q4(v[r][i], x0, x1) - 8 * sx);
        }
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            float s = warp_sum(acc[r]);
            if (lane == 0 && 2 * p + r < n_rows) y[2 * p + r] = s;
        }
        #pragma unroll
        for (int r = 0; r < 2; r++)
            #pragma unroll
            for (int i = 0; i < 4; i++) { v[r][i] = nv[r][i]; dd[r][i] = nd[r][i]; }
    }
}

// e: AoS, a warp stages its 2 rows (contiguous) into shared memory with 16-byte loads, nb == 128 only
extern "C" __global__ void ke_stage(const u8* W, int n_rows, int nb, const int4* xq, const float* xd, const int* xsum,
                                   float* y) {
    __shared__ __align__(16) u8 sm[4][2 * 2304 + 16];
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row0 = 2 * ((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (row0 >= n_rows) return;
    int nrow = min(2, n_rows - row0);
    const uint4* src = (const uint4*)(W + (long long)row0 * 2304);
    uint4* dst = (uint4*)sm[wib];
    int n16 = nrow * 144;
    uint4 t[9];
    #pragma unroll
    for (int j = 0; j < 9; j++) if (lane + 32 * j < n16) t[j] = __ldcs(src + lane + 32 * j);
    #pragma unroll
    for (int j = 0; j < 9; j++) if (lane + 32 * j < n16) dst[lane + 32 * j] = t[j];
    __syncwarp();
    float acc[2] = {0.f, 0.f};
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        int b = lane + 32 * i;
        int4 x0 = __ldg(xq + 2 * b), x1 = __ldg(xq + 2 * b + 1);
        float dx = __ldg(xd + b);
        int sx = __ldg(xsum + b);
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            const u16* h = (const u16*)(sm[wib] + r * 2304 + b * 18);
            unsigned int w[4];
            #pragma unroll
            for (int k = 0; k < 4; k++) w[k] = (unsigned int)h[1 + 2 * k] | ((unsigned int)h[2 + 2 * k] << 16);
            float dw = __half2float(__ushort_as_half(h[0]));
            acc[r] += dw * dx * (float)(dot_q4(make_uint4(w[0], w[1], w[2], w[3]), x0, x1) - 8 * sx);
        }
    }
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < nrow) y[row0 + r] = s;
    }
}

"""
SRC = SRC1.replace('extern "C" __global__ void empty_k', EXTRA + 'extern "C" __global__ void empty_k')


NAMES = NAMES1 + ("kb_cs_r2", "kc_r4", "kd_persist", "ke_stage")


def main():
    L = setup(SRC, NAMES)
    cp, F, QT, n, k, nb, rows, ref, x, xq, xd, xs, y = (L.cp, L.F, L.QT, L.n, L.k, L.nb, L.rows, L.ref, L.x, L.xq,
                                                        L.xd, L.xs, L.y)
    aos, qs, dd, ncopy, sms, bytes_, out, launches = (L.aos, L.qs, L.dd, L.ncopy, L.sms, L.bytes_, L.out,
                                                      L.launches)
    results = {}
    rounds = 200
    from flashlm.quant.cuda_kernels import CudaKernels as CK
    ck = CK()
    q3 = ck.quantize(x.reshape(1, k))
    planar = [ck.upload_rows(rows, QT.Q4_0, k) for _ in range(ncopy)]

    def add(name, f):
        y.fill(np.nan)
        f(0)
        got = cp.asnumpy(y).astype(np.float64)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        us = graph_us(cp, rounds, f)
        results[name] = {"us": us[0], "min": us[1], "max": us[2], "err": err, "gb_s": bytes_ / us[0] / 1e3}
        print(name, results[name], flush=True)

    sink = cp.zeros(1, cp.uint32)
    for rep in range(2):
        pu = graph_us(cp, rounds, lambda r: F["read_all"]((sms * 16,), (256,), (qs[r % ncopy], np.int64(n * nb), sink)))
        results[f"plain read x16 #{rep}"] = {"us": pu[0], "gb_s": n * nb * 16 / pu[0] / 1e3, "err": 0.0}
        add(f"flashlm matvec (planar) #{rep}", lambda r: ck.matvec(planar[r % ncopy].data.ptr, planar[0].shape[1], n, k, QT.Q4_0, x.reshape(1, k), y.reshape(1, n), q3))
        for threads in (128, 256):
            add(f"a k1_r2 t{threads} #{rep}", launches("k1_r2", threads))
            grid2 = (((n + 1) // 2 * 32 + threads - 1) // threads,)
            add(f"b cs_r2 t{threads} #{rep}", lambda r, g=grid2, t=threads: F["kb_cs_r2"](g, (t,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y)))
            grid4 = (((n + 3) // 4 * 32 + threads - 1) // threads,)
            add(f"c r4 t{threads} #{rep}", lambda r, g=grid4, t=threads: F["kc_r4"](g, (t,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y)))
            add(f"e aos staged t128 #{rep}", lambda r, g=grid2: F["ke_stage"](((n + 1) // 2 * 32 // 128 + 1,), (128,), (aos[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y)))
        for per_sm in (4, 8, 16):
            add(f"d persist {per_sm}x128 #{rep}", lambda r, p=per_sm: F["kd_persist"]((sms * p,), (128,), (qs[r % ncopy], dd[r % ncopy], np.int32(n), np.int32(nb), xq, xd, xs, y)))
        add(f"g k3_aos t128 #{rep}", launches("k3_aos", 128))
    out["results"] = results
    print(json.dumps(out, indent=1))
    print("\nSUMMARY")
    for kname, v in results.items():
        print(f"{kname:34s} {v['us']:8.2f} us  {v['gb_s']:8.0f} GB/s  err {v['err']:.2g}")


if __name__ == "__main__":
    main()
