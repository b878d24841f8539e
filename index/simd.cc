#include "index/simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/dtype_convert.h"

namespace kvtier::simd {
namespace {

#define KVTIER_AVX2 __attribute__((target("avx2,fma,f16c")))

KVTIER_AVX2 inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 sums of a[0..7] in one vector (lane i = sum of a[i]).
KVTIER_AVX2 inline __m256 Hsum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);  // lanes: 0 1 2 3 | 0 1 2 3 (halves)
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

KVTIER_AVX2 void HalfToFloatAvx2(const uint16_t* in, float* out, uint64_t n) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = HalfBitsToFloat(in[i]);
}

KVTIER_AVX2 float DotAvx2(const float* a, const float* b, uint32_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float s = Hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

KVTIER_AVX2 float SquaredDistanceAvx2(const float* a, const float* b, uint32_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  uint32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    acc1 = _mm256_fmadd_ps(d1, d1, acc1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
  }
  float s = Hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

// SquaredDistanceAvx2 on 4 rows at once: each row's operations in the same order.
KVTIER_AVX2 void SquaredDistancesAvx2(const float* rows, uint32_t count, const float* v, uint32_t n,
                                      float* out) {
  constexpr uint32_t kR = 4;
  uint32_t r = 0;
  for (; r + kR <= count; r += kR) {
    __m256 acc0[kR], acc1[kR];
    for (uint32_t p = 0; p < kR; ++p) acc0[p] = acc1[p] = _mm256_setzero_ps();
    uint32_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 b0 = _mm256_loadu_ps(v + i), b1 = _mm256_loadu_ps(v + i + 8);
      for (uint32_t p = 0; p < kR; ++p) {
        const float* a = rows + uint64_t{r + p} * n;
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), b0);
        const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), b1);
        acc0[p] = _mm256_fmadd_ps(d0, d0, acc0[p]);
        acc1[p] = _mm256_fmadd_ps(d1, d1, acc1[p]);
      }
    }
    for (; i + 8 <= n; i += 8) {
      const __m256 b0 = _mm256_loadu_ps(v + i);
      for (uint32_t p = 0; p < kR; ++p) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(rows + uint64_t{r + p} * n + i), b0);
        acc0[p] = _mm256_fmadd_ps(d0, d0, acc0[p]);
      }
    }
    for (uint32_t p = 0; p < kR; ++p) {
      const float* a = rows + uint64_t{r + p} * n;
      float s = Hsum(_mm256_add_ps(acc0[p], acc1[p]));
      for (uint32_t j = i; j < n; ++j) s += (a[j] - v[j]) * (a[j] - v[j]);
      out[r + p] = s;
    }
  }
  for (; r < count; ++r) out[r] = SquaredDistanceAvx2(rows + uint64_t{r} * n, v, n);
}

KVTIER_AVX2 void Bf16ToFloatAvx2(const uint16_t* in, float* out, uint64_t n) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(w));
  }
  for (; i < n; ++i) out[i] = Bf16BitsToFloat(in[i]);
}

// Rows per pass for g queries: enough independent accumulators (8..12) to cover the FMA
// latency, few enough to stay in the 16 vector registers with the rows and a query.
constexpr uint32_t RowsPerPass(uint32_t g) {
  return g == 1 ? 8 : g == 2 ? 5 : g == 3 ? 4 : g == 4 ? 3 : g <= 6 ? 2 : 1;
}

// Up to 8 queries against `count` rows, RowsPerPass(G) rows at a time. head_dim % 8 == 0.
KVTIER_AVX2 inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KVTIER_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
KVTIER_AVX2 inline __m256 Load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

template <uint32_t G, uint32_t R, typename T>
KVTIER_AVX2 inline void DotsPass(const T* rows, uint32_t d, const float* q, float* dots,
                                 uint64_t stride) {
  __m256 acc[16];
  for (uint32_t i = 0; i < R * G; ++i) acc[i] = _mm256_setzero_ps();
  for (uint32_t c = 0; c < d; c += 8) {
    __m256 x[R];
    for (uint32_t p = 0; p < R; ++p) x[p] = Load8(rows + uint64_t{p} * d + c);
    for (uint32_t h = 0; h < G; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + uint64_t{h} * d + c);
      for (uint32_t p = 0; p < R; ++p) acc[p * G + h] = _mm256_fmadd_ps(x[p], qv, acc[p * G + h]);
    }
  }
  for (uint32_t i = R * G; i < 16; ++i) acc[i] = _mm256_setzero_ps();
  alignas(32) float sums[16];
  _mm256_store_ps(sums, Hsum8(acc));
  if (R * G > 8) _mm256_store_ps(sums + 8, Hsum8(acc + 8));
  for (uint32_t p = 0; p < R; ++p) {
    for (uint32_t h = 0; h < G; ++h) dots[h * stride + p] = sums[p * G + h];
  }
}

template <uint32_t G, typename T>
KVTIER_AVX2 void DotsFixed(const T* rows, uint32_t count, uint32_t d, const float* q, float* dots,
                           uint64_t stride) {
  constexpr uint32_t kR = RowsPerPass(G);
  uint32_t r = 0;
  for (; r + kR <= count; r += kR) {
    DotsPass<G, kR>(rows + uint64_t{r} * d, d, q, dots + r, stride);
  }
  for (; r < count; ++r) DotsPass<G, 1>(rows + uint64_t{r} * d, d, q, dots + r, stride);
}

template <typename T>
KVTIER_AVX2 void DotsAvx2(const T* rows, uint32_t count, uint32_t d, const float* q, uint32_t g,
                          float* dots, uint64_t stride) {
  // Eight or more queries go four at a time (3 rows a pass, loads shared by 12 FMAs; 8
  // queries would take 1 row a pass). Each dot's summation order is the same either way.
  const uint32_t step = g >= 8 ? 4 : 8;
  for (uint32_t h0 = 0; h0 < g; h0 += step) {
    const uint32_t gg = std::min(step, g - h0);
    const float* qq = q + uint64_t{h0} * d;
    float* dd = dots + h0 * stride;
    switch (gg) {
      case 1:
        DotsFixed<1>(rows, count, d, qq, dd, stride);
        break;
      case 2:
        DotsFixed<2>(rows, count, d, qq, dd, stride);
        break;
      case 3:
        DotsFixed<3>(rows, count, d, qq, dd, stride);
        break;
      case 4:
        DotsFixed<4>(rows, count, d, qq, dd, stride);
        break;
      case 5:
        DotsFixed<5>(rows, count, d, qq, dd, stride);
        break;
      case 6:
        DotsFixed<6>(rows, count, d, qq, dd, stride);
        break;
      case 7:
        DotsFixed<7>(rows, count, d, qq, dd, stride);
        break;
      default:
        DotsFixed<8>(rows, count, d, qq, dd, stride);
        break;
    }
  }
}

// The int32 sums of a[0..7] in one vector (lane i = sum of a[i]; exact).
KVTIER_AVX2 inline __m256i Hsum8i(const __m256i* a) {
  const __m256i s01 = _mm256_hadd_epi32(a[0], a[1]);
  const __m256i s23 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i s45 = _mm256_hadd_epi32(a[4], a[5]);
  const __m256i s67 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i s0123 = _mm256_hadd_epi32(s01, s23);
  const __m256i s4567 = _mm256_hadd_epi32(s45, s67);
  const __m256i lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
  const __m256i hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
  return _mm256_add_epi32(lo, hi);
}

// int8 rows against int16 queries, 16 elements a step: each row sign-extended once to
// int16, then vpmaddwd (pairs of products summed into int32) per query. head_dim % 16 == 0.
template <uint32_t G, uint32_t R>
KVTIER_AVX2 inline void DotsI8I16Pass(const int8_t* rows, uint32_t d, const int16_t* q, float* dots,
                                      uint64_t stride) {
  __m256i acc[16];
  for (uint32_t i = 0; i < 16; ++i) acc[i] = _mm256_setzero_si256();
  for (uint32_t c = 0; c < d; c += 16) {
    __m256i x[R];
    for (uint32_t p = 0; p < R; ++p) {
      x[p] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + uint64_t{p} * d + c)));
    }
    for (uint32_t h = 0; h < G; ++h) {
      const __m256i qv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + uint64_t{h} * d + c));
      for (uint32_t p = 0; p < R; ++p) {
        acc[p * G + h] = _mm256_add_epi32(acc[p * G + h], _mm256_madd_epi16(x[p], qv));
      }
    }
  }
  alignas(32) int32_t sums[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), Hsum8i(acc));
  if (R * G > 8) _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), Hsum8i(acc + 8));
  for (uint32_t p = 0; p < R; ++p) {
    for (uint32_t h = 0; h < G; ++h) dots[h * stride + p] = static_cast<float>(sums[p * G + h]);
  }
}

template <uint32_t G>
KVTIER_AVX2 void DotsI8I16Fixed(const int8_t* rows, uint32_t count, uint32_t d, const int16_t* q,
                                float* dots, uint64_t stride) {
  constexpr uint32_t kR = RowsPerPass(G);
  uint32_t r = 0;
  for (; r + kR <= count; r += kR) {
    DotsI8I16Pass<G, kR>(rows + uint64_t{r} * d, d, q, dots + r, stride);
  }
  for (; r < count; ++r) DotsI8I16Pass<G, 1>(rows + uint64_t{r} * d, d, q, dots + r, stride);
}

KVTIER_AVX2 void DotsI8I16Avx2(const int8_t* rows, uint32_t count, uint32_t d, const int16_t* q,
                               uint32_t g, float* dots, uint64_t stride) {
  for (uint32_t h0 = 0; h0 < g; h0 += 4) {
    const uint32_t gg = std::min(4u, g - h0);
    const int16_t* qq = q + uint64_t{h0} * d;
    float* dd = dots + h0 * stride;
    switch (gg) {
      case 1:
        DotsI8I16Fixed<1>(rows, count, d, qq, dd, stride);
        break;
      case 2:
        DotsI8I16Fixed<2>(rows, count, d, qq, dd, stride);
        break;
      case 3:
        DotsI8I16Fixed<3>(rows, count, d, qq, dd, stride);
        break;
      default:
        DotsI8I16Fixed<4>(rows, count, d, qq, dd, stride);
        break;
    }
  }
}

// F16C conversion of 8 floats at a time, saturated to +-65504 first; a chunk holding a NaN
// goes through the scalar code (so NaN payloads match it). Rounds to nearest even like
// FloatToHalfBits, subnormals included: the same bits.
KVTIER_AVX2 void FloatToHalfAvx2(const float* in, uint16_t* out, uint64_t n) {
  const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(in + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (uint64_t j = i; j < i + 8; ++j) {
        const float x = in[j];
        out[j] = FloatToHalfBits(x != x ? x : std::clamp(x, -65504.0f, 65504.0f));
      }
      continue;
    }
    const __m256 c = _mm256_max_ps(lo, _mm256_min_ps(hi, v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) {
    const float x = in[i];
    out[i] = FloatToHalfBits(x != x ? x : std::clamp(x, -65504.0f, 65504.0f));
  }
}

// Eight keys at a time; the distance as the scalar code forms it (2 * dot is exact, so a
// contraction of the subtraction into an FMA would not change it either).
KVTIER_AVX2 void NearestCentroidsAvx2(const float* norms, const float* dots, uint32_t n,
                                      const float* cnorm, uint32_t count, uint32_t* assign) {
  const __m256 two = _mm256_set1_ps(2.0f);
  uint32_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 nv = _mm256_loadu_ps(norms + t);
    __m256 best = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256i arg = _mm256_setzero_si256();
    for (uint32_t c = 0; c < count; ++c) {
      const __m256 dist = _mm256_add_ps(
          _mm256_sub_ps(nv, _mm256_mul_ps(two, _mm256_loadu_ps(dots + uint64_t{c} * n + t))),
          _mm256_set1_ps(cnorm[c]));
      const __m256 lt = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
      best = _mm256_blendv_ps(best, dist, lt);
      arg = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(arg), _mm256_castsi256_ps(_mm256_set1_epi32(int(c))), lt));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(assign + t), arg);
  }
  for (; t < n; ++t) {
    uint32_t a = 0;
    float bd = std::numeric_limits<float>::infinity();
    for (uint32_t c = 0; c < count; ++c) {
      const float dist = norms[t] - 2.0f * dots[uint64_t{c} * n + t] + cnorm[c];
      if (dist < bd) bd = dist, a = c;
    }
    assign[t] = a;
  }
}

KVTIER_AVX2 void AddToAvx2(float* dst, const float* src, uint64_t n) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
  }
  for (; i < n; ++i) dst[i] += src[i];
}

void DotsI8I16Scalar(const int8_t* rows, uint32_t count, uint32_t d, const int16_t* q, uint32_t g,
                     float* dots, uint64_t stride) {
  for (uint32_t r = 0; r < count; ++r) {
    for (uint32_t h = 0; h < g; ++h) {
      int32_t s = 0;
      for (uint32_t c = 0; c < d; ++c) {
        s += int32_t{rows[uint64_t{r} * d + c]} * int32_t{q[uint64_t{h} * d + c]};
      }
      dots[h * stride + r] = static_cast<float>(s);
    }
  }
}

void DotsF32Scalar(const float* rows, uint32_t count, uint32_t d, const float* q, uint32_t g,
                   float* dots, uint64_t stride) {
  for (uint32_t r = 0; r < count; ++r) {
    for (uint32_t h = 0; h < g; ++h) {
      float s = 0;
      for (uint32_t c = 0; c < d; ++c) s += rows[uint64_t{r} * d + c] * q[uint64_t{h} * d + c];
      dots[h * stride + r] = s;
    }
  }
}

void DotsF16Scalar(const uint16_t* rows, uint32_t count, uint32_t d, const float* q, uint32_t g,
                   float* dots, uint64_t stride) {
  std::vector<float> x(d);
  for (uint32_t r = 0; r < count; ++r) {
    for (uint32_t c = 0; c < d; ++c) x[c] = HalfBitsToFloat(rows[uint64_t{r} * d + c]);
    for (uint32_t h = 0; h < g; ++h) {
      float s = 0;
      for (uint32_t c = 0; c < d; ++c) s += x[c] * q[uint64_t{h} * d + c];
      dots[h * stride + r] = s;
    }
  }
}

void DotsI8Scalar(const int8_t* rows, uint32_t count, uint32_t d, const float* q, uint32_t g,
                  float* dots, uint64_t stride) {
  for (uint32_t r = 0; r < count; ++r) {
    for (uint32_t h = 0; h < g; ++h) {
      float s = 0;
      for (uint32_t c = 0; c < d; ++c) {
        s += static_cast<float>(rows[uint64_t{r} * d + c]) * q[uint64_t{h} * d + c];
      }
      dots[h * stride + r] = s;
    }
  }
}

}  // namespace

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

void HalfToFloat(const uint16_t* in, float* out, uint64_t n) {
  if (HasAvx2()) return HalfToFloatAvx2(in, out, n);
  for (uint64_t i = 0; i < n; ++i) out[i] = HalfBitsToFloat(in[i]);
}

void FloatToHalf(const float* in, uint16_t* out, uint64_t n) {
  if (HasAvx2()) return FloatToHalfAvx2(in, out, n);
  for (uint64_t i = 0; i < n; ++i) {
    const float v = in[i];
    out[i] = FloatToHalfBits(v != v ? v : std::clamp(v, -65504.0f, 65504.0f));
  }
}

void Bf16ToFloat(const uint16_t* in, float* out, uint64_t n) {
  if (HasAvx2()) return Bf16ToFloatAvx2(in, out, n);
  for (uint64_t i = 0; i < n; ++i) out[i] = Bf16BitsToFloat(in[i]);
}

float SquaredDistance(const float* a, const float* b, uint32_t n) {
  if (HasAvx2()) return SquaredDistanceAvx2(a, b, n);
  float s = 0;
  for (uint32_t i = 0; i < n; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

void SquaredDistances(const float* rows, uint32_t count, const float* v, uint32_t n, float* out) {
  if (HasAvx2()) return SquaredDistancesAvx2(rows, count, v, n, out);
  for (uint32_t r = 0; r < count; ++r) out[r] = SquaredDistance(rows + uint64_t{r} * n, v, n);
}

float Dot(const float* a, const float* b, uint32_t n) {
  if (HasAvx2()) return DotAvx2(a, b, n);
  float s = 0;
  for (uint32_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void DotsF16(const uint16_t* rows, uint32_t count, uint32_t head_dim, const float* queries,
             uint32_t g, float* dots, uint64_t dots_stride) {
  if (HasAvx2() && head_dim % 8 == 0) {
    return DotsAvx2(rows, count, head_dim, queries, g, dots, dots_stride);
  }
  DotsF16Scalar(rows, count, head_dim, queries, g, dots, dots_stride);
}

void DotsF32(const float* rows, uint32_t count, uint32_t head_dim, const float* queries, uint32_t g,
             float* dots, uint64_t dots_stride) {
  if (HasAvx2() && head_dim % 8 == 0) {
    return DotsAvx2(rows, count, head_dim, queries, g, dots, dots_stride);
  }
  DotsF32Scalar(rows, count, head_dim, queries, g, dots, dots_stride);
}

void DotsI8(const int8_t* rows, uint32_t count, uint32_t head_dim, const float* queries, uint32_t g,
            float* dots, uint64_t dots_stride) {
  if (HasAvx2() && head_dim % 8 == 0) {
    return DotsAvx2(rows, count, head_dim, queries, g, dots, dots_stride);
  }
  DotsI8Scalar(rows, count, head_dim, queries, g, dots, dots_stride);
}

void AddTo(float* dst, const float* src, uint64_t n) {
  if (HasAvx2()) return AddToAvx2(dst, src, n);
  for (uint64_t i = 0; i < n; ++i) dst[i] += src[i];
}

void NearestCentroids(const float* norms, const float* dots, uint32_t n, const float* cnorm,
                      uint32_t count, uint32_t* assign) {
  if (HasAvx2()) return NearestCentroidsAvx2(norms, dots, n, cnorm, count, assign);
  for (uint32_t t = 0; t < n; ++t) {
    uint32_t a = 0;
    float bd = std::numeric_limits<float>::infinity();
    for (uint32_t c = 0; c < count; ++c) {
      const float dist = norms[t] - 2.0f * dots[uint64_t{c} * n + t] + cnorm[c];
      if (dist < bd) bd = dist, a = c;
    }
    assign[t] = a;
  }
}

int32_t I16Limit(uint32_t n) {
  const int64_t limit = n == 0 ? 32767 : (int64_t{INT32_MAX} / 127) / n;
  return static_cast<int32_t>(std::clamp<int64_t>(limit, 1, 32767));
}

float QuantizeI16(const float* x, uint32_t n, int16_t* out) {
  float amax = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const float a = std::abs(x[i]);
    if (!(a <= amax)) amax = a;  // a NaN sticks
  }
  if (!(amax > 0) || !std::isfinite(amax)) {
    std::fill_n(out, n, int16_t{0});
    return 0.0f;
  }
  const int32_t limit = I16Limit(n);
  const float scale = amax / static_cast<float>(limit);
  for (uint32_t i = 0; i < n; ++i) {
    // std::lround without the library call: |v| <= limit (+ rounding), so the truncation
    // is exact and v - t is exact.
    const float v = x[i] / scale;
    int32_t t = static_cast<int32_t>(v);
    const float frac = v - static_cast<float>(t);
    t += frac >= 0.5f ? 1 : frac <= -0.5f ? -1 : 0;
    out[i] = static_cast<int16_t>(std::clamp(t, -limit, limit));
  }
  return scale;
}

void DotsI8I16(const int8_t* rows, uint32_t count, uint32_t head_dim, const int16_t* queries,
               uint32_t g, float* dots, uint64_t dots_stride) {
  if (HasAvx2() && head_dim % 16 == 0) {
    return DotsI8I16Avx2(rows, count, head_dim, queries, g, dots, dots_stride);
  }
  DotsI8I16Scalar(rows, count, head_dim, queries, g, dots, dots_stride);
}

}  // namespace kvtier::simd
