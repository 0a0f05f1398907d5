// Torch wrapper for embed_gather (the embedding table in pinned host memory).
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "embed.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

void embed_gather(const torch::Tensor& ids, const torch::Tensor& table, torch::Tensor& out)
{
    EXL_CHECK_CUDA(ids);
    EXL_CHECK_DTYPE(ids, torch::kInt64);
    EXL_CHECK_CONTIG(ids);
    EXL_CHECK(!table.is_cuda() && table.is_pinned(), "table must be in pinned host memory (tensor.pin_memory())");
    EXL_CHECK_DTYPE(table, torch::kFloat16);
    EXL_CHECK_DIM(table, 2);
    EXL_CHECK_CONTIG(table);
    EXL_CHECK(table.size(1) % 8 == 0, "table rows must be a multiple of 8 wide (got ", table.size(1), ")");
    EXL_CHECK_ALIGNED(table, 16);
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_CONTIG(out);
    EXL_CHECK_SAME_DEVICE(out, ids);
    EXL_CHECK_ALIGNED(out, 16);
    EXL_CHECK(out.numel() == ids.numel() * table.size(1), "out must hold ids.numel() x ", table.size(1),
              " values (got shape ", out.sizes(), ")");

    const c10::cuda::CUDAGuard guard(ids.device());
    void* dev_table = nullptr;
    // Pinned memory is mapped for every device under unified addressing; ask for the device-side address.
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev_table, table.data_ptr(), 0));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(embed_gather_launch(ids.data_ptr<int64_t>(), reinterpret_cast<const half*>(dev_table),
                                       reinterpret_cast<half*>(out.data_ptr<at::Half>()), (int)ids.numel(),
                                       table.size(0), (int)table.size(1), pdl_auto(ids.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
