// Rotate-half rotary embedding, in place: with d = Dh / 2, p = positions[b, t],
//   x[..., i]     <- x[..., i] * cos[p, i] - x[..., i + d] * sin[p, i]
//   x[..., i + d] <- x[..., i + d] * cos[p, i] + x[..., i] * sin[p, i]      (i < d)
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

// x: [B, T, H, Dh] fp16 with element strides sb, st, sh (last dim contiguous).
// positions: int32 (pos_is64 false) or int64, element strides psb, pst; out-of-range positions leave x as is.
cudaError_t rotary_launch(half* x, int64_t sb, int64_t st, int64_t sh, int B, int T, int H, int Dh,
                          const float* cos, const float* sin, int max_pos,
                          const void* positions, bool pos_is64, int64_t psb, int64_t pst,
                          bool pdl, cudaStream_t stream);
