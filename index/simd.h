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

}  // namespace kvtier::simd

#endif  // KVTIER_INDEX_SIMD_H_
