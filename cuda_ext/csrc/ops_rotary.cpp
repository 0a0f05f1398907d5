// Torch wrapper for the in-place rotary embedding.
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "rotary.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& positions)
{
    EXL_CHECK_CUDA(x);
    EXL_CHECK_DTYPE(x, torch::kFloat16);
    EXL_CHECK_DIM(x, 4);
    EXL_CHECK(x.stride(3) == 1, "x [B, T, H, Dh] must be contiguous in Dh (strides ", x.strides(), ")");
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), Dh = x.size(3);
    EXL_CHECK(Dh % 2 == 0, "head dim Dh=", Dh, " must be even");
    check_rope_tables(cos, sin, Dh, x.device());
    EXL_CHECK(positions.scalar_type() == torch::kInt32 || positions.scalar_type() == torch::kInt64,
                "positions must be int32 or int64 (got ", positions.scalar_type(), ")");
    EXL_CHECK_DIM(positions, 2);
    EXL_CHECK(positions.size(0) == B && positions.size(1) == T, "positions must have shape [", B, ", ", T,
                "] (got ", positions.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(x, positions);

    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(rotary_launch(reinterpret_cast<half*>(x.data_ptr<at::Half>()), x.stride(0), x.stride(1), x.stride(2),
                                 (int)B, (int)T, (int)H, (int)Dh, cos.data_ptr<float>(), sin.data_ptr<float>(),
                                 (int)cos.size(0), positions.data_ptr(), positions.scalar_type() == torch::kInt64,
                                 positions.stride(0), positions.stride(1), pdl_auto(x.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
