// q4 GEMV on tensor cores, weights in the "mma layout" (see model/quant.py to_mma_layout):
// out[M, N] = x[M, K][:, perm] @ W + bias + residual for M = 1..8, the same arguments as q4_gemm_small
// (Q4GemmArgs, fused prologues included), and the prompt path's dequantization of that layout.
//
// The mma layout keeps the row layout's shape ([K / 8, N] int32) and permutes nibbles only inside
// each block of 8 packed rows x 16 columns (64 K x 16 N): lane L = 4 g + t of a warp loads the 16
// bytes at packed row 8 c + g, columns 16 j + 4 t .. + 3 of chunk c, n-tile j, and word s of them is
// its A fragment of mma.m16n8k16 for K step s: nibble i holds W[k, n] with
// n = 16 j + g + 8 (i & 1), k = 64 c + 16 s + 2 t + 8 ((i >> 1) & 1) + (i >> 2).
// Column slices at multiples of 16 and row ranges at multiples of 64 K stay valid mma-layout views.
#pragma once

#include "q4_gemm.cuh"

struct Q4MmaPlan
{
    int variant;            // kernel instance (warps per block, n-tiles per warp, chunks per load batch)
    int tiles;              // column tiles of the block width
    int splits;             // blocks along K
    int units_per_split;    // K units (chunks_per_unit chunks of 64 K) per split
    int chunks_per_unit;    // a unit ends on a fold boundary: max(1, fold_steps / 4) chunks
    int fold_steps;         // K steps of 16 between folds of scale and offset (a divisor of the group)
    int threads;
    int tn;                 // output columns per block
    size_t smem_bytes;
    int pdl;                // as Q4GemmPlan::pdl
};

// Whether the mma layout / kernel takes this shape: K % 64 == 0, N % 16 == 0, group size 32 or a multiple of 64.
bool q4_mma_supported(int K, int N, int groups);

// splits <= 0 and variant < 0 choose automatically; a plan with splits == 0 if unsupported.
Q4MmaPlan q4_mma_plan(int M, int K, int N, int groups, int sm_count, size_t smem_optin, int cc_major, int splits,
                      int variant, int pdl);
int q4_mma_num_variants();
const char* q4_mma_variant_name(int variant);

cudaError_t q4_mma_launch(const Q4MmaPlan& plan, const Q4GemmArgs& args, cudaStream_t stream);

// fp16 [K, N] (row k to perm[k] if given) from mma-layout weights; ldq / lds row strides (column slices).
cudaError_t q4_dequant_mma_launch(const uint32_t* qweight, const half* scales, const half* offsets,
                                  const int32_t* perm32, const int64_t* perm64, half* out,
                                  int K, int N, int groups, int64_t ldq, int64_t lds, bool pdl, cudaStream_t stream);
