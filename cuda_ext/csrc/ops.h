// Torch-facing entry points of the extension (defined in ops_*.cpp, bound in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>

// q4 (ops_q4.cpp)
void q4_gemm_small(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& offsets, const std::optional<torch::Tensor>& perm,
                   const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                   torch::Tensor& out, int64_t tn, int64_t splits, int64_t variant, int64_t pdl,
                   const std::optional<torch::Tensor>& norm_weight, double norm_eps, bool silu_up, bool mma);
std::vector<int64_t> q4_gemm_plan_info(int64_t M, int64_t K, int64_t N, int64_t groups, int64_t device,
                                       int64_t tn, int64_t splits, int64_t variant);
std::string q4_gemm_variant_name_py(int64_t M, int64_t variant);
int64_t q4_gemm_num_variants_py(int64_t M);
void q4_dequant(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& offsets,
                const std::optional<torch::Tensor>& perm, torch::Tensor& out, bool mma);
void q4_matmul_prompt(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                      const torch::Tensor& offsets, const std::optional<torch::Tensor>& perm,
                      const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                      torch::Tensor& out, bool mma, int64_t slice_bytes, int64_t bn);
std::vector<int64_t> q4_wgmma_plan_info(int64_t M, int64_t N, int64_t device, int64_t bn);
void dense_gemv(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& residual,
                torch::Tensor& out, const std::optional<torch::Tensor>& norm_weight, double norm_eps);
std::vector<int64_t> q4_mma_plan_info(int64_t M, int64_t K, int64_t N, int64_t groups, int64_t device, int64_t splits,
                                      int64_t variant);
std::string q4_mma_variant_name_py(int64_t variant);
int64_t q4_mma_num_variants_py();
bool q4_mma_supported_py(int64_t K, int64_t N, int64_t groups);

// norms (ops_norm.cpp)
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out);
void add_rms_norm(torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight, double eps,
                  torch::Tensor& out);

// rotary (ops_rotary.cpp)
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& positions);

// decode step (ops_decode.cpp)
void rope_kv_write(torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                   const torch::Tensor& sin, const torch::Tensor& positions, const torch::Tensor& slot,
                   torch::Tensor& k_cache, torch::Tensor& v_cache);
void decode_attention(const torch::Tensor& q, torch::Tensor& k_cache, torch::Tensor& v_cache,
                      const torch::Tensor& pos, const std::optional<torch::Tensor>& pad, int64_t kv_len,
                      torch::Tensor& out, int64_t splits, const std::optional<torch::Tensor>& k,
                      const std::optional<torch::Tensor>& v, const std::optional<torch::Tensor>& cos,
                      const std::optional<torch::Tensor>& sin);
std::vector<int64_t> decode_attention_plan(int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t kv_len,
                                           int64_t device, int64_t splits);

// activations (ops_act.cpp)
void silu_mul(const torch::Tensor& gate, const torch::Tensor& up, torch::Tensor& out);

// embeddings (ops_embed.cpp)
void embed_gather(const torch::Tensor& ids, const torch::Tensor& table, torch::Tensor& out);

// greedy pick (ops_argmax.cpp)
void argmax_rows(const torch::Tensor& logits, torch::Tensor& res, const std::optional<torch::Tensor>& ids);
