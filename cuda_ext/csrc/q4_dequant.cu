// W[k, n] = scales[k / gs, n] * q[k, n] + offsets[k / gs, n] -> fp16 [K, N] (row k written to perm[k] if given)
//
// One thread per (packed row, 4 columns): a 16-byte load of 8 K x 4 N nibbles, eight 8-byte stores.
// fp32 math then one round to fp16: s * q is exact in fp32 (11 x 4 bits), so this equals the
// reference's fp32 `q * s + o` cast to fp16 bit for bit.
#include "q4_dequant.cuh"
#include "common.cuh"

__global__ void __launch_bounds__(256)
q4_dequant_kernel(const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                  const half* __restrict__ offsets, const int32_t* __restrict__ perm32,
                  const int64_t* __restrict__ perm64, half* __restrict__ out,
                  int Kp, int N, int gpr, int64_t ldq, int64_t lds)
{
    pdl_wait();
    pdl_trigger();             // after the wait: at most one kernel queued behind this one
    const int nq = N >> 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)Kp * nq) return;
    const int i = (int)(idx / nq);
    const int cq = (int)(idx - (long long)i * nq);
    const int n0 = cq * 4;
    const int g = i / gpr;

    const uint4 w = __ldg(reinterpret_cast<const uint4*>(qweight + (size_t)i * ldq + n0));
    const uint2 sr = __ldg(reinterpret_cast<const uint2*>(scales + (size_t)g * lds + n0));
    const uint2 orw = __ldg(reinterpret_cast<const uint2*>(offsets + (size_t)g * lds + n0));
    const float2 s01 = __half22float2(*reinterpret_cast<const half2*>(&sr.x));
    const float2 s23 = __half22float2(*reinterpret_cast<const half2*>(&sr.y));
    const float2 o01 = __half22float2(*reinterpret_cast<const half2*>(&orw.x));
    const float2 o23 = __half22float2(*reinterpret_cast<const half2*>(&orw.y));
    const float s[4] = {s01.x, s01.y, s23.x, s23.y};
    const float o[4] = {o01.x, o01.y, o23.x, o23.y};
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};

    #pragma unroll
    for (int j = 0; j < 8; ++j)
    {
        const int k = i * 8 + j;
        const long long row = perm32 ? (long long)perm32[k] : (perm64 ? perm64[k] : (long long)k);
        half h[4];
        #pragma unroll
        for (int c = 0; c < 4; ++c)
        {
            const float q = (float)((wv[c] >> (4 * j)) & 0xFu);
            h[c] = __float2half_rn(fmaf(s[c], q, o[c]));
        }
        uint2 st;
        half2 lo = __halves2half2(h[0], h[1]);
        half2 hi = __halves2half2(h[2], h[3]);
        st.x = *reinterpret_cast<const uint32_t*>(&lo);
        st.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out + (size_t)row * N + n0) = st;
    }
}

cudaError_t q4_dequant_launch(const uint32_t* qweight, const half* scales, const half* offsets,
                              const int32_t* perm32, const int64_t* perm64, half* out,
                              int K, int N, int groups, int64_t ldq, int64_t lds, bool pdl, cudaStream_t stream)
{
    const int Kp = K / 8;
    const int gpr = (K / groups) / 8;
    const long long total = (long long)Kp * (N / 4);
    if (total == 0) return cudaSuccess;
    const int threads = 256;
    const long long blocks = EXL_DIV_UP(total, (long long)threads);
    return launch_kernel(q4_dequant_kernel, dim3((unsigned)blocks), dim3(threads), 0, stream, pdl,
                         qweight, scales, offsets, perm32, perm64, out, Kp, N, gpr, ldq, lds);
}
