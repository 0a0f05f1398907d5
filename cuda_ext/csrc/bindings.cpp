// The extension's one Python module: m.def lines grouped by topic. Thin wrappers live in cuda_ext/ops.py.
#include "ops.h"

#include <pybind11/stl.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "exllama CUDA kernels: q4 GEMM/dequant, RMSNorm, rotary, SiLU-mul";

    // q4 weights
    m.def("q4_gemm_small", &q4_gemm_small,
          "out[M, N] = x[M, K][:, perm] @ dequant(qweight, scales, offsets) + bias + residual, M <= 8",
          py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("perm"),
          py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("tn") = 0, py::arg("splits") = 0,
          py::arg("variant") = -1, py::arg("pdl") = -1, py::arg("norm_weight") = py::none(),
          py::arg("norm_eps") = 0.0, py::arg("silu_up") = false, py::arg("mma") = false);
    m.def("q4_gemm_plan", &q4_gemm_plan_info,
          "[tn, splits, rows_per_split, rows_per_trow, variant, tiles, smem_bytes] the kernel would use",
          py::arg("M"), py::arg("K"), py::arg("N"), py::arg("groups"), py::arg("device"), py::arg("tn") = 0,
          py::arg("splits") = 0, py::arg("variant") = -1);
    m.def("q4_gemm_variant_name", &q4_gemm_variant_name_py, py::arg("M"), py::arg("variant"));
    m.def("q4_gemm_num_variants", &q4_gemm_num_variants_py, py::arg("M"));
    m.def("q4_dequant", &q4_dequant, "out[K, N] (fp16) = dequant(qweight, scales, offsets), row k to perm[k] if given",
          py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("perm"), py::arg("out"),
          py::arg("mma") = false);
    m.def("q4_matmul_prompt", &q4_matmul_prompt,
          "out[M, N] = x @ dequant(W) + bias + residual for many rows: on Hopper one GEMM that "
          "dequantizes in its main loop (bn: -1 never, 0 auto, > 0 that token tile), else column slices of <= "
          "slice_bytes of fp16 weights, each dequantized then multiplied by cuBLAS",
          py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("perm"), py::arg("bias"),
          py::arg("residual"), py::arg("out"), py::arg("mma"), py::arg("slice_bytes"), py::arg("bn") = 0);
    m.def("q4_wgmma_plan", &q4_wgmma_plan_info, "[bn, stages, smem_bytes, blocks] of the fused Hopper prompt GEMM (zeros: not on this device or build)",
          py::arg("M"), py::arg("N"), py::arg("device"), py::arg("bn") = 0);
    m.def("dense_gemv", &dense_gemv,
          "out[M, N] = rms_norm?(x[M, K]) @ weight[N, K]^T + residual for M <= 8 fp16 rows (no cuBLAS workspace)",
          py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("out"), py::arg("norm_weight") = py::none(),
          py::arg("norm_eps") = 0.0);
    // tensor-core GEMV on weights in the mma layout (q4_gemm_small(..., mma=True))
    m.def("q4_mma_plan", &q4_mma_plan_info,
          "[tn, splits, units_per_split, chunks_per_unit, variant, tiles, smem_bytes, fold_steps] of the mma kernel",
          py::arg("M"), py::arg("K"), py::arg("N"), py::arg("groups"), py::arg("device"), py::arg("splits") = 0,
          py::arg("variant") = -1);
    m.def("q4_mma_variant_name", &q4_mma_variant_name_py, py::arg("variant"));
    m.def("q4_mma_num_variants", &q4_mma_num_variants_py);
    m.def("q4_mma_supported", &q4_mma_supported_py, "whether the mma layout takes [K, N] with this many groups",
          py::arg("K"), py::arg("N"), py::arg("groups"));

    // norms
    m.def("rms_norm", &rms_norm, "out = x * rsqrt(mean(x^2) + eps) * weight", py::arg("x"), py::arg("weight"),
          py::arg("eps"), py::arg("out"));
    m.def("add_rms_norm", &add_rms_norm, "residual += x; out = rms_norm(residual)", py::arg("residual"),
          py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"));

    // rotary
    m.def("rotary_", &rotary_, "in-place rotate-half rotary embedding at device positions", py::arg("x"),
          py::arg("cos"), py::arg("sin"), py::arg("positions"));

    // decode step
    m.def("rope_kv_write", &rope_kv_write,
          "rotate q in place, rotate k and store k, v at cache slot[0] (T = 1)", py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("slot"), py::arg("k_cache"),
          py::arg("v_cache"));
    m.def("decode_attention", &decode_attention,
          "single-query GQA attention over cache keys [pad[b], pos] within [0, kv_len); with k, v, cos and sin it "
          "first does rope_kv_write's work at rotary position pos - pad[b] (q unrotated)", py::arg("q"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"), py::arg("pad"), py::arg("kv_len"), py::arg("out"),
          py::arg("splits") = 0, py::arg("k") = py::none(), py::arg("v") = py::none(), py::arg("cos") = py::none(),
          py::arg("sin") = py::none());
    m.def("decode_attention_plan", &decode_attention_plan, "[splits, chunk, smem_bytes]", py::arg("B"),
          py::arg("Hkv"), py::arg("G"), py::arg("D"), py::arg("kv_len"), py::arg("device"), py::arg("splits") = 0);

    // embeddings
    m.def("embed_gather", &embed_gather, "out[r] = table[ids[r]] with the table in pinned host memory",
          py::arg("ids"), py::arg("table"), py::arg("out"));

    // greedy pick
    m.def("argmax_rows", &argmax_rows,
          "res[b] = (argmax of logits[b] as torch.argmax picks it, 1 if that logit is finite else 0); the index "
          "also to ids[b] if given", py::arg("logits"), py::arg("res"), py::arg("ids") = py::none());

    // activations
    m.def("silu_mul", &silu_mul, "out = silu(gate) * up", py::arg("gate"), py::arg("up"), py::arg("out"));
}
