// Greedy pick inside a captured decode step: per row of logits, the index of the maximum (torch.argmax's
// choice: a NaN wins, ties go to the lowest index) and whether that logit is finite.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

// logits [B, V] (row stride `stride` elements, fp16 if half_in else fp32). res [B, 2] int64: (index, finite);
// ids (may be null) [B] int64 at stride ids_stride: the index again (the next step's input token).
cudaError_t argmax_rows_launch(const void* logits, bool half_in, int64_t stride, int B, int V, int64_t* res,
                               int64_t* ids, int64_t ids_stride, bool pdl, cudaStream_t stream);
