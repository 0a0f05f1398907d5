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
// Nibbles 5..7 use w >> 12 the same way. At M = 1, fewer instructions a weight pay (an H100 runs this kernel
// partly issue-bound): P = kProdH2 (q4_row_h) decodes two nibbles a LOP3 into fp16 pairs and multiplies in half2;
// P = kProdI16 (q4_row_i16) multiplies bytes of nibbles with 12-bit integer x by DP2A.
//
// Latency: the kernel is memory-bound and short, so the bytes in flight decide. Variant S > 0 streams
// each thread's weights through a private shared-memory ring of S rows filled by cp.async (16 bytes
// each, L2 evict-first, no registers held), S - 1 rows ahead. With PDL the ring is filled before
// griddepcontrol.wait, i.e. while the previous kernel is still finishing; x (the previous kernel's
// output) is read only after the wait. Variant S == 0 keeps U rows in registers instead, the next U in
// flight, both batches requested before the wait (the default: faster on an H100, see docs/performance.md).
// early_trigger: release the next kernel (PDL) at the start instead of after the main loop; it never changes
// results, only how kernels overlap.
#pragma once

#include "q4_common.cuh"

namespace q4k {

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

// accq[m][c] += x[m, 8 rows] . q[8 rows, c] for one packed row (8 K x 4 N weights in w).
template <int M>
__device__ __forceinline__ void q4_row(const uint4& w, const float* xs, int kc, int r, float (&accq)[M][4])
{
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
    if constexpr (M <= 2)
    {
        // Column by column: 8 decoded values live at a time.
        #pragma unroll
        for (int c = 0; c < 4; ++c)
        {
            float q[8];
            decode8(wv[c], q);
            #pragma unroll
            for (int m = 0; m < M; ++m)
            {
                const float4* xr = reinterpret_cast<const float4*>(xs + m * kc + r * 8);
                const float4 xa = xr[0];
                const float4 xb = xr[1];
                float t = accq[m][c];
                t = fmaf(xa.x, q[0], t); t = fmaf(xa.y, q[1], t); t = fmaf(xa.z, q[2], t); t = fmaf(xa.w, q[3], t);
                t = fmaf(xb.x, q[4], t); t = fmaf(xb.y, q[5], t); t = fmaf(xb.z, q[6], t); t = fmaf(xb.w, q[7], t);
                accq[m][c] = t;
            }
        }
    }
    else
    {
        // Row by row: the 32 decoded values stay, x is read once per row of x.
        float q[4][8];
        #pragma unroll
        for (int c = 0; c < 4; ++c) decode8(wv[c], q[c]);
        #pragma unroll
        for (int m = 0; m < M; ++m)
        {
            const float4* xr = reinterpret_cast<const float4*>(xs + m * kc + r * 8);
            const float4 xa = xr[0];
            const float4 xb = xr[1];
            #pragma unroll
            for (int c = 0; c < 4; ++c)
            {
                float t = accq[m][c];
                t = fmaf(xa.x, q[c][0], t); t = fmaf(xa.y, q[c][1], t); t = fmaf(xa.z, q[c][2], t); t = fmaf(xa.w, q[c][3], t);
                t = fmaf(xb.x, q[c][4], t); t = fmaf(xb.y, q[c][5], t); t = fmaf(xb.z, q[c][6], t); t = fmaf(xb.w, q[c][7], t);
                accq[m][c] = t;
            }
        }
    }
}

// P = kProdH2 (M = 1): the same product with half2 arithmetic, ~2.1 instead of ~3.1 instructions a weight
// (the kernel is partly issue-bound on an H100: ncu shows math-pipe throttle and not-selected stalls).
// One LOP3 takes two nibbles 16 bits apart into an fp16 pair under the exponent of 1024: nibbles (0, 4) from
// w & 0x000F000F give 1024 + q; nibbles (1, 5) from w & 0x00F000F0 give 1024 + 16 q (no shift); the same two
// masks on w >> 8 give (2, 6) and (3, 7). One HSUB2 of 1032 (or 1152 = 1024 + 16 * 8) makes them exact q - 8
// (or 16 (q - 8)): centred, so the fp16 partial sums stay small and unbiased, and the group fold adds the 8
// back through the offset (o + 8 s). Four HFMA2 multiply them with the staged fp16 pairs (x_j, x_j+4), the
// odd ones staged as x / 16 (exact); the 8 products of a column are summed in fp16 (4 terms a lane), then in
// fp32 from there on. x is fp16 already, as the separate kernels store it.
__device__ __forceinline__ void q4_row_h(const uint4& w, const float* xs, int r, float (&accq)[1][4])
{
    const uint4 xr = *reinterpret_cast<const uint4*>(xs + r * 8);
    const half2 x0 = *reinterpret_cast<const half2*>(&xr.x);
    const half2 x1 = *reinterpret_cast<const half2*>(&xr.y);
    const half2 x2 = *reinterpret_cast<const half2*>(&xr.z);
    const half2 x3 = *reinterpret_cast<const half2*>(&xr.w);
    const half2 k1032 = __halves2half2(__ushort_as_half(0x6408), __ushort_as_half(0x6408));
    const half2 k1152 = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (int c = 0; c < 4; ++c)
    {
        const uint32_t v = wv[c];
        const uint32_t u = v >> 8;
        const uint32_t t0 = (v & 0x000F000Fu) | 0x64006400u;
        const uint32_t t1 = (v & 0x00F000F0u) | 0x64006400u;
        const uint32_t t2 = (u & 0x000F000Fu) | 0x64006400u;
        const uint32_t t3 = (u & 0x00F000F0u) | 0x64006400u;
        const half2 q0 = __hsub2(*reinterpret_cast<const half2*>(&t0), k1032);
        const half2 q1 = __hsub2(*reinterpret_cast<const half2*>(&t1), k1152);
        const half2 q2 = __hsub2(*reinterpret_cast<const half2*>(&t2), k1032);
        const half2 q3 = __hsub2(*reinterpret_cast<const half2*>(&t3), k1152);
        half2 a = __hmul2(x0, q0);
        a = __hfma2(x1, q1, a);
        a = __hfma2(x2, q2, a);
        a = __hfma2(x3, q3, a);
        const float2 f = __half22float2(a);
        accq[0][c] += f.x + f.y;
    }
}

// P == kProdI16 (M = 1): integer products, ~1 instruction a weight. x is staged per packed row as 12-bit
// integers xi (|xi| <= 2047) with one fp32 scale a row (max |x| / 2047: 2^-12 of the row's largest value,
// about fp16's resolution). Two LOP3 split a word into bytes q (nibbles 0, 2, 4, 6) and 16 q (nibbles 1, 3, 5, 7);
// four DP2A (two int16 x two unsigned bytes, accumulated in int32) take them against x words staged as
// (16 xi0, 16 xi2), (16 xi4, 16 xi6), (xi1, xi3), (xi5, xi7), so every product is 16 xi q, exact. The sum
// starts at the bits of 1.5 * 2^23: |16 sum xi q| <= 16 * 8 * 2047 * 15 < 2^22, so the int32 read as a float
// is 1.5 * 2^23 + 16 sum xi q exactly (no I2F, which is slow); one FADD removes the bias, one FFMA scales
// by scale / 16 (staged that way) into the fp32 sum. q is not centred: the group fold's offset is o itself.
__device__ __forceinline__ int dp2a_lo(uint32_t x16, uint32_t q8, int c)
{
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x16), "r"(q8), "r"(c));
    return d;
}

__device__ __forceinline__ int dp2a_hi(uint32_t x16, uint32_t q8, int c)
{
    int d;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x16), "r"(q8), "r"(c));
    return d;
}

constexpr int kI16Bias = 0x4B400000;          // 1.5 * 2^23 as a float
constexpr float kI16BiasF = 12582912.0f;

__device__ __forceinline__ void q4_row_i16(const uint4& w, const float* xrow, float (&accq)[1][4], float& xsum)
{
    const uint4 xr = *reinterpret_cast<const uint4*>(xrow);
    const float2 sx = *reinterpret_cast<const float2*>(xrow + 4);   // scale / 16, sum of the row's x
    const float sc = sx.x;
    xsum += sx.y;
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (int c = 0; c < 4; ++c)
    {
        const uint32_t lo = wv[c] & 0x0F0F0F0Fu;
        const uint32_t hi = wv[c] & 0xF0F0F0F0u;
        int d = dp2a_lo(xr.x, lo, kI16Bias);
        d = dp2a_hi(xr.y, lo, d);
        d = dp2a_lo(xr.z, hi, d);
        d = dp2a_hi(xr.w, hi, d);
        accq[0][c] = fmaf(sc, __int_as_float(d) - kI16BiasF, accq[0][c]);
    }
}

// The staged form of one packed row's x for q4_row_i16 (see there): four words of int16 pairs, scale / 16, and
// the fp32 sum of the row's x (for the offsets; a NaN in x reaches the output through it).
__device__ __forceinline__ void stage_i16(const float (&v)[8], float sum, float* dst)
{
    float amax = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float inv = amax > 0.f ? 2047.0f / amax : 0.f;   // inf rows: inv 0, scale inf, the sum turns NaN
    int xi[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j) xi[j] = __float2int_rn(v[j] * inv);
    auto pack = [](int a, int b) { return ((uint32_t)a & 0xFFFFu) | ((uint32_t)b << 16); };
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(pack(16 * xi[0], 16 * xi[2]), pack(16 * xi[4], 16 * xi[6]), pack(xi[1], xi[3]), pack(xi[5], xi[7]));
    dst[4] = amax * (1.0f / (2047.0f * 16.0f));
    dst[5] = sum;
}

// Bytes of the cp.async ring in front of the x staging area.
template <int S>
__host__ __device__ constexpr int ring_bytes() { return S * Q4_THREADS * 16; }

// M rows; S > 0: cp.async ring of S rows; S == 0: U rows in registers, next U prefetched. P: the product
// (kProdF32, or at M = 1 with S = 0 kProdH2 / kProdI16, whose staging stores each packed row's x in the form
// q4_row_h / q4_row_i16 reads, in the first 16 / 20 of its 32 bytes).
template <int M, int U, int S, int MINB, int P>
__global__ void __launch_bounds__(Q4_THREADS, MINB)
q4_gemm_small_kernel(const Q4GemmArgs a, const int tn, const int rows_per_split, const int rows_per_trow,
                     const int flags)
{
    extern __shared__ float4 smem4[];
    char* smem_raw = reinterpret_cast<char*>(smem4);

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
    uint4* ring = reinterpret_cast<uint4*>(smem_raw);                     // [S][Q4_THREADS]
    float* xs = reinterpret_cast<float*>(smem_raw + ring_bytes<S>());    // [M][kc] x (gathered, fp32)
    float* xs8 = xs + M * kc;                                            // [M][rows_per_split] sums of 8 x

    const int i0 = pb0 + trow * rows_per_trow;
    const int i1 = min(pb1, i0 + rows_per_trow);
    const int n = i1 - i0;                    // rows of this thread (may be <= 0)

    const bool early_trigger = flags & kEarlyTrigger;
    if (early_trigger) pdl_trigger();         // the next kernel may start (and prefetch) right away
    const uint64_t pol = evict_first_policy();
    const size_t wstride = (size_t)(N >> 2);  // uint4 per packed row
    const uint4* wp = reinterpret_cast<const uint4*>(a.qweight) + (size_t)i0 * wstride + (n0 >> 2);

    // Weights and scales never change between kernels: fetch them before waiting on the previous kernel.
    // S == 0: the first two batches of U rows (the second is what the main loop would request first) are
    // requested before the wait, so the staging after it overlaps twice the weight traffic: +1.3-2.6% on the
    // 7B model (docs/performance.md); the registers for both batches are live in the main loop anyway.
    uint4 wa[S > 0 ? 1 : U];
    uint4 wb[S > 0 ? 1 : U];
    if constexpr (S > 0)
    {
        #pragma unroll
        for (int j = 0; j < S - 1; ++j)
        {
            if (col_ok && j < n) cp_async16(smem_addr(ring + j * Q4_THREADS + tid), wp + (size_t)j * wstride, pol);
            cp_async_commit();
        }
    }
    else
    {
        #pragma unroll
        for (int u = 0; u < U; ++u)
            wa[u] = (col_ok && u < n) ? load_w<1>(wp + (size_t)u * wstride, pol) : make_uint4(0, 0, 0, 0);
        #pragma unroll
        for (int u = 0; u < U; ++u)
            wb[u] = (col_ok && U + u < n) ? load_w<1>(wp + (size_t)(U + u) * wstride, pol) : make_uint4(0, 0, 0, 0);
    }

    // The fused norm's weights are constants too: the block's K range of them into L1 before the wait, so the
    // staging after it does not wait on L2 for them (a permuted K gathers from anywhere: left to the staging).
    // 7B on an H100: 536.7-537.1 / 459.1-460.3 -> 540.7-540.9 / 461.7-461.9 t/s (docs/performance.md, session 7).
    if (a.norm_w && !a.perm32 && !a.perm64)
    {
        for (int r = tid * 4; r < nrows; r += Q4_THREADS * 4)          // 4 packed rows' weights: a 128-byte line
            asm volatile("prefetch.global.L1 [%0];" :: "l"(a.norm_w + (size_t)(pb0 + r) * 8));
    }

    float s4[4] = {0.f, 0.f, 0.f, 0.f};
    float o4[4] = {0.f, 0.f, 0.f, 0.f};
    int g = i0 / a.gpr;
    int cnt = i0 - g * a.gpr;
    // A group's scales and offsets; the half2 rows hold q - 8, so their offset is o + 8 s.
    auto load_group = [&](int grp) {
        load_so(a, grp, n0, s4, o4);
        if constexpr (P == kProdH2)
        {
            #pragma unroll
            for (int c = 0; c < 4; ++c) o4[c] = fmaf(8.0f, s4[c], o4[c]);
        }
    };
    if (col_ok && n > 0) load_group(g);

    pdl_wait();                               // x, residual, out, workspace: only from here on

    const int xstride = a.x_stride > 0 ? a.x_stride : K;
    __shared__ float norm_scratch[32];
    __shared__ float norm_inv[M];
    if (a.norm_w) rows_norm_inv(a, M, xstride, norm_inv, norm_scratch);

    // Stage x[:, block's K range] into shared memory as fp32, with per-packed-row sums.
    for (int item = tid; item < M * nrows; item += Q4_THREADS)
    {
        const int m = item / nrows;
        const int r = item - m * nrows;
        const int k0 = (pb0 + r) * 8;
        float v[8];
        load_x8(a, m, k0, xstride, norm_inv, v);
        float sum = 0.f;
        #pragma unroll
        for (int j = 0; j < 8; ++j) sum += v[j];
        float4* dst = reinterpret_cast<float4*>(xs + m * kc + r * 8);
        if constexpr (P == kProdI16)
        {
            stage_i16(v, sum, reinterpret_cast<float*>(dst));
        }
        else if constexpr (P == kProdH2)
        {
            uint4 pairs;
            const half2 p0 = __floats2half2_rn(v[0], v[4]), p1 = __floats2half2_rn(v[1] / 16.f, v[5] / 16.f);
            const half2 p2 = __floats2half2_rn(v[2], v[6]), p3 = __floats2half2_rn(v[3] / 16.f, v[7] / 16.f);
            pairs.x = *reinterpret_cast<const uint32_t*>(&p0);
            pairs.y = *reinterpret_cast<const uint32_t*>(&p1);
            pairs.z = *reinterpret_cast<const uint32_t*>(&p2);
            pairs.w = *reinterpret_cast<const uint32_t*>(&p3);
            *reinterpret_cast<uint4*>(dst) = pairs;
        }
        else
        {
            dst[0] = make_float4(v[0], v[1], v[2], v[3]);
            dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        if constexpr (P != kProdI16) xs8[m * rows_per_split + r] = sum;   // integer rows: in their staged row
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

    // At a group's end: fold in scale and offset, load the next group's.
    auto end_group = [&](bool more) {
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
        if (col_ok && more && g < a.groups) load_group(g);
    };
    // After each row: count it into its group.
    auto end_row = [&](int row_abs, bool more) {
        #pragma unroll
        for (int m = 0; m < M; ++m) xsum[m] += xs8[m * rows_per_split + row_abs - pb0];
        if (++cnt == a.gpr) end_group(more);
    };

    if constexpr (S > 0)
    {
        #pragma unroll 2
        for (int j = 0; j < n; ++j)
        {
            const int jj = j + S - 1;
            if (col_ok && jj < n)
                cp_async16(smem_addr(ring + (jj % S) * Q4_THREADS + tid), wp + (size_t)jj * wstride, pol);
            cp_async_commit();
            cp_async_wait<S - 1>();           // row j has landed
            const uint4 w = col_ok ? ring[(j % S) * Q4_THREADS + tid] : make_uint4(0, 0, 0, 0);
            q4_row<M>(w, xs, kc, i0 + j - pb0, accq);
            end_row(i0 + j, j + 1 < n);
        }
        cp_async_wait_all();
    }
    else
    {
        // Integer rows whose groups split into whole batches (the usual case): the group check once a batch.
        const bool batch_groups = P == kProdI16 && a.gpr % U == 0 && cnt % U == 0;
        const float* xrow = xs + (i0 - pb0) * 8;
        #pragma unroll 1
        for (int j = 0; j < n; j += U)
        {
            if (j > 0)                        // batch j + U (batch U came before the wait)
            {
                #pragma unroll
                for (int u = 0; u < U; ++u)
                {
                    const int jj = j + U + u;
                    wb[u] = (col_ok && jj < n) ? load_w<1>(wp + (size_t)jj * wstride, pol) : make_uint4(0, 0, 0, 0);
                }
            }
            if constexpr (P == kProdI16)
            {
                if (batch_groups && j + U <= n)
                {
                    #pragma unroll
                    for (int u = 0; u < U; ++u) q4_row_i16(wa[u], xrow + (j + u) * 8, accq, xsum[0]);
                    cnt += U;
                    if (cnt == a.gpr) end_group(j + U < n);
                }
                else
                {
                    #pragma unroll
                    for (int u = 0; u < U; ++u)
                    {
                        if (j + u < n)
                        {
                            q4_row_i16(wa[u], xrow + (j + u) * 8, accq, xsum[0]);
                            if (++cnt == a.gpr) end_group(j + u + 1 < n);
                        }
                    }
                }
            }
            else
            {
                #pragma unroll
                for (int u = 0; u < U; ++u)
                {
                    if (j + u < n)
                    {
                        if constexpr (P == kProdH2) q4_row_h(wa[u], xs, i0 + j + u - pb0, accq);
                        else q4_row<M>(wa[u], xs, kc, i0 + j + u - pb0, accq);
                        end_row(i0 + j + u, j + u + 1 < n);
                    }
                }
            }
            #pragma unroll
            for (int u = 0; u < U; ++u) wa[u] = wb[u];
        }
    }

    if (!early_trigger) pdl_trigger();        // main loop done: let the next kernel launch into our tail

    // A group cut off by the end of this thread's range.
    if (n > 0 && cnt != 0)
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

    __syncthreads();                          // ring and x in shared memory are dead from here
    const int warp = tid >> 5;
    const int lane = tid & 31;
    constexpr int NWARPS = Q4_THREADS / 32;
    float* red = reinterpret_cast<float*>(smem_raw);   // [NWARPS][M][tn]
    if (lane < lpr)
    {
        #pragma unroll
        for (int m = 0; m < M; ++m)
            *reinterpret_cast<float4*>(red + (warp * M + m) * tn + lane * 4) =
                make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    }
    __syncthreads();

    finish_tile(a, red, NWARPS, M, tn, tile, split, gridDim.y);
}

}  // namespace q4k

template <int M, int U, int S, int MINB, int P>
cudaError_t q4_gemm_launch_t(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream)
{
    static_assert(P == kProdF32 || (M == 1 && S == 0), "the half2 and integer rows are for M = 1 with registers");
    auto kernel = q4k::q4_gemm_small_kernel<M, U, S, MINB, P>;
    if (plan.smem_bytes > 48 * 1024)
    {
        // Raised per launch only when needed; cheap next to the kernel and safe while capturing.
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem_bytes);
        if (err != cudaSuccess) return err;
    }
    return launch_kernel(kernel, dim3(plan.tiles, plan.splits), dim3(Q4_THREADS), plan.smem_bytes, stream, plan.pdl > 0,
                         args, plan.tn, plan.rows_per_split, plan.rows_per_trow, plan.pdl == 2 ? q4k::kEarlyTrigger : 0);
}

#define Q4_INSTANTIATE(M, U, S, MINB, P) \
    template cudaError_t q4_gemm_launch_t<M, U, S, MINB, P>(const Q4GemmPlan&, const Q4GemmArgs&, cudaStream_t);
