// The decode step's attention side (T = 1, positions on the device, CUDA-graph safe):
//   rope_kv_write     rotate q in place, rotate k and store k and v at the cache slot: one launch
//                     instead of two rotary kernels and two index_copy_ (prompts too: T tokens at
//                     slots slot[0] .. slot[0] + T - 1).
//   decode_attention  single-query GQA attention over the cache, keys [pad[b], pos] inside [0, kv_len),
//                     fp32 softmax, split over the key length (flash-decoding) with the partials
//                     combined by the last block of each (batch, kv head), in split order.
// Launcher API: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

#ifndef ATT_THREADS
#define ATT_THREADS 128
#endif
#define ATT_MAX_G 8                // query heads per kv head handled by one block
#define ATT_COUNTERS 65536         // per-device (batch x kv head) counters for the split combine

// q [B, T, H, D], k / v [B, T, Hkv, D] as element strides (batch, token, head; the head dim contiguous,
// every stride even, rows 4-byte aligned); caches [B, Hkv, S, D] contiguous; positions [B, T] strided.
struct RopeKvArgs
{
    half* q;
    int64_t qsb, qst, qsh;
    const half* k;
    int64_t ksb, kst, ksh;
    const half* v;
    int64_t vsb, vst, vsh;
    int B, T, H, Hkv, D;
    const float* cos;
    const float* sin;
    int max_pos;
    const void* positions;
    bool pos_is64;
    int64_t psb, pst;
    const int64_t* slot;
    half* k_cache;
    half* v_cache;
    int S;
};

cudaError_t rope_kv_write_launch(const RopeKvArgs& args, bool pdl, cudaStream_t stream);

struct DecodeAttnPlan
{
    int splits;       // blocks along the key length
    int chunk;        // keys per split
    size_t smem;      // dynamic shared memory per block
    int threads;      // per block: ATT_THREADS, or twice that for short key ranges (automatic plans)
};

// splits <= 0: automatic (about two blocks per multiprocessor). splits == 0 in the result: unsupported.
DecodeAttnPlan decode_attention_plan(int B, int Hkv, int G, int D, int kv_len, int sm_count, int splits);

// Optional rotary prologue of decode_attention (k == nullptr: off; q is then already rotated and the
// new token's k and v already in the cache). On: q is the unrotated query, k / v [B, 1, Hkv, D] the new
// token's key and value (element strides per batch and head); every block rotates its q heads at the
// rotary position pos[0] - pad[b] (clamped at 0; at or past max_pos: unrotated), and the block whose key
// range holds pos[0] rotates k and stores k and v in the cache at pos[0] - rope_kv_write and attention in
// one launch.
struct AttnRope
{
    const half* k;
    int64_t ksb, ksh;
    const half* v;
    int64_t vsb, vsh;
    const float* cos;
    const float* sin;
    int max_pos;
};

cudaError_t decode_attention_launch(const DecodeAttnPlan& plan, const half* q, int64_t qsb, int64_t qsh,
                                    half* k_cache, half* v_cache, int S, const int64_t* pos,
                                    const int64_t* pad, int B, int Hkv, int G, int D, int kv_len, half* out,
                                    float* workspace, int* counters, const AttnRope& rope, bool pdl,
                                    cudaStream_t stream);
