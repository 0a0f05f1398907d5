// q4 GEMM for a few rows (decode): out[M, N] = x[M, K] (gathered through perm) @ W + bias + residual
// with W[k, n] = scales[k / gs, n] * q[k, n] + offsets[k / gs, n], q packed 8 to an int32 along K.
// Launcher API: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

#define Q4_THREADS 256
#define Q4_MAX_ROWS 8
#define Q4_COUNTERS 65536        // per-device tile counters for the split-K reduction

struct Q4GemmPlan
{
    int tn;               // output columns per block (32, 64 or 128)
    int splits;           // blocks along K (split-K, reduced by the last block of each column tile)
    int rows_per_split;   // packed rows (8 K-rows each) per split
    int rows_per_trow;    // packed rows per thread row inside a block
    int variant;          // inner-loop variant, see q4_gemm_variant_name()
    int tiles;            // column tiles = ceil(N / tn)
    size_t smem_bytes;    // dynamic shared memory per block
    int pdl;              // programmatic dependent launch: 0 off; 1 on, next kernel released after the main
                          // loop; 2 on, released at the start (weights are always read before the wait)
};

struct Q4GemmArgs
{
    const half* x;             // [M, K]
    const uint32_t* qweight;   // [K / 8, N]
    const half* scales;        // [G, N]
    const half* offsets;       // [G, N]
    const int32_t* perm32;     // [K] or null
    const int64_t* perm64;     // [K] or null
    const half* bias;          // [N] or null
    const half* residual;      // [M, N] or null (may alias out)
    half* out;                 // [M, N]
    float* workspace;          // [splits, M, N] when splits > 1
    int* counters;             // >= tiles ints, zero between launches (kernels leave them zero)
    int M, K, N, groups, gpr;  // gpr: packed rows per group = (K / groups) / 8
    // Fused prologues (decode): x is transformed while it is staged, rounded to fp16 as the separate
    // kernel would have stored it. x_stride: elements between rows of x (0: K).
    int x_stride;
    const float* norm_w;       // [K] or null: x <- rms_norm(x row over all K, norm_eps) * norm_w
    float norm_eps;
    const half* x_up;          // [M, x_stride] or null: x <- silu(x) * x_up (rows like x)
};

// tn / splits = 0 and variant < 0 pick automatically. pdl: 0 off, 1 / 2 as above (sm_90+ only).
// Returns a plan with splits == 0 if the shape is unsupported.
Q4GemmPlan q4_gemm_plan(int M, int K, int N, int groups, int sm_count, size_t smem_optin, int cc_major,
                        int tn, int splits, int variant, int pdl);

int q4_gemm_num_variants(int M);
const char* q4_gemm_variant_name(int M, int variant);

cudaError_t q4_gemm_small_launch(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream);

// Template entry points, instantiated in q4_gemm_m*.cu (compile units split for parallel builds).
// S > 0: weights stream through a per-thread cp.async ring of S rows; S == 0: U rows in registers,
// the next U prefetched. MINB: minimum resident blocks per multiprocessor (register cap). P: how the
// products are formed (q4_gemm_kernel.cuh): fp32, or at M = 1 half2 / 12-bit integers.
enum Q4Product { kProdF32 = 0, kProdH2 = 1, kProdI16 = 2 };
template <int M, int U, int S, int MINB, int P = kProdF32>
cudaError_t q4_gemm_launch_t(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream);
