// out[m, :] = x[m, :] * rsqrt(mean(x[m, :]^2) + eps) * w        (fp32 math, fp16 in and out)
// add variant: residual[m, :] += x[m, :] (rounded to fp16), then out = norm(residual)
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

// weight is fp16 (w_is_fp32 false) or fp32. Strides in elements between rows.
cudaError_t rms_norm_launch(const half* x, int64_t x_stride, const void* weight, bool w_is_fp32,
                            half* out, int64_t out_stride, int M, int D, float eps, bool pdl, cudaStream_t stream);

cudaError_t add_rms_norm_launch(half* residual, int64_t r_stride, const half* x, int64_t x_stride,
                                const void* weight, bool w_is_fp32, half* out, int64_t out_stride,
                                int M, int D, float eps, bool pdl, cudaStream_t stream);
