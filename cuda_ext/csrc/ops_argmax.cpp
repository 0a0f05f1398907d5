// Torch wrapper for argmax_rows (the greedy pick of a captured decode step).
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "argmax.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

void argmax_rows(const torch::Tensor& logits, torch::Tensor& res, const std::optional<torch::Tensor>& ids)
{
    EXL_CHECK_CUDA(logits);
    EXL_CHECK(logits.scalar_type() == torch::kFloat16 || logits.scalar_type() == torch::kFloat32,
              "logits must be float16 or float32 (got ", logits.scalar_type(), ")");
    EXL_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be [B, V > 0] with contiguous rows (got ", logits.sizes(), ")");
    EXL_CHECK(logits.size(1) < (int64_t)1 << 31, "argmax_rows: V must be below 2^31");
    const int64_t B = logits.size(0);
    EXL_CHECK_DTYPE(res, torch::kInt64);
    EXL_CHECK(res.is_contiguous() && res.dim() == 2 && res.size(0) == B && res.size(1) == 2,
              "res must be contiguous int64 [", B, ", 2] (got ", res.sizes(), ")");
    EXL_CHECK_SAME_DEVICE(res, logits);
    int64_t* ids_ptr = nullptr;
    int64_t ids_stride = 0;
    if (ids.has_value())
    {
        EXL_CHECK_DTYPE((*ids), torch::kInt64);
        EXL_CHECK(ids->numel() == B && ids->device() == logits.device(), "ids must hold B=", B,
                  " int64 values on the logits' device (got ", ids->sizes(), ")");
        ids_ptr = ids->data_ptr<int64_t>();
        ids_stride = B > 1 ? ids->view({B, -1}).stride(0) : 1;
    }
    const c10::cuda::CUDAGuard guard(logits.device());
    C10_CUDA_CHECK(argmax_rows_launch(logits.data_ptr(), logits.scalar_type() == torch::kFloat16, logits.stride(0),
                                      (int)B, (int)logits.size(1), res.data_ptr<int64_t>(), ids_ptr, ids_stride,
                                      pdl_auto(logits.device().index()), c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
