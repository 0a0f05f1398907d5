// Torch wrappers for rms_norm and add_rms_norm.
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "norm.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

void check_norm_args(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& out)
{
    EXL_CHECK_CUDA(x);
    EXL_CHECK_DTYPE(x, torch::kFloat16);
    EXL_CHECK_DIM(x, 2);
    EXL_CHECK(x.stride(1) == 1, "x must have contiguous rows (stride ", x.strides(), ")");
    EXL_CHECK(weight.scalar_type() == torch::kFloat16 || weight.scalar_type() == torch::kFloat32,
                "weight must be float16 or float32 (got ", weight.scalar_type(), ")");
    EXL_CHECK_CONTIG(weight);
    EXL_CHECK(weight.numel() == x.size(1), "weight must have D=", x.size(1), " elements (got ", weight.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(x, weight);
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_SAME_DEVICE(x, out);
    EXL_CHECK(out.sizes() == x.sizes(), "out must have the shape of x ", x.sizes(), " (got ", out.sizes(), ")");
    EXL_CHECK(out.stride(1) == 1, "out must have contiguous rows (stride ", out.strides(), ")");
}

}  // namespace

void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out)
{
    check_norm_args(x, weight, out);
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(rms_norm_launch(reinterpret_cast<const half*>(x.data_ptr<at::Half>()), x.stride(0),
                                   weight.data_ptr(), weight.scalar_type() == torch::kFloat32,
                                   reinterpret_cast<half*>(out.data_ptr<at::Half>()), out.stride(0),
                                   (int)x.size(0), (int)x.size(1), (float)eps, pdl_auto(x.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_rms_norm(torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight, double eps,
                  torch::Tensor& out)
{
    check_norm_args(x, weight, out);
    EXL_CHECK_DTYPE(residual, torch::kFloat16);
    EXL_CHECK_SAME_DEVICE(x, residual);
    EXL_CHECK(residual.sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), " (got ",
                residual.sizes(), ")");
    EXL_CHECK(residual.stride(1) == 1, "residual must have contiguous rows (stride ", residual.strides(), ")");
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(add_rms_norm_launch(reinterpret_cast<half*>(residual.data_ptr<at::Half>()), residual.stride(0),
                                       reinterpret_cast<const half*>(x.data_ptr<at::Half>()), x.stride(0),
                                       weight.data_ptr(), weight.scalar_type() == torch::kFloat32,
                                       reinterpret_cast<half*>(out.data_ptr<at::Half>()), out.stride(0),
                                       (int)x.size(0), (int)x.size(1), (float)eps, pdl_auto(x.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
