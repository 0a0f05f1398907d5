// AVX2 helpers shared by the CPU kernels: horizontal sums, exp. CPUK_AVX2 says whether this build has them.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPUK_AVX2 1
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>

namespace cpuk {

#if CPUK_AVX2
inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Eight 8-lane sums -> [sum a, ..., sum h].
inline __m256 hsum8x8(__m256 a, __m256 b, __m256 c, __m256 d, __m256 e, __m256 f, __m256 g, __m256 h)
{
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));   // [a b c d | a b c d] halves
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(e, f), _mm256_hadd_ps(g, h));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// exp(x), relative error ~2e-7 over the float range (Cephes' polynomial); x < -87.3 gives 0.
inline __m256 exp8(__m256 x)
{
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504019f);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sum of exp(x[i] - m) over n floats (exp(-inf) = 0), in fp64 per 8 lanes
inline double sum_exp(const float* x, int64_t n, float m)
{
    double s = 0.0;
    int64_t i = 0;
#if CPUK_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) s += (double)hsum8(exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
#endif
    for (; i < n; ++i) s += (double)std::exp(x[i] - m);
    return s;
}

// out[i] = exp(x[i] - m) for n floats
inline void exp_shifted(const float* x, int64_t n, float m, float* out)
{
    int64_t i = 0;
#if CPUK_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
#endif
    for (; i < n; ++i) out[i] = std::exp(x[i] - m);
}

}  // namespace cpuk
