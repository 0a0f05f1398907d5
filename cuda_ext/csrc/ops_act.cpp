// Torch wrapper for silu_mul.
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "act.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

void silu_mul(const torch::Tensor& gate, const torch::Tensor& up, torch::Tensor& out)
{
    EXL_CHECK_CUDA(gate);
    EXL_CHECK_DTYPE(gate, torch::kFloat16);
    EXL_CHECK_DTYPE(up, torch::kFloat16);
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_DIM(gate, 2);
    EXL_CHECK(up.sizes() == gate.sizes(), "up must have the shape of gate ", gate.sizes(), " (got ", up.sizes(), ")");
    EXL_CHECK(out.sizes() == gate.sizes(), "out must have the shape of gate ", gate.sizes(), " (got ", out.sizes(), ")");
    EXL_CHECK(gate.stride(1) == 1 && up.stride(1) == 1 && out.stride(1) == 1,
                "gate, up and out must have contiguous rows");
    EXL_CHECK_SAME_DEVICE(gate, up);
    EXL_CHECK_SAME_DEVICE(gate, out);

    const c10::cuda::CUDAGuard guard(gate.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(silu_mul_launch(reinterpret_cast<const half*>(gate.data_ptr<at::Half>()), gate.stride(0),
                                   reinterpret_cast<const half*>(up.data_ptr<at::Half>()), up.stride(0),
                                   reinterpret_cast<half*>(out.data_ptr<at::Half>()), out.stride(0),
                                   (int)gate.size(0), (int)gate.size(1), pdl_auto(gate.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
