// q4 GEMV for M = 1..8 rows on tensor cores (mma.m16n8k16, fp16 in, fp32 accumulate), weights in the
// mma layout (q4_mma.cuh), and the dequantization of that layout for the prompt path.
//
// Why tensor cores for a GEMV: the CUDA-core kernel spends ~3 instructions a weight (nibble to float,
// FMA) and an H100 then runs out of issue slots before it runs out of bandwidth. Here a 32-bit load
// is one mma A fragment (8 weights): one shift, four LOP3s and four HSUB2s make the exact integers
// q as fp16, one mma multiplies them by x (the B fragment, column m = token m; columns >= M repeat the
// last row and are dropped) and accumulates in fp32, exactly: q * x is exact in fp32 and |q| <= 15.
// Scales and offsets are folded in per group as in the CUDA-core kernel:
// sum_k x (s q + o) = s sum_k x q + o sum_k x, with sum_k x precomputed per fold segment.
//
// Work split: a block owns tn = 16 NT CW columns and a K range (split-K over blockIdx.y, reduced as in
// q4_gemm_small). Its W warps form CW column groups of NT n-tiles; the W / CW warps of a group take
// contiguous runs of K units (a unit ends on a fold boundary) and are summed in the block. Wider blocks
// stage x (and its fused prologue) for more columns at once. Each warp streams its weights U chunks
// (64 K) ahead in registers.
// FOLD_BIAS (variant "-fb"): skip the HSUB2s and subtract the magic numbers' 1024 / 64 times sum x
// at the fold instead (fewer instructions, slightly less exact: the fp32 sums carry the offset).
#include "q4_mma.cuh"
#include "q4_common.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace q4m {


// One mma-layout word -> the A fragment: (w & 0x000F000F) | 0x64006400 is the half2 (1024 + nibble 0,
// 1024 + nibble 4); with mask 0x00F000F0 and 0x5400 (= 64, ulp 1/16) it is (64 + nibble 1, 64 + nibble 5);
// w >> 8 gives nibbles 2, 6 and 3, 7 the same way. Rows n = g carry 1024, rows n = g + 8 carry 64.
template <bool FOLD_BIAS>
__device__ __forceinline__ void dq_word(uint32_t w, uint32_t (&a)[4])
{
    const uint32_t w2 = w >> 8;
    a[0] = (w & 0x000F000Fu) | 0x64006400u;
    a[1] = (w & 0x00F000F0u) | 0x54005400u;
    a[2] = (w2 & 0x000F000Fu) | 0x64006400u;
    a[3] = (w2 & 0x00F000F0u) | 0x54005400u;
    if constexpr (!FOLD_BIAS)
    {
        const half2 b1024 = bits_h2(0x64006400u);
        const half2 b64 = bits_h2(0x54005400u);
        a[0] = h2_bits(__hsub2(bits_h2(a[0]), b1024));
        a[1] = h2_bits(__hsub2(bits_h2(a[1]), b64));
        a[2] = h2_bits(__hsub2(bits_h2(a[2]), b1024));
        a[3] = h2_bits(__hsub2(bits_h2(a[3]), b64));
    }
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word(const uint4& w, int s)
{
    return s == 0 ? w.x : (s == 1 ? w.y : (s == 2 ? w.z : w.w));
}

// Register cap for MINB resident blocks a multiprocessor (the planner's wave). Warps: CW column groups
// (NT n-tiles each) x W / CW along K.
template <int W, int CW, int NT, int U, bool FOLD_BIAS, int MINB>
__global__ void __launch_bounds__(W * 32, MINB)
q4_mma_kernel(const Q4GemmArgs a, const int units_per_split, const int chunks_per_unit, const int fold_steps,
              const int flags)
{
    extern __shared__ float4 smem4[];
    char* smem = reinterpret_cast<char*>(smem4);
    constexpr int TN = 16 * NT * CW;
    constexpr int KW = W / CW;                 // warps along K
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int cg = warp % CW;                  // column group
    const int kw = warp / CW;                  // K share
    const int g = lane >> 2;
    const int t = lane & 3;
    const int M = a.M;
    const int N = a.N;
    const int K = a.K;
    const int gs = K / a.groups;
    const int tile = blockIdx.x;
    const int split = blockIdx.y;

    // K ranges: the block's units, then the warp's contiguous share of them (in chunks of 64 K).
    const int units = (K >> 6) / chunks_per_unit;
    const int bu0 = split * units_per_split;
    const int nbu = min(units, bu0 + units_per_split) - bu0;
    const int bc0 = bu0 * chunks_per_unit;
    const int nsteps = nbu * chunks_per_unit * 4;               // K steps of 16 in the block
    const int wu0 = (kw * nbu) / KW;
    const int wc0 = bc0 + wu0 * chunks_per_unit;                // the warp's first chunk
    const int nc = (((kw + 1) * nbu) / KW - wu0) * chunks_per_unit;

    const bool early_trigger = flags & q4k::kEarlyTrigger;
    if (early_trigger) pdl_trigger();
    const uint64_t pol = q4k::evict_first_policy();
    const size_t cstride = (size_t)2 * N;                       // uint4 per chunk (8 packed rows)
    const int nt0 = (tile * CW + cg) * NT;                      // the warp's first n-tile
    const uint4* wp[NT];
    bool ok[NT];
    #pragma unroll
    for (int j = 0; j < NT; ++j)
    {
        const int n0 = (nt0 + j) * 16;
        ok[j] = n0 < N;
        wp[j] = reinterpret_cast<const uint4*>(a.qweight + (size_t)(8 * wc0 + g) * N + n0 + 4 * t);
    }

    // Weights and scales never change between kernels: fetch them before waiting on the previous one.
    uint4 wa[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u)
    {
        #pragma unroll
        for (int j = 0; j < NT; ++j)
            wa[u][j] = (u < nc && ok[j]) ? q4k::load_w<1>(wp[j] + (size_t)u * cstride, pol) : make_uint4(0, 0, 0, 0);
    }

    // Scale and offset of rows n = g and g + 8 of each n-tile for the group of absolute K `k`.
    float sc[NT][2] = {}, of[NT][2] = {};
    auto load_so = [&](int k) {
        const size_t row = (size_t)(k / gs) * N;
        #pragma unroll
        for (int j = 0; j < NT; ++j)
        {
            const int n = (nt0 + j) * 16 + g;
            sc[j][0] = ok[j] ? __half2float(__ldg(a.scales + row + n)) : 0.f;
            sc[j][1] = ok[j] ? __half2float(__ldg(a.scales + row + n + 8)) : 0.f;
            of[j][0] = ok[j] ? __half2float(__ldg(a.offsets + row + n)) : 0.f;
            of[j][1] = ok[j] ? __half2float(__ldg(a.offsets + row + n + 8)) : 0.f;
            if constexpr (FOLD_BIAS)
            {
                of[j][0] -= 1024.f * sc[j][0];
                of[j][1] -= 64.f * sc[j][1];
            }
        }
    };
    if (nc > 0) load_so(wc0 * 64);

    pdl_wait();                               // x, residual, out, workspace: only from here on

    const int xstride = a.x_stride > 0 ? a.x_stride : K;
    __shared__ float norm_scratch[32];
    __shared__ float norm_inv[Q4_MAX_ROWS];
    if (a.norm_w) q4k::rows_norm_inv(a, M, xstride, norm_inv, norm_scratch);

    // x of the block's K steps as B fragments: [step][m][16 halves], lane quad t's four at 4 t:
    // x[16 s + 2 t], x[16 s + 2 t + 1], x[16 s + 2 t + 8], x[16 s + 2 t + 9]. Then sum x per fold segment.
    half* xs = reinterpret_cast<half*>(smem);
    float* xstep = reinterpret_cast<float*>(smem + (size_t)nsteps * M * 32);    // [step][m]
    float* xseg = xstep + nsteps * M;                                           // [segment][m]
    const int kb0 = bc0 * 64;
    for (int item = tid; item < nsteps * M; item += blockDim.x)
    {
        const int s = item / M;
        const int m = item - s * M;
        float v0[8], v1[8];
        q4k::load_x8(a, m, kb0 + 16 * s, xstride, norm_inv, v0);
        q4k::load_x8(a, m, kb0 + 16 * s + 8, xstride, norm_inv, v1);
        half2* dst = reinterpret_cast<half2*>(xs + (size_t)item * 16);
        float sum = 0.f;
        #pragma unroll
        for (int q = 0; q < 4; ++q)
        {
            dst[2 * q] = __floats2half2_rn(v0[2 * q], v0[2 * q + 1]);
            dst[2 * q + 1] = __floats2half2_rn(v1[2 * q], v1[2 * q + 1]);
        }
        #pragma unroll
        for (int q = 0; q < 8; ++q) sum += v0[q];
        #pragma unroll
        for (int q = 0; q < 8; ++q) sum += v1[q];
        xstep[item] = sum;
    }
    __syncthreads();
    const int nsegs = nsteps / fold_steps;
    for (int item = tid; item < nsegs * M; item += blockDim.x)
    {
        const int sg = item / M;
        const int m = item - sg * M;
        float sum = 0.f;
        for (int i = 0; i < fold_steps; ++i) sum += xstep[(sg * fold_steps + i) * M + m];
        xseg[item] = sum;
    }
    __syncthreads();

    float acc[NT][4], accq[NT][4];
    #pragma unroll
    for (int j = 0; j < NT; ++j)
    {
        #pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] = accq[j][c] = 0.f;
    }
    const int mb = min(g, M - 1);             // B column g reads token g
    const int m0 = min(2 * t, M - 1);         // C columns 2t, 2t + 1 are tokens 2t, 2t + 1
    const int m1 = min(2 * t + 1, M - 1);
    int step = (wc0 - bc0) * 4;               // block-relative K step
    int ks = 0;
    const int step_end = step + nc * 4;

    #pragma unroll 1
    for (int c = 0; c < nc; c += U)
    {
        uint4 wb[U][NT];
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const int cc = c + U + u;
            #pragma unroll
            for (int j = 0; j < NT; ++j)
                wb[u][j] = (cc < nc && ok[j]) ? q4k::load_w<1>(wp[j] + (size_t)cc * cstride, pol) : make_uint4(0, 0, 0, 0);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            if (c + u >= nc) break;
            #pragma unroll
            for (int s = 0; s < 4; ++s)
            {
                const uint2 b = *reinterpret_cast<const uint2*>(xs + ((size_t)step * M + mb) * 16 + 4 * t);
                #pragma unroll
                for (int j = 0; j < NT; ++j)
                {
                    uint32_t af[4];
                    dq_word<FOLD_BIAS>(word(wa[u][j], s), af);
                    mma_16816(accq[j], af, b.x, b.y);
                }
                ++step;
                if (++ks == fold_steps)
                {
                    const int sg = step / fold_steps - 1;
                    const float x0 = xseg[sg * M + m0];
                    const float x1 = xseg[sg * M + m1];
                    #pragma unroll
                    for (int j = 0; j < NT; ++j)
                    {
                        acc[j][0] = fmaf(sc[j][0], accq[j][0], fmaf(of[j][0], x0, acc[j][0]));
                        acc[j][1] = fmaf(sc[j][0], accq[j][1], fmaf(of[j][0], x1, acc[j][1]));
                        acc[j][2] = fmaf(sc[j][1], accq[j][2], fmaf(of[j][1], x0, acc[j][2]));
                        acc[j][3] = fmaf(sc[j][1], accq[j][3], fmaf(of[j][1], x1, acc[j][3]));
                        #pragma unroll
                        for (int q = 0; q < 4; ++q) accq[j][q] = 0.f;
                    }
                    ks = 0;
                    if (step < step_end) load_so(kb0 + step * 16);
                }
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            #pragma unroll
            for (int j = 0; j < NT; ++j) wa[u][j] = wb[u][j];
        }
    }

    if (!early_trigger) pdl_trigger();        // main loop done: let the next kernel launch into our tail

    __syncthreads();                          // x in shared memory is dead from here
    float* red = reinterpret_cast<float*>(smem);   // [KW][M][TN]
    #pragma unroll
    for (int j = 0; j < NT; ++j)
    {
        const int col = (cg * NT + j) * 16 + g;
        if (2 * t < M)
        {
            red[(kw * M + 2 * t) * TN + col] = acc[j][0];
            red[(kw * M + 2 * t) * TN + col + 8] = acc[j][2];
        }
        if (2 * t + 1 < M)
        {
            red[(kw * M + 2 * t + 1) * TN + col] = acc[j][1];
            red[(kw * M + 2 * t + 1) * TN + col + 8] = acc[j][3];
        }
    }
    __syncthreads();
    q4k::finish_tile(a, red, KW, M, TN, tile, split, gridDim.y);
}

// Dequantize: a block = one chunk (64 K) x 8 n-tiles (128 N); each warp decodes its n-tile's fragments
// into a shared tile, which the block then writes as whole rows (row k to perm[k]).
constexpr int DQ_PAD = 8;

__global__ void __launch_bounds__(256)
q4_dequant_mma_kernel(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                      const half* __restrict__ offsets, const int32_t* __restrict__ perm32,
                      const int64_t* __restrict__ perm64, half* __restrict__ out, int N, int gs, int64_t ldq,
                      int64_t lds)
{
    pdl_wait();
    pdl_trigger();
    __shared__ half tile_s[64][128 + DQ_PAD];
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int c = blockIdx.y;
    const int n0 = blockIdx.x * 128 + warp * 16;
    if (n0 < N)
    {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(qweight + (size_t)(8 * c + g) * ldq + n0 + 4 * t));
        #pragma unroll
        for (int s = 0; s < 4; ++s)
        {
            const size_t row = (size_t)((64 * c + 16 * s) / gs) * lds;
            const float s_lo = __half2float(__ldg(scales + row + n0 + g));
            const float s_hi = __half2float(__ldg(scales + row + n0 + g + 8));
            const float o_lo = __half2float(__ldg(offsets + row + n0 + g));
            const float o_hi = __half2float(__ldg(offsets + row + n0 + g + 8));
            const uint32_t v = word(w, s);
            #pragma unroll
            for (int i = 0; i < 8; ++i)
            {
                const float q = (float)((v >> (4 * i)) & 0xFu);
                const int k = 16 * s + 2 * t + 8 * ((i >> 1) & 1) + (i >> 2);
                const bool hi = i & 1;
                tile_s[k][warp * 16 + g + (hi ? 8 : 0)] = __float2half_rn(fmaf(hi ? s_hi : s_lo, q, hi ? o_hi : o_lo));
            }
        }
    }
    __syncthreads();
    // 64 rows x 128 columns, 16 bytes a thread per pass
    for (int item = tid; item < 64 * 16; item += 256)
    {
        const int k = item >> 4;
        const int col = (item & 15) * 8;
        const int n = blockIdx.x * 128 + col;
        if (n >= N) continue;
        const int kabs = 64 * c + k;
        const long long r = perm32 ? (long long)perm32[kabs] : (perm64 ? perm64[kabs] : (long long)kabs);
        *reinterpret_cast<uint4*>(out + (size_t)r * N + n) = *reinterpret_cast<const uint4*>(&tile_s[k][col]);
    }
}

}  // namespace q4m

namespace {

struct MmaVariant
{
    int W, CW, NT, U;
    bool fold_bias;
    int minb;             // resident blocks a multiprocessor the registers are capped for
    const char* name;
};

// Entry 0 is the default (docs/performance.md). Names: warps, column groups, n-tiles and chunks in flight
// per warp; "-fb": FOLD_BIAS.
const MmaVariant kMmaVariants[] = {
    {8, 1, 4, 1, true, 2, "w8n4u1-fb"},
    {8, 1, 2, 2, true, 3, "w8n2u2-fb"},
    {8, 1, 2, 2, false, 3, "w8n2u2"},
    {8, 2, 2, 2, true, 3, "w8c2n2u2-fb"},
    {8, 4, 2, 2, true, 3, "w8c4n2u2-fb"},
    {8, 2, 2, 2, false, 3, "w8c2n2u2"},
};
constexpr int kNumMma = (int)(sizeof(kMmaVariants) / sizeof(MmaVariant));

int default_mma_variant()
{
    static const int v = [] {
        const char* forced = std::getenv("EXLLAMA_MMA_VARIANT");
        if (!forced) return 0;
        for (int i = 0; i < kNumMma; ++i)
            if (std::strcmp(kMmaVariants[i].name, forced) == 0) return i;
        return 0;
    }();
    return v;
}

// K steps (16) between folds: the whole group up to 256 K (a divisor of it), so that fold segments
// tile every group; 0 if the group size is not 32 or a multiple of 64.
int fold_steps_for(int gs)
{
    if (gs == 32) return 2;
    if (gs <= 0 || gs % 64) return 0;
    const int d = gs / 64;
    for (int c : {4, 3, 2, 1})
        if (d % c == 0) return 4 * c;
    return 4;
}

// x staging (B fragments, per-step and per-segment sums), reused by the block's reduction.
size_t mma_smem(int M, int steps, int fold_steps, const MmaVariant& v)
{
    const size_t x = (size_t)steps * M * (32 + 4) + (size_t)(steps / fold_steps) * M * 4;
    return std::max(x, (size_t)(v.W / v.CW) * M * 16 * v.NT * v.CW * 4);
}

template <int W, int CW, int NT, int U, bool FB, int MINB>
cudaError_t launch_mma(const Q4MmaPlan& p, const Q4GemmArgs& a, cudaStream_t stream)
{
    auto kernel = q4m::q4_mma_kernel<W, CW, NT, U, FB, MINB>;
    if (p.smem_bytes > 48 * 1024)
    {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem_bytes);
        if (err != cudaSuccess) return err;
    }
    return launch_kernel(kernel, dim3(p.tiles, p.splits), dim3(W * 32), p.smem_bytes, stream, p.pdl > 0, a,
                         p.units_per_split, p.chunks_per_unit, p.fold_steps, p.pdl == 2 ? q4k::kEarlyTrigger : 0);
}

}  // namespace

bool q4_mma_supported(int K, int N, int groups)
{
    return K > 0 && N > 0 && K % 64 == 0 && N % 16 == 0 && groups > 0 && K % groups == 0 &&
           fold_steps_for(K / groups) > 0;
}

int q4_mma_num_variants() { return kNumMma; }

const char* q4_mma_variant_name(int variant)
{
    return (variant >= 0 && variant < kNumMma) ? kMmaVariants[variant].name : "?";
}

Q4MmaPlan q4_mma_plan(int M, int K, int N, int groups, int sm_count, size_t smem_optin, int cc_major, int splits,
                      int variant, int pdl)
{
    Q4MmaPlan p{};
    p.splits = 0;
    if (M < 1 || M > Q4_MAX_ROWS || !q4_mma_supported(K, N, groups)) return p;
    if (variant < 0 || variant >= kNumMma) variant = default_mma_variant();
    const MmaVariant& v = kMmaVariants[variant];
    const int fs = fold_steps_for(K / groups);
    const int cpu = std::max(1, fs / 4);
    const int units = (K / 64) / cpu;
    const int tn = 16 * v.NT * v.CW;
    const int kw = v.W / v.CW;
    const int tiles = (N + tn - 1) / tn;
    if (sm_count <= 0) sm_count = 1;
    if (splits <= 0)
    {
        // One wave of the resident blocks; each K warp keeps at least one unit.
        const int target = sm_count * v.minb;
        splits = tiles >= target ? 1 : std::min(target / tiles, std::max(1, units / kw));
    }
    splits = std::max(1, std::min(splits, units));
    int ups = (units + splits - 1) / splits;
    while (ups > 1 && mma_smem(M, ups * cpu * 4, fs, v) > smem_optin) ups = (ups + 1) / 2;
    splits = (units + ups - 1) / ups;
    if (mma_smem(M, ups * cpu * 4, fs, v) > smem_optin) return p;
    if (splits > 1 && tiles > Q4_COUNTERS) return p;
    p.variant = variant;
    p.tiles = tiles;
    p.splits = splits;
    p.units_per_split = ups;
    p.chunks_per_unit = cpu;
    p.fold_steps = fs;
    p.threads = v.W * 32;
    p.tn = tn;
    p.smem_bytes = mma_smem(M, ups * cpu * 4, fs, v);
    p.pdl = (cc_major >= 9 && pdl > 0) ? std::min(pdl, 2) : 0;
    return p;
}

cudaError_t q4_mma_launch(const Q4MmaPlan& p, const Q4GemmArgs& a, cudaStream_t stream)
{
    if (p.splits <= 0) return cudaErrorInvalidValue;
    switch (p.variant)
    {
        case 1: return launch_mma<8, 1, 2, 2, true, 3>(p, a, stream);
        case 2: return launch_mma<8, 1, 2, 2, false, 3>(p, a, stream);
        case 3: return launch_mma<8, 2, 2, 2, true, 3>(p, a, stream);
        case 4: return launch_mma<8, 4, 2, 2, true, 3>(p, a, stream);
        case 5: return launch_mma<8, 2, 2, 2, false, 3>(p, a, stream);
        default: return launch_mma<8, 1, 4, 1, true, 2>(p, a, stream);
    }
}

cudaError_t q4_dequant_mma_launch(const uint32_t* qweight, const half* scales, const half* offsets,
                                  const int32_t* perm32, const int64_t* perm64, half* out,
                                  int K, int N, int groups, int64_t ldq, int64_t lds, bool pdl, cudaStream_t stream)
{
    if (K == 0 || N == 0) return cudaSuccess;
    if (!q4_mma_supported(K, N, groups)) return cudaErrorInvalidValue;
    return launch_kernel(q4m::q4_dequant_mma_kernel, dim3((N + 127) / 128, K / 64), dim3(256), 0, stream, pdl,
                         qweight, scales, offsets, perm32, perm64, out, N, K / groups, ldq, lds);
}
