// Small device helpers shared by the kernels. No torch types in any .cu/.cuh file.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <utility>

#define EXL_DIV_UP(a, b) (((a) + (b) - 1) / (b))

// A half2's 32 bits and back (the dequantizing kernels build half2 values with integer ops).
__device__ __forceinline__ uint32_t h2_bits(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 bits_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ float warp_sum(float v)
{
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch)
{
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                      // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (lane < nwarps) ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Programmatic dependent launch (Hopper+): a kernel launched with the PDL attribute may start while
// the previous kernel in the stream finishes. It must call pdl_wait() before touching memory that
// the previous kernel writes (or reads); pdl_trigger() lets the next kernel start early.
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launch with or without the PDL attribute (callers pass pdl = false on devices before sm_90).
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                 bool pdl, Args&&... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Rotate-half rotary of one pair (x1 = x[i], x2 = x[i + D/2]) in fp32 with explicit roundings (no FMA
// contraction), so rotary, rope_kv_write and the attention kernel's prologue agree bit for bit.
__device__ __forceinline__ float rope_lo(float x1, float x2, float c, float s)
{
    return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}

__device__ __forceinline__ float rope_hi(float x1, float x2, float c, float s)
{
    return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// Eight fp16 values (one 16-byte load) to fp32.
__device__ __forceinline__ void h8_to_f(const uint4& raw, float (&v)[8])
{
    const half2* h = reinterpret_cast<const half2*>(&raw);
    #pragma unroll
    for (int j = 0; j < 4; ++j)
    {
        const float2 f = __half22float2(h[j]);
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
    }
}
