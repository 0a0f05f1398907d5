// Host-side launch options shared by the torch wrappers (ops_*.cpp).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

// Whether the current stream is capturing a CUDA graph.
inline bool capturing()
{
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Programmatic dependent launch, automatic choice: on while a CUDA graph is being captured (the
// decode step), on sm_90+, unless EXLLAMA_NO_PDL is set. Eager launches stay plain: the q4 kernel
// reads weights before it waits on the previous kernel, which only a captured step guarantees safe.
// q4 kernels release the next kernel at their start (mode 2) when their weights are >= 4 MiB and
// after their main loop (mode 1) when smaller: measured on an H100, early release gains 3-10% on
// 7B-sized layers but costs up to 40% on SmolLM-sized ones, where a cascade of early-launched
// small kernels crowds the machine (docs/performance.md). EXLLAMA_PDL_MODE=1|2 forces one mode.
inline bool pdl_auto(int device)
{
    static const bool disabled = [] {
        const char* e = std::getenv("EXLLAMA_NO_PDL");
        return e && *e && std::string(e) != "0";
    }();
    if (disabled) return false;
    if (!capturing()) return false;
    static int major[64] = {0};
    if (device < 0 || device >= 64) return false;
    if (major[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device));
    return major[device] >= 9;
}

inline int pdl_mode_default(double weight_bytes)
{
    static const int forced = [] {
        const char* e = std::getenv("EXLLAMA_PDL_MODE");
        if (!e) return 0;
        const std::string v(e);
        return v == "1" ? 1 : (v == "2" ? 2 : 0);
    }();
    if (forced) return forced;
    return weight_bytes >= 4.0 * 1024 * 1024 ? 2 : 1;
}
