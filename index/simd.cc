#include "index/simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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
  for (uint32_t h0 = 0; h0 < g; h0 += 8) {
    const uint32_t gg = std::min(8u, g - h0);
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

}  // namespace kvtier::simd
