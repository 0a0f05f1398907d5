// The CPU extension's Python module: checks, allocation and threading (torch's intra-op pool) around kernels.h.
// Wrapped by cuda_ext/cpu_ops.py; layouts in kernels.h and docs/design.md.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "kernels.h"
#include "pool.h"
#include "sampler.h"

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
    cpuk::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
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

// A packed linear layer as the kernels see it (layouts in kernels.h): the tensors are kept alive here.
struct Lin {
    torch::Tensor w_t, sc_t, of_t, perm_t, bias_t;
    const uint8_t* w4 = nullptr;
    const int8_t* w8 = nullptr;
    const uint16_t* sc = nullptr;
    const uint16_t* of = nullptr;
    const int64_t* perm = nullptr;
    const float* bias = nullptr;
    int64_t bits = 4, K = 0, N = 0, gs = 32, levels = 1;
};

Lin make_lin(const torch::Tensor& w, const torch::Tensor& sc, const c10::optional<torch::Tensor>& of, int64_t bits,
             int64_t K, int64_t gs, int64_t levels, const c10::optional<torch::Tensor>& perm,
             const c10::optional<torch::Tensor>& bias)
{
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
    TORCH_CHECK(levels == 1 || levels == 2, "levels must be 1 or 2");
    check_cpu(w, "w", bits == 4 ? torch::kUInt8 : torch::kInt8);
    check_cpu(sc, "sc", torch::kFloat16);
    Lin L;
    L.bits = bits, L.K = K, L.levels = levels, L.N = w.size(0) * cpuk::TILE;
    TORCH_CHECK(K % 32 == 0 && w.dim() == 4 && w.size(1) == K / 32, "w does not hold K=", K, " inputs");
    if (bits == 4) {
        TORCH_CHECK(gs > 0 && gs % 32 == 0 && K % gs == 0, "group size ", gs, " must be a multiple of 32 dividing K");
        TORCH_CHECK(of.has_value(), "4-bit weights need offsets");
        check_cpu(*of, "of", torch::kFloat16);
        TORCH_CHECK(sc.numel() == L.N * (K / gs) && of->numel() == L.N * (K / gs),
                    "scales/offsets do not match the weights");
        L.of_t = *of;
        L.gs = gs;
    } else {
        TORCH_CHECK(sc.numel() == L.N * (K / 32), "scales do not match the weights");
        L.gs = 32;
    }
    L.w_t = w, L.sc_t = sc;
    if (perm) {
        check_cpu(*perm, "perm", torch::kInt64);
        TORCH_CHECK(perm->numel() == K, "perm must have K entries");
        L.perm_t = *perm;
    }
    if (bias) {
        check_cpu(*bias, "bias", torch::kFloat32);
        TORCH_CHECK(bias->numel() == L.N, "bias must have N entries");
        L.bias_t = *bias;
    }
    // raw pointers once: a Tensor's typed data_ptr() checks cost ~50 ns a call
    if (bits == 4) L.w4 = w.data_ptr<uint8_t>(), L.of = half_ptr(L.of_t);
    else L.w8 = w.data_ptr<int8_t>();
    L.sc = half_ptr(sc);
    if (L.perm_t.defined()) L.perm = L.perm_t.data_ptr<int64_t>();
    if (L.bias_t.defined()) L.bias = L.bias_t.data_ptr<float>();
    return L;
}

// out [M, N] = prologue(x [M, xstride]) [:, perm] @ W^T (+ bias) (+ residual [M, N]); out may be residual.
// The prologue: rms_norm with norm_w, or silu(x[:, :K]) * x[:, K:2K] (silu), or none.
void gemv_rows(const Lin& L, const float* x, int64_t M, int64_t xstride, const float* norm_w, float eps, bool silu,
               const float* residual, float* out)
{
    constexpr int TL = cpuk::TILE;
    const int64_t K = L.K, N = L.N, G = K / L.gs;
    std::vector<int8_t> q(M * K), q2(L.levels == 2 ? M * K : 0);
    std::vector<float> d(M * (K / 32)), gsum(M * G), row(K), gathered(L.perm ? K : 0);
    for (int64_t m = 0; m < M; ++m) {
        cpuk::prologue_row(x + m * xstride, (int)K, norm_w, eps, silu, row.data());
        const float* r = row.data();
        if (L.perm) {
            for (int64_t k = 0; k < K; ++k) gathered[k] = row[L.perm[k]];
            r = gathered.data();
        }
        cpuk::quantize_row(r, (int)K, (int)L.gs, q.data() + m * K, L.levels == 2 ? q2.data() + m * K : nullptr,
                           d.data() + m * (K / 32), L.bits == 4 ? gsum.data() + m * G : nullptr);
    }
    cpuk::parallel_for(0, N / TL, tile_grain(K, (int)L.bits), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            for (int64_t m = 0; m < M; ++m) {
                const cpuk::QRow xr{q.data() + m * K, L.levels == 2 ? q2.data() + m * K : nullptr,
                                    d.data() + m * (K / 32), gsum.data() + m * G};
                float y[TL];
                if (L.w4)
                    cpuk::q4_tile(L.w4, L.sc, L.of, (int)K, (int)L.gs, t, xr, y);
                else
                    cpuk::q8_tile(L.w8, L.sc, (int)K, t, xr, y);
                float* o = out + m * N + TL * t;
                const float* rr = residual ? residual + m * N + TL * t : nullptr;
                for (int r = 0; r < TL; ++r) o[r] = y[r] + (L.bias ? L.bias[TL * t + r] : 0.0f) + (rr ? rr[r] : 0.0f);
            }
        }
    });
}

// out [M, N] = prologue(x [M, Kx]) [:, perm] @ W^T (+ bias) (+ residual); bits 4 (w uint8, sc/of fp16 [N/8, G, 8])
// or 8 (w int8 [N/8, K/32, 8, 32], sc fp16 [N/8, K/32, 8], of unused). The prologue: rms_norm with norm_weight,
// or silu(x[:, :K]) * x[:, K:] (silu: Kx = 2K), or none. out may alias residual. levels: the activations' int8
// levels (kernels.h, QRow): 1, or 2 for ~15-bit activations at ~1.5x the integer work.
torch::Tensor q_gemv(const torch::Tensor& x, int64_t bits, const torch::Tensor& w, const torch::Tensor& sc,
                     const c10::optional<torch::Tensor>& of, int64_t K, int64_t gs,
                     const c10::optional<torch::Tensor>& norm_weight, double eps, bool silu,
                     const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& residual,
                     const c10::optional<torch::Tensor>& out_opt, int64_t levels,
                     const c10::optional<torch::Tensor>& perm)
{
    const Lin L = make_lin(w, sc, of, bits, K, gs, levels, perm, bias);
    check_cpu(x, "x", torch::kFloat32);
    TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
    const int64_t M = x.size(0), N = L.N;
    TORCH_CHECK(x.size(1) == (silu ? 2 * K : K), "x has ", x.size(1), " columns, expected ", silu ? 2 * K : K);
    if (norm_weight) {
        check_cpu(*norm_weight, "norm_weight", torch::kFloat32);
        TORCH_CHECK(norm_weight->numel() == K, "norm_weight must have K entries");
    }
    if (residual) {
        check_cpu(*residual, "residual", torch::kFloat32);
        TORCH_CHECK(residual->numel() == M * N, "residual must be [M, N]");
    }
    torch::Tensor out = out_opt ? *out_opt : torch::empty({M, N}, x.options());
    check_cpu(out, "out", torch::kFloat32);
    TORCH_CHECK(out.numel() == M * N, "out must be [M, N]");
    gemv_rows(L, x.data_ptr<float>(), M, x.size(1), norm_weight ? norm_weight->data_ptr<float>() : nullptr, (float)eps,
              silu, residual ? residual->data_ptr<float>() : nullptr, out.data_ptr<float>());
    return out;
}

// Dense rows [n0, n1) of W as fp32 [n1 - n0, K] (multiples of TILE), from either layout.
torch::Tensor q_dequant(int64_t bits, const torch::Tensor& w, const torch::Tensor& sc,
                        const c10::optional<torch::Tensor>& of, int64_t K, int64_t gs, int64_t n0, int64_t n1,
                        const c10::optional<torch::Tensor>& out_opt)
{
    check_cpu(w, "w", bits == 4 ? torch::kUInt8 : torch::kInt8);
    check_cpu(sc, "sc", torch::kFloat16);
    constexpr int TL = cpuk::TILE;
    const int64_t N = w.size(0) * TL;
    TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && n0 % TL == 0 && n1 % TL == 0, "bad row range");
    // out: a reusable scratch of at least (n1 - n0) K floats (the prompt path's slices), viewed to the shape
    torch::Tensor out;
    if (out_opt) {
        check_cpu(*out_opt, "out", torch::kFloat32);
        TORCH_CHECK(out_opt->numel() >= (n1 - n0) * K, "out is too small");
        out = out_opt->view({-1}).narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
    } else {
        out = torch::empty({n1 - n0, K}, sc.options().dtype(torch::kFloat32));
    }
    float* op = out.data_ptr<float>();
    // one thread: this feeds torch's GEMM (the prompt path), whose OpenMP threads would find the pool's workers
    // spinning on the cores they need (a 16-token prompt took ~1 s so); vectorized, it is a small part of the GEMM
    if (bits == 4)
        cpuk::q4_dequant_rows(w.data_ptr<uint8_t>(), half_ptr(sc), half_ptr(*of), (int)K, (int)gs, n0, n1, op);
    else
        cpuk::q8_dequant_rows(w.data_ptr<int8_t>(), half_ptr(sc), (int)K, n0, n1, op);
    return out;
}

// Attention of T new tokens a row straight from the fused q|k|v projection: qkv [B, T, (H + 2 Hkv) D] at cache
// positions start .. start + T - 1. Rotates q and k (rotate-half; cos/sin [P, D/2] tables), writes k and v into the
// caches [B, Hkv, S, D] (fp32, or fp16 with half), and attends each query to keys 0 .. its own position ->
// out [B, T, H D].
void attention_rows(const float* qkv, int64_t B, int64_t T, const float* cp, const float* sp, int64_t start, char* kc,
                    char* vc, bool half, int64_t H, int64_t Hkv, int64_t S, int64_t D, float* out)
{
    const int64_t esz = half ? 2 : 4, W = (H + 2 * Hkv) * D, hd = D / 2;
    std::vector<float> q(B * T * H * D);
    auto store = [&](char* base, int64_t idx, float v) {
        if (half)
            reinterpret_cast<at::Half*>(base)[idx] = at::Half(v);
        else
            reinterpret_cast<float*>(base)[idx] = v;
    };
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const int64_t pos = start + t;
            const float* row = qkv + (b * T + t) * W;
            const float* c = cp + pos * hd;
            const float* s_ = sp + pos * hd;
            for (int64_t h = 0; h < H; ++h) {
                const float* x = row + h * D;
                float* o = q.data() + ((b * T + t) * H + h) * D;
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
    const float scale = 1.0f / std::sqrt((float)D);
    // one task a (row, token, head); each needs its keys' scores
    cpuk::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> p(start + T);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
            cpuk::decode_attention_heads(q.data() + (b * T + t) * H * D, kc + b * Hkv * S * D * esz,
                                         vc + b * Hkv * S * D * esz, half, (int)H, (int)Hkv, (int)D, S, start + t + 1,
                                         scale, (int)h, (int)h + 1, p.data(), out + (b * T + t) * H * D);
        }
    });
}

void check_attention(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& cos,
                     const torch::Tensor& sin, int64_t B, int64_t T, int64_t W, int64_t H, int64_t start)
{
    check_cpu(cos, "cos", torch::kFloat32);
    check_cpu(sin, "sin", torch::kFloat32);
    const auto kt = k_cache.scalar_type();
    TORCH_CHECK(kt == v_cache.scalar_type() && (kt == torch::kFloat32 || kt == torch::kFloat16),
                "k/v caches must both be fp32 or fp16");
    check_cpu(k_cache, "k_cache", kt);
    check_cpu(v_cache, "v_cache", kt);
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad cache shapes");
    const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
    TORCH_CHECK(k_cache.size(0) == B && W == (H + 2 * Hkv) * D && H % Hkv == 0 && D % 2 == 0,
                "qkv does not match the cache's heads");
    TORCH_CHECK(start >= 0 && start + T <= S, "positions ", start, "..", start + T, " exceed the cache length ", S);
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= start + T && cos.size(1) == D / 2 && sin.sizes() == cos.sizes(),
                "rotary tables too short");
}

torch::Tensor qkv_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                            int64_t start, const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t H)
{
    check_cpu(qkv, "qkv", torch::kFloat32);
    TORCH_CHECK(qkv.dim() == 3, "qkv must be [B, T, (H + 2 Hkv) D]");
    const int64_t B = qkv.size(0), T = qkv.size(1);
    check_attention(k_cache, v_cache, cos, sin, B, T, qkv.size(2), H, start);
    const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
    auto out = torch::empty({B, T, H * D}, qkv.options());
    attention_rows(qkv.data_ptr<float>(), B, T, cos.data_ptr<float>(), sin.data_ptr<float>(), start,
                   static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()),
                   k_cache.scalar_type() == torch::kFloat16, H, Hkv, S, D, out.data_ptr<float>());
    return out;
}

// The whole decode step of a packed model for a few tokens (B T rows; Ops.CPU_GEMV_MAX_ROWS decides how many): every layer's norm, q|k|v, attention,
// o_proj + residual, norm, gate|up, SiLU-mul, down + residual, then the final norm and the LM head, without
// returning to Python between them, and with the GIL released. model/cpu_decode.py builds it.
class CpuDecoder {
public:
    CpuDecoder(int64_t H, int64_t hidden, double eps) : H_(H), hidden_(hidden), eps_((float)eps) {}

    void add_layer(const torch::Tensor& in_norm, const torch::Tensor& post_norm, const py::tuple& qkv,
                   const py::tuple& o, const py::tuple& gate_up, const py::tuple& down)
    {
        check_cpu(in_norm, "in_norm", torch::kFloat32);
        check_cpu(post_norm, "post_norm", torch::kFloat32);
        Layer l{in_norm, post_norm, lin(qkv), lin(o), lin(gate_up), lin(down)};
        TORCH_CHECK(l.qkv.K == hidden_ && l.o.N == hidden_ && l.gate_up.K == hidden_ && l.down.N == hidden_ &&
                    l.gate_up.N == 2 * l.down.K && in_norm.numel() == hidden_ && post_norm.numel() == hidden_,
                    "layer ", layers_.size(), ": shapes do not chain");
        layers_.push_back(std::move(l));
    }

    void set_head(const torch::Tensor& norm, const py::tuple& head)
    {
        check_cpu(norm, "norm", torch::kFloat32);
        norm_ = norm;
        head_ = lin(head);
        TORCH_CHECK(head_.K == hidden_ && norm.numel() == hidden_, "head shapes do not match");
    }

    // h [B, T, hidden] fp32 (consumed: the residual stream) at positions start..; caches per layer -> logits
    // [B, T or 1, V] (last_only: each row's last token).
    torch::Tensor step(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin, int64_t start,
                       const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                       bool last_only)
    {
        check_cpu(h, "h", torch::kFloat32);
        TORCH_CHECK(h.dim() == 3 && h.size(2) == hidden_, "h must be [B, T, hidden]");
        TORCH_CHECK(head_.N > 0, "no head set");
        TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one cache per layer");
        const int64_t B = h.size(0), T = h.size(1), M = B * T;
        for (size_t i = 0; i < layers_.size(); ++i)
            check_attention(k_caches[i], v_caches[i], cos, sin, B, T, layers_[i].qkv.N, H_, start);
        const int64_t Hkv = k_caches[0].size(1), S = k_caches[0].size(2), D = k_caches[0].size(3);
        const int64_t rows = last_only ? B : M;
        auto logits = torch::empty({B, last_only ? 1 : T, head_.N}, h.options());
        {
            py::gil_scoped_release nogil;     // other Python threads (the web server) run meanwhile
            float* hp = h.data_ptr<float>();
            std::vector<float> qkv, att(M * H_ * D), gu;
            for (size_t i = 0; i < layers_.size(); ++i) {
                const Layer& l = layers_[i];
                qkv.resize(M * l.qkv.N);
                gu.resize(M * l.gate_up.N);
                gemv_rows(l.qkv, hp, M, hidden_, l.in_norm.data_ptr<float>(), eps_, false, nullptr, qkv.data());
                attention_rows(qkv.data(), B, T, cos.data_ptr<float>(), sin.data_ptr<float>(), start,
                               static_cast<char*>(k_caches[i].data_ptr()), static_cast<char*>(v_caches[i].data_ptr()),
                               k_caches[i].scalar_type() == torch::kFloat16, H_, Hkv, S, D, att.data());
                gemv_rows(l.o, att.data(), M, H_ * D, nullptr, 0.0f, false, hp, hp);
                gemv_rows(l.gate_up, hp, M, hidden_, l.post_norm.data_ptr<float>(), eps_, false, nullptr, gu.data());
                gemv_rows(l.down, gu.data(), M, l.gate_up.N, nullptr, 0.0f, true, hp, hp);
            }
            std::vector<float> last;
            const float* src = hp;
            if (last_only && T > 1) {
                last.resize(B * hidden_);
                for (int64_t b = 0; b < B; ++b)
                    std::copy(hp + ((b + 1) * T - 1) * hidden_, hp + (b + 1) * T * hidden_, last.begin() + b * hidden_);
                src = last.data();
            }
            gemv_rows(head_, src, rows, hidden_, norm_.data_ptr<float>(), eps_, false, nullptr, logits.data_ptr<float>());
        }
        return logits;
    }

private:
    struct Layer {
        torch::Tensor in_norm, post_norm;
        Lin qkv, o, gate_up, down;
    };

    // (w, sc, of, bits, K, gs, levels, perm, bias) from model/cpu_decode.py
    static Lin lin(const py::tuple& t)
    {
        TORCH_CHECK(t.size() == 9, "a packed layer is (w, sc, of, bits, K, gs, levels, perm, bias)");
        auto opt = [&](int i) {
            return t[i].is_none() ? c10::optional<torch::Tensor>() : c10::optional<torch::Tensor>(t[i].cast<torch::Tensor>());
        };
        return make_lin(t[0].cast<torch::Tensor>(), t[1].cast<torch::Tensor>(), opt(2), t[3].cast<int64_t>(),
                        t[4].cast<int64_t>(), t[5].cast<int64_t>(), t[6].cast<int64_t>(), opt(7), opt(8));
    }

    int64_t H_, hidden_;
    float eps_;
    std::vector<Layer> layers_;
    torch::Tensor norm_;
    Lin head_;
};

// One row's sampling (sampler.h): logits [V] fp32, history int64 [T] (the penalties' tokens), banned int64 [n].
// u: the uniform for the draw, or < 0 for the final distribution over the vocabulary (fp32 [V], the tests' view).
py::object sample_row(const torch::Tensor& logits, const torch::Tensor& history, const torch::Tensor& banned,
                      double repetition_penalty, int64_t sustain, int64_t decay, double presence, double frequency,
                      double temperature, int64_t top_k, double top_p, double min_p, double typical, double u)
{
    check_cpu(logits, "logits", torch::kFloat32);
    check_cpu(history, "history", torch::kInt64);
    check_cpu(banned, "banned", torch::kInt64);
    TORCH_CHECK(logits.dim() == 1 && logits.numel() > 0, "logits must be [V]");
    cpuk::SampleParams p;
    p.repetition_penalty = (float)repetition_penalty, p.sustain = sustain, p.decay = decay;
    p.presence = (float)presence, p.frequency = (float)frequency, p.temperature = (float)temperature;
    p.top_k = top_k, p.top_p = (float)top_p, p.min_p = (float)min_p, p.typical = (float)typical;
    const float* lp = logits.data_ptr<float>();
    std::vector<float> x(lp, lp + logits.numel()), vals;
    std::vector<int64_t> ids;
    if (!cpuk::sample_candidates(x, history.data_ptr<int64_t>(), history.numel(), banned.data_ptr<int64_t>(),
                                 banned.numel(), p, ids, vals))
        throw py::value_error("no token can be sampled: every candidate has logit -inf or nan "
                              "(all banned, or the model produced -inf / nan)");
    auto id = [&](size_t i) { return ids.empty() ? (int64_t)i : ids[i]; };   // empty ids: the whole row
    if (u >= 0) return py::int_(ids.size() == 1 ? ids[0] : id(cpuk::draw(vals, u)));
    auto probs = torch::zeros_like(logits);
    float* pp = probs.data_ptr<float>();
    if (temperature == 0.0 || top_k == 1) {
        pp[ids[0]] = 1.0f;
    } else {
        const float m = *std::max_element(vals.begin(), vals.end());
        double total = 0.0;
        for (float v : vals) total += std::exp((double)(v - m));
        for (size_t i = 0; i < vals.size(); ++i) pp[id(i)] = (float)(std::exp((double)(vals[i] - m)) / total);
    }
    return py::cast(probs);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "exllama CPU kernels: block-quantized GEMV (int8 activations), dequantization, decode attention";
    m.def("isa", &cpuk::isa, "the instruction set this build uses");
    m.def("sample_row", &sample_row, py::arg("logits"), py::arg("history"), py::arg("banned"),
          py::arg("repetition_penalty"), py::arg("sustain"), py::arg("decay"), py::arg("presence"),
          py::arg("frequency"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
          py::arg("typical"), py::arg("u"));
    m.def("q4_pack", &q4_pack, "q4 qweight [K/8, N] -> the CPU layout uint8 [N/8, K/32, 8, 16]");
    m.attr("TILE") = cpuk::TILE;
    m.def("q_gemv", &q_gemv, py::arg("x"), py::arg("bits"), py::arg("w"), py::arg("sc"), py::arg("of"), py::arg("K"),
          py::arg("gs"), py::arg("norm_weight"), py::arg("eps"), py::arg("silu"), py::arg("bias"), py::arg("residual"),
          py::arg("out"), py::arg("levels") = 1, py::arg("perm") = py::none());
    m.def("q_dequant", &q_dequant, py::arg("bits"), py::arg("w"), py::arg("sc"), py::arg("of"), py::arg("K"),
          py::arg("gs"), py::arg("n0"), py::arg("n1"), py::arg("out") = py::none());
    py::class_<CpuDecoder>(m, "CpuDecoder")
        .def(py::init<int64_t, int64_t, double>(), py::arg("H"), py::arg("hidden"), py::arg("eps"))
        .def("add_layer", &CpuDecoder::add_layer)
        .def("set_head", &CpuDecoder::set_head)
        .def("step", &CpuDecoder::step, py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("start"),
             py::arg("k_caches"), py::arg("v_caches"), py::arg("last_only"));
    m.def("qkv_attention", &qkv_attention, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("start"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("H"));
}
