// Torch wrappers for the decode-step kernels (decode.cuh): rope_kv_write and decode_attention.
#include "ops.h"
#include "checks.h"
#include "launch.h"
#include "decode.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <vector>

namespace {

// Per-device counters of the split combine; zeroed once, left zero by every launch (graph-safe).
int* attn_counters(const torch::Device& device)
{
    static std::mutex mu;
    static std::vector<torch::Tensor*> buffers;   // never freed (see ops_q4.cpp)
    std::lock_guard<std::mutex> lock(mu);
    const int index = device.index();
    if ((int)buffers.size() <= index) buffers.resize(index + 1, nullptr);
    if (!buffers[index])
    {
        EXL_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                  "decode_attention: the first call on a device must run before CUDA graph capture (warm up once eagerly)");
        buffers[index] = new torch::Tensor(
            torch::zeros({ATT_COUNTERS}, torch::TensorOptions().dtype(torch::kInt32).device(device)));
    }
    return buffers[index]->data_ptr<int>();
}

int sm_count_of(int device)
{
    static int counts[64] = {0};
    if (device < 0 || device >= 64) return 1;
    if (counts[device] == 0)
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
    return counts[device];
}

// [B, T, heads, D] with the head dim contiguous and even strides (half2 access).
void check_head_view(const torch::Tensor& t, const char* name, int64_t B, int64_t T, int64_t heads, int64_t D)
{
    EXL_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    EXL_CHECK(t.scalar_type() == torch::kFloat16, name, " must be float16 (got ", t.scalar_type(), ")");
    EXL_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == T && t.size(2) == heads && t.size(3) == D,
              name, " must have shape [", B, ", ", T, ", ", heads, ", ", D, "] (got ", t.sizes(), ")");
    EXL_CHECK(t.stride(3) == 1, name, " must be contiguous in the head dim (strides ", t.strides(), ")");
}

void check_cache(const torch::Tensor& c, const char* name, int64_t B, int64_t Hkv, int64_t D)
{
    EXL_CHECK(c.is_cuda(), name, " must be a CUDA tensor");
    EXL_CHECK(c.scalar_type() == torch::kFloat16, name, " must be float16 (got ", c.scalar_type(), ")");
    EXL_CHECK(c.is_contiguous(), name, " must be contiguous");
    EXL_CHECK(c.dim() == 4 && c.size(0) == B && c.size(1) == Hkv && c.size(3) == D,
              name, " must have shape [", B, ", ", Hkv, ", S, ", D, "] (got ", c.sizes(), ")");
}

}  // namespace

void rope_kv_write(torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                   const torch::Tensor& sin, const torch::Tensor& positions, const torch::Tensor& slot,
                   torch::Tensor& k_cache, torch::Tensor& v_cache)
{
    EXL_CHECK(q.dim() == 4, "q must be [B, T, H, D] (got shape ", q.sizes(), ")");
    EXL_CHECK(k.dim() == 4, "k must be [B, T, Hkv, D] (got shape ", k.sizes(), ")");
    const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
    check_head_view(q, "q", B, T, H, D);
    check_head_view(k, "k", B, T, Hkv, D);
    check_head_view(v, "v", B, T, Hkv, D);
    EXL_CHECK(D % 4 == 0, "head dim D=", D, " must be a multiple of 4");
    for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&q, &k, &v})
    {
        EXL_CHECK(t->stride(0) % 2 == 0 && t->stride(1) % 2 == 0 && t->stride(2) % 2 == 0 &&
                      reinterpret_cast<uintptr_t>(t->data_ptr()) % 4 == 0,
                  "q, k and v need even strides and 4-byte aligned rows (strides ", t->strides(), ")");
    }
    check_cache(k_cache, "k_cache", B, Hkv, D);
    check_cache(v_cache, "v_cache", B, Hkv, D);
    EXL_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache");
    check_rope_tables(cos, sin, D, q.device());
    EXL_CHECK(positions.scalar_type() == torch::kInt32 || positions.scalar_type() == torch::kInt64,
              "positions must be int32 or int64 (got ", positions.scalar_type(), ")");
    EXL_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T,
              "positions must have shape [", B, ", ", T, "] (got ", positions.sizes(), ")");
    EXL_CHECK_DTYPE(slot, torch::kInt64);
    EXL_CHECK(slot.numel() >= 1, "slot must hold the cache position");
    for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&k, &v, &positions, &slot, &k_cache, &v_cache})
        EXL_CHECK(t->device() == q.device(), "rope_kv_write: every tensor must be on q's device");

    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    RopeKvArgs a{};
    a.q = reinterpret_cast<half*>(q.data_ptr<at::Half>());
    a.qsb = q.stride(0); a.qst = q.stride(1); a.qsh = q.stride(2);
    a.k = reinterpret_cast<const half*>(k.data_ptr<at::Half>());
    a.ksb = k.stride(0); a.kst = k.stride(1); a.ksh = k.stride(2);
    a.v = reinterpret_cast<const half*>(v.data_ptr<at::Half>());
    a.vsb = v.stride(0); a.vst = v.stride(1); a.vsh = v.stride(2);
    a.B = (int)B; a.T = (int)T; a.H = (int)H; a.Hkv = (int)Hkv; a.D = (int)D;
    a.cos = cos.data_ptr<float>();
    a.sin = sin.data_ptr<float>();
    a.max_pos = (int)cos.size(0);
    a.positions = positions.data_ptr();
    a.pos_is64 = positions.scalar_type() == torch::kInt64;
    a.psb = positions.stride(0); a.pst = positions.stride(1);
    a.slot = slot.data_ptr<int64_t>();
    a.k_cache = reinterpret_cast<half*>(k_cache.data_ptr<at::Half>());
    a.v_cache = reinterpret_cast<half*>(v_cache.data_ptr<at::Half>());
    a.S = (int)k_cache.size(2);
    C10_CUDA_CHECK(rope_kv_write_launch(a, pdl_auto(q.device().index()), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> decode_attention_plan(int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t kv_len,
                                           int64_t device, int64_t splits)
{
    const DecodeAttnPlan p = decode_attention_plan((int)B, (int)Hkv, (int)G, (int)D, (int)kv_len,
                                                   sm_count_of((int)device), (int)splits);
    return {p.splits, p.chunk, (int64_t)p.smem, p.threads};
}

void decode_attention(const torch::Tensor& q, torch::Tensor& k_cache, torch::Tensor& v_cache,
                      const torch::Tensor& pos, const std::optional<torch::Tensor>& pad, int64_t kv_len,
                      torch::Tensor& out, int64_t splits, const std::optional<torch::Tensor>& k,
                      const std::optional<torch::Tensor>& v, const std::optional<torch::Tensor>& cos,
                      const std::optional<torch::Tensor>& sin)
{
    EXL_CHECK(q.dim() == 4, "q must be [B, 1, H, D] (got shape ", q.sizes(), ")");
    EXL_CHECK(k_cache.dim() == 4, "k_cache must be [B, Hkv, S, D] (got shape ", k_cache.sizes(), ")");
    const int64_t B = q.size(0), H = q.size(2), D = q.size(3), Hkv = k_cache.size(1), S = k_cache.size(2);
    check_head_view(q, "q", B, 1, H, D);
    check_cache(k_cache, "k_cache", B, Hkv, D);
    check_cache(v_cache, "v_cache", B, Hkv, D);
    EXL_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache");
    EXL_CHECK(H % Hkv == 0, "query heads H=", H, " must be a multiple of the kv heads Hkv=", Hkv);
    EXL_CHECK(D == 64 || D == 128, "decode_attention takes head dims 64 and 128 (got D=", D, ")");
    EXL_CHECK(H / Hkv <= ATT_MAX_G, "decode_attention takes up to ", ATT_MAX_G, " query heads per kv head (got ",
              H / Hkv, ")");
    EXL_CHECK_ALIGNED(q, 16);
    EXL_CHECK(q.stride(0) % 8 == 0 && q.stride(2) % 8 == 0, "q strides must be multiples of 8 (got ", q.strides(), ")");
    EXL_CHECK(kv_len >= 1 && kv_len <= S, "kv_len=", kv_len, " must be in [1, ", S, "]");
    EXL_CHECK_DTYPE(pos, torch::kInt64);
    EXL_CHECK(pos.numel() >= 1, "pos must hold the query position");
    if (pad.has_value())
    {
        EXL_CHECK_DTYPE((*pad), torch::kInt64);
        EXL_CHECK_CONTIG((*pad));
        EXL_CHECK(pad->numel() == B, "pad must have B=", B, " elements (got ", pad->sizes(), ")");
        EXL_CHECK(pad->device() == q.device(), "pad must be on q's device");
    }
    EXL_CHECK_DTYPE(out, torch::kFloat16);
    EXL_CHECK_CONTIG(out);
    EXL_CHECK(out.numel() == B * H * D, "out must hold B*H*D=", B * H * D, " elements (got ", out.sizes(), ")");
    for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&k_cache, &v_cache, &pos, &out})
        EXL_CHECK(t->device() == q.device(), "decode_attention: every tensor must be on q's device");
    AttnRope rope{};
    if (k.has_value())
    {
        // rotary prologue: the new token's k, v and the tables; q is then unrotated
        EXL_CHECK(v.has_value() && cos.has_value() && sin.has_value(), "decode_attention: k needs v, cos and sin too");
        check_head_view(*k, "k", B, 1, Hkv, D);
        check_head_view(*v, "v", B, 1, Hkv, D);
        check_rope_tables(*cos, *sin, D, q.device());
        for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&*k, &*v})
            EXL_CHECK(t->device() == q.device(), "decode_attention: every tensor must be on q's device");
        rope.k = reinterpret_cast<const half*>(k->data_ptr<at::Half>());
        rope.ksb = k->stride(0);
        rope.ksh = k->stride(2);
        rope.v = reinterpret_cast<const half*>(v->data_ptr<at::Half>());
        rope.vsb = v->stride(0);
        rope.vsh = v->stride(2);
        rope.cos = cos->data_ptr<float>();
        rope.sin = sin->data_ptr<float>();
        rope.max_pos = (int)cos->size(0);
    }

    const c10::cuda::CUDAGuard guard(q.device());
    const int device = q.device().index();
    const DecodeAttnPlan plan = decode_attention_plan((int)B, (int)Hkv, (int)(H / Hkv), (int)D, (int)kv_len,
                                                      sm_count_of(device), (int)splits);
    EXL_CHECK(plan.splits > 0, "decode_attention: no kernel configuration for this shape");
    torch::Tensor workspace;
    float* ws = nullptr;
    int* counters = nullptr;
    if (plan.splits > 1)
    {
        workspace = torch::empty({B * H * plan.splits * (D + 2)}, q.options().dtype(torch::kFloat32));
        ws = workspace.data_ptr<float>();
        counters = attn_counters(q.device());
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(decode_attention_launch(
        plan, reinterpret_cast<const half*>(q.data_ptr<at::Half>()), q.stride(0), q.stride(2),
        reinterpret_cast<half*>(k_cache.data_ptr<at::Half>()), reinterpret_cast<half*>(v_cache.data_ptr<at::Half>()),
        (int)S, pos.data_ptr<int64_t>(), pad.has_value() ? pad->data_ptr<int64_t>() : nullptr, (int)B, (int)Hkv,
        (int)(H / Hkv), (int)D, (int)kv_len, reinterpret_cast<half*>(out.data_ptr<at::Half>()), ws, counters, rope,
        pdl_auto(device), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
