// Fused prompt GEMM on Hopper (sm_90a): out[M, N] = x[M, K] @ W + bias + residual with W the 4-bit
// weights (row layout, or the mma layout of q4_mma.cuh), dequantized in registers inside the GEMM's main
// loop: no fp16 copy of the weights is ever written (the dequant + cuBLAS path writes and reads one a layer).
//
// The product is computed transposed, out^T = W^T x^T, so the weights are wgmma's A operand, which may
// sit in registers: a lane's 16-byte load of the mma layout is its A fragment for four K steps of 16
// (the layout the tensor-core GEMV already reads); from the row layout a lane takes one byte of each of 16
// words instead. x^T is the B operand, tiles of BN tokens x 64 K brought to shared memory by TMA (128-byte
// swizzle); the packed weights, scales and offsets of the block's 128 columns come by TMA too. One producer
// thread feeds a ring of stages; two consumer warpgroups own 64 columns each and run wgmma m64nBNk16 with
// fp32 accumulators. Blocks are persistent (one a multiprocessor) over the tiles.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

struct Q4WgmmaArgs
{
    const half* x;            // [M, K], rows contiguous, row stride ldx (elements)
    const uint32_t* qweight;  // [K / 8, N] (row or mma layout), row stride ldq
    const half* scales;       // [G, N], row stride lds (offsets too)
    const half* offsets;
    const half* bias;         // [N] or null
    const half* residual;     // [M, N] row stride ldr, or null; may be out itself
    half* out;                // [M, N] row stride ldo
    int M, K, N, groups;
    bool mma;                 // qweight in the mma layout (else the row layout)
    int64_t ldx, ldq, lds, ldr, ldo;
};

struct Q4WgmmaPlan
{
    int bn;                   // tokens a block (the wgmma N); 0: no plan
    int stages;
    size_t smem_bytes;
    int blocks;               // grid: one block a tile, or one a multiprocessor looping over tiles
};

// Whether this build has the kernel for the device (an sm_90a build on an sm_90 GPU; probed once, not
// while a graph is being captured: capturing = true then answers false).
bool q4_wgmma_available(int device, bool capturing);

// Whether the kernel takes this problem (K % 64 == 0, N % 16 == 0, group size 32 or a power of two >= 64,
// 16-byte aligned rows); q4_wgmma_available says whether the device and build have it.
bool q4_wgmma_supported(const Q4WgmmaArgs& a);

// bn <= 0: chosen for M and N (fewest waves of tiles weighted by tile width); else one of 64, 128, 192,
// 240, 256. persistent: one block a multiprocessor, each looping over tiles.
Q4WgmmaPlan q4_wgmma_plan(int M, int N, int sm_count, size_t smem_optin, int bn, bool persistent);

cudaError_t q4_wgmma_launch(const Q4WgmmaPlan& plan, const Q4WgmmaArgs& a, cudaStream_t stream);
