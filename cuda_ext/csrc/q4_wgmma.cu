// Fused prompt GEMM on Hopper: see q4_wgmma.cuh for the design.
//
// Block: 128 output columns x BN tokens. Warpgroup 0 is the producer: one thread issues the TMA loads of each
// stage (x [BN tokens, 64 K] with 128-byte swizzle; the packed weights [8 rows, 128 columns]; the chunk's
// scale and offset rows). Warpgroups 1 and 2 each own 64 columns. Per chunk of 64 K a consumer lane reads its
// packed weights (mma layout: 16 bytes, four A fragments; row layout: one byte of each of 16 words) and its
// rows' scales, turns the nibbles into exact fp16 integers (magic-number OR and subtract, as the tensor-core
// GEMV does) and then into weights with one HFMA2 each (q * s + o rounded once, as the reference's fp32
// q * s + o rounded to fp16), and issues four wgmma m64nBNk16 against the stage's x tile. The fragments of
// chunk c + 1 are made while chunk c's wgmmas run (two register sets), so the tensor cores wait neither for
// the dequantization nor, with enough stages, for memory.
//
// Measured on an H100 (docs/performance.md, session 9): scales read from global memory in the consumers cost
// an L2 round trip a chunk (their half2 broadcast waited for the load), and ptxas serializes the wgmmas
// (C7514/C7520) when a wait loop sits between them or when a step's work after the commit is conditional;
// hence the scales in the stages, the stage read between commit and wait, and the last chunk's own call.
#include "q4_wgmma.cuh"
#include "common.cuh"
#include "wgmma_rs.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <mutex>
#include <vector>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define Q4W_DEVICE 1
#endif

namespace q4w {

constexpr int BM = 128;                    // output columns a block
constexpr int BK = 64;                     // K a stage
constexpr int THREADS = 384;               // producer warpgroup + two consumer warpgroups
constexpr int W_BYTES = 8 * BM * 4;        // a stage's packed weights: 8 rows x 128 int32
constexpr int S_BYTES = 4 * BM * 2;        // its scales then offsets: up to 2 group rows x 128 fp16 each
constexpr int MAX_STAGES = 8;

__host__ __device__ constexpr int x_bytes(int bn) { return bn * BK * 2; }

#ifdef Q4W_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity)
{
    uint32_t done = 0;
    do
    {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    } while (!done);
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1)
{
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}

// Shared-memory descriptor of a K-major tile with 128-byte swizzle: rows of 64 fp16, 8-row groups 1024 B apart.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins registers an in-flight wgmma reads or writes: the compiler may neither move their uses across this
// point nor reuse them before it.
__device__ __forceinline__ void fence_regs(uint32_t (&a)[4][4])
{
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R])
{
    #pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// (w & MASK) | MAGIC in one LOP3 (the compiler emits an AND and an OR for the C expression)
template <uint32_t MASK, uint32_t MAGIC>
__device__ __forceinline__ half2 nibbles(uint32_t w)
{
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "n"(MASK), "n"(MAGIC));
    return bits_h2(r);
}

// One mma-layout word (8 weights) -> the A fragment of one K step (q4_mma.cu dq_word), times scale plus offset:
// (s0, o0) those of row g, (s1, o1) of row g + 8.
__device__ __forceinline__ void dq_word(uint32_t w, half2 s0, half2 o0, half2 s1, half2 o1, uint32_t (&a)[4])
{
    const uint32_t w2 = w >> 8;
    const half2 b1024 = bits_h2(0x64006400u), b64 = bits_h2(0x54005400u);
    a[0] = h2_bits(__hfma2(__hsub2(nibbles<0x000F000Fu, 0x64006400u>(w), b1024), s0, o0));
    a[1] = h2_bits(__hfma2(__hsub2(nibbles<0x00F000F0u, 0x54005400u>(w), b64), s1, o1));
    a[2] = h2_bits(__hfma2(__hsub2(nibbles<0x000F000Fu, 0x64006400u>(w2), b1024), s0, o0));
    a[3] = h2_bits(__hfma2(__hsub2(nibbles<0x00F000F0u, 0x54005400u>(w2), b64), s1, o1));
}

// One row-layout word's byte t (K pair 2t, 2t + 1 of 8 consecutive K) -> the half2 (q[2t], q[2t + 1]) as exact
// fp16 integers: PRMT puts the byte in both halves, the mask keeps the low nibble in the low half and the high
// one (x 16) in the high half, the magic numbers 1024 and 64 (ulp 1 and 1/16) make them fp16 values.
__device__ __forceinline__ half2 row_pair(uint32_t w, uint32_t sel)
{
    const half2 magic = bits_h2(0x54006400u);
    return __hsub2(nibbles<0x00F0000Fu, 0x54006400u>(__byte_perm(w, 0, sel)), magic);
}

#endif

template <int BN, bool G32, bool ROW>
__global__ void __launch_bounds__(THREADS, 1)
q4_wgmma_kernel(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w,
                const __grid_constant__ CUtensorMap tm_s, const __grid_constant__ CUtensorMap tm_o,
                const Q4WgmmaArgs a, const int stages)
{
#ifdef Q4W_DEVICE
    constexpr int XB = x_bytes(BN);
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // swizzled tiles need 1024-byte alignment (the host adds the slack); an offset from the array itself
    // keeps the compiler's knowledge that these are shared-memory addresses (LDS, not generic loads)
    uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    uint8_t* xs = smem;
    uint8_t* ws = smem + (size_t)stages * XB;
    uint8_t* ss = ws + (size_t)stages * W_BYTES;
    uint64_t* full = reinterpret_cast<uint64_t*>(ss + (size_t)stages * S_BYTES);
    uint64_t* empty = full + stages;

    const int nch = a.K / BK;
    const int wg = threadIdx.x >> 7;
    const int gshift = G32 ? 0 : __ffs(a.K / a.groups / BK) - 1;      // chunks a group: a power of two
    constexpr int G_ROWS = G32 ? 2 : 1;                                 // group rows a chunk
    // Tiles in token-tile-major order (neighbouring blocks share a weight tile); a block takes tiles
    // blockIdx.x, + gridDim.x, ... (persistent when the grid is smaller than the tile count: the producer
    // then loads the next tile's first stages during this tile's epilogue).
    const int mt = (a.M + BN - 1) / BN;
    const int tiles = mt * ((a.N + BM - 1) / BM);

    if (threadIdx.x == 0)
    {
        for (int s = 0; s < stages; ++s)
        {
            mbar_init(full + s, 1);
            mbar_init(empty + s, 8);     // every consumer warp releases the stage
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0)
    {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0)
        {
            for (const CUtensorMap* m : {&tm_x, &tm_w, &tm_s, &tm_o})
                asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(m)) : "memory");
            int s = 0;
            uint32_t phase = 0;
            int loads = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
            {
                const int m0 = (tile % mt) * BN, n0 = (tile / mt) * BM;
                for (int c = 0; c < nch; ++c, ++loads)
                {
                    if (loads >= stages) mbar_wait(empty + s, phase ^ 1);
                    mbar_expect_tx(full + s, XB + W_BYTES + 2 * G_ROWS * BM * 2);
                    tma_load_2d(xs + (size_t)s * XB, &tm_x, full + s, c * BK, m0);
                    tma_load_2d(ws + (size_t)s * W_BYTES, &tm_w, full + s, n0, c * 8);
                    const int grp = G32 ? 2 * c : c >> gshift;
                    tma_load_2d(ss + (size_t)s * S_BYTES, &tm_s, full + s, n0, grp);
                    tma_load_2d(ss + (size_t)s * S_BYTES + S_BYTES / 2, &tm_o, full + s, n0, grp);
                    if (++s == stages)
                    {
                        s = 0;
                        phase ^= 1;
                    }
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");

    const int lane = threadIdx.x & 31;
    const int warp = (threadIdx.x >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    const int col = (wg - 1) * 64 + warp * 16;            // the warp's 16 columns within the block
    const uint32_t w_off = (uint32_t)(g * BM + col + 4 * t) * 4;     // mma layout: the lane's 16 bytes
    const uint32_t sel = 0x4040u | t | (t << 8);                       // row layout: byte t in both halves
    int s = 0;                 // stage of the chunk at hand
    uint32_t phase = 0;        // its parity

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    {
        const int m0 = (tile % mt) * BN, n0 = (tile / mt) * BM;
        const int f = n0 + col;
        const bool active = f < a.N;                           // N % 16 == 0: whole warps in or out

        // A stage's packed weights and scales (loaded first, dequantized later: see step).
        struct Frag
        {
            // mma layout: the lane's 16 bytes; row layout: packed rows 0..7 at columns g and g + 8
            uint32_t w[ROW ? 8 : 1][ROW ? 2 : 4];
            half2 s0[G_ROWS], o0[G_ROWS], s1[G_ROWS], o1[G_ROWS];      // rows g, g + 8 of each group
        };
        auto load = [&](int s) {
            Frag f;
            if constexpr (ROW)
            {
                const uint32_t* wp = reinterpret_cast<const uint32_t*>(ws + (size_t)s * W_BYTES) + col + g;
                #pragma unroll
                for (int r = 0; r < 8; ++r)
                {
                    f.w[r][0] = wp[r * BM];
                    f.w[r][1] = wp[r * BM + 8];
                }
            }
            else
            {
                const uint4 v = *reinterpret_cast<const uint4*>(ws + (size_t)s * W_BYTES + w_off);
                f.w[0][0] = v.x;
                f.w[0][1] = v.y;
                f.w[0][2] = v.z;
                f.w[0][3] = v.w;
            }
            const half* sc = reinterpret_cast<const half*>(ss + (size_t)s * S_BYTES) + col + g;
            const half* of = sc + S_BYTES / 4;
            #pragma unroll
            for (int h = 0; h < G_ROWS; ++h)
            {
                f.s0[h] = __half2half2(sc[h * BM]);
                f.s1[h] = __half2half2(sc[h * BM + 8]);
                f.o0[h] = __half2half2(of[h * BM]);
                f.o1[h] = __half2half2(of[h * BM + 8]);
            }
            return f;
        };
        // -> the A fragments of the stage's four K steps
        auto dequant = [&](const Frag& f, uint32_t (&A)[4][4]) {
            #pragma unroll
            for (int k = 0; k < 4; ++k)
            {
                const int h = (G32 && k >= 2) ? 1 : 0;      // group size 32: K steps 2 and 3 are the next group
                if constexpr (ROW)
                {
                    // A fragment of K step k: byte t of packed rows 2k (K 0..7 of the step) and 2k + 1 (8..15)
                    A[k][0] = h2_bits(__hfma2(row_pair(f.w[2 * k][0], sel), f.s0[h], f.o0[h]));
                    A[k][1] = h2_bits(__hfma2(row_pair(f.w[2 * k][1], sel), f.s1[h], f.o1[h]));
                    A[k][2] = h2_bits(__hfma2(row_pair(f.w[2 * k + 1][0], sel), f.s0[h], f.o0[h]));
                    A[k][3] = h2_bits(__hfma2(row_pair(f.w[2 * k + 1][1], sel), f.s1[h], f.o1[h]));
                }
                else
                {
                    dq_word(f.w[0][k], f.s0[h], f.o0[h], f.s1[h], f.o1[h], A[k]);
                }
            }
        };

        float acc[BN / 2];
        #pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
        uint32_t A0[4][4], A1[4][4];

        int s_prev = s;
        mbar_wait(full + s, phase);
        dequant(load(s), A0);

        // Chunk c from Acur; with `more`, chunk c + 1 dequantized into Anext while c's wgmmas run. Its stage
        // is read between the commit and the wait, and the last chunk takes its own call: with conditional
        // work there, ptxas serializes the wgmmas.
        auto step = [&](int c, uint32_t (&Acur)[4][4], uint32_t (&Anext)[4][4], bool more) {
            wgmma_fence();
            const uint64_t desc = desc_sw128(smem_u32(xs + (size_t)s * XB));
            #pragma unroll
            for (int k = 0; k < 4; ++k) WgmmaRS<BN>::mma(acc, Acur[k], desc + 2 * k);   // +32 bytes a K step
            wgmma_commit();
            const int s_this = s;
            if (++s == stages)
            {
                s = 0;
                phase ^= 1;
            }
            Frag f;
            if (more)
            {
                mbar_wait(full + s, phase);
                f = load(s);
            }
            wgmma_wait<1>();               // chunk c - 1 done: its stage and its registers (Anext) are free
            fence_regs(Anext);
            if (c > 0 && lane == 0) mbar_arrive(empty + s_prev);
            s_prev = s_this;
            if (more) dequant(f, Anext);
        };

        int c = 0;
        for (; c + 2 < nch; c += 2)
        {
            step(c, A0, A1, true);
            step(c + 1, A1, A0, true);
        }
        if (c + 1 < nch)
        {
            step(c, A0, A1, true);
            step(c + 1, A1, A0, false);
        }
        else
        {
            step(c, A0, A1, false);
        }
        wgmma_wait<0>();
        fence_regs(acc);
        fence_regs(A0);
        fence_regs(A1);
        if (lane == 0) mbar_arrive(empty + s_prev);           // the tile's last stage

        if (!active) continue;
        // Lane pairs (g, g ^ 1) swap values so that each stores two adjacent columns of one token.
        const bool odd = g & 1;
        const int fe = f + (g & ~1);
        float2 b0 = make_float2(0.f, 0.f), b1 = b0;
        if (a.bias)
        {
            b0 = __half22float2(*reinterpret_cast<const half2*>(a.bias + fe));
            b1 = __half22float2(*reinterpret_cast<const half2*>(a.bias + fe + 8));
        }
        #pragma unroll
        for (int i = 0; i < BN / 8; ++i)
        {
            const float r0 = __shfl_xor_sync(0xffffffffu, odd ? acc[4 * i] : acc[4 * i + 1], 4);
            const float r1 = __shfl_xor_sync(0xffffffffu, odd ? acc[4 * i + 2] : acc[4 * i + 3], 4);
            const int tok = m0 + 8 * i + 2 * t + (odd ? 1 : 0);
            if (tok >= a.M) continue;
            float2 v0 = odd ? make_float2(r0, acc[4 * i + 1]) : make_float2(acc[4 * i], r0);
            float2 v1 = odd ? make_float2(r1, acc[4 * i + 3]) : make_float2(acc[4 * i + 2], r1);
            v0.x += b0.x;
            v0.y += b0.y;
            v1.x += b1.x;
            v1.y += b1.y;
            if (a.residual)
            {
                const half* rp = a.residual + (size_t)tok * a.ldr + fe;
                const float2 r0f = __half22float2(*reinterpret_cast<const half2*>(rp));
                const float2 r1f = __half22float2(*reinterpret_cast<const half2*>(rp + 8));
                v0.x += r0f.x;
                v0.y += r0f.y;
                v1.x += r1f.x;
                v1.y += r1f.y;
            }
            half* op = a.out + (size_t)tok * a.ldo + fe;
            *reinterpret_cast<half2*>(op) = __floats2half2_rn(v0.x, v0.y);
            *reinterpret_cast<half2*>(op + 8) = __floats2half2_rn(v1.x, v1.y);
        }
    }
#endif
}

__global__ void q4_wgmma_probe(int* out)
{
#ifdef Q4W_DEVICE
    *out = 1;
#else
    *out = 0;
#endif
}

// ---- host ----------------------------------------------------------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 encode_fn()
{
    static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess)
        {
            (void)cudaGetLastError();
            p = nullptr;
        }
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }();
    return fn;
}

// Whether this build has the sm_90a kernels for the device (a one-element probe, once per device, never
// while a stream captures a graph: then false until asked outside capture).
bool built_for(int device, bool capturing)
{
    static std::mutex mu;
    static std::vector<int> known;      // -1 unknown, 0 no, 1 yes
    std::lock_guard<std::mutex> lock(mu);
    if ((int)known.size() <= device) known.resize(device + 1, -1);
    if (known[device] < 0)
    {
        if (capturing) return false;
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        int ok = 0;
        if (major == 9 && minor == 0 && encode_fn())
        {
            int* d = nullptr;
            if (cudaMalloc(&d, sizeof(int)) == cudaSuccess)
            {
                q4_wgmma_probe<<<1, 1>>>(d);
                if (cudaMemcpy(&ok, d, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess) ok = 0;
                cudaFree(d);
            }
        }
        (void)cudaGetLastError();
        known[device] = ok;
    }
    return known[device] == 1;
}

template <int BN, bool G32, bool ROW>
cudaError_t launch(const Q4WgmmaPlan& plan, const Q4WgmmaArgs& a, const CUtensorMap (&tm)[4], cudaStream_t stream)
{
    static std::mutex mu;
    static size_t configured = 0;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (plan.smem_bytes > configured)
        {
            const cudaError_t e = cudaFuncSetAttribute(q4_wgmma_kernel<BN, G32, ROW>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem_bytes);
            if (e != cudaSuccess) return e;
            configured = plan.smem_bytes;
        }
    }
    q4_wgmma_kernel<BN, G32, ROW><<<plan.blocks, THREADS, plan.smem_bytes, stream>>>(tm[0], tm[1], tm[2], tm[3], a,
                                                                                 plan.stages);
    return cudaGetLastError();
}

template <bool G32, bool ROW>
cudaError_t launch_bn(const Q4WgmmaPlan& plan, const Q4WgmmaArgs& a, const CUtensorMap (&tm)[4], cudaStream_t stream)
{
    switch (plan.bn)
    {
        case 64: return launch<64, G32, ROW>(plan, a, tm, stream);
        case 128: return launch<128, G32, ROW>(plan, a, tm, stream);
        case 192: return launch<192, G32, ROW>(plan, a, tm, stream);
        case 240: return launch<240, G32, ROW>(plan, a, tm, stream);
        case 256: return launch<256, G32, ROW>(plan, a, tm, stream);
        default: return cudaErrorInvalidConfiguration;
    }
}

}  // namespace q4w

bool q4_wgmma_supported(const Q4WgmmaArgs& a)
{
    if (a.K % q4w::BK || a.N % 16 || a.groups <= 0 || a.K % a.groups) return false;
    const int gs = a.K / a.groups;
    if (!(gs == 32 || (gs % 64 == 0 && (gs & (gs - 1)) == 0))) return false;
    // TMA: 16-byte aligned bases and row strides
    if (reinterpret_cast<uintptr_t>(a.x) % 16 || a.ldx % 8 || reinterpret_cast<uintptr_t>(a.qweight) % 16 ||
        a.ldq % 4 || reinterpret_cast<uintptr_t>(a.scales) % 16 || reinterpret_cast<uintptr_t>(a.offsets) % 16 ||
        a.lds % 8 || a.ldo % 2 || reinterpret_cast<uintptr_t>(a.out) % 4 ||
        (a.residual && (a.ldr % 2 || reinterpret_cast<uintptr_t>(a.residual) % 4)) ||
        (a.bias && reinterpret_cast<uintptr_t>(a.bias) % 4))
        return false;
    return true;
}

bool q4_wgmma_available(int device, bool capturing) { return q4w::built_for(device, capturing); }

Q4WgmmaPlan q4_wgmma_plan(int M, int N, int sm_count, size_t smem_optin, int bn, bool persistent)
{
    static const int widths[] = {64, 128, 192, 240, 256};
    Q4WgmmaPlan best{};
    double best_cost = 0;
    for (int w : widths)
    {
        if (bn > 0 && w != bn) continue;
        const size_t stage = (size_t)q4w::x_bytes(w) + q4w::W_BYTES + q4w::S_BYTES;
        const int stages = (int)std::min<size_t>(q4w::MAX_STAGES, (smem_optin - 1024 - 16 * q4w::MAX_STAGES) / stage);
        if (stages < 3) continue;
        // Waves of tiles times the tile's time (its width plus a fixed cost).
        const long long tiles = (long long)((M + w - 1) / w) * ((N + q4w::BM - 1) / q4w::BM);
        const double cost = (double)((tiles + sm_count - 1) / sm_count) * (w + 32);
        if (best.bn == 0 || cost < best_cost)
        {
            best = Q4WgmmaPlan{w, stages, stages * stage + 16 * (size_t)stages + 1024,
                               (int)(persistent ? std::min<long long>(tiles, sm_count) : tiles)};
            best_cost = cost;
        }
    }
    return best;
}

cudaError_t q4_wgmma_launch(const Q4WgmmaPlan& plan, const Q4WgmmaArgs& a, cudaStream_t stream)
{
    const auto encode = q4w::encode_fn();
    if (!encode) return cudaErrorNotSupported;
    // A 2-D map: inner x outer elements, rows stride_bytes apart, boxes of box_inner x box_outer.
    auto map2d = [&](CUtensorMap& m, CUtensorMapDataType type, const void* base, int64_t inner, int64_t outer,
                     int64_t stride_bytes, int box_inner, int box_outer, CUtensorMapSwizzle swizzle) {
        const cuuint64_t dims[2] = {(cuuint64_t)inner, (cuuint64_t)outer};
        const cuuint64_t strides[1] = {(cuuint64_t)stride_bytes};
        const cuuint32_t box[2] = {(cuuint32_t)box_inner, (cuuint32_t)box_outer};
        const cuuint32_t estr[2] = {1, 1};
        return encode(&m, type, 2, const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                      swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
    };
    const bool g32 = a.K / a.groups == 32;
    CUtensorMap tm[4];
    const bool ok =
        map2d(tm[0], CU_TENSOR_MAP_DATA_TYPE_FLOAT16, a.x, a.K, a.M, a.ldx * 2, q4w::BK, plan.bn,
              CU_TENSOR_MAP_SWIZZLE_128B) &&
        map2d(tm[1], CU_TENSOR_MAP_DATA_TYPE_UINT32, a.qweight, a.N, a.K / 8, a.ldq * 4, q4w::BM, 8,
              CU_TENSOR_MAP_SWIZZLE_NONE) &&
        map2d(tm[2], CU_TENSOR_MAP_DATA_TYPE_FLOAT16, a.scales, a.N, a.groups, a.lds * 2, q4w::BM, g32 ? 2 : 1,
              CU_TENSOR_MAP_SWIZZLE_NONE) &&
        map2d(tm[3], CU_TENSOR_MAP_DATA_TYPE_FLOAT16, a.offsets, a.N, a.groups, a.lds * 2, q4w::BM, g32 ? 2 : 1,
              CU_TENSOR_MAP_SWIZZLE_NONE);
    if (!ok) return cudaErrorInvalidValue;
    if (a.mma)
        return g32 ? q4w::launch_bn<true, false>(plan, a, tm, stream) : q4w::launch_bn<false, false>(plan, a, tm, stream);
    return g32 ? q4w::launch_bn<true, true>(plan, a, tm, stream) : q4w::launch_bn<false, true>(plan, a, tm, stream);
}
