// Decode-step attention kernels; see decode.cuh.
#include "decode.cuh"
#include "common.cuh"

#include <algorithm>
#include <math_constants.h>

// ---- rope_kv_write ------------------------------------------------------------------------
// One thread per (b, t, head of q|k|v, run j < D / (2 W)): elements W j .. W j + W - 1 and their
// rotate-half partners + D/2 (as rotary.cu: fp32 math, one fp16 rounding). W = 8 moves 16 bytes a
// load where rows and tables are 16-byte aligned (a prompt's T tokens), else W = 2. q rotates in
// place; k goes to the cache rotated and v as is, token t at slot[0] + t. T = 1 is the decode step,
// T > 1 a prompt (one launch instead of two rotary kernels and two cache copies).
template <int W>
__device__ __forceinline__ void ld_h(const half* p, float (&v)[W])
{
    if constexpr (W == 8)
    {
        h8_to_f(*reinterpret_cast<const uint4*>(p), v);
    }
    else
    {
        #pragma unroll
        for (int e = 0; e < W; e += 2)
        {
            const float2 f = __half22float2(*reinterpret_cast<const half2*>(p + e));
            v[e] = f.x;
            v[e + 1] = f.y;
        }
    }
}

template <int W>
__device__ __forceinline__ void st_h(half* p, const float (&v)[W])
{
    if constexpr (W == 8)
    {
        uint4 raw;
        half2* h = reinterpret_cast<half2*>(&raw);
        #pragma unroll
        for (int e = 0; e < 4; ++e) h[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
        *reinterpret_cast<uint4*>(p) = raw;
    }
    else
    {
        #pragma unroll
        for (int e = 0; e < W; e += 2) *reinterpret_cast<half2*>(p + e) = __floats2half2_rn(v[e], v[e + 1]);
    }
}

template <typename PT, int W>
__global__ void rope_kv_write_kernel(half* q, int64_t qsb, int64_t qst, int64_t qsh, const half* k, int64_t ksb,
                                     int64_t kst, int64_t ksh, const half* v, int64_t vsb, int64_t vst, int64_t vsh,
                                     int T, int H, int Hkv, int d, const float* __restrict__ cosv,
                                     const float* __restrict__ sinv, int max_pos, const PT* __restrict__ positions,
                                     int64_t psb, int64_t pst, const int64_t* __restrict__ slot, half* kc, half* vc,
                                     int S, long long total)
{
    pdl_wait();
    pdl_trigger();
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int dw = d / W;                        // runs per half of the head
    const int j = (int)(idx % dw);
    long long r = idx / dw;
    const int NH = H + 2 * Hkv;
    const int hh = (int)(r % NH);
    r /= NH;
    const int t = (int)(r % T);
    const int b = (int)(r / T);
    const int D = 2 * d;
    const int i = W * j;

    const long long p = (long long)positions[b * psb + t * pst];
    const bool rot = p >= 0 && p < max_pos;
    float c[W], s[W];
    #pragma unroll
    for (int e = 0; e < W; ++e) { c[e] = 1.f; s[e] = 0.f; }
    if (rot && hh < H + Hkv)
    {
        #pragma unroll
        for (int e = 0; e < W; e += 2)
        {
            const float2 cc = __ldg(reinterpret_cast<const float2*>(cosv + p * d + i + e));
            const float2 ss = __ldg(reinterpret_cast<const float2*>(sinv + p * d + i + e));
            c[e] = cc.x; c[e + 1] = cc.y;
            s[e] = ss.x; s[e + 1] = ss.y;
        }
    }
    auto rotate = [&](const half* src, half* dst) {
        float x1[W], x2[W], y1[W], y2[W];
        ld_h<W>(src + i, x1);
        ld_h<W>(src + i + d, x2);
        #pragma unroll
        for (int e = 0; e < W; ++e)
        {
            y1[e] = rope_lo(x1[e], x2[e], c[e], s[e]);
            y2[e] = rope_hi(x1[e], x2[e], c[e], s[e]);
        }
        st_h<W>(dst + i, y1);
        st_h<W>(dst + i + d, y2);
    };
    if (hh < H)
    {
        half* base = q + b * qsb + t * qst + hh * qsh;
        if (rot) rotate(base, base);
        return;
    }
    const long long sl = slot[0] + t;
    if (sl < 0 || sl >= S) return;
    const bool is_k = hh < H + Hkv;
    const int h = is_k ? hh - H : hh - H - Hkv;
    const half* src = is_k ? k + b * ksb + t * kst + h * ksh : v + b * vsb + t * vst + h * vsh;
    half* dst = (is_k ? kc : vc) + (((size_t)b * Hkv + h) * S + sl) * D;
    if (is_k && rot)
    {
        rotate(src, dst);
    }
    else
    {
        float x[W];
        ld_h<W>(src + i, x);
        st_h<W>(dst + i, x);
        ld_h<W>(src + i + d, x);
        st_h<W>(dst + i + d, x);
    }
}

template <int W>
static cudaError_t launch_rope_kv(const RopeKvArgs& a, bool pdl, cudaStream_t stream)
{
    const int d = a.D / 2;
    const long long total = (long long)a.B * a.T * (a.H + 2 * a.Hkv) * (d / W);
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    const unsigned blocks = (unsigned)EXL_DIV_UP(total, (long long)threads);
    if (a.pos_is64)
        return launch_kernel(rope_kv_write_kernel<int64_t, W>, dim3(blocks), dim3(threads), 0, stream, pdl, a.q, a.qsb,
                             a.qst, a.qsh, a.k, a.ksb, a.kst, a.ksh, a.v, a.vsb, a.vst, a.vsh, a.T, a.H, a.Hkv, d,
                             a.cos, a.sin, a.max_pos, static_cast<const int64_t*>(a.positions), a.psb, a.pst, a.slot,
                             a.k_cache, a.v_cache, a.S, total);
    return launch_kernel(rope_kv_write_kernel<int32_t, W>, dim3(blocks), dim3(threads), 0, stream, pdl, a.q, a.qsb,
                         a.qst, a.qsh, a.k, a.ksb, a.kst, a.ksh, a.v, a.vsb, a.vst, a.vsh, a.T, a.H, a.Hkv, d,
                         a.cos, a.sin, a.max_pos, static_cast<const int32_t*>(a.positions), a.psb, a.pst, a.slot,
                         a.k_cache, a.v_cache, a.S, total);
}

cudaError_t rope_kv_write_launch(const RopeKvArgs& a, bool pdl, cudaStream_t stream)
{
    // 16-byte runs where every row start is 16-byte aligned (strides in halves multiple of 8) and the
    // head is long enough; prompts only: the decode step's T = 1 has too few threads to gain from it
    auto al = [](const void* ptr) { return ((uintptr_t)ptr & 15) == 0; };
    const bool vec = a.T > 1 && (a.D / 2) % 8 == 0 && al(a.q) && al(a.k) && al(a.v) && al(a.cos) && al(a.sin) &&
                     al(a.k_cache) && al(a.v_cache) && (a.qsb | a.qst | a.qsh | a.ksb | a.kst | a.ksh | a.vsb | a.vst |
                                                        a.vsh) % 8 == 0;
    return vec ? launch_rope_kv<8>(a, pdl, stream) : launch_rope_kv<2>(a, pdl, stream);
}

// ---- decode_attention ---------------------------------------------------------------------
// Block (b, kv head, split): keys [split * chunk, + chunk) clipped to the valid range [lo, hi).
// A key row (D halves) is read by L = D / 8 lanes, 16 bytes each; a warp covers 32 / L keys a step.
// Pass 1: scores (log2 domain) of the G query heads into shared memory; pass 2: per-head max and
// exp2 sums (one warp per head); pass 3: p @ V into registers, reduced over the warp's key groups
// and then the warps. One split: normalised output. Several: unnormalised partials (and max, sum)
// to a workspace; the last block of the (b, kv head) combines them in split order.
namespace attn {

// Key rows in flight per lane: a block's first UNR rows a lane are loaded before the PDL wait, the next UNR
// while they are used. 8 for head dim 128, 4 for 64, on an H100 (docs/performance.md, session 6: 7B 527-529 /
// 459 t/s with 8 against 521 / 449 with 4; SmolLM2-135M, head dim 64: 1,646-1,652 with 4 against 1,612-1,615
// with 8). -DATT_UNR=n forces n (A/B builds).
__host__ __device__ constexpr int unr_for(int D)
{
#ifdef ATT_UNR
    (void)D;
    return ATT_UNR;
#else
    return D >= 128 ? 8 : 4;
#endif
}

__device__ __forceinline__ uint4 ld_stream(const half* p)
{
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// A lane's 16 bytes of key (or value) row j: zeros past e1; row `fresh` (the new token, >= 0 only in the
// block that wrote it) from shared memory, the rest streamed from the cache.
__device__ __forceinline__ uint4 key_row(const half* base, const half* fresh_row, int j, int e1, int fresh, int li,
                                         int D)
{
    if (j >= e1) return make_uint4(0, 0, 0, 0);
    if (j == fresh) return *reinterpret_cast<const uint4*>(fresh_row + li * 8);
    return ld_stream(base + (size_t)j * D);
}

template <int D, int G, int NT>
__global__ void __launch_bounds__(NT)
decode_attn_kernel(const half* __restrict__ q, int64_t qsb, int64_t qsh, half* kc, half* vc, int S, int Hkv,
                   const int64_t* __restrict__ pos, const int64_t* __restrict__ pad, int kv_len, int chunk,
                   float scale_log2, half* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters,
                   const AttnRope rope)
{
    constexpr int L = D / 8;
    constexpr int KPW = 32 / L;
    constexpr int NW = NT / 32;
    constexpr int KPB = NW * KPW;
    constexpr int UNR = unr_for(D);
    extern __shared__ float4 att_smem4[];
    float* sm = reinterpret_cast<float*>(att_smem4);
    __shared__ float s_m[G], s_l[G];
    __shared__ int is_last;

    const int bk = blockIdx.x;
    const int b = bk / Hkv;
    const int kvh = bk - b * Hkv;
    const int split = blockIdx.y;
    const int splits = gridDim.y;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int li = lane % L;
    const int ki = lane / L;

    // Everything up to pdl_wait() reads only what was written before this decode step began (the
    // position and padding buffers, the rotary tables, cache rows of earlier tokens), so it overlaps the
    // previous kernel's tail under programmatic dependent launch: the block's first key and value rows are
    // in flight before q exists. Only row p (this step's token, written by the previous kernel or below)
    // waits.
    const int p = (int)pos[0];
    const int lo = pad ? (int)pad[b] : 0;
    const int hi = min(p + 1, kv_len);
    // Only the splits holding keys [lo, hi) take part (the plan is fixed per key bucket, the position is
    // not): the others exit, and a single active split writes the output itself with no combine.
    const int first = lo / chunk;
    const int last = (max(hi, lo + 1) - 1) / chunk;
    if (split < first || split > last) return;
    const int active = last - first + 1;
    const int e0 = max(split * chunk, lo);
    const int e1 = min(split * chunk + chunk, hi);
    const int n = e1 - e0;

    const size_t head_off = ((size_t)b * Hkv + kvh) * (size_t)S * D + li * 8;
    const half* kb = kc + head_off;
    const half* vb = vc + head_off;
    const int j0 = e0 + warp * KPW;                     // this warp's first key rows
    uint4 kraw[UNR], vraw[UNR];
    #pragma unroll
    for (int u = 0; u < UNR; ++u)
    {
        const int j = j0 + u * KPB + ki;
        kraw[u] = j == p ? make_uint4(0, 0, 0, 0) : key_row(kb, nullptr, j, e1, -1, li, D);
        vraw[u] = j == p ? make_uint4(0, 0, 0, 0) : key_row(vb, nullptr, j, e1, -1, li, D);
    }

    // Rotary prologue (rope.k): cos / sin of this lane's 8 dims (rotate-half pairs dims i and i + D / 2,
    // which sit L / 2 lanes apart), and the new token's rotated k and v, in the cache and in shared
    // memory for the block that reads key p (the cache loads below bypass L1 and may not see own stores).
    __shared__ __align__(16) half knew[D], vnew[D];
    const bool fused_rope = rope.k != nullptr;
    const bool has_new = fused_rope && split == p / chunk;
    float rc[8], rs[8];
    bool rot = false;
    // the model's rotary position of the new token: p - pad[b] (clamped at 0), no extra load to wait on
    const long long rp = max(p - lo, 0);
    if (fused_rope)
    {
        rot = rp >= 0 && rp < rope.max_pos;
        const int d = D / 2;
        #pragma unroll
        for (int e = 0; e < 8; ++e)
        {
            const int i = (li * 8 + e) % d;
            rc[e] = rot ? __ldg(rope.cos + rp * d + i) : 1.f;
            rs[e] = rot ? __ldg(rope.sin + rp * d + i) : 0.f;
        }
    }

    pdl_wait();
    pdl_trigger();

    uint4 qraw[G];                                      // in flight while the new key is rotated below
    #pragma unroll
    for (int g = 0; g < G; ++g)
        qraw[g] = *reinterpret_cast<const uint4*>(q + b * qsb + (int64_t)(kvh * G + g) * qsh + li * 8);

    if (has_new)
    {
        static_assert(NT >= D, "one element of the new key and value a thread");
        const int d = D / 2;
        const half* ks = rope.k + b * rope.ksb + kvh * rope.ksh;
        const half* vs = rope.v + b * rope.vsb + kvh * rope.vsh;
        half* kd = kc + (((size_t)b * Hkv + kvh) * S + p) * D;
        half* vd = vc + (((size_t)b * Hkv + kvh) * S + p) * D;
        // Every load before the first store (which may alias them, for all the compiler knows): the new
        // key and value come in one round trip, with q's, not in two after it.
        const half k1 = tid < d ? ks[tid] : __float2half_rn(0.f);
        const half k2 = tid < d ? ks[tid + d] : __float2half_rn(0.f);
        const half vx = tid < D ? vs[tid] : __float2half_rn(0.f);
        const float c = rot && tid < d ? __ldg(rope.cos + rp * d + tid) : 1.f;
        const float sn = rot && tid < d ? __ldg(rope.sin + rp * d + tid) : 0.f;
        if (tid < d)
        {
            const float x1 = __half2float(k1), x2 = __half2float(k2);
            const half y1 = rot ? __float2half_rn(rope_lo(x1, x2, c, sn)) : k1;
            const half y2 = rot ? __float2half_rn(rope_hi(x1, x2, c, sn)) : k2;
            knew[tid] = kd[tid] = y1;
            knew[tid + d] = kd[tid + d] = y2;
        }
        if (tid < D) vnew[tid] = vd[tid] = vx;
        __syncthreads();
    }
    #pragma unroll
    for (int u = 0; u < UNR; ++u)                       // row p, now that it exists
    {
        if (j0 + u * KPB + ki == p && p < e1)
        {
            kraw[u] = key_row(kb, knew, p, e1, has_new ? p : -1, li, D);
            vraw[u] = key_row(vb, vnew, p, e1, has_new ? p : -1, li, D);
        }
    }

    float qr[G][8];
    #pragma unroll
    for (int g = 0; g < G; ++g)
    {
        h8_to_f(qraw[g], qr[g]);
        if (fused_rope && rot)
        {
            // as rope_kv_write stores q: fp32 rotation, one fp16 rounding
            const bool first = li < L / 2;
            #pragma unroll
            for (int e = 0; e < 8; ++e)
            {
                const float other = __shfl_xor_sync(0xffffffffu, qr[g][e], L / 2);
                const float y = first ? rope_lo(qr[g][e], other, rc[e], rs[e]) : rope_hi(other, qr[g][e], rc[e], rs[e]);
                qr[g][e] = __half2float(__float2half_rn(y));
            }
        }
        #pragma unroll
        for (int e = 0; e < 8; ++e) qr[g][e] *= scale_log2;
    }

    float* sc = sm;                                     // [G][chunk]

    // Pass 1: scores (the first rows were loaded before the wait; each batch's loads are issued before the
    // previous batch is used, so long chunks pay the memory latency once, not once a batch).
    for (int jb = j0; jb < e1; jb += KPB * UNR)
    {
        uint4 raw[UNR];
        #pragma unroll
        for (int u = 0; u < UNR; ++u)
        {
            raw[u] = kraw[u];
            kraw[u] = key_row(kb, knew, jb + KPB * UNR + u * KPB + ki, e1, has_new ? p : -1, li, D);
        }
        #pragma unroll
        for (int u = 0; u < UNR; ++u)
        {
            const int j = jb + u * KPB + ki;
            float kv[8];
            h8_to_f(raw[u], kv);
            #pragma unroll
            for (int g = 0; g < G; ++g)
            {
                float dsum = 0.f;
                #pragma unroll
                for (int e = 0; e < 8; ++e) dsum = fmaf(qr[g][e], kv[e], dsum);
                #pragma unroll
                for (int off = L / 2; off > 0; off >>= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, off);
                if (j < e1 && li == 0) sc[g * chunk + (j - e0)] = dsum;
            }
        }
    }
    __syncthreads();

    // Pass 2: softmax numerators in place, per-head max and sum.
    for (int g = warp; g < G; g += NW)
    {
        float m = -CUDART_INF_F;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, sc[g * chunk + i]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float l = 0.f;
        for (int i = lane; i < n; i += 32)
        {
            const float e = exp2f(sc[g * chunk + i] - m);
            sc[g * chunk + i] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0)
        {
            s_m[g] = m;
            s_l[g] = l;
        }
    }
    __syncthreads();

    // Pass 3: p @ V.
    float acc[G][8];
    #pragma unroll
    for (int g = 0; g < G; ++g)
    {
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
    }
    for (int jb = j0; jb < e1; jb += KPB * UNR)
    {
        uint4 raw[UNR];
        #pragma unroll
        for (int u = 0; u < UNR; ++u)
        {
            raw[u] = vraw[u];
            vraw[u] = key_row(vb, vnew, jb + KPB * UNR + u * KPB + ki, e1, has_new ? p : -1, li, D);
        }
        #pragma unroll
        for (int u = 0; u < UNR; ++u)
        {
            const int j = jb + u * KPB + ki;
            if (j < e1)
            {
                float vv[8];
                h8_to_f(raw[u], vv);
                #pragma unroll
                for (int g = 0; g < G; ++g)
                {
                    const float w = sc[g * chunk + (j - e0)];
                    #pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(w, vv[e], acc[g][e]);
                }
            }
        }
    }
    #pragma unroll
    for (int g = 0; g < G; ++g)
    {
        #pragma unroll
        for (int e = 0; e < 8; ++e)
        {
            float t = acc[g][e];
            #pragma unroll
            for (int off = L; off < 32; off <<= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
            acc[g][e] = t;
        }
    }
    __syncthreads();                                    // scores dead: reuse shared memory
    float* red = sm;                                    // [NW][G][D]
    if (ki == 0)
    {
        #pragma unroll
        for (int g = 0; g < G; ++g)
        {
            float4* dst = reinterpret_cast<float4*>(red + (warp * G + g) * D + li * 8);
            dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
        }
    }
    __syncthreads();

    const int H = Hkv * G;
    const int bh0 = b * H + kvh * G;                    // first query head (global row of out)
    for (int item = tid; item < G * D; item += NT)
    {
        const int g = item / D;
        const int dd = item - g * D;
        float o = 0.f;
        #pragma unroll
        for (int w = 0; w < NW; ++w) o += red[(w * G + g) * D + dd];
        if (active == 1)
        {
            const float l = s_l[g];
            out[(size_t)(bh0 + g) * D + dd] = __float2half_rn(l > 0.f ? o / l : 0.f);
        }
        else
        {
            ws[((size_t)(bh0 + g) * splits + split) * D + dd] = o;
        }
    }
    if (active == 1) return;

    const int BH = gridDim.x * G;
    float* wml = ws + (size_t)BH * splits * D;          // [BH][splits][2] (max, sum)
    if (tid < G)
    {
        wml[((size_t)(bh0 + tid) * splits + split) * 2] = s_m[tid];
        wml[((size_t)(bh0 + tid) * splits + split) * 2 + 1] = s_l[tid];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0)
    {
        const int prev = atomicAdd(counters + bk, 1);
        is_last = (prev == active - 1);
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();

    // Combine in split order: a warp per head finds the max and the weights exp2(m_s - M) (into shared
    // memory, the scores' space), then every output element sums its splits with the loads batched.
    float* f = sm;                                      // [G][active]
    __shared__ float s_den[G];
    for (int g = warp; g < G; g += NW)
    {
        const float* ml = wml + (size_t)(bh0 + g) * splits * 2;
        const int s0 = first + lane;
        const float m0 = s0 <= last ? __ldcg(ml + 2 * s0) : -CUDART_INF_F;
        const float l0 = s0 <= last ? __ldcg(ml + 2 * s0 + 1) : 0.f;
        float M = m0;
        for (int s = s0 + 32; s <= last; s += 32) M = fmaxf(M, __ldcg(ml + 2 * s));
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
        float den = 0.f;
        for (int s = s0; s <= last; s += 32)
        {
            const float ms = s == s0 ? m0 : __ldcg(ml + 2 * s);
            const float ls = s == s0 ? l0 : __ldcg(ml + 2 * s + 1);
            const float fs = ms == -CUDART_INF_F ? 0.f : exp2f(ms - M);
            f[g * active + (s - first)] = fs;
            den = fmaf(fs, ls, den);
        }
        den = warp_sum(den);
        if (lane == 0) s_den[g] = den;
    }
    __syncthreads();
    for (int item = tid; item < G * D; item += NT)
    {
        const int g = item / D;
        const int dd = item - g * D;
        const float* wp = ws + ((size_t)(bh0 + g) * splits + first) * D + dd;
        const float* fg = f + g * active;
        float num = 0.f;
        #pragma unroll 8
        for (int s = 0; s < active; ++s) num = fmaf(fg[s], __ldcg(wp + (size_t)s * D), num);
        const float den = s_den[g];
        out[(size_t)(bh0 + g) * D + dd] = __float2half_rn(den > 0.f ? num / den : 0.f);
    }
    if (tid == 0) counters[bk] = 0;                     // ready for the next launch (and graph replays)
}

template <int D, int G>
cudaError_t launch_attn(const DecodeAttnPlan& plan, const half* q, int64_t qsb, int64_t qsh, half* kc,
                        half* vc, int S, const int64_t* pos, const int64_t* pad, int B, int Hkv,
                        int kv_len, half* out, float* ws, int* counters, const AttnRope& rope, bool pdl,
                        cudaStream_t stream)
{
    if (plan.threads != ATT_THREADS && plan.threads != 2 * ATT_THREADS) return cudaErrorInvalidValue;
    auto kernel = plan.threads == ATT_THREADS ? decode_attn_kernel<D, G, ATT_THREADS>
                                              : decode_attn_kernel<D, G, 2 * ATT_THREADS>;
    if (plan.smem > 48 * 1024)
    {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem);
        if (err != cudaSuccess) return err;
    }
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)D);
    return launch_kernel(kernel, dim3(B * Hkv, plan.splits), dim3(plan.threads), plan.smem, stream, pdl, q, qsb, qsh,
                         kc, vc, S, Hkv, pos, pad, kv_len, plan.chunk, scale_log2, out, ws, counters, rope);
}

template <int D>
cudaError_t launch_attn_g(int G, const DecodeAttnPlan& plan, const half* q, int64_t qsb, int64_t qsh,
                          half* kc, half* vc, int S, const int64_t* pos, const int64_t* pad, int B,
                          int Hkv, int kv_len, half* out, float* ws, int* counters, const AttnRope& rope, bool pdl,
                          cudaStream_t stream)
{
    switch (G)
    {
#define ATT_CASE(g) \
        case g: return launch_attn<D, g>(plan, q, qsb, qsh, kc, vc, S, pos, pad, B, Hkv, kv_len, out, ws, counters, \
                                         rope, pdl, stream);
        ATT_CASE(1) ATT_CASE(2) ATT_CASE(3) ATT_CASE(4) ATT_CASE(5) ATT_CASE(6) ATT_CASE(7) ATT_CASE(8)
#undef ATT_CASE
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace attn

DecodeAttnPlan decode_attention_plan(int B, int Hkv, int G, int D, int kv_len, int sm_count, int splits)
{
    DecodeAttnPlan p{0, 0, 0, ATT_THREADS};
    if (B <= 0 || Hkv <= 0 || G < 1 || G > ATT_MAX_G || (D != 64 && D != 128) || kv_len <= 0) return p;
    if ((long long)B * Hkv > ATT_COUNTERS) return p;
    const int sms = std::max(sm_count, 1);
    // Keys a block takes in one loop iteration (all requested before the PDL wait) with nt threads.
    auto per_iter = [&](int nt) { return (nt / 32) * (32 / (D / 8)) * attn::unr_for(D); };
    // Where one iteration a block would leave multiprocessors idle (short contexts, few kv heads), or where one
    // block a head takes every key in at most two iterations, blocks of twice the threads take twice the keys an
    // iteration: rows a block of ATT_THREADS would request only after the PDL wait (or another split's, combined
    // after) are in flight before it. H100, empty cache: 7B 550 -> 559 t/s, 13B 256.5 -> 259.6; SmolLM2-135M +2%.
    // Elsewhere 128 threads stay: 256 lost at the 7B's 2k (463 -> 436 t/s) and 512 keys (7.39 -> 7.56 us).
    if (splits <= 0 && ((long long)B * Hkv * EXL_DIV_UP(kv_len, per_iter(ATT_THREADS)) < sms ||
                        ((long long)B * Hkv < sms && kv_len <= 2 * per_iter(2 * ATT_THREADS))))
        p.threads = 2 * ATT_THREADS;
    const int KPB = (p.threads / 32) * (32 / (D / 8));
    const int max_chunk = std::max(KPB, ((46 * 1024) / (G * 4)) / KPB * KPB);   // scores + static smem fit 48 KB
    if (splits <= 0)
    {
        // One loop iteration a block (its rows are loaded before the PDL wait) when that still gives a
        // block an SM, else two (few kv heads: fewer, fuller blocks win); longer chunks once the grid would
        // pass ~4 blocks an SM. Splits past the position exit at once.
        const int iters = (long long)B * Hkv * EXL_DIV_UP(kv_len, per_iter(p.threads)) >= sms ? 1 : 2;
        int chunk = std::max(iters * per_iter(p.threads), EXL_DIV_UP(kv_len * B * Hkv, 4 * sms));
        p.chunk = std::min(EXL_DIV_UP(chunk, KPB) * KPB, max_chunk);
    }
    else
    {
        splits = std::min(splits, kv_len);
        p.chunk = std::min(EXL_DIV_UP(EXL_DIV_UP(kv_len, splits), KPB) * KPB, max_chunk);
    }
    p.splits = EXL_DIV_UP(kv_len, p.chunk);
    const size_t scores = (size_t)G * p.chunk * 4;
    const size_t red = (size_t)(p.threads / 32) * G * D * 4;
    const size_t weights = (size_t)G * p.splits * 4;   // the combine's split weights
    p.smem = std::max(std::max(scores, red), weights);
    return p;
}

cudaError_t decode_attention_launch(const DecodeAttnPlan& plan, const half* q, int64_t qsb, int64_t qsh,
                                    half* k_cache, half* v_cache, int S, const int64_t* pos,
                                    const int64_t* pad, int B, int Hkv, int G, int D, int kv_len, half* out,
                                    float* workspace, int* counters, const AttnRope& rope, bool pdl,
                                    cudaStream_t stream)
{
    if (plan.splits <= 0) return cudaErrorInvalidValue;
    if (D == 64)
        return attn::launch_attn_g<64>(G, plan, q, qsb, qsh, k_cache, v_cache, S, pos, pad, B, Hkv, kv_len, out,
                                       workspace, counters, rope, pdl, stream);
    if (D == 128)
        return attn::launch_attn_g<128>(G, plan, q, qsb, qsh, k_cache, v_cache, S, pos, pad, B, Hkv, kv_len, out,
                                        workspace, counters, rope, pdl, stream);
    return cudaErrorInvalidValue;
}
