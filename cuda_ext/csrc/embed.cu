// Embedding lookup from a table kept in pinned host memory (mapped into the GPU's address space):
// the table costs no VRAM, a decode step reads one row (8 KB for a 4096-wide model) over the bus,
// and the lookup stays inside a captured CUDA graph. An id outside [0, vocab) gives a zero row
// (a kernel cannot raise; callers validate ids they get from users).
//
// One block per row, 16-byte loads; the whole row's loads are issued before any store.
#include "embed.cuh"
#include "common.cuh"

__global__ void __launch_bounds__(128)
embed_gather_kernel(const int64_t* __restrict__ ids, const uint4* __restrict__ table, uint4* __restrict__ out,
                    int64_t vocab, int dim8)
{
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x;
    const int64_t id = ids[r];
    const bool ok = id >= 0 && id < vocab;
    const uint4* src = table + (ok ? id : 0) * dim8;
    uint4* dst = out + (int64_t)r * dim8;
    constexpr int U = 4;
    for (int c = threadIdx.x; c < dim8; c += U * blockDim.x)
    {
        uint4 v[U];
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const int cc = c + u * blockDim.x;
            v[u] = (ok && cc < dim8) ? src[cc] : make_uint4(0, 0, 0, 0);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const int cc = c + u * blockDim.x;
            if (cc < dim8) dst[cc] = v[u];
        }
    }
}

cudaError_t embed_gather_launch(const int64_t* ids, const half* table, half* out, int rows, int64_t vocab,
                                int dim, bool pdl, cudaStream_t stream)
{
    if (rows == 0) return cudaSuccess;
    return launch_kernel(embed_gather_kernel, dim3(rows), dim3(128), 0, stream, pdl, ids,
                         reinterpret_cast<const uint4*>(table), reinterpret_cast<uint4*>(out), vocab, dim / 8);
}
