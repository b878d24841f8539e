// The estimator's shared steps (index/layer_index.h): per-block relative masses from dot
// products, and the fusion of per-head masses into a selection. Every backend that uses
// the estimator goes through these, so backends differ only in how they get the dot
// products.
//
// Masses are carried relative to a per-head constant: mass_h(b) = exp(e_h(b) - M_h) for
// any M_h (usually the head's largest term, so nothing overflows). The fusion divides by
// sum_b mass_h(b), where M_h cancels: F(b) = sum_h mass_h(b) / sum_b' mass_h(b') is
// exactly sum_h exp(e_h(b) - Z_h). No logarithm is ever taken.
#ifndef KVTIER_INDEX_FUSION_H_
#define KVTIER_INDEX_FUSION_H_

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "index/layer_index.h"

namespace kvtier {

// In place: v[i] = exp(v[i]) for i < n (AVX2 when the CPU has it; relative error below
// 2e-7 in [-87, 88]; inputs below -87, -infinity included, give 0; NaN gives 0).
void ExpInPlace(float* v, uint64_t n);

// The largest of v[0..n), NaN ignored (-infinity when none); the sum of v[0..n) in double.
float MaxOf(const float* v, uint64_t n);
double SumOf(const float* v, uint64_t n);

// Per block, sum_j exp(terms[i * rows + j] - shift), terms being (scale * dot +
// log weight) already: out[i] for i < n. `terms` is overwritten. Returns the shift
// used (the largest term; -infinity when every term is -infinity, and then every out[i]
// is 0).
float MassFromTerms(float* terms, uint64_t n, uint32_t rows, float* out);

// MassFromTerms given the largest term `max` (as MaxOf(terms, n * rows) would return it):
// the same results. Returns the shift used.
float MassFromTermsMax(float* terms, uint64_t n, uint32_t rows, float max, float* out);

// In place, t[i] = t[i] * (row_scale[i] * s) + add[i] for i < n; returns MaxOf of the
// results (two-stage scoring's first pass: integer dot products to terms).
float ScaleAddMax(float* t, const float* row_scale, float s, const float* add, uint64_t n);

// Fusion and top-k over n indexed blocks. `mass` is [num_query_heads][stride] floats
// (mass_h of block ids[i] at mass[h * stride + i], relative to any per-head constant;
// each >= 0). Writes `out` and `scores` as LayerIndex::Select does. A head whose masses
// are all 0 contributes nothing. Keeps its scratch between calls.
class Fusion {
 public:
  Status Run(const IndexConfig& config, const SelectParams& params, std::span<const uint64_t> ids,
             const float* mass, uint64_t stride, std::span<int64_t> out, std::span<float> scores);

 private:
  std::vector<float> fused_;                      // [score rows][n]
  std::vector<std::pair<float, uint64_t>> rank_;  // candidates of one row
};

}  // namespace kvtier

#endif  // KVTIER_INDEX_FUSION_H_
