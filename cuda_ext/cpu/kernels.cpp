// CPU kernels (kernels.h). Built for the machine it runs on (-march=native, cuda_ext/build.py), so the
// instruction set is chosen where the engine runs: AVX-512 VNNI or AVX-VNNI dot products where present, AVX2
// (maddubs + madd, as llama.cpp) otherwise, plain C++ without AVX2.
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <algorithm>

#include "simd.h"

namespace cpuk {

namespace {

inline float half_to_float(uint16_t h)
{
#if CPUK_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {                       // subnormal: normalise
            int e = -1;
            do { man <<= 1; ++e; } while (!(man & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | man << 13;
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

#if CPUK_AVX2
// Sum of u8 x s8 products of 32 pairs, as 8 int32 lanes.
inline __m256i dot_u8s8(__m256i u, __m256i s)
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    // |u| <= 127 and |s| <= 127 here (q4: u <= 15), so the pairwise int16 sums never saturate.
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// 16 packed bytes -> 32 nibbles in k order (low nibbles are k 0..15, high nibbles k 16..31).
// One broadcast load, one variable shift (the upper lane by 4) and one mask.
inline __m256i unpack_q4(const uint8_t* p)
{
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}
#endif

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

const char* isa()
{
#if CPUK_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx512vnni";
#elif CPUK_AVX2 && defined(__AVXVNNI__)
    return "avxvnni";
#elif CPUK_AVX2
    return "avx2";
#else
    return "scalar";
#endif
}

void prologue_row(const float* x, int K, const float* norm_w, float eps, bool silu_mul, float* out)
{
    int k = 0;
    if (silu_mul) {
        const float* up = x + K;
#if CPUK_AVX2
        const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
        for (; k + 8 <= K; k += 8) {
            __m256 g = _mm256_loadu_ps(x + k);
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, neg))));
            _mm256_storeu_ps(out + k, _mm256_mul_ps(s, _mm256_loadu_ps(up + k)));
        }
#endif
        for (; k < K; ++k) out[k] = silu(x[k]) * up[k];
        return;
    }
    if (!norm_w) {
        if (out != x) std::memcpy(out, x, sizeof(float) * K);
        return;
    }
    float ss = 0.0f;
#if CPUK_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    ss = hsum8(acc);
#endif
    for (; k < K; ++k) ss += x[k] * x[k];
    const float r = 1.0f / std::sqrt(ss / K + eps);
    k = 0;
#if CPUK_AVX2
    const __m256 rv = _mm256_set1_ps(r);
    for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), rv), _mm256_loadu_ps(norm_w + k)));
#endif
    for (; k < K; ++k) out[k] = x[k] * r * norm_w[k];
}

void quantize_row(const float* x, int K, int gs, int8_t* q, int8_t* q2, float* d, float* gsum)
{
    const int KB = K / 32, bpg = gs / 32;
    for (int b = 0; b < KB; ++b) {
        const float* xb = x + 32 * b;
        int isum = 0;
#if CPUK_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
        const float amax = hmax8(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                               _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
        const float db = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 iv = _mm256_set1_ps(id), dv = _mm256_set1_ps(db), iv2 = _mm256_set1_ps(id * 128.0f);
        __m256i i1[4], i2[4], acc = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            // round half to even (the default rounding mode), as the reference's torch.round
            i1[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
            if (q2) {
                const __m256 r = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(i1[i]), dv, v[i]);
                i2[i] = _mm256_cvtps_epi32(_mm256_mul_ps(r, iv2));
                acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_slli_epi32(i1[i], 7), i2[i]));
            } else {
                acc = _mm256_add_epi32(acc, i1[i]);
            }
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        isum = _mm_cvtsi128_si32(s4);
        // packs work per 128-bit lane; the permute puts the four groups of 8 back in k order
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(i1[0], i1[1]), _mm256_packs_epi32(i1[2], i1[3])), order));
        if (q2)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q2 + 32 * b), _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(i2[0], i2[1]), _mm256_packs_epi32(i2[2], i2[3])), order));
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float db = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; ++j) {
            // round half to even, as the reference's torch.round
            const int v = (int)std::nearbyint(xb[j] * id);
            q[32 * b + j] = (int8_t)v;
            if (q2) {
                // |residual| <= db / 2, so |v2| <= 64
                const int v2 = (int)std::nearbyint(std::fma(-(float)v, db, xb[j]) * id * 128.0f);
                q2[32 * b + j] = (int8_t)v2;
                isum += 128 * v + q2[32 * b + j];
            } else {
                isum += v;
            }
        }
#endif
        d[b] = q2 ? db / 128.0f : db;
        if (gsum) {
            if (b % bpg == 0) gsum[b / bpg] = 0.0f;
            gsum[b / bpg] += d[b] * (float)isum;
        }
    }
}

namespace {

#if CPUK_AVX2
// The integer dot product of a weight block (as u8) with a quantized activation block, for one or two levels:
// two levels give 128 <w, q> + <w, q2> (|<w, q>| < 2^15 a lane, so the shifted sum stays exact).
template <bool TWO>
inline __m256i dot_act(__m256i u, __m256i s1, __m256i s2)
{
    if (TWO) return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(u, s1), 7), dot_u8s8(u, s2));
    return dot_u8s8(u, s1);
}
#endif

template <bool TWO>
void q4_tile_impl(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, int gs, int64_t t, const QRow& x,
                  float* y)
{
    const int KB = K / 32, G = K / gs, bpg = gs / 32;
    const uint8_t* wt = w + (int64_t)t * KB * TILE * 16;
    const uint16_t* st = sc + (int64_t)t * G * TILE;
    const uint16_t* ot = of + (int64_t)t * G * TILE;
#if CPUK_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m256 oacc = _mm256_setzero_ps();
    alignas(32) float sd[8];
    for (int g = 0; g < G; ++g) {
        const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 8 * g)));
        const __m256 o8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ot + 8 * g)));
        oacc = _mm256_fmadd_ps(o8, _mm256_set1_ps(x.gsum[g]), oacc);
        for (int j = 0; j < bpg; ++j) {
            const int kb = g * bpg + j;
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * kb));
            const __m256i xv2 = TWO ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q2 + 32 * kb)) : xv;
            _mm256_store_ps(sd, _mm256_mul_ps(s8, _mm256_set1_ps(x.d[kb])));
            const uint8_t* wb = wt + kb * TILE * 16;
#define CPUK_ROW(r, acc) \
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_act<TWO>(unpack_q4(wb + 16 * r), xv, xv2)), _mm256_broadcast_ss(sd + r), acc)
            CPUK_ROW(0, a0); CPUK_ROW(1, a1); CPUK_ROW(2, a2); CPUK_ROW(3, a3);
            CPUK_ROW(4, a4); CPUK_ROW(5, a5); CPUK_ROW(6, a6); CPUK_ROW(7, a7);
#undef CPUK_ROW
        }
    }
    _mm256_storeu_ps(y, _mm256_add_ps(hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7), oacc));
#else
    for (int r = 0; r < TILE; ++r) {
        float acc = 0.0f;
        for (int g = 0; g < G; ++g) {
            float ga = 0.0f;
            for (int j = 0; j < bpg; ++j) {
                const int kb = g * bpg + j;
                const uint8_t* wb = wt + (kb * TILE + r) * 16;
                const int8_t* xq = x.q + 32 * kb;
                int s = 0;
                for (int i = 0; i < 16; ++i) {
                    s += (wb[i] & 0xF) * (TWO ? 128 * xq[i] + x.q2[32 * kb + i] : xq[i]);
                    s += (wb[i] >> 4) * (TWO ? 128 * xq[i + 16] + x.q2[32 * kb + i + 16] : xq[i + 16]);
                }
                ga += x.d[kb] * (float)s;
            }
            acc += half_to_float(st[TILE * g + r]) * ga + half_to_float(ot[TILE * g + r]) * x.gsum[g];
        }
        y[r] = acc;
    }
#endif
}

template <bool TWO>
void q8_tile_impl(const int8_t* w, const uint16_t* sc, int K, int64_t t, const QRow& x, float* y)
{
    const int KB = K / 32;
    const int8_t* wt = w + (int64_t)t * KB * TILE * 32;
    const uint16_t* st = sc + (int64_t)t * KB * TILE;
#if CPUK_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    alignas(32) float sd[8];
    for (int kb = 0; kb < KB; ++kb) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * kb));
        const __m256i xv2 = TWO ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q2 + 32 * kb)) : xv;
        const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 8 * kb)));
        _mm256_store_ps(sd, _mm256_mul_ps(s8, _mm256_set1_ps(x.d[kb])));
        const int8_t* wb = wt + kb * TILE * 32;
        // u8 x s8 dot products by the sign trick: |w| times x with w's sign
#define CPUK_ROW(r, acc)                                                                                          \
    {                                                                                                             \
        const __m256i wr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * r));                   \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_act<TWO>(_mm256_sign_epi8(wr, wr), _mm256_sign_epi8(xv, wr),  \
                                                              _mm256_sign_epi8(xv2, wr))),                      \
                              _mm256_broadcast_ss(sd + r), acc);                                                  \
    }
        CPUK_ROW(0, a0); CPUK_ROW(1, a1); CPUK_ROW(2, a2); CPUK_ROW(3, a3);
        CPUK_ROW(4, a4); CPUK_ROW(5, a5); CPUK_ROW(6, a6); CPUK_ROW(7, a7);
#undef CPUK_ROW
    }
    _mm256_storeu_ps(y, hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7));
#else
    for (int r = 0; r < TILE; ++r) {
        float acc = 0.0f;
        for (int kb = 0; kb < KB; ++kb) {
            const int8_t* wb = wt + (kb * TILE + r) * 32;
            const int8_t* xq = x.q + 32 * kb;
            int s = 0;
            for (int i = 0; i < 32; ++i) s += wb[i] * (TWO ? 128 * xq[i] + x.q2[32 * kb + i] : xq[i]);
            acc += half_to_float(st[TILE * kb + r]) * x.d[kb] * (float)s;
        }
        y[r] = acc;
    }
#endif
}

}  // namespace

void q4_tile(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, int gs, int64_t t, const QRow& x,
             float* y)
{
    x.q2 ? q4_tile_impl<true>(w, sc, of, K, gs, t, x, y) : q4_tile_impl<false>(w, sc, of, K, gs, t, x, y);
}

void q8_tile(const int8_t* w, const uint16_t* sc, int K, int64_t t, const QRow& x, float* y)
{
    x.q2 ? q8_tile_impl<true>(w, sc, K, t, x, y) : q8_tile_impl<false>(w, sc, K, t, x, y);
}

void q4_dequant_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* of, int K, int gs, int64_t n0,
                     int64_t n1, float* out)
{
    const int KB = K / 32, G = K / gs, bpg = gs / 32;
    for (int64_t n = n0; n < n1; ++n) {
        const int64_t t = n / TILE;
        const int r = (int)(n % TILE);
        float* o = out + (n - n0) * K;
        for (int kb = 0; kb < KB; ++kb) {
            const int g = kb / bpg;
            const float s = half_to_float(sc[(t * G + g) * TILE + r]), m = half_to_float(of[(t * G + g) * TILE + r]);
            const uint8_t* wb = w + ((t * KB + kb) * TILE + r) * 16;
            float* ob = o + 32 * kb;
#if CPUK_AVX2
            const __m256i q = unpack_q4(wb);                  // 32 bytes, k order
            const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
            const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_ps(ob + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), sv, mv));
#else
            for (int i = 0; i < 16; ++i) {
                ob[i] = s * (float)(wb[i] & 0xF) + m;
                ob[i + 16] = s * (float)(wb[i] >> 4) + m;
            }
#endif
        }
    }
}

void q8_dequant_rows(const int8_t* w, const uint16_t* sc, int K, int64_t n0, int64_t n1, float* out)
{
    const int KB = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
        const int64_t t = n / TILE;
        const int r = (int)(n % TILE);
        float* o = out + (n - n0) * K;
        for (int kb = 0; kb < KB; ++kb) {
            const float s = half_to_float(sc[(t * KB + kb) * TILE + r]);
            const int8_t* wb = w + ((t * KB + kb) * TILE + r) * 32;
#if CPUK_AVX2
            const __m256 sv = _mm256_set1_ps(s);
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_ps(o + 32 * kb + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 8 * j)))), sv));
#else
            for (int i = 0; i < 32; ++i) o[32 * kb + i] = s * (float)wb[i];
#endif
        }
    }
}

namespace {

inline float dot_row(const float* q, const void* k, bool half, int64_t off, int D)
{
    int d = 0;
    float s = 0.0f;
#if CPUK_AVX2
    __m256 acc = _mm256_setzero_ps();
    if (half) {
        const uint16_t* kp = static_cast<const uint16_t*>(k) + off;
        for (; d + 8 <= D; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d),
                                  _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + d))), acc);
    } else {
        const float* kp = static_cast<const float*>(k) + off;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kp + d), acc);
    }
    s = hsum8(acc);
#endif
    for (; d < D; ++d)
        s += q[d] * (half ? half_to_float(static_cast<const uint16_t*>(k)[off + d]) : static_cast<const float*>(k)[off + d]);
    return s;
}

inline void axpy_row(float a, const void* v, bool half, int64_t off, int D, float* o)
{
    int d = 0;
#if CPUK_AVX2
    const __m256 av = _mm256_set1_ps(a);
    if (half) {
        const uint16_t* vp = static_cast<const uint16_t*>(v) + off;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(av, _mm256_cvtph_ps(_mm_loadu_si128(
                                                            reinterpret_cast<const __m128i*>(vp + d))),
                                                    _mm256_loadu_ps(o + d)));
    } else {
        const float* vp = static_cast<const float*>(v) + off;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(av, _mm256_loadu_ps(vp + d), _mm256_loadu_ps(o + d)));
    }
#endif
    for (; d < D; ++d)
        o[d] += a * (half ? half_to_float(static_cast<const uint16_t*>(v)[off + d]) : static_cast<const float*>(v)[off + d]);
}

}  // namespace

void decode_attention_heads(const float* q, const void* k, const void* v, bool kv_half, int H, int Hkv, int D,
                            int64_t S, int64_t L, float scale, int h0, int h1, float* p, float* out)
{
    const int rep = H / Hkv;
    for (int h = h0; h < h1; ++h) {
        const int64_t base = (int64_t)(h / rep) * S * D;
        const float* qh = q + (int64_t)h * D;
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
            p[j] = scale * dot_row(qh, k, kv_half, base + j * D, D);
            m = std::max(m, p[j]);
        }
        float sum = 0.0f;
        int64_t j = 0;
#if CPUK_AVX2
        const __m256 mv = _mm256_set1_ps(m);
        __m256 sv = _mm256_setzero_ps();
        for (; j + 8 <= L; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
            _mm256_storeu_ps(p + j, e);
            sv = _mm256_add_ps(sv, e);
        }
        sum = hsum8(sv);
#endif
        for (; j < L; ++j) {
            p[j] = std::exp(p[j] - m);
            sum += p[j];
        }
        float* oh = out + (int64_t)h * D;
        std::fill(oh, oh + D, 0.0f);
        for (j = 0; j < L; ++j) axpy_row(p[j], v, kv_half, base + j * D, D, oh);
        const float inv = 1.0f / sum;
        for (int d = 0; d < D; ++d) oh[d] *= inv;
    }
}

}  // namespace cpuk
