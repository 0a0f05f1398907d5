// Argument checks shared by the torch wrappers (ops_*.cpp). Messages name the argument and what was expected.
//
// Messages are built with std::string and std::to_string only, then passed to TORCH_CHECK as one
// string: multi-argument TORCH_CHECK formats through std::ostringstream inside this library, and
// with a statically linked libstdc++ (seen with the GPU machine's toolchain) its number formatting
// crashed the process instead of raising.
#pragma once

#include <torch/extension.h>

#include <string>
#include <type_traits>

namespace exl {

inline std::string to_str(const char* s) { return s; }
inline std::string to_str(const std::string& s) { return s; }
inline std::string to_str(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_str(const c10::Device& d) { return d.str(); }
inline std::string to_str(c10::IntArrayRef a)
{
    std::string r = "[";
    for (size_t i = 0; i < a.size(); ++i)
    {
        if (i) r += ", ";
        r += std::to_string(a[i]);
    }
    return r + "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline std::string to_str(T v) { return std::to_string(v); }

template <typename... A>
inline std::string cat(const A&... a)
{
    std::string r;
    ((r += to_str(a)), ...);
    return r;
}

}  // namespace exl

// TORCH_CHECK with a message built by exl::cat (only evaluated when the check fails).
#define EXL_CHECK(cond, ...) TORCH_CHECK((cond), ::exl::cat(__VA_ARGS__))

#define EXL_CHECK_CUDA(t) EXL_CHECK((t).is_cuda(), #t " must be a CUDA tensor (got ", (t).device(), ")")
#define EXL_CHECK_DTYPE(t, dt) \
    EXL_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), " (got ", (t).scalar_type(), ")")
#define EXL_CHECK_CONTIG(t) EXL_CHECK((t).is_contiguous(), #t " must be contiguous")
#define EXL_CHECK_DIM(t, n) EXL_CHECK((t).dim() == (n), #t " must have ", n, " dimensions (got shape ", (t).sizes(), ")")
#define EXL_CHECK_SIZE(t, d, v) \
    EXL_CHECK((t).size(d) == (v), #t ".size(", d, ") must be ", v, " (got shape ", (t).sizes(), ")")
#define EXL_CHECK_SAME_DEVICE(a, b) \
    EXL_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device (", (a).device(), " vs ", \
              (b).device(), ")")
#define EXL_CHECK_ALIGNED(t, bytes) \
    EXL_CHECK((reinterpret_cast<uintptr_t>((t).data_ptr()) % (bytes)) == 0, #t " must be ", bytes, \
              "-byte aligned (storage offset ", (t).storage_offset(), ")")

// Rotary tables as the kernels take them: contiguous fp32 cos and sin [P, D / 2] on `device`.
inline void check_rope_tables(const torch::Tensor& cos, const torch::Tensor& sin, int64_t D, const c10::Device& device)
{
    EXL_CHECK_DTYPE(cos, torch::kFloat32);
    EXL_CHECK_DTYPE(sin, torch::kFloat32);
    EXL_CHECK_DIM(cos, 2);
    EXL_CHECK_CONTIG(cos);
    EXL_CHECK_CONTIG(sin);
    EXL_CHECK_SIZE(cos, 1, D / 2);
    EXL_CHECK(sin.sizes() == cos.sizes(), "sin must have the shape of cos ", cos.sizes(), " (got ", sin.sizes(), ")");
    EXL_CHECK(cos.device() == device && sin.device() == device, "cos and sin must be on ", device, " (got ",
              cos.device(), ", ", sin.device(), ")");
}
