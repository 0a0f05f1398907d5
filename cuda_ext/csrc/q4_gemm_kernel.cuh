// out[m, n] = sum_k x[m, perm[k]] * (scales[k / gs, n] * q[k, n] + offsets[k / gs, n]) + bias[n] + residual[m, n]
//
// The q4 GEMV/GEMM kernel for M = 1..8 rows. Included only by the q4_gemm_m*.cu compile units.
//
// Work split: a block owns `tn` output columns (a column tile) and a range of packed rows
// (`rows_per_split` rows of 8 K each; blockIdx.y picks the split). Each thread owns 4 columns,
// so one 16-byte load brings 8 K x 4 N weights; `tn / 4` threads side by side cover the tile and
// the block's 256 threads form 256 / (tn / 4) "thread rows", each taking a contiguous run of
// packed rows. Within a group the thread accumulates sum_k x_k q_k (fp32, exact q) and sum_k x_k;
// at the group's end it folds them in as scale * sum(x q) + offset * sum(x). Thread rows are
// reduced in the block (shuffles, then shared memory); splits through a fp32 workspace that the
// last block of each tile sums in split order (deterministic, no float atomics).
//
// q from a nibble without an int->float conversion: nibble j (j <= 4) of w sits at bit 4j, so
// (w & 0xF << 4j) | exponent(2^(23-4j)) is the float 2^(23-4j) + q exactly; one LOP3 + one FADD.
// Nibbles 5..7 use w >> 12 the same way.
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

__device__ __forceinline__ void decode8(uint32_t w, float (&q)[8])
{
    const uint32_t w2 = w >> 12;
    q[0] = __uint_as_float((w  & 0x0000000Fu) | 0x4B000000u) - 8388608.0f;   // 2^23
    q[1] = __uint_as_float((w  & 0x000000F0u) | 0x49000000u) - 524288.0f;    // 2^19
    q[2] = __uint_as_float((w  & 0x00000F00u) | 0x47000000u) - 32768.0f;     // 2^15
    q[3] = __uint_as_float((w  & 0x0000F000u) | 0x45000000u) - 2048.0f;      // 2^11
    q[4] = __uint_as_float((w  & 0x000F0000u) | 0x43000000u) - 128.0f;       // 2^7
    q[5] = __uint_as_float((w2 & 0x00000F00u) | 0x47000000u) - 32768.0f;
    q[6] = __uint_as_float((w2 & 0x0000F000u) | 0x45000000u) - 2048.0f;
    q[7] = __uint_as_float((w2 & 0x000F0000u) | 0x43000000u) - 128.0f;
}

__device__ __forceinline__ void load_so(const Q4GemmArgs& a, int g, int n0, float (&s)[4], float (&o)[4])
{
    const uint2 sr = __ldg(reinterpret_cast<const uint2*>(a.scales + (size_t)g * a.N + n0));
    const uint2 orw = __ldg(reinterpret_cast<const uint2*>(a.offsets + (size_t)g * a.N + n0));
    const float2 s01 = __half22float2(*reinterpret_cast<const half2*>(&sr.x));
    const float2 s23 = __half22float2(*reinterpret_cast<const half2*>(&sr.y));
    const float2 o01 = __half22float2(*reinterpret_cast<const half2*>(&orw.x));
    const float2 o23 = __half22float2(*reinterpret_cast<const half2*>(&orw.y));
    s[0] = s01.x; s[1] = s01.y; s[2] = s23.x; s[3] = s23.y;
    o[0] = o01.x; o[1] = o01.y; o[2] = o23.x; o[3] = o23.y;
}

// M rows, U packed rows per batch of loads, PIPE: load batch b+1 before computing batch b.
template <int M, int U, bool PIPE, int LM>
__global__ void __launch_bounds__(Q4_THREADS, (M == 1 ? 2 : 1))
q4_gemm_small_kernel(const Q4GemmArgs a, const int tn, const int rows_per_split, const int rows_per_trow)
{
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);

    const int lpr = tn >> 2;                 // threads across the tile
    const int tid = threadIdx.x;
    const int trow = tid / lpr;
    const int tcol = tid - trow * lpr;
    const int tile = blockIdx.x;
    const int split = blockIdx.y;
    const int N = a.N;
    const int K = a.K;
    const int Kp = K >> 3;
    const int n0 = tile * tn + tcol * 4;
    const bool col_ok = n0 < N;

    const int pb0 = split * rows_per_split;
    const int pb1 = min(Kp, pb0 + rows_per_split);
    const int nrows = pb1 - pb0;
    const int kc = rows_per_split * 8;
    float* xs = smem;                         // [M][kc]   x (gathered, fp32)
    float* xs8 = smem + M * kc;               // [M][rows_per_split] sums of 8 consecutive x

    const int i0 = pb0 + trow * rows_per_trow;
    const int i1 = min(pb1, i0 + rows_per_trow);

    uint64_t pol = 0;
    if constexpr (LM == 1) pol = evict_first_policy();

    const size_t wstride = (size_t)(N >> 2);  // uint4 per packed row
    const uint4* wp = reinterpret_cast<const uint4*>(a.qweight) + (size_t)i0 * wstride + (n0 >> 2);

    // First batch of weights goes out before x is staged, so the staging hides under its latency.
    uint4 wa[U];
    #pragma unroll
    for (int u = 0; u < U; ++u)
        wa[u] = (col_ok && i0 + u < i1) ? load_w<LM>(wp + (size_t)u * wstride, pol) : make_uint4(0, 0, 0, 0);

    float s4[4] = {0.f, 0.f, 0.f, 0.f};
    float o4[4] = {0.f, 0.f, 0.f, 0.f};
    int g = i0 / a.gpr;
    int cnt = i0 - g * a.gpr;
    if (col_ok && i0 < i1) load_so(a, g, n0, s4, o4);

    // Stage x[:, block's K range] into shared memory as fp32, with per-packed-row sums.
    for (int item = tid; item < M * nrows; item += Q4_THREADS)
    {
        const int m = item / nrows;
        const int r = item - m * nrows;
        const int k0 = (pb0 + r) * 8;
        const half* xr = a.x + (size_t)m * K;
        float v[8];
        if (a.perm32)
        {
            #pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = __half2float(xr[a.perm32[k0 + j]]);
        }
        else if (a.perm64)
        {
            #pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = __half2float(xr[a.perm64[k0 + j]]);
        }
        else
        {
            const uint4 raw = *reinterpret_cast<const uint4*>(xr + k0);
            const half2* h = reinterpret_cast<const half2*>(&raw);
            #pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                const float2 f = __half22float2(h[j]);
                v[2 * j] = f.x;
                v[2 * j + 1] = f.y;
            }
        }
        float sum = 0.f;
        #pragma unroll
        for (int j = 0; j < 8; ++j) sum += v[j];
        float4* dst = reinterpret_cast<float4*>(xs + m * kc + r * 8);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        xs8[m * rows_per_split + r] = sum;
    }
    __syncthreads();

    float acc[M][4];
    float accq[M][4];
    float xsum[M];
    #pragma unroll
    for (int m = 0; m < M; ++m)
    {
        xsum[m] = 0.f;
        #pragma unroll
        for (int c = 0; c < 4; ++c) { acc[m][c] = 0.f; accq[m][c] = 0.f; }
    }

    #pragma unroll 1
    for (int i = i0; i < i1; i += U)
    {
        uint4 wb[U];
        if constexpr (PIPE)
        {
            #pragma unroll
            for (int u = 0; u < U; ++u)
            {
                const int ii = i + U + u;
                wb[u] = (col_ok && ii < i1) ? load_w<LM>(wp + (size_t)(ii - i0) * wstride, pol) : make_uint4(0, 0, 0, 0);
            }
        }

        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            if (i + u < i1)
            {
                const int r = i + u - pb0;
                float q[4][8];
                decode8(wa[u].x, q[0]);
                decode8(wa[u].y, q[1]);
                decode8(wa[u].z, q[2]);
                decode8(wa[u].w, q[3]);

                #pragma unroll
                for (int m = 0; m < M; ++m)
                {
                    const float4* xr = reinterpret_cast<const float4*>(xs + m * kc + r * 8);
                    const float4 xa = xr[0];
                    const float4 xb = xr[1];
                    xsum[m] += xs8[m * rows_per_split + r];
                    #pragma unroll
                    for (int c = 0; c < 4; ++c)
                    {
                        float t = accq[m][c];
                        t = fmaf(xa.x, q[c][0], t);
                        t = fmaf(xa.y, q[c][1], t);
                        t = fmaf(xa.z, q[c][2], t);
                        t = fmaf(xa.w, q[c][3], t);
                        t = fmaf(xb.x, q[c][4], t);
                        t = fmaf(xb.y, q[c][5], t);
                        t = fmaf(xb.z, q[c][6], t);
                        t = fmaf(xb.w, q[c][7], t);
                        accq[m][c] = t;
                    }
                }

                if (++cnt == a.gpr)
                {
                    #pragma unroll
                    for (int m = 0; m < M; ++m)
                    {
                        #pragma unroll
                        for (int c = 0; c < 4; ++c)
                        {
                            acc[m][c] = fmaf(s4[c], accq[m][c], fmaf(o4[c], xsum[m], acc[m][c]));
                            accq[m][c] = 0.f;
                        }
                        xsum[m] = 0.f;
                    }
                    cnt = 0;
                    ++g;
                    if (col_ok && g < a.groups && i + u + 1 < i1) load_so(a, g, n0, s4, o4);
                }
            }
        }

        if constexpr (PIPE)
        {
            #pragma unroll
            for (int u = 0; u < U; ++u) wa[u] = wb[u];
        }
        else
        {
            #pragma unroll
            for (int u = 0; u < U; ++u)
            {
                const int ii = i + U + u;
                wa[u] = (col_ok && ii < i1) ? load_w<LM>(wp + (size_t)(ii - i0) * wstride, pol) : make_uint4(0, 0, 0, 0);
            }
        }
    }

    // A group cut off by the end of this thread's range.
    if (i0 < i1 && cnt != 0)
    {
        #pragma unroll
        for (int m = 0; m < M; ++m)
        {
            #pragma unroll
            for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(s4[c], accq[m][c], fmaf(o4[c], xsum[m], acc[m][c]));
        }
    }

    // Reduce the thread rows of each warp (lanes tcol, tcol + lpr, ...), in a fixed order.
    #pragma unroll
    for (int m = 0; m < M; ++m)
    {
        #pragma unroll
        for (int c = 0; c < 4; ++c)
        {
            float v = acc[m][c];
            for (int off = 16; off >= lpr; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            acc[m][c] = v;
        }
    }

    __syncthreads();                          // x in shared memory is dead from here
    const int warp = tid >> 5;
    const int lane = tid & 31;
    constexpr int NWARPS = Q4_THREADS / 32;
    float* red = smem;                        // [NWARPS][M][tn]
    if (lane < lpr)
    {
        #pragma unroll
        for (int m = 0; m < M; ++m)
            *reinterpret_cast<float4*>(red + (warp * M + m) * tn + lane * 4) =
                make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    }
    __syncthreads();

    const int splits = gridDim.y;
    for (int item = tid; item < M * tn; item += Q4_THREADS)
    {
        const int m = item / tn;
        const int col = item - m * tn;
        const int n = tile * tn + col;
        if (n >= N) continue;
        float v = 0.f;
        #pragma unroll
        for (int w = 0; w < NWARPS; ++w) v += red[(w * M + m) * tn + col];
        if (splits == 1)
        {
            if (a.bias) v += __half2float(a.bias[n]);
            if (a.residual) v += __half2float(a.residual[(size_t)m * N + n]);
            a.out[(size_t)m * N + n] = __float2half_rn(v);
        }
        else
        {
            a.workspace[((size_t)split * M + m) * N + n] = v;
        }
    }
    if (splits == 1) return;

    // Split-K: the last block to finish this column tile sums the partials in split order.
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (tid == 0)
    {
        const int prev = atomicAdd(a.counters + tile, 1);
        is_last = (prev == splits - 1);
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int item = tid; item < M * tn; item += Q4_THREADS)
    {
        const int m = item / tn;
        const int col = item - m * tn;
        const int n = tile * tn + col;
        if (n >= N) continue;
        float v = 0.f;
        for (int s = 0; s < splits; ++s) v += __ldcg(a.workspace + ((size_t)s * M + m) * N + n);
        if (a.bias) v += __half2float(a.bias[n]);
        if (a.residual) v += __half2float(a.residual[(size_t)m * N + n]);
        a.out[(size_t)m * N + n] = __float2half_rn(v);
    }
    if (tid == 0) a.counters[tile] = 0;       // ready for the next launch (and graph replays)
}

}  // namespace q4k

template <int M, int U, bool PIPE, int LM>
cudaError_t q4_gemm_launch_t(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream)
{
    auto kernel = q4k::q4_gemm_small_kernel<M, U, PIPE, LM>;
    if (plan.smem_bytes > 48 * 1024)
    {
        // Raised per launch only when needed; cheap next to the kernel and safe while capturing.
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem_bytes);
        if (err != cudaSuccess) return err;
    }
    dim3 grid(plan.tiles, plan.splits);
    kernel<<<grid, Q4_THREADS, plan.smem_bytes, stream>>>(args, plan.tn, plan.rows_per_split, plan.rows_per_trow);
    return cudaGetLastError();
}

#define Q4_INSTANTIATE(M, U, PIPE, LM) \
    template cudaError_t q4_gemm_launch_t<M, U, PIPE, LM>(const Q4GemmPlan&, const Q4GemmArgs&, cudaStream_t);
