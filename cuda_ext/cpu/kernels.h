// CPU kernels on raw pointers (no torch types): block-quantized GEMV, dequantization, decode attention.
//
// Weight layouts (docs/design.md, "CPU layouts"); N is a multiple of TILE (a tile of 8 output rows),
// K a multiple of 32 (a block of 32 inputs):
//   q4: w  uint8 [N/8][K/32][8][16]: byte j of row r of a block holds q[k = 32 kb + j] in its low nibble and
//          q[k + 16] in its high nibble (0..15); sc, of fp16 [N/8][G][8]: W = sc * q + of per group of gs inputs.
//   q8: w  int8  [N/8][K/32][8][32]: q[k = 32 kb + j], -127..127; sc fp16 [N/8][K/32][8]: W = sc * q.
// Activations are quantized per block of 32 to int8 with one fp32 scale (xq = round(x / d), d = max|x| / 127),
// so one 32-input dot product is exact integer work.
#pragma once

#include <cstdint>

namespace cpuk {

constexpr int TILE = 8;   // output rows a tile

// What runs on this build: "avx512vnni", "avxvnni", "avx2" or "scalar".
const char* isa();

// One activation row quantized: q [K], d [K/32], and (q4) gsum [G]: the sum of the dequantized row over each group.
// Two levels (q2 not null): x = d (128 q + q2), the second level holding the first one's rounding error to 1/128 of
// its step (~15 bits in all), for products whose errors the softmax amplifies (q|k|v); one level: x = d q.
struct QRow {
    const int8_t* q;
    const int8_t* q2;
    const float* d;
    const float* gsum;
};

// x [K] -> rms_norm(x) * w (norm_w may be null: x as is), or silu(x[:K]) * x[K:2K] when silu (x is [2K]);
// written to out [K] (fp32).
void prologue_row(const float* x, int K, const float* norm_w, float eps, bool silu, float* out);

// out: q [K], d [K/32], gsum [K/gs] (gsum may be null); q2 [K] (may be null: one level) the second level.
void quantize_row(const float* x, int K, int gs, int8_t* q, int8_t* q2, float* d, float* gsum);

// y[n] (n in tile t: TILE rows) = dot of a tile with a quantized row; writes TILE floats.
void q4_tile(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, int gs, int64_t t, const QRow& x,
             float* y);
void q8_tile(const int8_t* w, const uint16_t* sc, int K, int64_t t, const QRow& x, float* y);

// Dense rows [n0, n1) of W (fp32, [n1 - n0][K]) from either layout (n0, n1 multiples of TILE).
void q4_dequant_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, int gs, int64_t n0,
                     int64_t n1, float* out);
void q8_dequant_rows(const int8_t* w, const uint16_t* sc, int K, int64_t n0, int64_t n1, float* out);

// Single-query attention of the heads h0..h1 of one row (GQA: head h reads kv head h / (H / Hkv)).
// q [H][D] (already rotated), cache k/v [Hkv][S][D] as fp32 or fp16 (kv_half), keys 0..L-1; out [H][D].
// scratch: L floats.
void decode_attention_heads(const float* q, const void* k, const void* v, bool kv_half, int H, int Hkv, int D,
                            int64_t S, int64_t L, float scale, int h0, int h1, float* scratch, float* out);

}  // namespace cpuk
