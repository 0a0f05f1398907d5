// out[m, n] = x[m, :] . W[n, :] (+ residual) for M = 1..8 rows of x and an fp16 W [N, K] (nn.Linear's
// layout, rows contiguous), with the q4 kernels' fused RMSNorm prologue. For the fp16 LM head of the
// decode step: it streams W once at close to bandwidth, and unlike cuBLAS needs no workspace, so a
// captured step holds no cuBLAS workspace of its own (32 MiB on an H100).
//
// A warp takes DG_ROWS rows of W at a time (grid-stride, so a block stages x once for many rows); its
// lanes read them 16 bytes at a time, four loads a row in flight, against x staged in shared memory
// (fp32, after the prologue); fp32 sums, one warp reduction a row.
#include "dense_gemv.cuh"
#include "q4_common.cuh"

#include <algorithm>

#define DG_THREADS 256
#define DG_ROWS 2

namespace {

__global__ void __launch_bounds__(DG_THREADS)
dense_gemv_kernel(const Q4GemmArgs a, const half* __restrict__ w, int64_t ldw)
{
    extern __shared__ float4 smem4[];
    float* xs = reinterpret_cast<float*>(smem4);        // [M][K]
    const int M = a.M, K = a.K, N = a.N;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int Kc = K >> 3;                              // 16-byte chunks a row

    pdl_wait();
    pdl_trigger();
    const int xstride = a.x_stride > 0 ? a.x_stride : K;
    __shared__ float norm_scratch[32];
    __shared__ float norm_inv[Q4_MAX_ROWS];
    if (a.norm_w) q4k::rows_norm_inv(a, M, xstride, norm_inv, norm_scratch);
    for (int item = tid; item < M * Kc; item += DG_THREADS)
    {
        const int m = item / Kc;
        const int c = item - m * Kc;
        float v[8];
        q4k::load_x8(a, m, c * 8, xstride, norm_inv, v);
        float4* dst = reinterpret_cast<float4*>(xs + (size_t)m * K + c * 8);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();

    const int stride = gridDim.x * (DG_THREADS / 32) * DG_ROWS;
    #pragma unroll 1
    for (int n0 = (blockIdx.x * (DG_THREADS / 32) + warp) * DG_ROWS; n0 < N; n0 += stride)
    {
    float acc[DG_ROWS][Q4_MAX_ROWS];
    #pragma unroll
    for (int r = 0; r < DG_ROWS; ++r)
    {
        #pragma unroll
        for (int m = 0; m < Q4_MAX_ROWS; ++m) acc[r][m] = 0.f;
    }
    #pragma unroll 1
    for (int c0 = 0; c0 < Kc; c0 += 32 * 4)
    {
        uint4 wv[DG_ROWS][4];
        #pragma unroll
        for (int r = 0; r < DG_ROWS; ++r)
        {
            #pragma unroll
            for (int u = 0; u < 4; ++u)
            {
                const int c = c0 + u * 32 + lane;
                wv[r][u] = (n0 + r < N && c < Kc)
                               ? __ldg(reinterpret_cast<const uint4*>(w + (size_t)(n0 + r) * ldw) + c)
                               : make_uint4(0, 0, 0, 0);
            }
        }
        #pragma unroll
        for (int u = 0; u < 4; ++u)
        {
            const int c = c0 + u * 32 + lane;
            if (c >= Kc) break;
            #pragma unroll
            for (int r = 0; r < DG_ROWS; ++r)
            {
                float f[8];
                h8_to_f(wv[r][u], f);
                #pragma unroll
                for (int m = 0; m < Q4_MAX_ROWS; ++m)
                {
                    if (m >= M) break;
                    const float4* xr = reinterpret_cast<const float4*>(xs + (size_t)m * K + c * 8);
                    const float4 xa = xr[0], xb = xr[1];
                    float t = acc[r][m];
                    t = fmaf(f[0], xa.x, t); t = fmaf(f[1], xa.y, t); t = fmaf(f[2], xa.z, t); t = fmaf(f[3], xa.w, t);
                    t = fmaf(f[4], xb.x, t); t = fmaf(f[5], xb.y, t); t = fmaf(f[6], xb.z, t); t = fmaf(f[7], xb.w, t);
                    acc[r][m] = t;
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < DG_ROWS; ++r)
    {
        const int n = n0 + r;
        #pragma unroll
        for (int m = 0; m < Q4_MAX_ROWS; ++m)
        {
            if (m >= M) break;
            const float v = warp_sum(acc[r][m]);
            if (lane == 0 && n < N) q4k::store_out(a, m, n, v);     // a.bias is null
        }
    }
    }
}

}  // namespace

cudaError_t dense_gemv_launch(const Q4GemmArgs& args, const half* weight, int64_t ldw, int sm_count, bool pdl,
                              cudaStream_t stream)
{
    if (args.M < 1 || args.M > Q4_MAX_ROWS || (args.K & 7) || ldw % 8) return cudaErrorInvalidValue;
    const int rows_per_block = (DG_THREADS / 32) * DG_ROWS;
    const size_t smem = (size_t)args.M * args.K * sizeof(float);
    if (smem > 48 * 1024)
    {
        cudaError_t err = cudaFuncSetAttribute(dense_gemv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
    }
    // As many blocks as are resident at once (3 a multiprocessor at 78 registers), at most four (more would
    // mostly repeat the prologue): a grid-stride block left waiting for a slot would run all its passes at
    // the end, alone. H100: 7B LM head 103.2 -> 92.5 us, SmolLM2's 28.4 -> 24.0 us.
    int per_sm = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dense_gemv_kernel, DG_THREADS, smem);
    if (err != cudaSuccess) return err;
    per_sm = std::max(1, std::min(per_sm, 4));
    const unsigned blocks = (unsigned)std::min<long long>((args.N + rows_per_block - 1) / rows_per_block,
                                                          (long long)per_sm * std::max(1, sm_count));
    return launch_kernel(dense_gemv_kernel, dim3(blocks), dim3(DG_THREADS), smem, stream, pdl, args, weight, ldw);
}
