// W[k, n] = scales[k / gs, n] * q[k, n] + offsets[k / gs, n] -> fp16 [K, N] (row k written to perm[k] if given)
// ldq / lds: row strides (elements) of qweight and of scales/offsets, >= N (column slices of wider weights).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

cudaError_t q4_dequant_launch(const uint32_t* qweight, const half* scales, const half* offsets,
                              const int32_t* perm32, const int64_t* perm64, half* out,
                              int K, int N, int groups, int64_t ldq, int64_t lds, bool pdl, cudaStream_t stream);
