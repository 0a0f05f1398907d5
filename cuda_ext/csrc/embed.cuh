// out[r, :] = table[ids[r], :] with the table in pinned host memory, read by the GPU over the bus.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

cudaError_t embed_gather_launch(const int64_t* ids, const half* table, half* out, int rows, int64_t vocab,
                                int dim, bool pdl, cudaStream_t stream);
