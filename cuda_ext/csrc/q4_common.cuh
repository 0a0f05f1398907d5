// Device helpers shared by the two q4 GEMV kernels (q4_gemm_kernel.cuh: CUDA cores, row layout;
// q4_mma.cu: tensor cores, mma layout): weight loads, the fused x prologue, the output epilogue.
#pragma once

#include "q4_gemm.cuh"
#include "common.cuh"

namespace q4k {

__device__ __forceinline__ uint64_t evict_first_policy()
{
    uint64_t pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}

// LM 0: plain read-only load; LM 1: no L1 allocation and an L2 evict-first hint (weights stream once).
template <int LM>
__device__ __forceinline__ uint4 load_w(const uint4* p, uint64_t pol)
{
    uint4 r;
    if constexpr (LM == 0)
    {
        r = __ldg(p);
    }
    else
    {
        asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
            : "l"(p), "l"(pol));
    }
    return r;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint64_t pol)
{
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "l"(pol) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Kernel flags (an int argument of both q4 GEMVs).
constexpr int kEarlyTrigger = 1;   // release the next kernel (PDL) at the start, not after the main loop

// Fused RMSNorm: 1 / rms of each of the M rows of x over all K (every block needs the whole row;
// rows are short, 2-16 KB). Writes norm_inv[m]; ends with a barrier.
__device__ __forceinline__ void rows_norm_inv(const Q4GemmArgs& a, int M, int xstride, float* norm_inv,
                                              float* scratch)
{
    const int Kp = a.K >> 3;
    #pragma unroll 1
    for (int m = 0; m < M; ++m)
    {
        const half* xr = a.x + (size_t)m * xstride;
        float ss = 0.f;
        for (int c = threadIdx.x; c < Kp; c += blockDim.x)
        {
            float v[8];
            h8_to_f(*reinterpret_cast<const uint4*>(xr + c * 8), v);
            #pragma unroll
            for (int j = 0; j < 8; ++j) ss = fmaf(v[j], v[j], ss);
        }
        const float total = block_sum(ss, scratch);
        if (threadIdx.x == 0) norm_inv[m] = rsqrtf(total / (float)a.K + a.norm_eps);
    }
    __syncthreads();
}

// The 8 inputs x[m, perm[k0 .. k0 + 7]] as the GEMV consumes them: gathered through perm, through the
// fused prologue (rms_norm or silu(gate) * up) and rounded to fp16 exactly as the separate kernel
// would have stored them, returned as fp32.
__device__ __forceinline__ void load_x8(const Q4GemmArgs& a, int m, int k0, int xstride, const float* norm_inv,
                                        float (&v)[8])
{
    const half* xr = a.x + (size_t)m * xstride;
    int kidx[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j)
        kidx[j] = a.perm32 ? a.perm32[k0 + j] : (a.perm64 ? (int)a.perm64[k0 + j] : k0 + j);
    if (a.perm32 || a.perm64)
    {
        #pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __half2float(xr[kidx[j]]);
    }
    else
    {
        h8_to_f(*reinterpret_cast<const uint4*>(xr + k0), v);
    }
    if (a.norm_w)
    {
        const float inv = norm_inv[m];
        #pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __half2float(__float2half_rn(v[j] * inv * __ldg(a.norm_w + kidx[j])));
    }
    else if (a.x_up)
    {
        const half* ur = a.x_up + (size_t)m * xstride;
        #pragma unroll
        for (int j = 0; j < 8; ++j)
        {
            const float u = __half2float(ur[kidx[j]]);
            v[j] = __half2float(__float2half_rn(v[j] / (1.0f + __expf(-v[j])) * u));
        }
    }
}

// out[m, nn] = v + bias + residual, rounded to fp16 once.
__device__ __forceinline__ void store_out(const Q4GemmArgs& a, int m, int nn, float v)
{
    if (a.bias) v += __half2float(a.bias[nn]);
    if (a.residual) v += __half2float(a.residual[(size_t)m * a.N + nn]);
    a.out[(size_t)m * a.N + nn] = __float2half_rn(v);
}

// Block epilogue: red [nwarps][M][tn] holds each warp's partial sums for the block's tn columns
// (tile `tile`). Sums the warps in order; one split: + bias + residual -> out. Split-K: partials to
// the fp32 workspace, and the last block of the column tile sums the splits in split order
// (deterministic, no float atomics) and stores. Starts after a barrier that made red visible.
__device__ __forceinline__ void finish_tile(const Q4GemmArgs& a, const float* red, int nwarps, int M, int tn,
                                            int tile, int split, int splits)
{
    const int tid = threadIdx.x;
    const int N = a.N;
    auto each_column = [&](auto&& fn) {       // (row m, column col of the tile, global column nn) inside N
        for (int item = tid; item < M * tn; item += blockDim.x)
        {
            const int m = item / tn;
            const int col = item - m * tn;
            if (tile * tn + col < N) fn(m, col, tile * tn + col);
        }
    };
    each_column([&](int m, int col, int nn) {
        float v = 0.f;
        for (int w = 0; w < nwarps; ++w) v += red[(w * M + m) * tn + col];
        if (splits == 1)
            store_out(a, m, nn, v);
        else
            a.workspace[((size_t)split * M + m) * N + nn] = v;
    });
    if (splits == 1) return;

    // One acq_rel atomic by thread 0 after the barrier publishes the whole block's partials (release is
    // cumulative through the barrier) and, in the last block, acquires the others' - instead of a
    // sequentially consistent fence in every thread, before and after: 7B 531.5 -> 542.1 t/s on an H100
    // (docs/performance.md, session 7).
    __shared__ int is_last;
    __syncthreads();
    if (tid == 0)
    {
        int prev;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(a.counters + tile) : "memory");
        is_last = (prev == splits - 1);
    }
    __syncthreads();
    if (!is_last) return;
    each_column([&](int m, int, int nn) {
        float v = 0.f;
        for (int sp = 0; sp < splits; ++sp) v += __ldcg(a.workspace + ((size_t)sp * M + m) * N + nn);
        store_out(a, m, nn, v);
    });
    if (tid == 0) a.counters[tile] = 0;       // ready for the next launch (and graph replays)
}

}  // namespace q4k
