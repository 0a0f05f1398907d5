// The CPU extension's Python module: checks, allocation and threading (torch's intra-op pool) around kernels.h.
// Wrapped by cuda_ext/cpu_ops.py; layouts in kernels.h and docs/design.md.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "kernels.h"

namespace {

void check_cpu(const torch::Tensor& t, const char* name, at::ScalarType dtype)
{
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const uint16_t* half_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// Tiles a task: at least ~32 KB of weights each, so a small layer stays on one thread.
int64_t tile_grain(int64_t K, int bits) { return std::max<int64_t>(1, (int64_t)(32768 * 8 / cpuk::TILE) / (K * bits)); }

}  // namespace

// qweight int32 [K/8, N] (the q4 format: nibble j of word [i, n] is q[8i + j, n]) -> uint8 [N/8, K/32, 8, 16].
torch::Tensor q4_pack(const torch::Tensor& qweight)
{
    check_cpu(qweight, "qweight", torch::kInt32);
    const int64_t K = qweight.size(0) * 8, N = qweight.size(1);
    constexpr int T = cpuk::TILE;
    TORCH_CHECK(K % 32 == 0 && N % T == 0, "q4_pack needs K % 32 == 0 and N % ", T, " == 0, got K=", K, " N=", N);
    auto out = torch::empty({N / T, K / 32, T, 16}, qweight.options().dtype(torch::kUInt8));
    const uint32_t* src = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
    uint8_t* dst = out.data_ptr<uint8_t>();
    const int64_t KB = K / 32;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const int64_t t = n / T, r = n % T;
            for (int64_t kb = 0; kb < KB; ++kb) {
                uint8_t* b = dst + ((t * KB + kb) * T + r) * 16;
                for (int j = 0; j < 16; ++j) {
                    const int64_t k = 32 * kb + j, k2 = k + 16;
                    const uint32_t lo = (src[(k / 8) * N + n] >> (4 * (k % 8))) & 0xF;
                    const uint32_t hi = (src[(k2 / 8) * N + n] >> (4 * (k2 % 8))) & 0xF;
                    b[j] = (uint8_t)(lo | hi << 4);
                }
            }
        }
    });
    return out;
}

// out [M, N] = prologue(x [M, Kx]) @ W^T (+ bias) (+ residual); bits 4 (w uint8, sc/of fp16 [N/8, G, 8]) or
// 8 (w int8 [N/8, K/32, 8, 32], sc fp16 [N/8, K/32, 8], of unused). The prologue: rms_norm with norm_weight,
// or silu(x[:, :K]) * x[:, K:] (silu: Kx = 2K), or none. out may alias residual.
torch::Tensor q_gemv(const torch::Tensor& x, int64_t bits, const torch::Tensor& w, const torch::Tensor& sc,
                     const c10::optional<torch::Tensor>& of, int64_t K, int64_t gs,
                     const c10::optional<torch::Tensor>& norm_weight, double eps, bool silu,
                     const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                     const c10::optional<torch::Tensor>& out_opt)
{
    check_cpu(x, "x", torch::kFloat32);
    TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
    check_cpu(w, "w", bits == 4 ? torch::kUInt8 : torch::kInt8);
    check_cpu(sc, "sc", torch::kFloat16);
    constexpr int TL = cpuk::TILE;
    const int64_t M = x.size(0), N = w.size(0) * TL;
    TORCH_CHECK(K % 32 == 0 && w.size(1) == K / 32, "w does not hold K=", K, " inputs");
    TORCH_CHECK(x.size(1) == (silu ? 2 * K : K), "x has ", x.size(1), " columns, expected ", silu ? 2 * K : K);
    if (bits == 4) {
        TORCH_CHECK(gs > 0 && gs % 32 == 0 && K % gs == 0, "group size ", gs, " must be a multiple of 32 dividing K");
        TORCH_CHECK(of.has_value(), "4-bit weights need offsets");
        check_cpu(*of, "of", torch::kFloat16);
        TORCH_CHECK(sc.numel() == N * (K / gs) && of->numel() == N * (K / gs), "scales/offsets do not match the weights");
    } else {
        gs = 32;
        TORCH_CHECK(sc.numel() == N * (K / 32), "scales do not match the weights");
    }
    if (norm_weight) {
        check_cpu(*norm_weight, "norm_weight", torch::kFloat32);
        TORCH_CHECK(norm_weight->numel() == K, "norm_weight must have K entries");
    }
    if (bias) {
        check_cpu(*bias, "bias", torch::kFloat32);
        TORCH_CHECK(bias->numel() == N, "bias must have N entries");
    }
    if (residual) {
        check_cpu(*residual, "residual", torch::kFloat32);
        TORCH_CHECK(residual->numel() == M * N, "residual must be [M, N]");
    }
    torch::Tensor out = out_opt ? *out_opt : torch::empty({M, N}, x.options());
    check_cpu(out, "out", torch::kFloat32);
    TORCH_CHECK(out.numel() == M * N, "out must be [M, N]");

    const int64_t G = K / gs;
    std::vector<int8_t> q(M * K);
    std::vector<float> d(M * (K / 32)), gsum(M * G), row(K);
    const float* xp = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
        cpuk::prologue_row(xp + m * x.size(1), (int)K, norm_weight ? norm_weight->data_ptr<float>() : nullptr,
                           (float)eps, silu, row.data());
        cpuk::quantize_row(row.data(), (int)K, (int)gs, q.data() + m * K, d.data() + m * (K / 32),
                           bits == 4 ? gsum.data() + m * G : nullptr);
    }
    float* op = out.data_ptr<float>();
    const float* rp = residual ? residual->data_ptr<float>() : nullptr;
    const float* bp = bias ? bias->data_ptr<float>() : nullptr;
    // raw pointers out of the loop: a Tensor's typed data_ptr() checks cost ~50 ns a call
    const uint8_t* w4 = bits == 4 ? w.data_ptr<uint8_t>() : nullptr;
    const int8_t* w8 = bits == 8 ? w.data_ptr<int8_t>() : nullptr;
    const uint16_t* scp = half_ptr(sc);
    const uint16_t* ofp = bits == 4 ? half_ptr(*of) : nullptr;
    at::parallel_for(0, N / TL, tile_grain(K, (int)bits), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            for (int64_t m = 0; m < M; ++m) {
                const cpuk::QRow xr{q.data() + m * K, d.data() + m * (K / 32), gsum.data() + m * G};
                float y[TL];
                if (w4)
                    cpuk::q4_tile(w4, scp, ofp, (int)K, (int)gs, t, xr, y);
                else
                    cpuk::q8_tile(w8, scp, (int)K, t, xr, y);
                float* o = op + m * N + TL * t;
                for (int r = 0; r < TL; ++r) {
                    float v = y[r];
                    if (bp) v += bp[TL * t + r];
                    if (rp) v += rp[m * N + TL * t + r];
                    o[r] = v;
                }
            }
        }
    });
    return out;
}

// Dense rows [n0, n1) of W as fp32 [n1 - n0, K] (multiples of TILE), from either layout.
torch::Tensor q_dequant(int64_t bits, const torch::Tensor& w, const torch::Tensor& sc,
                        const c10::optional<torch::Tensor>& of, int64_t K, int64_t gs, int64_t n0, int64_t n1)
{
    check_cpu(w, "w", bits == 4 ? torch::kUInt8 : torch::kInt8);
    check_cpu(sc, "sc", torch::kFloat16);
    constexpr int TL = cpuk::TILE;
    const int64_t N = w.size(0) * TL;
    TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && n0 % TL == 0 && n1 % TL == 0, "bad row range");
    auto out = torch::empty({n1 - n0, K}, sc.options().dtype(torch::kFloat32));
    float* op = out.data_ptr<float>();
    at::parallel_for(n0 / TL, n1 / TL, 8, [&](int64_t t0, int64_t t1) {
        if (bits == 4)
            cpuk::q4_dequant_rows(w.data_ptr<uint8_t>(), half_ptr(sc), half_ptr(*of), (int)K, (int)gs, TL * t0, TL * t1,
                                  op + (TL * t0 - n0) * K);
        else
            cpuk::q8_dequant_rows(w.data_ptr<int8_t>(), half_ptr(sc), (int)K, TL * t0, TL * t1, op + (TL * t0 - n0) * K);
    });
    return out;
}

// Attention of a few new tokens straight from the fused q|k|v projection: qkv [B, T, (H + 2 Hkv) D] fp32 at cache
// positions start .. start + T - 1. Rotates q and k (rotate-half; cos/sin [P, D/2] fp32 tables), writes k and v into
// the caches [B, Hkv, S, D] (fp32 or fp16), and attends each query to keys 0 .. its own position -> [B, T, H D].
torch::Tensor qkv_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            int64_t start, const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t H)
{
    check_cpu(qkv, "qkv", torch::kFloat32);
    check_cpu(cos, "cos", torch::kFloat32);
    check_cpu(sin, "sin", torch::kFloat32);
    const auto kt = k_cache.scalar_type();
    TORCH_CHECK(kt == v_cache.scalar_type() && (kt == torch::kFloat32 || kt == torch::kFloat16),
                "k/v caches must both be fp32 or fp16");
    check_cpu(k_cache, "k_cache", kt);
    check_cpu(v_cache, "v_cache", kt);
    TORCH_CHECK(qkv.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad attention shapes");
    const int64_t B = qkv.size(0), T = qkv.size(1), Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
    TORCH_CHECK(k_cache.size(0) == B && qkv.size(2) == (H + 2 * Hkv) * D && H % Hkv == 0 && D % 2 == 0,
                "qkv does not match the cache's heads");
    TORCH_CHECK(start >= 0 && start + T <= S, "positions ", start, "..", start + T, " exceed the cache length ", S);
    TORCH_CHECK(cos.size(0) >= start + T && cos.size(1) == D / 2 && sin.sizes() == cos.sizes(), "rotary tables too short");
    const bool half = kt == torch::kFloat16;
    const int64_t esz = k_cache.element_size(), W = (H + 2 * Hkv) * D, hd = D / 2;
    auto q = torch::empty({B, T, H, D}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    char* kc = static_cast<char*>(k_cache.data_ptr());
    char* vc = static_cast<char*>(v_cache.data_ptr());
    auto store = [&](char* base, int64_t idx, float v) {
        if (half)
            reinterpret_cast<at::Half*>(base)[idx] = at::Half(v);
        else
            reinterpret_cast<float*>(base)[idx] = v;
    };
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const int64_t pos = start + t;
            const float* row = src + (b * T + t) * W;
            const float* c = cp + pos * hd;
            const float* s_ = sp + pos * hd;
            for (int64_t h = 0; h < H; ++h) {
                const float* x = row + h * D;
                float* o = qp + ((b * T + t) * H + h) * D;
                for (int64_t i = 0; i < hd; ++i) {
                    o[i] = x[i] * c[i] - x[i + hd] * s_[i];
                    o[i + hd] = x[i + hd] * c[i] + x[i] * s_[i];
                }
            }
            for (int64_t h = 0; h < Hkv; ++h) {
                const float* x = row + (H + h) * D;
                const float* v = row + (H + Hkv + h) * D;
                const int64_t at = ((b * Hkv + h) * S + pos) * D;
                for (int64_t i = 0; i < hd; ++i) {
                    store(kc, at + i, x[i] * c[i] - x[i + hd] * s_[i]);
                    store(kc, at + i + hd, x[i + hd] * c[i] + x[i] * s_[i]);
                }
                for (int64_t i = 0; i < D; ++i) store(vc, at + i, v[i]);
            }
        }
    }
    auto out = torch::empty({B, T, H * D}, qkv.options());
    float* op = out.data_ptr<float>();
    const float scale = 1.0f / std::sqrt((float)D);
    // one task a (row, token, head); each needs its keys' scores
    at::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> p(start + T);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
            const char* kb = kc + b * Hkv * S * D * esz;
            const char* vb = vc + b * Hkv * S * D * esz;
            cpuk::decode_attention_heads(qp + (b * T + t) * H * D, kb, vb, half, (int)H, (int)Hkv, (int)D, S,
                                         start + t + 1, scale, (int)h, (int)h + 1, p.data(), op + (b * T + t) * H * D);
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "exllama CPU kernels: block-quantized GEMV (int8 activations), dequantization, decode attention";
    m.def("isa", &cpuk::isa, "the instruction set this build uses");
    m.def("q4_pack", &q4_pack, "q4 qweight [K/8, N] -> the CPU layout uint8 [N/8, K/32, 8, 16]");
    m.attr("TILE") = cpuk::TILE;
    m.def("q_gemv", &q_gemv, py::arg("x"), py::arg("bits"), py::arg("w"), py::arg("sc"), py::arg("of"), py::arg("K"),
          py::arg("gs"), py::arg("norm_weight"), py::arg("eps"), py::arg("silu"), py::arg("bias"), py::arg("residual"),
          py::arg("out"));
    m.def("q_dequant", &q_dequant, py::arg("bits"), py::arg("w"), py::arg("sc"), py::arg("of"), py::arg("K"),
          py::arg("gs"), py::arg("n0"), py::arg("n1"));
    m.def("qkv_attention", &qkv_attention, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("start"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("H"));
}
