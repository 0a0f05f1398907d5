// q4 GEMM for M <= 8 rows: planning (tile width, split-K) and dispatch to the template instances.
#include "q4_gemm.cuh"
#include "common.cuh"

#include <algorithm>

// variant = 2 * shape + load_mode; shape 0: 8 rows a batch, next batch prefetched; 1: 16 rows, no
// prefetch; 2: 4 rows, prefetched. load_mode 0: plain __ldg; 1: no L1 allocation + L2 evict-first.
static const int kDefaultVariant = 0;

int q4_gemm_num_variants(int M) { return M == 1 ? 6 : 2; }

const char* q4_gemm_variant_name(int variant)
{
    switch (variant)
    {
        case 0: return "u8-pipe";
        case 1: return "u8-pipe-evict";
        case 2: return "u16";
        case 3: return "u16-evict";
        case 4: return "u4-pipe";
        case 5: return "u4-pipe-evict";
        default: return "?";
    }
}

static size_t plan_smem(int M, int rows_per_split, int tn)
{
    const size_t xbytes = (size_t)M * rows_per_split * 8 * 4 + (size_t)M * rows_per_split * 4;
    const size_t rbytes = (size_t)(Q4_THREADS / 32) * M * tn * 4;
    return std::max(xbytes, rbytes);
}

Q4GemmPlan q4_gemm_plan(int M, int K, int N, int groups, int sm_count, size_t smem_optin,
                        int tn, int splits, int variant)
{
    Q4GemmPlan p{};
    p.splits = 0;
    if (M < 1 || M > Q4_MAX_ROWS || K <= 0 || N <= 0 || (K & 7) || (N & 3) || groups <= 0 || K % groups) return p;
    if ((K / groups) & 7) return p;
    if (variant < 0 || variant >= q4_gemm_num_variants(M)) variant = kDefaultVariant;
    const int Kp = K / 8;
    if (sm_count <= 0) sm_count = 1;

    if (tn == 0)
    {
        // Narrow tiles when wide ones would leave multiprocessors idle.
        tn = (EXL_DIV_UP(N, 64) >= sm_count) ? 64 : 32;
    }
    if (tn != 32 && tn != 64 && tn != 128) return p;
    const int lpr = tn / 4;
    const int trows = Q4_THREADS / lpr;
    const int tiles = EXL_DIV_UP(N, tn);

    if (splits <= 0)
    {
        // Aim for about two blocks per multiprocessor, but keep >= 8 packed rows per thread row.
        const int want = EXL_DIV_UP(2 * sm_count, tiles);
        const int cap = std::max(1, Kp / (trows * 8));
        splits = std::max(1, std::min(want, cap));
    }
    splits = std::min(splits, Kp);
    int rps = EXL_DIV_UP(Kp, splits);
    // Shared memory holds x for the block's K range: split further if it does not fit.
    while (plan_smem(M, rps, tn) > smem_optin && rps > 1)
    {
        ++splits;
        rps = EXL_DIV_UP(Kp, splits);
    }
    splits = EXL_DIV_UP(Kp, rps);           // no empty splits
    if (splits > 1 && tiles > Q4_COUNTERS) return p;
    if (plan_smem(M, rps, tn) > smem_optin) return p;

    p.tn = tn;
    p.splits = splits;
    p.rows_per_split = rps;
    p.rows_per_trow = EXL_DIV_UP(rps, trows);
    p.variant = variant;
    p.tiles = tiles;
    p.smem_bytes = plan_smem(M, rps, tn);
    return p;
}

template <int M>
static cudaError_t dispatch_variant(const Q4GemmPlan& plan, const Q4GemmArgs& args, cudaStream_t stream)
{
    if constexpr (M == 1)
    {
        switch (plan.variant)
        {
            case 1: return q4_gemm_launch_t<1, 8, true, 1>(plan, args, stream);
            case 2: return q4_gemm_launch_t<1, 16, false, 0>(plan, args, stream);
            case 3: return q4_gemm_launch_t<1, 16, false, 1>(plan, args, stream);
            case 4: return q4_gemm_launch_t<1, 4, true, 0>(plan, args, stream);
            case 5: return q4_gemm_launch_t<1, 4, true, 1>(plan, args, stream);
            default: return q4_gemm_launch_t<1, 8, true, 0>(plan, args, stream);
        }
    }
    else
    {
        if (plan.variant == 1) return q4_gemm_launch_t<M, 8, true, 1>(plan, args, stream);
        return q4_gemm_launch_t<M, 8, true, 0>(plan, args, stream);
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
