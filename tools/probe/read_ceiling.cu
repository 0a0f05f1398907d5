// How fast can a single-kernel read of one decoder projection's 4-bit weights go on this GPU?
// Pure-read kernels (no arithmetic beyond an XOR to keep the loads alive), timed the way the decode
// step runs them: a CUDA graph of back-to-back launches, rotating over enough weight copies that L2
// cannot hold them. Compares (a) a contiguous stream split evenly over the blocks and (b) the q4 GEMV's
// access pattern ([K/8, N] int32 rows, 128-column tiles, each warp row 512 B wide, 16 packed rows per
// thread), so the gap between the GEMV and bandwidth can be split into "access pattern + launch" and
// "the kernel's own work".
//   nvcc -O3 -arch=sm_90 -o /tmp/read_ceiling tools/probe/read_ceiling.cu && /tmp/read_ceiling
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); exit(1); } } while (0)

__device__ __forceinline__ uint4 ld_stream(const uint4* p)
{
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// (a) contiguous: block b reads uint4 [b * per, (b + 1) * per), threads interleaved, U loads in flight.
template <int U>
__global__ void __launch_bounds__(256) read_contig(const uint4* w, size_t n16, unsigned* sink)
{
    const size_t per = (n16 + gridDim.x - 1) / gridDim.x;
    const size_t b0 = blockIdx.x * per, b1 = min(n16, b0 + per);
    unsigned acc = 0;
    for (size_t i = b0 + threadIdx.x; i < b1; i += (size_t)U * blockDim.x)
    {
        uint4 v[U];
        #pragma unroll
        for (int u = 0; u < U; ++u)
        {
            const size_t j = i + (size_t)u * blockDim.x;
            v[u] = j < b1 ? ld_stream(w + j) : make_uint4(0, 0, 0, 0);
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

// (b) the GEMV pattern: tile of tn columns (tn/4 threads across), splits over K; thread row reads
// rows_per_trow consecutive packed rows (stride N int32), U in registers + U prefetched.
template <int U>
__global__ void __launch_bounds__(256) read_gemv(const uint32_t* q, int Kp, int N, int tn, int rows_per_split,
                                                  int rows_per_trow, unsigned* sink)
{
    const int lpr = tn / 4, trow = threadIdx.x / lpr, tcol = threadIdx.x % lpr;
    const int n0 = blockIdx.x * tn + tcol * 4;
    const int pb0 = blockIdx.y * rows_per_split, pb1 = min(Kp, pb0 + rows_per_split);
    const int i0 = pb0 + trow * rows_per_trow, i1 = min(pb1, i0 + rows_per_trow);
    unsigned acc = 0;
    if (n0 < N)
    {
        const uint4* p = reinterpret_cast<const uint4*>(q + (size_t)i0 * N + n0);
        const size_t stride = N / 4;
        const int n = i1 - i0;
        uint4 a[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) a[u] = u < n ? ld_stream(p + (size_t)u * stride) : make_uint4(0, 0, 0, 0);
        for (int j = 0; j < n; j += U)
        {
            uint4 b[U];
            #pragma unroll
            for (int u = 0; u < U; ++u) b[u] = (j + U + u < n) ? ld_stream(p + (size_t)(j + U + u) * stride) : make_uint4(0, 0, 0, 0);
            #pragma unroll
            for (int u = 0; u < U; ++u) { acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w; a[u] = b[u]; }
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

struct Shape { const char* name; int K, N; };

int main()
{
    int dev = 0, sms = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    printf("device %s, %d SMs\n", prop.name, sms);
    const Shape shapes[] = {{"4096x4096", 4096, 4096}, {"4096x12288", 4096, 12288}, {"4096x22016", 4096, 22016},
                            {"11008x4096", 11008, 4096}, {"4096x32000", 4096, 32000}};
    const size_t pool_bytes = 512ull << 20;
    char* pool;
    CK(cudaMalloc(&pool, pool_bytes));
    CK(cudaMemset(pool, 1, pool_bytes));
    unsigned* sink;
    CK(cudaMalloc(&sink, 16));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    // 1 GiB device copy as the yardstick
    {
        char* b;
        CK(cudaMalloc(&b, 1ull << 30));
        char* c;
        CK(cudaMalloc(&c, 1ull << 30));
        CK(cudaMemcpyAsync(c, b, 1ull << 30, cudaMemcpyDeviceToDevice, s));
        CK(cudaEventRecord(e0, s));
        for (int i = 0; i < 5; ++i) CK(cudaMemcpyAsync(c, b, 1ull << 30, cudaMemcpyDeviceToDevice, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        printf("D2D copy 1 GiB: %.0f GB/s (read + write)\n", 2.0 * 5 * (1ull << 30) / (ms * 1e-3) / 1e9);
        CK(cudaFree(b));
        CK(cudaFree(c));
    }

    for (const Shape& sh : shapes)
    {
        const size_t bytes = (size_t)sh.K / 8 * sh.N * 4;
        const int sets = (int)std::min<size_t>(64, pool_bytes / bytes);
        const int reps = 64;
        auto time_graph = [&](auto launch) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            for (int r = 0; r < reps; ++r) launch(pool + (size_t)(r % sets) * bytes);
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            CK(cudaGraphLaunch(ge, s));
            CK(cudaStreamSynchronize(s));
            std::vector<float> t;
            for (int i = 0; i < 15; ++i)
            {
                CK(cudaEventRecord(e0, s));
                CK(cudaGraphLaunch(ge, s));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                t.push_back(ms * 1000.0f / reps);
            }
            std::sort(t.begin(), t.end());
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
            return t[t.size() / 2];
        };
        printf("%-11s %6.2f MB, floor at 3000 GB/s %.2f us\n", sh.name, bytes / 1e6, bytes / 3000e3);
        for (int bps : {1, 2, 3, 4, 8})
        {
            const int blocks = bps * sms;
            float us = time_graph([&](char* p) {
                read_contig<8><<<blocks, 256, 0, s>>>(reinterpret_cast<const uint4*>(p), bytes / 16, sink);
            });
            printf("  contiguous  %4d blocks (%d/SM)       %7.2f us %6.0f GB/s\n", blocks, bps, us, bytes / (us * 1e3));
        }
        const int Kp = sh.K / 8;
        for (int tn : {32, 64, 128})
            for (int splits : {1, 2, 4, 8})
            {
                const int tiles = (sh.N + tn - 1) / tn;
                const int rps = (Kp + splits - 1) / splits;
                const int trows = 256 / (tn / 4);
                const int rpt = (rps + trows - 1) / trows;
                float us = time_graph([&](char* p) {
                    read_gemv<4><<<dim3(tiles, splits), 256, 0, s>>>(reinterpret_cast<const uint32_t*>(p), Kp, sh.N, tn,
                                                                     rps, rpt, sink);
                });
                printf("  gemv layout tn %3d splits %d (%5d blocks, %3d rows/thread) %7.2f us %6.0f GB/s\n", tn, splits,
                       tiles * splits, rpt, us, bytes / (us * 1e3));
            }
    }
    CK(cudaGetLastError());
    return 0;
}
