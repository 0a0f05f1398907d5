// fp16 GEMV for M = 1..8 rows: out[M, N] = x[M, K] @ W[N, K]^T (+ residual), W rows ldw elements apart,
// with the optional fused RMSNorm prologue of Q4GemmArgs (x, M, K, N, x_stride, norm_w, norm_eps,
// residual, out are read; the q4 fields are not). Launcher API: raw pointers and a stream.
#pragma once

#include "q4_gemm.cuh"

cudaError_t dense_gemv_launch(const Q4GemmArgs& args, const half* weight, int64_t ldw, int sm_count, bool pdl,
                              cudaStream_t stream);
