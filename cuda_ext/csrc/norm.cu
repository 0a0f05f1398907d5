// out[m, :] = x[m, :] * rsqrt(mean(x[m, :]^2) + eps) * w        (fp32 math, fp16 in and out)
// add variant: residual[m, :] += x[m, :] (rounded to fp16), then out = norm(residual)
//
// One block per row. VEC: rows are read and written 8 halves (16 bytes) at a time; else one by one.
// Pass 1 sums squares (and writes the updated residual); pass 2 normalises what pass 1 kept in
// registers (VEC) or re-reads the row, which the same thread wrote, so no barrier is needed between
// them beyond the block reduction.
#include "norm.cuh"
#include "common.cuh"

template <typename WT>
__device__ __forceinline__ float wload(const WT* w, int i);
template <>
__device__ __forceinline__ float wload<float>(const float* w, int i) { return __ldg(w + i); }
template <>
__device__ __forceinline__ float wload<half>(const half* w, int i) { return __half2float(__ldg(w + i)); }

__device__ __forceinline__ uint4 f_to_h8(const float (&v)[8])
{
    uint4 raw;
    half2* h = reinterpret_cast<half2*>(&raw);
    #pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
    return raw;
}

template <typename WT, bool ADD, bool VEC>
__global__ void rms_norm_kernel(half* residual, int64_t r_stride, const half* x, int64_t x_stride,
                                const WT* __restrict__ w, half* out, int64_t out_stride, int D, float eps)
{
    __shared__ float scratch[32];
    pdl_wait();
    pdl_trigger();             // after the wait: at most one kernel queued behind this one
    const int m = blockIdx.x;
    const half* xr = x + (size_t)m * x_stride;
    half* rr = ADD ? residual + (size_t)m * r_stride : nullptr;
    half* orow = out + (size_t)m * out_stride;
    // The row the norm reads: x, or the residual after the add.
    const half* src = ADD ? rr : xr;

    float ss = 0.f;
    // VEC: a thread's first KEEP runs of 8 stay in registers between the passes (every run for rows of up
    // to KEEP * 8 * blockDim.x, e.g. 4096 or 8192 with 512 threads), with their weights loaded before the
    // block reduction; longer rows re-read the rest.
    constexpr int KEEP = 2;
    float keep[KEEP][8], wk[KEEP][8];
    if constexpr (VEC)
    {
        auto load_run = [&](int c, float (&v)[8]) {
            h8_to_f(*reinterpret_cast<const uint4*>(xr + c * 8), v);
            if constexpr (ADD)
            {
                float r[8];
                h8_to_f(*reinterpret_cast<const uint4*>(rr + c * 8), r);
                #pragma unroll
                for (int j = 0; j < 8; ++j) r[j] += v[j];
                const uint4 packed = f_to_h8(r);
                *reinterpret_cast<uint4*>(rr + c * 8) = packed;
                h8_to_f(packed, v);               // the norm sees the fp16-rounded sum
            }
            #pragma unroll
            for (int j = 0; j < 8; ++j) ss = fmaf(v[j], v[j], ss);
        };
        #pragma unroll
        for (int u = 0; u < KEEP; ++u)
        {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < D / 8)
            {
                load_run(c, keep[u]);
                #pragma unroll
                for (int j = 0; j < 8; ++j) wk[u][j] = wload<WT>(w, c * 8 + j);
            }
        }
        for (int c = threadIdx.x + KEEP * blockDim.x; c < D / 8; c += blockDim.x)
        {
            float v[8];
            load_run(c, v);
        }
    }
    else
    {
        for (int i = threadIdx.x; i < D; i += blockDim.x)
        {
            float v = __half2float(xr[i]);
            if constexpr (ADD)
            {
                const half h = __float2half_rn(__half2float(rr[i]) + v);
                rr[i] = h;
                v = __half2float(h);
            }
            ss = fmaf(v, v, ss);
        }
    }

    const float total = block_sum(ss, scratch);
    const float inv = rsqrtf(total / (float)D + eps);

    if constexpr (VEC)
    {
        #pragma unroll
        for (int u = 0; u < KEEP; ++u)
        {
            const int c = threadIdx.x + u * blockDim.x;
            if (c < D / 8)
            {
                float v[8];
                #pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = keep[u][j] * inv * wk[u][j];
                *reinterpret_cast<uint4*>(orow + c * 8) = f_to_h8(v);
            }
        }
        for (int c = threadIdx.x + KEEP * blockDim.x; c < D / 8; c += blockDim.x)
        {
            float v[8];
            h8_to_f(*reinterpret_cast<const uint4*>(src + c * 8), v);
            #pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = v[j] * inv * wload<WT>(w, c * 8 + j);
            *reinterpret_cast<uint4*>(orow + c * 8) = f_to_h8(v);
        }
    }
    else
    {
        for (int i = threadIdx.x; i < D; i += blockDim.x)
            orow[i] = __float2half_rn(__half2float(src[i]) * inv * wload<WT>(w, i));
    }
}

static bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

template <bool ADD>
static cudaError_t launch_norm(half* residual, int64_t r_stride, const half* x, int64_t x_stride,
                               const void* weight, bool w_is_fp32, half* out, int64_t out_stride,
                               int M, int D, float eps, bool pdl, cudaStream_t stream)
{
    if (M == 0 || D == 0) return cudaSuccess;
    bool vec = (D % 8 == 0) && aligned16(x) && aligned16(out) && (x_stride % 8 == 0) && (out_stride % 8 == 0);
    if (ADD) vec = vec && aligned16(residual) && (r_stride % 8 == 0);
    const int work = vec ? D / 8 : D;
    int threads = ((work + 31) / 32) * 32;
    threads = threads < 32 ? 32 : (threads > 512 ? 512 : threads);
    dim3 grid(M);
    if (w_is_fp32)
    {
        const float* w = static_cast<const float*>(weight);
        if (vec) return launch_kernel(rms_norm_kernel<float, ADD, true>, grid, dim3(threads), 0, stream, pdl, residual, r_stride, x, x_stride, w, out, out_stride, D, eps);
        return launch_kernel(rms_norm_kernel<float, ADD, false>, grid, dim3(threads), 0, stream, pdl, residual, r_stride, x, x_stride, w, out, out_stride, D, eps);
    }
    const half* w = static_cast<const half*>(weight);
    if (vec) return launch_kernel(rms_norm_kernel<half, ADD, true>, grid, dim3(threads), 0, stream, pdl, residual, r_stride, x, x_stride, w, out, out_stride, D, eps);
    return launch_kernel(rms_norm_kernel<half, ADD, false>, grid, dim3(threads), 0, stream, pdl, residual, r_stride, x, x_stride, w, out, out_stride, D, eps);
}

cudaError_t rms_norm_launch(const half* x, int64_t x_stride, const void* weight, bool w_is_fp32,
                            half* out, int64_t out_stride, int M, int D, float eps, bool pdl, cudaStream_t stream)
{
    return launch_norm<false>(nullptr, 0, x, x_stride, weight, w_is_fp32, out, out_stride, M, D, eps, pdl, stream);
}

cudaError_t add_rms_norm_launch(half* residual, int64_t r_stride, const half* x, int64_t x_stride,
                                const void* weight, bool w_is_fp32, half* out, int64_t out_stride,
                                int M, int D, float eps, bool pdl, cudaStream_t stream)
{
    return launch_norm<true>(residual, r_stride, x, x_stride, weight, w_is_fp32, out, out_stride, M, D, eps, pdl, stream);
}
