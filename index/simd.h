// Vector helpers of the index: AVX2/FMA/F16C code paths compiled with target attributes
// (no global -mavx2), chosen at run time, each with a portable fallback giving the same
// results up to float rounding.
#ifndef KVTIER_INDEX_SIMD_H_
#define KVTIER_INDEX_SIMD_H_

#include <cstdint>

namespace kvtier::simd {

// Whether this CPU runs the AVX2 + FMA + F16C paths (checked once).
bool HasAvx2();

// fp16 bits <-> float for n elements. ToHalf saturates to +-65504 (no infinities) and
// rounds to nearest even; NaN stays NaN.
void HalfToFloat(const uint16_t* in, float* out, uint64_t n);
void FloatToHalf(const float* in, uint16_t* out, uint64_t n);

// bf16 bits -> float for n elements.
void Bf16ToFloat(const uint16_t* in, float* out, uint64_t n);

// sum_i a[i] * b[i], and sum_i (a[i] - b[i])^2.
float Dot(const float* a, const float* b, uint32_t n);
float SquaredDistance(const float* a, const float* b, uint32_t n);

// out[r] = SquaredDistance(rows + r * n, v, n) for r < count, the same bits as those
// calls (several rows in flight).
void SquaredDistances(const float* rows, uint32_t count, const float* v, uint32_t n, float* out);

// For `count` fp16 rows of head_dim elements (row r at rows + r * head_dim) and g float
// queries (query h at queries + h * head_dim): dots[h * dots_stride + r] = q_h . row_r.
void DotsF16(const uint16_t* rows, uint32_t count, uint32_t head_dim, const float* queries,
             uint32_t g, float* dots, uint64_t dots_stride);

// The same for float rows.
void DotsF32(const float* rows, uint32_t count, uint32_t head_dim, const float* queries, uint32_t g,
             float* dots, uint64_t dots_stride);

// The same for int8 rows (the raw integers: the caller applies each row's scale).
void DotsI8(const int8_t* rows, uint32_t count, uint32_t head_dim, const float* queries, uint32_t g,
            float* dots, uint64_t dots_stride);

// The largest query magnitude QuantizeI16 uses for vectors of n elements: 32767, less
// when n * 127 * 32767 would overflow int32 (so DotsI8I16 is exact for n <= 1024).
int32_t I16Limit(uint32_t n);

// dst[i] += src[i] for i < n.
void AddTo(float* dst, const float* src, uint64_t n);

// k-means assignment from dot products: for t < n, assign[t] = the c < count minimising
// (norms[t] - 2 * dots[c * n + t]) + cnorm[c] (float, in that order), ties and NaN to
// the lower c (a scalar loop keeping strictly smaller distances); the same on every path.
void NearestCentroids(const float* norms, const float* dots, uint32_t n, const float* cnorm,
                      uint32_t count, uint32_t* assign);

// Quantizes n floats for DotsI8I16: scale = max |x_i| / I16Limit(n) (in float), out_i =
// round(x_i / scale) (half away from zero). Returns the scale; 0 (and out all 0) when
// max |x_i| is 0 or not finite (or some x_i is NaN). The same integers on every machine.
float QuantizeI16(const float* x, uint32_t n, int16_t* out);

// For `count` int8 rows and g int16 queries (QuantizeI16): dots[h * dots_stride + r] =
// float(sum_c row_r[c] * q_h[c]), the sum exact in integers (so the same on every
// machine and code path); the caller applies the row's and the query's scales.
void DotsI8I16(const int8_t* rows, uint32_t count, uint32_t head_dim, const int16_t* queries,
               uint32_t g, float* dots, uint64_t dots_stride);

}  // namespace kvtier::simd

#endif  // KVTIER_INDEX_SIMD_H_
