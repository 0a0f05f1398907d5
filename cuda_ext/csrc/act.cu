// out[m, f] = silu(gate[m, f]) * up[m, f] = gate / (1 + exp(-gate)) * up     (fp32 math, fp16 in and out)
//
// VEC: 8 halves (16 bytes) per thread; else one element per thread. Grid: x over columns, y strides over rows.
#include "act.cuh"
#include "common.cuh"

__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

template <bool VEC>
__global__ void silu_mul_kernel(const half* __restrict__ gate, int64_t gs, const half* __restrict__ up, int64_t us,
                                half* __restrict__ out, int64_t os, int M, int F)
{
    pdl_wait();
    pdl_trigger();             // after the wait: at most one kernel queued behind this one
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (VEC ? F / 8 : F)) return;
    for (int m = blockIdx.y; m < M; m += gridDim.y)
    {
        const half* gr = gate + (size_t)m * gs;
        const half* ur = up + (size_t)m * us;
        half* orow = out + (size_t)m * os;
        if constexpr (VEC)
        {
            const uint4 graw = *reinterpret_cast<const uint4*>(gr + c * 8);
            const uint4 uraw = *reinterpret_cast<const uint4*>(ur + c * 8);
            const half2* g2 = reinterpret_cast<const half2*>(&graw);
            const half2* u2 = reinterpret_cast<const half2*>(&uraw);
            uint4 oraw;
            half2* o2 = reinterpret_cast<half2*>(&oraw);
            #pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                const float2 g = __half22float2(g2[j]);
                const float2 u = __half22float2(u2[j]);
                o2[j] = __floats2half2_rn(silu_mul1(g.x, u.x), silu_mul1(g.y, u.y));
            }
            *reinterpret_cast<uint4*>(orow + c * 8) = oraw;
        }
        else
        {
            orow[c] = __float2half_rn(silu_mul1(__half2float(gr[c]), __half2float(ur[c])));
        }
    }
}

static bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

cudaError_t silu_mul_launch(const half* gate, int64_t g_stride, const half* up, int64_t u_stride,
                            half* out, int64_t o_stride, int M, int F, bool pdl, cudaStream_t stream)
{
    if (M == 0 || F == 0) return cudaSuccess;
    const bool vec = (F % 8 == 0) && aligned16(gate) && aligned16(up) && aligned16(out) &&
                     (g_stride % 8 == 0) && (u_stride % 8 == 0) && (o_stride % 8 == 0);
    const int threads = 256;
    const int work = vec ? F / 8 : F;
    dim3 grid(EXL_DIV_UP(work, threads), M < 65535 ? M : 65535);
    if (vec)
        return launch_kernel(silu_mul_kernel<true>, grid, dim3(threads), 0, stream, pdl, gate, g_stride, up, u_stride, out, o_stride, M, F);
    return launch_kernel(silu_mul_kernel<false>, grid, dim3(threads), 0, stream, pdl, gate, g_stride, up, u_stride, out, o_stride, M, F);
}
