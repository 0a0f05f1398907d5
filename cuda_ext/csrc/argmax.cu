// One block of 1024 threads per row: each thread keeps the best (value, index) of its strided elements
// (16-byte loads, all issued before the compares), then warp shuffles and one pass over the warps' bests.
// Order: NaN above every number, then by value, then the lower index (torch.argmax's choice).
#include "argmax.cuh"
#include "common.cuh"

#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 1024;
static_assert(kThreads == 32 * 32, "the final reduction takes one warp's best a lane");

struct Best
{
    float v;
    int i;
};

__device__ __forceinline__ bool better(float v, int i, const Best& b)
{
    const bool vn = v != v, bn = b.v != b.v;
    if (vn != bn) return vn;
    if (!vn && v != b.v) return v > b.v;
    return i < b.i;
}

__device__ __forceinline__ void take(Best& b, float v, int i)
{
    if (better(v, i, b)) b = {v, i};
}

__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__global__ void __launch_bounds__(kThreads) argmax_rows_kernel(const T* __restrict__ logits, int64_t stride, int V,
                                                               int64_t* __restrict__ res, int64_t* __restrict__ ids,
                                                               int64_t ids_stride)
{
    constexpr int E = 16 / sizeof(T);            // elements in a 16-byte load
    constexpr int U = 4;                         // loads in flight per thread
    pdl_wait();
    pdl_trigger();
    const int row = blockIdx.x;
    const T* x = logits + row * stride;
    Best b{-INFINITY, 0x7fffffff};
    const bool vec = (stride % E == 0) && ((uintptr_t)logits % 16 == 0);
    const int nvec = vec ? V / E : 0;
    for (int c0 = threadIdx.x; c0 < nvec; c0 += U * kThreads)
    {
        uint4 raw[U];
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const int c = c0 + u * kThreads;
            raw[u] = c < nvec ? reinterpret_cast<const uint4*>(x)[c] : make_uint4(0, 0, 0, 0);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const int c = c0 + u * kThreads;
            if (c >= nvec) break;
            const T* e = reinterpret_cast<const T*>(&raw[u]);
            #pragma unroll
            for (int j = 0; j < E; ++j) take(b, to_float(e[j]), c * E + j);
        }
    }
    for (int i = nvec * E + threadIdx.x; i < V; i += kThreads)   // the tail (or every element, unaligned)
        take(b, to_float(x[i]), i);
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1)
    {
        const float v = __shfl_xor_sync(0xffffffffu, b.v, off);
        const int i = __shfl_xor_sync(0xffffffffu, b.i, off);
        take(b, v, i);
    }
    __shared__ Best warps[kThreads / 32];
    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = b;
    __syncthreads();
    if (threadIdx.x < 32)
    {
        // the warps' bests by one more shuffle reduction (kThreads / 32 == 32 entries, one a lane)
        Best t = warps[threadIdx.x];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1)
        {
            const float v = __shfl_xor_sync(0xffffffffu, t.v, off);
            const int i = __shfl_xor_sync(0xffffffffu, t.i, off);
            take(t, v, i);
        }
        if (threadIdx.x == 0)
        {
            const int64_t idx = t.i < V ? t.i : 0;
            res[2 * row] = idx;
            res[2 * row + 1] = isfinite(t.v) ? 1 : 0;
            if (ids) ids[row * ids_stride] = idx;
        }
    }
}

}  // namespace

cudaError_t argmax_rows_launch(const void* logits, bool half_in, int64_t stride, int B, int V, int64_t* res,
                               int64_t* ids, int64_t ids_stride, bool pdl, cudaStream_t stream)
{
    if (B == 0) return cudaSuccess;
    if (half_in)
        return launch_kernel(argmax_rows_kernel<half>, dim3(B), dim3(kThreads), 0, stream, pdl,
                             static_cast<const half*>(logits), stride, V, res, ids, ids_stride);
    return launch_kernel(argmax_rows_kernel<float>, dim3(B), dim3(kThreads), 0, stream, pdl,
                         static_cast<const float*>(logits), stride, V, res, ids, ids_stride);
}
