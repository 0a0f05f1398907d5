// q4 GEMM for M <= 8 rows: planning (tile width, split-K, variant) and dispatch to the template instances.
#include "q4_gemm.cuh"
#include "common.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace {

struct Variant
{
    int U, S, MINB;
    const char* name;
};

// S > 0: cp.async ring of S rows per thread; S == 0: U rows in registers (+ U prefetched).
// MINB: blocks per multiprocessor the register budget is set for. Entry 0 is the default: on an
// H100 (docs/performance.md) registers beat the cp.async ring by 10-40% at every M = 1..8; at M = 1 the
// half2 products ("reg4h", ~2.1 instructions a weight) beat the fp32 ones ("reg4", ~3.1) by 18-22%, and
// the integer ones ("reg4i": 12-bit x, DP2A, ~1 instruction a weight) beat half2 by 6% in the 7B model.
const Variant kVariantsM1[] = {{4, 0, 3, "reg4i"}, {4, 0, 3, "reg4h"}, {0, 16, 1, "cp16"}, {4, 0, 2, "reg4-b2"},
                               {4, 0, 3, "reg4"}};
const Variant kVariantsMn[] = {{4, 0, 1, "reg4"}, {0, 16, 1, "cp16"}};

const Variant& variant_of(int M, int v)
{
    return M == 1 ? kVariantsM1[v] : kVariantsMn[v];
}

// Entry 0, unless EXLLAMA_Q4_VARIANT names another (A/B timings of whole models).
int default_variant(int M)
{
    static const char* forced = std::getenv("EXLLAMA_Q4_VARIANT");
    if (!forced) return 0;
    const int n = q4_gemm_num_variants(M);
    for (int i = 0; i < n; ++i)
        if (std::strcmp(variant_of(M, i).name, forced) == 0) return i;
    return 0;
}

// Packed rows a thread row keeps at least before K is split further (EXLLAMA_Q4_MIN_ROWS for A/B runs).
int min_rows_per_thread()
{
    static const int rows = [] {
        const char* e = std::getenv("EXLLAMA_Q4_MIN_ROWS");
        const int v = e ? std::atoi(e) : 0;
        return v > 0 ? v : 16;
    }();
    return rows;
}

// Packed rows a thread keeps in a sparse M = 1 grid (see q4_gemm_plan): the two batches of U = 4 it loads first.
constexpr int kSparseRowsPerThread = 8;

size_t plan_smem(int M, int rows_per_split, int tn, int S)
{
    const size_t ring = (size_t)S * Q4_THREADS * 16;
    const size_t xbytes = (size_t)M * rows_per_split * 8 * 4 + (size_t)M * rows_per_split * 4;
    const size_t rbytes = (size_t)(Q4_THREADS / 32) * M * tn * 4;
    return std::max(ring + xbytes, rbytes);
}

}  // namespace

int q4_gemm_num_variants(int M)
{
    return M == 1 ? (int)(sizeof(kVariantsM1) / sizeof(Variant)) : (int)(sizeof(kVariantsMn) / sizeof(Variant));
}

const char* q4_gemm_variant_name(int M, int variant)
{
    if (M < 1 || M > Q4_MAX_ROWS || variant < 0 || variant >= q4_gemm_num_variants(M)) return "?";
    return variant_of(M, variant).name;
}

Q4GemmPlan q4_gemm_plan(int M, int K, int N, int groups, int sm_count, size_t smem_optin, int cc_major,
                        int tn, int splits, int variant, int pdl)
{
    Q4GemmPlan p{};
    p.splits = 0;
    if (M < 1 || M > Q4_MAX_ROWS || K <= 0 || N <= 0 || (K & 7) || (N & 3) || groups <= 0 || K % groups) return p;
    if ((K / groups) & 7) return p;
    if (variant < 0 || variant >= q4_gemm_num_variants(M)) variant = default_variant(M);
    const int S = variant_of(M, variant).S;
    const int Kp = K / 8;
    if (sm_count <= 0) sm_count = 1;

    // Automatic tile width and split count (fitted to H100 sweeps, docs/performance.md): as many
    // blocks as fit about one wave (resident blocks per multiprocessor x multiprocessors, + 30%),
    // while each thread row keeps >= 16 packed rows (4 batches of loads) and split-K stays small;
    // ties go to wider tiles (longer contiguous rows per warp), which also have fewer splits.
    const int per_sm = M == 1 ? variant_of(M, variant).MINB : (M == 2 ? 2 : 1);
    const double cap = 1.3 * per_sm * sm_count;
    if (tn == 0 || splits <= 0)
    {
        int best_tn = 0, best_splits = 0;
        double best_blocks = 0;
        bool best_over = true;
        for (int cand : {128, 64, 32})
        {
            if (tn != 0 && cand != tn) continue;
            const int ctiles = EXL_DIV_UP(N, cand);
            const int ctrows = Q4_THREADS / (cand / 4);
            int cs = splits;
            if (cs <= 0)
            {
                int by_rows = std::max(1, Kp / (ctrows * min_rows_per_thread()));
                const int by_wave = std::max(1, (int)(cap / ctiles));
                // M = 1, a grid under half the resident blocks (the 7B's o_proj: 128 of 396): split K further,
                // down to the two batches of 4 rows a thread requests before the PDL wait, so all its weights are
                // in flight before the previous kernel ends. 7B 518 / 438 -> 521 / 449-450 t/s; larger grids and
                // fewer rows were slower (docs/performance.md, session 6).
                if (M == 1 && ctiles * std::min(by_rows, by_wave) < 0.5 * per_sm * sm_count)
                    by_rows = std::max(1, Kp / (ctrows * kSparseRowsPerThread));
                cs = std::min(by_rows, by_wave);
            }
            const double blocks = (double)ctiles * cs;
            const bool over = blocks > cap;
            // Prefer fitting the wave; then more blocks (or, if nothing fits, fewer); ties keep the wider tile.
            const bool better = best_tn == 0 || (best_over && !over) ||
                                (over == best_over && (over ? blocks < best_blocks : blocks > best_blocks));
            if (better)
            {
                best_tn = cand;
                best_splits = cs;
                best_blocks = blocks;
                best_over = over;
            }
        }
        tn = best_tn;
        splits = best_splits;
    }
    if (tn != 32 && tn != 64 && tn != 128) return p;
    const int lpr = tn / 4;
    const int trows = Q4_THREADS / lpr;
    const int tiles = EXL_DIV_UP(N, tn);

    splits = std::min(splits, Kp);
    int rps = EXL_DIV_UP(Kp, splits);
    // Shared memory holds x for the block's K range: split further if it does not fit.
    while (plan_smem(M, rps, tn, S) > smem_optin && rps > 1)
    {
        ++splits;
        rps = EXL_DIV_UP(Kp, splits);
    }
    splits = EXL_DIV_UP(Kp, rps);           // no empty splits
    if (splits > 1 && tiles > Q4_COUNTERS) return p;
    if (plan_smem(M, rps, tn, S) > smem_optin) return p;

    p.tn = tn;
    p.splits = splits;
    p.rows_per_split = rps;
    p.rows_per_trow = EXL_DIV_UP(rps, trows);
    p.variant = variant;
    p.tiles = tiles;
    p.smem_bytes = plan_smem(M, rps, tn, S);
    p.pdl = (cc_major >= 9 && pdl > 0) ? std::min(pdl, 2) : 0;
    return p;
}

template <int M>
static cudaError_t dispatch_variant(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream)
{
    if constexpr (M == 1)
    {
        switch (plan.variant)
        {
            case 1: return q4_gemm_launch_t<1, 4, 0, 3, kProdH2>(plan, args, stream);
            case 2: return q4_gemm_launch_t<1, 0, 16, 1>(plan, args, stream);
            case 3: return q4_gemm_launch_t<1, 4, 0, 2>(plan, args, stream);
            case 4: return q4_gemm_launch_t<1, 4, 0, 3>(plan, args, stream);
            default: return q4_gemm_launch_t<1, 4, 0, 3, kProdI16>(plan, args, stream);
        }
    }
    else
    {
        if (plan.variant == 1) return q4_gemm_launch_t<M, 0, 16, 1>(plan, args, stream);
        return q4_gemm_launch_t<M, 4, 0, 1>(plan, args, stream);
    }
}

cudaError_t q4_gemm_small_launch(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream)
{
    if (plan.splits <= 0) return cudaErrorInvalidValue;
    switch (args.M)
    {
        case 1: return dispatch_variant<1>(plan, args, stream);
        case 2: return dispatch_variant<2>(plan, args, stream);
        case 3: return dispatch_variant<3>(plan, args, stream);
        case 4: return dispatch_variant<4>(plan, args, stream);
        case 5: return dispatch_variant<5>(plan, args, stream);
        case 6: return dispatch_variant<6>(plan, args, stream);
        case 7: return dispatch_variant<7>(plan, args, stream);
        case 8: return dispatch_variant<8>(plan, args, stream);
        default: return cudaErrorInvalidValue;
    }
}
