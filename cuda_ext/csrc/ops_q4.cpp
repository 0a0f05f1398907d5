// Torch wrappers for the q4 kernels: argument checks, device guard, current stream, launch check.
#include "ops.h"
#include "checks.h"
#include "q4_gemm.cuh"
#include "q4_dequant.cuh"
#include "q4_mma.cuh"
#include "q4_wgmma.cuh"
#include "dense_gemv.cuh"
#include "launch.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace {

// The act-order permutation's data pointer as the kernels take it: int32 or int64 (the other null).
void perm_ptrs(const std::optional<torch::Tensor>& perm, const int32_t*& p32, const int64_t*& p64)
{
    p32 = nullptr;
    p64 = nullptr;
    if (!perm.has_value()) return;
    if (perm->scalar_type() == torch::kInt64) p64 = perm->data_ptr<int64_t>();
    else p32 = perm->data_ptr<int32_t>();
}

// Per-device split-K tile counters. Zeroed once; each kernel leaves them zero again, so they are
// safe under CUDA graph replay. One stream at a time per device (as the engine runs).
int* tile_counters(const torch::Device& device)
{
    // Deliberately never freed: a static tensor destroyed at exit can outlive the allocator.
    static std::mutex mu;
    static std::vector<torch::Tensor*> buffers;
    std::lock_guard<std::mutex> lock(mu);
    const int index = device.index();
    if ((int)buffers.size() <= index) buffers.resize(index + 1, nullptr);
    if (!buffers[index])
    {
        EXL_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                    "q4_gemm_small: the first split-K call on ", device, " must run before CUDA graph capture "
                    "(warm up once eagerly)");
        buffers[index] = new torch::Tensor(
            torch::zeros({Q4_COUNTERS}, torch::TensorOptions().dtype(torch::kInt32).device(device)));
    }
    return buffers[index]->data_ptr<int>();
}

// row_strided: qweight, scales and offsets may be column slices of wider tensors (rows contiguous,
// the same row stride for scales and offsets): q4_dequant takes them, the GEMM kernel does not.
void check_q4_weights(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& offsets,
                      const std::optional<torch::Tensor>& perm, int64_t& K, int64_t& N, int64_t& groups,
                      bool row_strided = false)
{
    EXL_CHECK_CUDA(qweight);
    EXL_CHECK_DTYPE(qweight, torch::kInt32);
    EXL_CHECK_DIM(qweight, 2);
    if (row_strided)
    {
        EXL_CHECK(qweight.stride(1) == 1 && scales.dim() == 2 && scales.stride(1) == 1 && offsets.dim() == 2 &&
                      offsets.stride(1) == 1 && scales.stride(0) == offsets.stride(0) &&
                      qweight.stride(0) % 4 == 0 && scales.stride(0) % 4 == 0,
                  "qweight, scales and offsets must have contiguous rows, row strides a multiple of 4 (scales and "
                  "offsets with one row stride)");
    }
    else
    {
        EXL_CHECK_CONTIG(qweight);
    }
    EXL_CHECK_ALIGNED(qweight, 16);
    K = qweight.size(0) * 8;
    N = qweight.size(1);
    EXL_CHECK(N % 4 == 0, "qweight.size(1) (N=", N, ") must be a multiple of 4");

    EXL_CHECK_DTYPE(scales, torch::kFloat16);
    EXL_CHECK_DTYPE(offsets, torch::kFloat16);
    EXL_CHECK_DIM(scales, 2);
    if (!row_strided)
    {
        EXL_CHECK_CONTIG(scales);
        EXL_CHECK_CONTIG(offsets);
    }
    EXL_CHECK_SIZE(scales, 1, N);
    EXL_CHECK(offsets.sizes() == scales.sizes(), "offsets must have the shape of scales ", scales.sizes(),
                " (got ", offsets.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(qweight, scales);
    EXL_CHECK_SAME_DEVICE(qweight, offsets);
    EXL_CHECK_ALIGNED(scales, 8);  // 8-byte loads of 4 columns
    EXL_CHECK_ALIGNED(offsets, 8);
    groups = scales.size(0);
    EXL_CHECK(groups > 0 && K % groups == 0, "scales.size(0) (", groups, " groups) must divide K=", K);
    EXL_CHECK((K / groups) % 8 == 0, "group size K / groups = ", K / groups, " must be a multiple of 8");
    if (perm.has_value())
    {
        const auto& p = *perm;
        EXL_CHECK(p.scalar_type() == torch::kInt64 || p.scalar_type() == torch::kInt32,
                    "perm must be int64 or int32 (got ", p.scalar_type(), ")");
        EXL_CHECK_DIM(p, 1);
        EXL_CHECK_SIZE(p, 0, K);
        EXL_CHECK_CONTIG(p);
        EXL_CHECK_SAME_DEVICE(qweight, p);
    }
}

struct DeviceInfo
{
    int sm_count = 0;
    int smem_optin = 0;
    int cc_major = 0;
};

// Multiprocessor count and opt-in shared memory per block, read once per device.
DeviceInfo device_info(int device)
{
    static std::mutex mu;
    static std::vector<DeviceInfo> cache;
    std::lock_guard<std::mutex> lock(mu);
    if ((int)cache.size() <= device) cache.resize(device + 1);
    DeviceInfo& d = cache[device];
    if (d.sm_count == 0)
    {
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    }
    return d;
}

Q4GemmPlan make_plan(int M, int K, int N, int groups, int device, int tn, int splits, int variant, int pdl)
{
    const DeviceInfo d = device_info(device);
    return q4_gemm_plan(M, K, N, groups, d.sm_count, (size_t)d.smem_optin, d.cc_major, tn, splits, variant, pdl);
}

// pdl < 0: automatic (see launch.h); 0 off, 1 / 2 forced on (see Q4GemmPlan::pdl; for tuning and tests).
int resolve_pdl(int64_t pdl, int device, int64_t K, int64_t N)
{
    return pdl >= 0 ? (int)pdl : (pdl_auto(device) ? pdl_mode_default((double)K * N / 2) : 0);
}

// What the two dequantizing wrappers share: the checked weights (column slices allowed), their data and
// act-order pointers, and the launcher of their layout.
struct DequantSource
{
    int64_t K = 0, N = 0, groups = 0, ldq = 0, lds = 0;
    const uint32_t* qweight = nullptr;
    const half* scales = nullptr;
    const half* offsets = nullptr;
    const int32_t* perm32 = nullptr;
    const int64_t* perm64 = nullptr;
    decltype(&q4_dequant_launch) launch = nullptr;

    // Dequantize columns [c0, c0 + n) into out [K, n].
    cudaError_t run(int64_t c0, int64_t n, half* out, bool pdl, cudaStream_t stream) const
    {
        return launch(qweight + c0, scales + c0, offsets + c0, perm32, perm64, out, (int)K, (int)n, (int)groups,
                      ldq, lds, pdl, stream);
    }
};

DequantSource dequant_source(const char* who, const torch::Tensor& qweight, const torch::Tensor& scales,
                             const torch::Tensor& offsets, const std::optional<torch::Tensor>& perm, bool mma)
{
    DequantSource d;
    check_q4_weights(qweight, scales, offsets, perm, d.K, d.N, d.groups, /*row_strided=*/true);
    EXL_CHECK(!mma || q4_mma_supported((int)d.K, (int)d.N, (int)d.groups), who, ": K=", d.K, " N=", d.N,
              " groups=", d.groups, " has no mma layout (K % 64, N % 16, group size 32 or a multiple of 64)");
    d.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
    d.scales = reinterpret_cast<const half*>(scales.data_ptr<at::Half>());
    d.offsets = reinterpret_cast<const half*>(offsets.data_ptr<at::Half>());
    perm_ptrs(perm, d.perm32, d.perm64);
    d.ldq = qweight.stride(0);
    d.lds = scales.stride(0);
    d.launch = mma ? q4_dequant_mma_launch : q4_dequant_launch;
    return d;
}

}  // namespace

void q4_gemm_small(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& offsets, const std::optional<torch::Tensor>& perm,
                   const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                   torch::Tensor& out, int64_t tn, int64_t splits, int64_t variant, int64_t pdl,
                   const std::optional<torch::Tensor>& norm_weight, double norm_eps, bool silu_up, bool mma)
{
    int64_t K, N, groups;
    check_q4_weights(qweight, scales, offsets, perm, K, N, groups);
    EXL_CHECK_DTYPE(x, torch::kFloat16);
    EXL_CHECK_DIM(x, 2);
    EXL_CHECK_CONTIG(x);
    EXL_CHECK_SAME_DEVICE(x, qweight);
    EXL_CHECK_ALIGNED(x, 16);
    EXL_CHECK(!(silu_up && norm_weight.has_value()), "q4_gemm_small: norm_weight and silu_up cannot be combined");
    if (silu_up)
    {
        EXL_CHECK(x.size(1) == 2 * K, "with silu_up, x must be [M, 2K] = gate|up with K=", K, " (got shape ",
                  x.sizes(), ")");
    }
    else
    {
        EXL_CHECK_SIZE(x, 1, K);
    }
    if (norm_weight.has_value())
    {
        EXL_CHECK_DTYPE((*norm_weight), torch::kFloat32);
        EXL_CHECK_CONTIG((*norm_weight));
        EXL_CHECK_SAME_DEVICE((*norm_weight), qweight);
        EXL_CHECK(norm_weight->numel() == K, "norm_weight must have K=", K, " elements (got ", norm_weight->sizes(), ")");
    }
    const int64_t M = x.size(0);
    EXL_CHECK(M >= 1 && M <= Q4_MAX_ROWS, "q4_gemm_small takes 1..", Q4_MAX_ROWS, " rows (got M=", M, ")");
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_CONTIG(out);
    EXL_CHECK_SAME_DEVICE(out, qweight);
    EXL_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N,
                "out must have shape [", M, ", ", N, "] (got ", out.sizes(), ")");
    if (bias.has_value())
    {
        EXL_CHECK_DTYPE((*bias), torch::kFloat16);
        EXL_CHECK_CONTIG((*bias));
        EXL_CHECK_SAME_DEVICE((*bias), qweight);
        EXL_CHECK(bias->numel() == N, "bias must have N=", N, " elements (got ", bias->sizes(), ")");
    }
    if (residual.has_value())
    {
        EXL_CHECK_DTYPE((*residual), torch::kFloat16);
        EXL_CHECK_CONTIG((*residual));
        EXL_CHECK_SAME_DEVICE((*residual), qweight);
        EXL_CHECK(residual->numel() == M * N, "residual must have shape [", M, ", ", N, "] (got ", residual->sizes(), ")");
    }

    const c10::cuda::CUDAGuard guard(qweight.device());
    const int device = qweight.device().index();
    const int pdl_mode = resolve_pdl(pdl, device, K, N);
    Q4GemmPlan plan{};
    Q4MmaPlan mplan{};
    if (mma)
    {
        const DeviceInfo d = device_info(device);
        mplan = q4_mma_plan((int)M, (int)K, (int)N, (int)groups, d.sm_count, (size_t)d.smem_optin, d.cc_major,
                            (int)splits, (int)variant, pdl_mode);
    }
    else
    {
        plan = make_plan((int)M, (int)K, (int)N, (int)groups, device, (int)tn, (int)splits, (int)variant, pdl_mode);
    }
    const int nsplits = mma ? mplan.splits : plan.splits;
    EXL_CHECK(nsplits > 0, "q4_gemm_small: no kernel configuration for M=", M, " K=", K, " N=", N,
                " groups=", groups, " tn=", tn, " splits=", splits, mma ? " (mma layout)" : "");

    torch::Tensor workspace;
    Q4GemmArgs a{};
    if (nsplits > 1)
    {
        workspace = torch::empty({(int64_t)nsplits * M * N}, x.options().dtype(torch::kFloat32));
        a.workspace = workspace.data_ptr<float>();
        a.counters = tile_counters(qweight.device());
    }
    a.x = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
    a.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
    a.scales = reinterpret_cast<const half*>(scales.data_ptr<at::Half>());
    a.offsets = reinterpret_cast<const half*>(offsets.data_ptr<at::Half>());
    perm_ptrs(perm, a.perm32, a.perm64);
    a.bias = bias.has_value() ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
    a.residual = residual.has_value() ? reinterpret_cast<const half*>(residual->data_ptr<at::Half>()) : nullptr;
    a.out = reinterpret_cast<half*>(out.data_ptr<at::Half>());
    a.x_stride = (int)x.size(1);
    a.norm_w = norm_weight.has_value() ? norm_weight->data_ptr<float>() : nullptr;
    a.norm_eps = (float)norm_eps;
    a.x_up = silu_up ? a.x + K : nullptr;
    a.M = (int)M;
    a.K = (int)K;
    a.N = (int)N;
    a.groups = (int)groups;
    a.gpr = (int)(K / groups / 8);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(mma ? q4_mma_launch(mplan, a, stream) : q4_gemm_small_launch(plan, a, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> q4_gemm_plan_info(int64_t M, int64_t K, int64_t N, int64_t groups, int64_t device,
                                       int64_t tn, int64_t splits, int64_t variant)
{
    const Q4GemmPlan p = make_plan((int)M, (int)K, (int)N, (int)groups, (int)device, (int)tn, (int)splits, (int)variant, 0);
    return {p.tn, p.splits, p.rows_per_split, p.rows_per_trow, p.variant, p.tiles, (int64_t)p.smem_bytes};
}

std::string q4_gemm_variant_name_py(int64_t M, int64_t variant) { return q4_gemm_variant_name((int)M, (int)variant); }

int64_t q4_gemm_num_variants_py(int64_t M) { return q4_gemm_num_variants((int)M); }

void q4_dequant(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& offsets,
                const std::optional<torch::Tensor>& perm, torch::Tensor& out, bool mma)
{
    const DequantSource d = dequant_source("q4_dequant", qweight, scales, offsets, perm, mma);
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_CONTIG(out);
    EXL_CHECK_SAME_DEVICE(out, qweight);
    EXL_CHECK_ALIGNED(out, 8);
    EXL_CHECK(out.dim() == 2 && out.size(0) == d.K && out.size(1) == d.N,
                "out must have shape [", d.K, ", ", d.N, "] (got ", out.sizes(), ")");

    const c10::cuda::CUDAGuard guard(qweight.device());
    C10_CUDA_CHECK(d.run(0, d.N, reinterpret_cast<half*>(out.data_ptr<at::Half>()), pdl_auto(qweight.device().index()),
                         c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> q4_mma_plan_info(int64_t M, int64_t K, int64_t N, int64_t groups, int64_t device, int64_t splits,
                                      int64_t variant)
{
    const DeviceInfo d = device_info((int)device);
    const Q4MmaPlan p = q4_mma_plan((int)M, (int)K, (int)N, (int)groups, d.sm_count, (size_t)d.smem_optin, d.cc_major,
                                    (int)splits, (int)variant, 0);
    return {p.tn, p.splits, p.units_per_split, p.chunks_per_unit, p.variant, p.tiles, (int64_t)p.smem_bytes,
            p.fold_steps};
}

std::string q4_mma_variant_name_py(int64_t variant) { return q4_mma_variant_name((int)variant); }

int64_t q4_mma_num_variants_py() { return q4_mma_num_variants(); }

bool q4_mma_supported_py(int64_t K, int64_t N, int64_t groups) { return q4_mma_supported((int)K, (int)N, (int)groups); }

namespace {

// EXLLAMA_WGMMA_PERSISTENT=0|1 (A/B runs): one block a tile, or one a multiprocessor looping over tiles.
bool wgmma_persistent()
{
    static const bool on = [] {
        const char* e = std::getenv("EXLLAMA_WGMMA_PERSISTENT");
        return !(e && std::string(e) == "0");
    }();
    return on;
}

// The fused Hopper GEMM (q4_wgmma.cuh) when it takes the problem; false to fall back.
bool try_wgmma(const DequantSource& d, const torch::Tensor& x, const std::optional<torch::Tensor>& perm,
               const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
               torch::Tensor& out, int64_t bn, bool mma)
{
    const int device = x.device().index();
    if (!q4_wgmma_available(device, capturing()))
    {
        EXL_CHECK(bn <= 0, "q4_matmul_prompt: this device or build has no fused GEMM (bn=", bn, ")");
        return false;
    }
    // act-order: gather x's columns once (the kernel reads the weights' sorted K order)
    const torch::Tensor xs = perm.has_value() ? x.index_select(1, *perm) : (x.stride(1) == 1 ? x : x.contiguous());
    Q4WgmmaArgs a{};
    a.x = reinterpret_cast<const half*>(xs.data_ptr<at::Half>());
    a.qweight = d.qweight;
    a.scales = d.scales;
    a.offsets = d.offsets;
    a.bias = bias.has_value() ? reinterpret_cast<const half*>(bias->data_ptr<at::Half>()) : nullptr;
    a.residual = residual.has_value() ? reinterpret_cast<const half*>(residual->data_ptr<at::Half>()) : nullptr;
    a.out = reinterpret_cast<half*>(out.data_ptr<at::Half>());
    a.M = (int)xs.size(0);
    a.K = (int)d.K;
    a.N = (int)d.N;
    a.groups = (int)d.groups;
    a.mma = mma;
    a.ldx = xs.stride(0);
    a.ldq = d.ldq;
    a.lds = d.lds;
    a.ldr = residual.has_value() ? residual->stride(0) : 0;
    a.ldo = out.stride(0);
    const bool takes = a.M > 0 && (!residual.has_value() || residual->stride(1) == 1) &&
                       (!bias.has_value() || bias->is_contiguous()) && q4_wgmma_supported(a);
    if (!takes)
    {
        EXL_CHECK(bn <= 0, "q4_matmul_prompt: the fused GEMM (bn=", bn, ") does not take this problem or device");
        return false;
    }
    const DeviceInfo di = device_info(device);
    const Q4WgmmaPlan plan = q4_wgmma_plan(a.M, a.N, di.sm_count, (size_t)di.smem_optin, (int)bn, wgmma_persistent());
    EXL_CHECK(plan.bn > 0, "q4_matmul_prompt: no fused GEMM plan for bn=", bn);
    C10_CUDA_CHECK(q4_wgmma_launch(plan, a, c10::cuda::getCurrentCUDAStream(device)));
    return true;
}

}  // namespace

std::vector<int64_t> q4_wgmma_plan_info(int64_t M, int64_t N, int64_t device, int64_t bn)
{
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
    if (!q4_wgmma_available((int)device, capturing())) return {0, 0, 0, 0};
    const DeviceInfo d = device_info((int)device);
    const Q4WgmmaPlan p = q4_wgmma_plan((int)M, (int)N, d.sm_count, (size_t)d.smem_optin, (int)bn, wgmma_persistent());
    return {p.bn, p.stages, (int64_t)p.smem_bytes, p.blocks};
}

// bn: -1 dequantize + cuBLAS; 0 the fused Hopper GEMM where it applies (sm_90a build and GPU, K % 64, N % 16,
// power-of-two groups), else the former; > 0 the fused GEMM with that token tile (an error where it does not apply).
void q4_matmul_prompt(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                      const torch::Tensor& offsets, const std::optional<torch::Tensor>& perm,
                      const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                      torch::Tensor& out, bool mma, int64_t slice_bytes, int64_t bn)
{
    const DequantSource d = dequant_source("q4_matmul_prompt", qweight, scales, offsets, perm, mma);
    const int64_t K = d.K, N = d.N;
    EXL_CHECK_DTYPE(x, torch::kFloat16);
    EXL_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, K=", K, "] (got ", x.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(x, qweight);
    const int64_t M = x.size(0);
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.stride(1) == 1,
              "out must be [", M, ", ", N, "] with contiguous rows (got ", out.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(out, qweight);
    if (residual.has_value())
        EXL_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == torch::kFloat16,
                  "residual must be fp16 [", M, ", ", N, "] (got ", residual->sizes(), ")");
    if (bias.has_value())
        EXL_CHECK(bias->numel() == N && bias->scalar_type() == torch::kFloat16, "bias must be fp16 [", N, "]");

    // out may be the residual itself (the model accumulates into its residual stream in place)
    const bool residual_in_out = residual.has_value() && residual->data_ptr() == out.data_ptr() &&
                                 residual->strides() == out.strides();
    const c10::cuda::CUDAGuard guard(qweight.device());
    const int device = qweight.device().index();
    if (bn >= 0 && try_wgmma(d, x, perm, bias, residual, out, bn, mma)) return;
    // Column slices of at most slice_bytes of fp16 weights, whole 128-column blocks.
    int64_t width = N;
    if (K * N * 2 > slice_bytes) width = std::max<int64_t>(128, slice_bytes / (2 * K) / 128 * 128);
    width = std::min(width, N);
    const int nslices = (int)((N + width - 1) / width);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
    const torch::Tensor buf = torch::empty({K * width}, x.options());

    // One slice: the weights dequantized into the buffer, then out[:, c0:c1] by cuBLAS.
    for (int i = 0; i < nslices; ++i)
    {
        const int64_t c0 = i * width, w = std::min(width, N - c0);
        C10_CUDA_CHECK(d.run(c0, w, reinterpret_cast<half*>(buf.data_ptr<at::Half>()), false, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const torch::Tensor wt = buf.narrow(0, 0, K * w).view({K, w});
        torch::Tensor part = out.narrow(1, c0, w);
        if (residual_in_out && !bias.has_value())
        {
            at::addmm_out(part, part, x, wt);         // beta = 1 on out itself: no copy of the residual
        }
        else if (residual.has_value() || bias.has_value())
        {
            torch::Tensor base = residual.has_value() ? residual->narrow(1, c0, w) : bias->narrow(0, c0, w);
            if (residual.has_value() && bias.has_value()) base = base + bias->narrow(0, c0, w);
            at::addmm_out(part, base, x, wt);
        }
        else
        {
            at::mm_out(part, x, wt);
        }
    }
}

void dense_gemv(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& residual,
                torch::Tensor& out, const std::optional<torch::Tensor>& norm_weight, double norm_eps)
{
    EXL_CHECK_CUDA(weight);
    EXL_CHECK_DTYPE(weight, torch::kFloat16);
    EXL_CHECK(weight.dim() == 2 && weight.stride(1) == 1 && weight.stride(0) % 8 == 0,
              "weight must be fp16 [N, K] with contiguous rows 16-byte aligned (got ", weight.sizes(), ")");
    EXL_CHECK_ALIGNED(weight, 16);
    const int64_t N = weight.size(0), K = weight.size(1);
    EXL_CHECK_DTYPE(x, torch::kFloat16);
    EXL_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "x must be contiguous [M, K=", K, "] (got ",
              x.sizes(), ")");
    EXL_CHECK_ALIGNED(x, 16);
    EXL_CHECK(K % 8 == 0, "K=", K, " must be a multiple of 8");
    const int64_t M = x.size(0);
    EXL_CHECK(M >= 1 && M <= Q4_MAX_ROWS, "dense_gemv takes 1..", Q4_MAX_ROWS, " rows (got M=", M, ")");
    EXL_CHECK(out.scalar_type() == torch::kFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == M &&
                  out.size(1) == N, "out must be contiguous fp16 [", M, ", ", N, "]");
    for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &out})
        EXL_CHECK(t->device() == weight.device(), "dense_gemv: every tensor must be on the weight's device");
    Q4GemmArgs a{};
    if (residual.has_value())
    {
        EXL_CHECK(residual->scalar_type() == torch::kFloat16 && residual->is_contiguous() && residual->numel() == M * N,
                  "residual must be contiguous fp16 [", M, ", ", N, "]");
        a.residual = reinterpret_cast<const half*>(residual->data_ptr<at::Half>());
    }
    if (norm_weight.has_value())
    {
        EXL_CHECK(norm_weight->scalar_type() == torch::kFloat32 && norm_weight->is_contiguous() &&
                      norm_weight->numel() == K && norm_weight->device() == weight.device(),
                  "norm_weight must be contiguous fp32 [K] on the weight's device");
        a.norm_w = norm_weight->data_ptr<float>();
    }
    const c10::cuda::CUDAGuard guard(weight.device());
    const int device = weight.device().index();
    EXL_CHECK((size_t)M * K * 4 <= (size_t)device_info(device).smem_optin, "dense_gemv: M * K = ", M * K,
              " fp32 values do not fit in shared memory");
    a.x = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
    a.out = reinterpret_cast<half*>(out.data_ptr<at::Half>());
    a.norm_eps = (float)norm_eps;
    a.M = (int)M;
    a.K = (int)K;
    a.N = (int)N;
    C10_CUDA_CHECK(dense_gemv_launch(a, reinterpret_cast<const half*>(weight.data_ptr<at::Half>()), weight.stride(0),
                                     device_info(device).sm_count, pdl_auto(device), c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
