// Rotate-half rotary embedding, in place: with d = Dh / 2, p = positions[b, t],
//   x[..., i]     <- x[..., i] * cos[p, i] - x[..., i + d] * sin[p, i]
//   x[..., i + d] <- x[..., i + d] * cos[p, i] + x[..., i] * sin[p, i]      (i < d)
//
// One thread per (b, t, h, i). Positions are read on the device, so a captured CUDA graph can be
// replayed at a new position by rewriting the positions tensor.
#include "rotary.cuh"
#include "common.cuh"

template <typename PT>
__global__ void rotary_kernel(half* x, int64_t sb, int64_t st, int64_t sh, int T, int H, int d,
                              const float* __restrict__ cosv, const float* __restrict__ sinv, int max_pos,
                              const PT* __restrict__ pos, int64_t psb, int64_t pst, long long total)
{
    pdl_wait();
    pdl_trigger();             // after the wait: at most one kernel queued behind this one
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int i = (int)(idx % d);
    long long r = idx / d;
    const int h = (int)(r % H);
    r /= H;
    const int t = (int)(r % T);
    const int b = (int)(r / T);

    const long long p = (long long)pos[b * psb + t * pst];
    if (p < 0 || p >= max_pos) return;
    half* base = x + b * sb + t * st + h * sh;
    const float c = __ldg(cosv + p * d + i);
    const float s = __ldg(sinv + p * d + i);
    const float x1 = __half2float(base[i]);
    const float x2 = __half2float(base[i + d]);
    base[i] = __float2half_rn(rope_lo(x1, x2, c, s));
    base[i + d] = __float2half_rn(rope_hi(x1, x2, c, s));
}

cudaError_t rotary_launch(half* x, int64_t sb, int64_t st, int64_t sh, int B, int T, int H, int Dh,
                          const float* cos, const float* sin, int max_pos,
                          const void* positions, bool pos_is64, int64_t psb, int64_t pst,
                          bool pdl, cudaStream_t stream)
{
    const int d = Dh / 2;
    const long long total = (long long)B * T * H * d;
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    const unsigned blocks = (unsigned)EXL_DIV_UP(total, (long long)threads);
    if (pos_is64)
        return launch_kernel(rotary_kernel<int64_t>, dim3(blocks), dim3(threads), 0, stream, pdl, x, sb, st, sh, T, H, d,
                             cos, sin, max_pos, static_cast<const int64_t*>(positions), psb, pst, total);
    return launch_kernel(rotary_kernel<int32_t>, dim3(blocks), dim3(threads), 0, stream, pdl, x, sb, st, sh, T, H, d,
                         cos, sin, max_pos, static_cast<const int32_t*>(positions), psb, pst, total);
}
