// out[m, f] = silu(gate[m, f]) * up[m, f] = gate / (1 + exp(-gate)) * up     (fp32 math, fp16 in and out)
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

// Row strides in elements (columns contiguous), so gate and up may be halves of one fused [M, 2F] tensor.
cudaError_t silu_mul_launch(const half* gate, int64_t g_stride, const half* up, int64_t u_stride,
                            half* out, int64_t o_stride, int M, int F, bool pdl, cudaStream_t stream);
