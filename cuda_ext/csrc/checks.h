// Argument checks shared by the torch wrappers (ops_*.cpp). Messages name the argument and what was expected.
#pragma once

#include <torch/extension.h>

#define EXL_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor (got ", (t).device(), ")")
#define EXL_CHECK_DTYPE(t, dt) \
    TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", c10::toString(dt), " (got ", (t).scalar_type(), ")")
#define EXL_CHECK_CONTIG(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define EXL_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must have ", n, " dimensions (got shape ", (t).sizes(), ")")
#define EXL_CHECK_SIZE(t, d, v) \
    TORCH_CHECK((t).size(d) == (v), #t ".size(", d, ") must be ", v, " (got shape ", (t).sizes(), ")")
#define EXL_CHECK_SAME_DEVICE(a, b) \
    TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device (", (a).device(), " vs ", (b).device(), ")")
#define EXL_CHECK_ALIGNED(t, bytes) \
    TORCH_CHECK((reinterpret_cast<uintptr_t>((t).data_ptr()) % (bytes)) == 0, #t " must be ", bytes, \
                "-byte aligned (storage offset ", (t).storage_offset(), ")")
