#include "index/layer_index.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "index/backends.h"
#include "index/fusion.h"
#include "index/simd.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// v[i] = exp(v[i] - shift).
__attribute__((target("avx2,fma"))) void ExpAvx2(float* v, uint64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.3f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 p0 = _mm256_set1_ps(1.9875691500e-4f), p1 = _mm256_set1_ps(1.3981999507e-3f),
               p2 = _mm256_set1_ps(8.3334519073e-3f), p3 = _mm256_set1_ps(4.1665795894e-2f),
               p4 = _mm256_set1_ps(1.6666665459e-1f), p5 = _mm256_set1_ps(5.0000001201e-1f);
  const __m256 one = _mm256_set1_ps(1.0f);
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(v + i), sh);
    // x >= lo is false for NaN and for x below -87: those lanes become 0.
    const __m256 keep = _mm256_cmp_ps(x0, lo, _CMP_GE_OQ);
    __m256 x = _mm256_min_ps(_mm256_max_ps(x0, lo), hi);
    const __m256 fx =
        _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, ln2_hi, x);
    x = _mm256_fnmadd_ps(fx, ln2_lo, x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_fmadd_ps(p0, x, p1);
    y = _mm256_fmadd_ps(y, x, p2);
    y = _mm256_fmadd_ps(y, x, p3);
    y = _mm256_fmadd_ps(y, x, p4);
    y = _mm256_fmadd_ps(y, x, p5);
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, one));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_storeu_ps(v + i, _mm256_and_ps(y, keep));
  }
  for (; i < n; ++i) {
    const float x = v[i] - shift;
    v[i] = x >= -87.0f ? std::exp(std::min(x, 88.3f)) : 0.0f;
  }
}

__attribute__((target("avx2,fma"))) float ScaleAddMaxAvx2(float* t, const float* a, float s,
                                                          const float* b, uint64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  __m256 m0 = _mm256_set1_ps(kNegInf);
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_mul_ps(_mm256_loadu_ps(a + i), sv);
    const __m256 x =
        _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(t + i), f), _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(t + i, x);
    m0 = _mm256_max_ps(x, m0);  // m0 when x is NaN
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m0);
  float m = kNegInf;
  for (float x : lanes) m = x > m ? x : m;
  for (; i < n; ++i) {
    t[i] = t[i] * (a[i] * s) + b[i];
    m = t[i] > m ? t[i] : m;
  }
  return m;
}

// The largest of v[0..n) ignoring NaN (-infinity when none).
__attribute__((target("avx2,fma"))) float MaxAvx2(const float* v, uint64_t n) {
  __m256 a0 = _mm256_set1_ps(kNegInf), a1 = a0;
  uint64_t i = 0;
  // max_ps(x, acc) is acc when x is NaN.
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_max_ps(_mm256_loadu_ps(v + i), a0);
    a1 = _mm256_max_ps(_mm256_loadu_ps(v + i + 8), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(a0, a1));
  float m = kNegInf;
  for (float x : lanes) m = x > m ? x : m;
  for (; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// sum of v[0..n) in double.
__attribute__((target("avx2,fma"))) double SumAvx2(const float* v, uint64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0;
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm_loadu_ps(v + i)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm_loadu_ps(v + i + 4)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(a0, a1));
  double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) s += v[i];
  return s;
}

// The selection order: higher score first, ties by the lower block id; NaN as -inf.
bool Better(const std::pair<float, uint64_t>& a, const std::pair<float, uint64_t>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

// Top-k of `rank` (scores, ids) into out/scores (padding with -1 / 0).
void TakeTop(std::vector<std::pair<float, uint64_t>>& rank, uint32_t k, int64_t* out,
             float* scores) {
  const size_t take = std::min<size_t>(k, rank.size());
  std::partial_sort(rank.begin(), rank.begin() + take, rank.end(), Better);
  for (size_t i = 0; i < k; ++i) {
    out[i] = i < take ? static_cast<int64_t>(rank[i].second) : -1;
    if (scores != nullptr) scores[i] = i < take ? rank[i].first : 0.0f;
  }
}

}  // namespace

void ExpInPlace(float* v, uint64_t n) {
  if (simd::HasAvx2()) return ExpAvx2(v, n, 0.0f);
  for (uint64_t i = 0; i < n; ++i) v[i] = v[i] >= -87.0f ? std::exp(std::min(v[i], 88.3f)) : 0.0f;
}

float MaxOf(const float* v, uint64_t n) {
  if (simd::HasAvx2()) return MaxAvx2(v, n);
  float m = kNegInf;
  for (uint64_t i = 0; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

double SumOf(const float* v, uint64_t n) {
  if (simd::HasAvx2()) return SumAvx2(v, n);
  double s = 0;
  for (uint64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

float ScaleAddMax(float* t, const float* row_scale, float s, const float* add, uint64_t n) {
  if (simd::HasAvx2()) return ScaleAddMaxAvx2(t, row_scale, s, add, n);
  float m = kNegInf;
  for (uint64_t i = 0; i < n; ++i) {
    t[i] = t[i] * (row_scale[i] * s) + add[i];
    m = t[i] > m ? t[i] : m;
  }
  return m;
}

float MassFromTerms(float* terms, uint64_t n, uint32_t rows, float* out) {
  return MassFromTermsMax(terms, n, rows, MaxOf(terms, n * rows), out);
}

float MassFromTermsMax(float* terms, uint64_t n, uint32_t rows, float max, float* out) {
  const uint64_t count = n * rows;
  const float shift = max;
  if (shift == kNegInf || shift != shift) {
    std::fill_n(out, n, 0.0f);
    return kNegInf;
  }
  if (simd::HasAvx2()) {
    ExpAvx2(terms, count, shift);  // the subtraction fused in
  } else {
    for (uint64_t i = 0; i < count; ++i) terms[i] -= shift;
    ExpInPlace(terms, count);
  }
  if (rows == 1) {
    std::copy_n(terms, n, out);
  } else if (rows == 2) {
    for (uint64_t b = 0; b < n; ++b) out[b] = terms[2 * b] + terms[2 * b + 1];
  } else {
    for (uint64_t b = 0; b < n; ++b) {
      float s = 0;
      for (uint32_t j = 0; j < rows; ++j) s += terms[b * rows + j];
      out[b] = s;
    }
  }
  return shift;
}

Status Fusion::Run(const IndexConfig& config, const SelectParams& params,
                   std::span<const uint64_t> ids, const float* mass, uint64_t stride,
                   std::span<int64_t> out, std::span<float> scores) {
  const uint32_t hq = config.num_query_heads;
  const uint32_t kv = config.summary.num_kv_heads;
  const uint32_t g = hq / kv;
  const bool per_kv = params.scope == SelectionScope::kPerKvHead;
  const uint32_t score_rows = per_kv ? kv : 1;
  const uint64_t n = ids.size();
  fused_.assign(uint64_t{score_rows} * n, 0.0f);
  for (uint32_t h = 0; h < hq; ++h) {
    const float* m = mass + h * stride;
    const double total = SumOf(m, n);
    if (!(total > 0)) continue;
    const float inv = static_cast<float>(1.0 / total);
    float* f = fused_.data() + (per_kv ? uint64_t{h / g} * n : 0);
    for (uint64_t i = 0; i < n; ++i) f[i] += m[i] * inv;
  }
  for (uint32_t r = 0; r < score_rows; ++r) {
    rank_.clear();
    const float* f = fused_.data() + uint64_t{r} * n;
    for (uint64_t i = 0; i < n; ++i) {
      if (ids[i] < params.candidates_begin || ids[i] >= params.candidates_end) continue;
      rank_.emplace_back(f[i] == f[i] ? f[i] : kNegInf, ids[i]);
    }
    TakeTop(rank_, params.top_k, out.data() + uint64_t{r} * params.top_k,
            scores.empty() ? nullptr : scores.data() + uint64_t{r} * params.top_k);
  }
  return Status::OK();
}

uint64_t SelectOutputSize(const IndexConfig& config, SelectionScope scope, uint32_t top_k) {
  return scope == SelectionScope::kPerKvHead ? uint64_t{config.summary.num_kv_heads} * top_k
                                             : top_k;
}

Status ValidateSelect(const IndexConfig& config, const SelectParams& params,
                      std::span<const int64_t> out, std::span<const float> scores) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("Select: " + what);
  };
  const uint64_t q = uint64_t{config.num_query_heads} * config.summary.head_dim;
  if (params.queries.size() != q) {
    return bad("queries must hold num_query_heads * head_dim = " + std::to_string(q) +
               " floats, got " + std::to_string(params.queries.size()));
  }
  if (params.top_k == 0) return bad("top_k is 0");
  if (params.scope != SelectionScope::kPerLayer && params.scope != SelectionScope::kPerKvHead) {
    return bad("unknown scope");
  }
  if (params.scope == SelectionScope::kPerKvHead && config.backend == IndexBackend::kInfLLM) {
    return bad("the InfLLM formulation selects per layer only");
  }
  const uint64_t want = SelectOutputSize(config, params.scope, params.top_k);
  if (out.size() != want) {
    return bad("out must hold " + std::to_string(want) + " entries, got " +
               std::to_string(out.size()));
  }
  if (!scores.empty() && scores.size() != want) {
    return bad("scores must be empty or hold " + std::to_string(want) + " entries");
  }
  return Status::OK();
}

Result<std::unique_ptr<LayerIndex>> CreateLayerIndex(const IndexConfig& config) {
  KVTIER_RETURN_IF_ERROR(ValidateSummaryShape(config.summary));
  const uint32_t kv = config.summary.num_kv_heads;
  if (config.num_query_heads == 0 || config.num_query_heads % kv != 0) {
    return Status::InvalidArgument(
        "index: num_query_heads " + std::to_string(config.num_query_heads) +
        " is not a positive multiple of num_kv_heads " + std::to_string(kv));
  }
  if (!(config.scale >= 0.0f) || std::isinf(config.scale)) {
    return Status::InvalidArgument("index: bad scale");
  }
  if (config.coarse_rows > 0 || config.shortlist_factor > 0) {
    if (config.backend != IndexBackend::kScan || config.summary.kind != SummaryKind::kClusters) {
      return Status::InvalidArgument(
          "index: two-stage scoring needs the scan backend and kClusters summaries");
    }
    if (config.coarse_rows == 0 || config.coarse_rows >= config.summary.rows ||
        config.shortlist_factor == 0) {
      return Status::InvalidArgument("index: two-stage scoring needs coarse_rows in [1, " +
                                     std::to_string(config.summary.rows) +
                                     ") and shortlist_factor >= 1");
    }
  }
  switch (config.backend) {
    case IndexBackend::kScan:
      return CreateScanIndex(config);
    case IndexBackend::kFaissFlat:
    case IndexBackend::kFaissHnsw:
    case IndexBackend::kInfLLM:
      if (config.backend == IndexBackend::kFaissHnsw &&
          config.summary.kind == SummaryKind::kMinMax) {
        return Status::InvalidArgument("index: HNSW cannot search min/max summaries");
      }
      if (config.hnsw_m < 2 || config.hnsw_ef_search == 0) {
        return Status::InvalidArgument("index: hnsw_m below 2 or hnsw_ef_search 0");
      }
      return CreateFaissIndex(config);
    case IndexBackend::kGpu:
      return CreateGpuIndex(config);
    case IndexBackend::kAuto:
      return Status::InvalidArgument("index: resolve kAuto before creating an index");
  }
  return Status::InvalidArgument("index: unknown backend");
}

namespace {

// log sum_j exp(t_j) over the finite-or-not terms (-infinity when all are -infinity).
double LogSumExp(const std::vector<double>& t) {
  double m = -INFINITY;
  for (double v : t) m = std::max(m, v);
  if (m == -INFINITY) return m;
  double sum = 0;
  for (double v : t) sum += std::exp(v - m);
  return m + std::log(sum);
}

// The two-stage definition (the top of layer_index.h) in double precision.
void ReferenceTwoStage(const IndexConfig& config, std::span<const uint64_t> ids,
                       std::span<const BlockSummary* const> summaries, const SelectParams& params,
                       std::span<int64_t> out, std::span<float> scores) {
  const SummaryShape& s = config.summary;
  const uint32_t hq = config.num_query_heads, kv = s.num_kv_heads, g = hq / kv, d = s.head_dim;
  const uint32_t rows = s.rows, cr = config.coarse_rows;
  const double scale = config.scale > 0 ? config.scale : 1.0 / std::sqrt(double(d));
  const uint64_t n = ids.size();
  const bool per_kv = params.scope == SelectionScope::kPerKvHead;
  const uint32_t score_rows = per_kv ? kv : 1;
  const auto candidate = [&](uint64_t i) {
    return ids[i] >= params.candidates_begin && ids[i] < params.candidates_end;
  };
  std::vector<CoarseSummary> coarse(n);
  for (uint64_t i = 0; i < n; ++i) CoarsenSummary(s, *summaries[i], cr, &coarse[i]);
  // e1[h][i]: the coarse estimate; e2: the full one.
  std::vector<double> e1(uint64_t{hq} * n), t;
  const auto full = [&](uint32_t h, uint64_t i) {
    const float* q = params.queries.data() + uint64_t{h} * d;
    const BlockSummary& b = *summaries[i];
    const uint32_t k = h / g;
    t.assign(rows, -INFINITY);
    for (uint32_t j = 0; j < rows; ++j) {
      const double w = b.weights[uint64_t{k} * rows + j];
      if (w <= 0) continue;
      double dot = 0;
      for (uint32_t c = 0; c < d; ++c) {
        dot += q[c] * double(HalfBitsToFloat(b.vectors[(uint64_t{k} * rows + j) * d + c]));
      }
      t[j] = std::log(w) + scale * dot;
    }
    return LogSumExp(t);
  };
  std::vector<double> z1(hq);
  // The first pass's queries: s q_h in float, quantized (simd::QuantizeI16).
  const float scale_f = config.scale > 0 ? config.scale : 1.0f / std::sqrt(float(d));
  std::vector<float> qf(d);
  std::vector<int16_t> qi(d);
  for (uint32_t h = 0; h < hq; ++h) {
    for (uint32_t x = 0; x < d; ++x) qf[x] = params.queries[uint64_t{h} * d + x] * scale_f;
    const double qs = simd::QuantizeI16(qf.data(), d, qi.data());
    const uint32_t k = h / g;
    for (uint64_t i = 0; i < n; ++i) {
      const CoarseSummary& c = coarse[i];
      t.assign(cr, -INFINITY);
      for (uint32_t j = 0; j < cr; ++j) {
        const double w = c.weights[uint64_t{k} * cr + j];
        if (w <= 0) continue;
        int64_t dot = 0;
        for (uint32_t x = 0; x < d; ++x) {
          dot += int64_t{c.vectors[(uint64_t{k} * cr + j) * d + x]} * qi[x];
        }
        t[j] = std::log(w) + double(dot) * qs * c.scales[uint64_t{k} * cr + j];
      }
      e1[uint64_t{h} * n + i] = LogSumExp(t);
    }
    z1[h] = LogSumExp(std::vector<double>(e1.begin() + h * n, e1.begin() + (h + 1) * n));
  }
  std::vector<std::pair<double, uint64_t>> rank;  // (score, position)
  const auto better = [&](const std::pair<double, uint64_t>& a,
                          const std::pair<double, uint64_t>& b) {
    return a.first != b.first ? a.first > b.first : ids[a.second] < ids[b.second];
  };
  for (uint32_t r = 0; r < score_rows; ++r) {
    const uint32_t h0 = per_kv ? r * g : 0, h1 = per_kv ? h0 + g : hq;
    // The shortlist by the first pass's fusion.
    rank.clear();
    for (uint64_t i = 0; i < n; ++i) {
      if (!candidate(i)) continue;
      double f = 0;
      for (uint32_t h = h0; h < h1; ++h) {
        if (z1[h] != -INFINITY) f += std::exp(e1[uint64_t{h} * n + i] - z1[h]);
      }
      rank.emplace_back(f == f ? f : -INFINITY, i);
    }
    std::sort(rank.begin(), rank.end(), better);
    rank.resize(std::min<uint64_t>(rank.size(), uint64_t{config.shortlist_factor} * params.top_k));
    std::vector<bool> fine(n, false);
    for (const auto& [f, i] : rank) fine[i] = true;
    for (uint64_t i = 0; i < n; ++i) fine[i] = fine[i] || !candidate(i);
    // Z_h over the fine set's full estimates and the coarse ones elsewhere; the scores.
    std::vector<double> f(rank.size(), 0.0), e2(n);
    for (uint32_t h = h0; h < h1; ++h) {
      std::vector<double> all(n);
      for (uint64_t i = 0; i < n; ++i) {
        e2[i] = fine[i] ? full(h, i) : -INFINITY;
        all[i] = fine[i] ? e2[i] : e1[uint64_t{h} * n + i];
      }
      const double z = LogSumExp(all);
      if (z == -INFINITY) continue;
      for (size_t x = 0; x < rank.size(); ++x) f[x] += std::exp(e2[rank[x].second] - z);
    }
    for (size_t x = 0; x < rank.size(); ++x) rank[x].first = f[x] == f[x] ? f[x] : -INFINITY;
    std::sort(rank.begin(), rank.end(), better);
    for (uint64_t x = 0; x < params.top_k; ++x) {
      const uint64_t at = uint64_t{r} * params.top_k + x;
      out[at] = x < rank.size() ? static_cast<int64_t>(ids[rank[x].second]) : -1;
      if (!scores.empty()) scores[at] = x < rank.size() ? static_cast<float>(rank[x].first) : 0.0f;
    }
  }
}

}  // namespace

Status ReferenceSelect(const IndexConfig& config, std::span<const uint64_t> ids,
                       std::span<const BlockSummary* const> summaries, const SelectParams& params,
                       std::span<int64_t> out, std::span<float> scores) {
  KVTIER_RETURN_IF_ERROR(ValidateSelect(config, params, out, scores));
  if (ids.size() != summaries.size()) return Status::InvalidArgument("ids and summaries differ");
  if (config.coarse_rows > 0) {
    ReferenceTwoStage(config, ids, summaries, params, out, scores);
    return Status::OK();
  }
  const SummaryShape& s = config.summary;
  const uint32_t hq = config.num_query_heads, kv = s.num_kv_heads, g = hq / kv, d = s.head_dim;
  const uint32_t rows = s.rows;
  const double scale = config.scale > 0 ? config.scale : 1.0 / std::sqrt(double(d));
  const uint64_t n = ids.size();
  const bool per_kv = params.scope == SelectionScope::kPerKvHead;
  const uint32_t score_rows = per_kv ? kv : 1;
  std::vector<double> fused(uint64_t{score_rows} * n, 0.0);
  std::vector<double> e(n);
  for (uint32_t h = 0; h < hq; ++h) {
    const float* q = params.queries.data() + uint64_t{h} * d;
    const uint32_t k = h / g;
    for (uint64_t i = 0; i < n; ++i) {
      const BlockSummary& b = *summaries[i];
      const auto vec = [&](uint32_t j, uint32_t c) {
        return double(HalfBitsToFloat(b.vectors[(uint64_t{k} * rows + j) * d + c]));
      };
      if (config.backend == IndexBackend::kInfLLM) {
        double wsum = 0, dot = 0;
        for (uint32_t j = 0; j < rows; ++j) wsum += b.weights[uint64_t{k} * rows + j];
        for (uint32_t j = 0; j < rows; ++j) {
          const double w = b.weights[uint64_t{k} * rows + j] / wsum;
          for (uint32_t c = 0; c < d; ++c) dot += w * q[c] * vec(j, c);
        }
        e[i] = dot;
      } else if (s.kind == SummaryKind::kMinMax) {
        double bound = 0;
        for (uint32_t c = 0; c < d; ++c) bound += std::max(q[c] * vec(0, c), q[c] * vec(1, c));
        e[i] = scale * bound + std::log(double(b.valid_tokens));
      } else {
        double m = -INFINITY;
        std::vector<double> t(rows, -INFINITY);
        for (uint32_t j = 0; j < rows; ++j) {
          const double w = b.weights[uint64_t{k} * rows + j];
          if (w <= 0) continue;
          double dot = 0;
          for (uint32_t c = 0; c < d; ++c) dot += q[c] * vec(j, c);
          t[j] = std::log(w) + scale * dot;
          m = std::max(m, t[j]);
        }
        double sum = 0;
        for (uint32_t j = 0; j < rows; ++j) sum += std::exp(t[j] - m);
        e[i] = m == -INFINITY ? -INFINITY : m + std::log(sum);
      }
    }
    double* f = fused.data() + (per_kv ? uint64_t{k} * n : 0);
    if (config.backend == IndexBackend::kInfLLM) {
      for (uint64_t i = 0; i < n; ++i) f[i] += e[i];
      continue;
    }
    double z = -INFINITY;
    for (uint64_t i = 0; i < n; ++i) z = std::max(z, e[i]);
    if (z == -INFINITY) continue;
    double sum = 0;
    for (uint64_t i = 0; i < n; ++i) sum += std::exp(e[i] - z);
    const double lz = z + std::log(sum);
    for (uint64_t i = 0; i < n; ++i) f[i] += std::exp(e[i] - lz);
  }
  std::vector<std::pair<float, uint64_t>> rank;
  for (uint32_t r = 0; r < score_rows; ++r) {
    rank.clear();
    for (uint64_t i = 0; i < n; ++i) {
      if (ids[i] < params.candidates_begin || ids[i] >= params.candidates_end) continue;
      const double v = fused[uint64_t{r} * n + i];
      rank.emplace_back(v == v ? static_cast<float>(v) : kNegInf, ids[i]);
    }
    TakeTop(rank, params.top_k, out.data() + uint64_t{r} * params.top_k,
            scores.empty() ? nullptr : scores.data() + uint64_t{r} * params.top_k);
  }
  return Status::OK();
}

}  // namespace kvtier
