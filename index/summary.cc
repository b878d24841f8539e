#include "index/summary.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>

#include "index/simd.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

constexpr uint8_t kSummaryVersion = 1;
constexpr size_t kSummaryHeaderBytes = 1 + 1 + 2 + 4 + 4 + 4;

// Scratch of one summarizing thread: the keys of one head as floats, and the clustering.
struct Scratch {
  std::vector<float> keys;       // [n][D]
  std::vector<float> norms;      // [n] |k|^2
  std::vector<float> centroid;   // [C][D]
  std::vector<float> cnorm;      // [C]
  std::vector<float> sums;       // [C][D]
  std::vector<uint32_t> count;   // [C]
  std::vector<uint32_t> assign;  // [n]
  std::vector<float> mind;       // [n]
  std::vector<uint32_t> order;   // [n]
  std::vector<float> dots;       // [C][n]
  std::vector<float> dist;       // [n]
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

void LoadHeadKeys(const SummaryShape& s, const void* block, uint32_t kv, uint32_t n, float* out) {
  const uint64_t base = uint64_t{kv} * s.block_tokens * s.head_dim;
  const uint64_t count = uint64_t{n} * s.head_dim;
  if (s.dtype == DType::kF32) {
    std::memcpy(out, static_cast<const float*>(block) + base, count * 4);
  } else if (s.dtype == DType::kF16) {
    simd::HalfToFloat(static_cast<const uint16_t*>(block) + base, out, count);
  } else if (s.dtype == DType::kBF16) {
    simd::Bf16ToFloat(static_cast<const uint16_t*>(block) + base, out, count);
  } else {
    for (uint64_t i = 0; i < count; ++i) out[i] = LoadAsFloat(block, base + i, s.dtype);
  }
}

// k-means of n keys into C clusters: centroid [C][D], count [C] (see summary.h).
void Cluster(Scratch& sc, uint32_t n, uint32_t d, uint32_t c_max) {
  const float* x = sc.keys.data();
  sc.centroid.assign(uint64_t{c_max} * d, 0.0f);
  sc.count.assign(c_max, 0);
  sc.norms.resize(n);
  for (uint32_t t = 0; t < n; ++t)
    sc.norms[t] = simd::Dot(x + uint64_t{t} * d, x + uint64_t{t} * d, d);
  // Seed 0: the key nearest the mean.
  std::vector<float>& mean = sc.sums;
  mean.assign(d, 0.0f);
  for (uint32_t t = 0; t < n; ++t) simd::AddTo(mean.data(), x + uint64_t{t} * d, d);
  for (uint32_t i = 0; i < d; ++i) mean[i] /= static_cast<float>(n);
  uint32_t best = 0;
  float best_d = std::numeric_limits<float>::infinity();
  sc.dist.resize(n);
  simd::SquaredDistances(x, n, mean.data(), d, sc.dist.data());
  for (uint32_t t = 0; t < n; ++t) {
    const float dist = sc.dist[t];
    if (dist < best_d) best_d = dist, best = t;
  }
  uint32_t seeds = 0;
  sc.mind.assign(n, std::numeric_limits<float>::infinity());
  for (uint32_t c = 0; c < c_max; ++c) {
    std::memcpy(sc.centroid.data() + uint64_t{c} * d, x + uint64_t{best} * d, d * 4);
    ++seeds;
    // Farthest key from the seeds so far.
    float far_d = -1.0f;
    uint32_t far = 0;
    simd::SquaredDistances(x, n, sc.centroid.data() + uint64_t{c} * d, d, sc.dist.data());
    for (uint32_t t = 0; t < n; ++t) {
      const float dist = sc.dist[t];
      sc.mind[t] = std::min(sc.mind[t], dist);
      if (sc.mind[t] > far_d) far_d = sc.mind[t], far = t;
    }
    if (far_d <= 0.0f) break;  // every key coincides with a seed
    best = far;
  }
  // Lloyd rounds over the seeded clusters.
  sc.assign.assign(n, 0);
  sc.cnorm.resize(seeds);
  for (uint32_t round = 0; round <= kKMeansRounds; ++round) {
    for (uint32_t c = 0; c < seeds; ++c) {
      const float* cc = sc.centroid.data() + uint64_t{c} * d;
      sc.cnorm[c] = simd::Dot(cc, cc, d);
    }
    // Every key against every centroid in one pass: dots[c][t].
    sc.dots.resize(uint64_t{seeds} * n);
    simd::DotsF32(x, n, d, sc.centroid.data(), seeds, sc.dots.data(), n);
    simd::NearestCentroids(sc.norms.data(), sc.dots.data(), n, sc.cnorm.data(), seeds,
                           sc.assign.data());
    // Recompute the centroids (an emptied cluster keeps its centroid, with count 0).
    sc.sums.assign(uint64_t{seeds} * d, 0.0f);
    std::fill(sc.count.begin(), sc.count.end(), 0u);
    for (uint32_t t = 0; t < n; ++t) {
      float* dst = sc.sums.data() + uint64_t{sc.assign[t]} * d;
      const float* xt = x + uint64_t{t} * d;
      simd::AddTo(dst, xt, d);
      ++sc.count[sc.assign[t]];
    }
    for (uint32_t c = 0; c < seeds; ++c) {
      if (sc.count[c] == 0) continue;
      const float inv = 1.0f / static_cast<float>(sc.count[c]);
      float* cc = sc.centroid.data() + uint64_t{c} * d;
      const float* ss = sc.sums.data() + uint64_t{c} * d;
      for (uint32_t i = 0; i < d; ++i) cc[i] = ss[i] * inv;
    }
  }
  for (uint32_t c = 0; c < c_max; ++c) {
    if (c >= seeds || sc.count[c] == 0) {
      sc.count[c] = 0;
      std::fill_n(sc.centroid.data() + uint64_t{c} * d, d, 0.0f);
    }
  }
}

}  // namespace

uint32_t SummaryRows(SummaryKind kind, uint32_t clusters, uint32_t top_r) {
  switch (kind) {
    case SummaryKind::kClusters:
      return clusters;
    case SummaryKind::kMean:
      return 1;
    case SummaryKind::kMinMax:
      return 2;
    case SummaryKind::kTopR:
      return top_r;
  }
  return 0;
}

SummaryShape SummaryShape::For(const ModelLayout& layout, const RetrievalOptions& options) {
  SummaryShape s;
  s.num_kv_heads = layout.num_kv_heads;
  s.head_dim = layout.head_dim;
  s.block_tokens = layout.block_tokens;
  s.dtype = layout.dtype;
  s.kind = options.summary;
  s.rows = SummaryRows(options.summary, options.clusters, options.top_r);
  return s;
}

Status ValidateSummaryShape(const SummaryShape& s) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("summary: " + what);
  };
  if (s.num_kv_heads == 0 || s.head_dim == 0 || s.block_tokens == 0) {
    return bad("zero num_kv_heads, head_dim or block_tokens");
  }
  if (s.head_dim > 1024) return bad("head_dim " + std::to_string(s.head_dim) + " above 1024");
  if (s.block_tokens > 4096) {
    return bad("block_tokens " + std::to_string(s.block_tokens) + " above 4096");
  }
  if (s.num_kv_heads > 4096) return bad("num_kv_heads above 4096");
  if (DTypeBytes(s.dtype) == 0) return bad("unknown dtype");
  switch (s.kind) {
    case SummaryKind::kClusters:
    case SummaryKind::kTopR:
      if (s.rows == 0 || s.rows > kMaxSummaryRows) {
        return bad(std::string(s.kind == SummaryKind::kTopR ? "top_r " : "clusters ") +
                   std::to_string(s.rows) + " outside [1, " + std::to_string(kMaxSummaryRows) +
                   "]");
      }
      break;
    case SummaryKind::kMean:
      if (s.rows != 1) return bad("kMean has 1 row");
      break;
    case SummaryKind::kMinMax:
      if (s.rows != 2) return bad("kMinMax has 2 rows");
      break;
    default:
      return bad("unknown kind");
  }
  return Status::OK();
}

Status SummarizeBlock(const SummaryShape& s, const void* block, uint32_t valid_tokens,
                      std::span<const float> scores, BlockSummary* out) {
  KVTIER_RETURN_IF_ERROR(ValidateSummaryShape(s));
  if (block == nullptr || out == nullptr) {
    return Status::InvalidArgument("summary: null block or output");
  }
  if (valid_tokens == 0 || valid_tokens > s.block_tokens) {
    return Status::InvalidArgument("summary: valid_tokens " + std::to_string(valid_tokens) +
                                   " outside [1, " + std::to_string(s.block_tokens) + "]");
  }
  if (!scores.empty() && scores.size() != uint64_t{s.num_kv_heads} * s.block_tokens) {
    return Status::InvalidArgument("summary: scores must hold num_kv_heads * block_tokens floats");
  }
  const uint32_t n = valid_tokens;
  const uint32_t d = s.head_dim;
  const uint32_t rows = s.rows;
  out->valid_tokens = n;
  out->vectors.resize(s.vector_elements());
  out->weights.resize(s.weight_elements());
  Scratch& sc = ThreadScratch();
  sc.keys.resize(uint64_t{n} * d);
  std::vector<float> row(uint64_t{rows} * d);
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    LoadHeadKeys(s, block, kv, n, sc.keys.data());
    const float* x = sc.keys.data();
    float* w = out->weights.data() + uint64_t{kv} * rows;
    std::fill(row.begin(), row.end(), 0.0f);
    switch (s.kind) {
      case SummaryKind::kClusters:
        Cluster(sc, n, d, rows);
        std::memcpy(row.data(), sc.centroid.data(), row.size() * 4);
        for (uint32_t c = 0; c < rows; ++c) w[c] = static_cast<float>(sc.count[c]);
        break;
      case SummaryKind::kMean:
        for (uint32_t t = 0; t < n; ++t) {
          for (uint32_t i = 0; i < d; ++i) row[i] += x[uint64_t{t} * d + i];
        }
        for (uint32_t i = 0; i < d; ++i) row[i] /= static_cast<float>(n);
        w[0] = static_cast<float>(n);
        break;
      case SummaryKind::kMinMax:
        for (uint32_t i = 0; i < d; ++i) {
          float lo = std::numeric_limits<float>::infinity(), hi = -lo;
          for (uint32_t t = 0; t < n; ++t) {
            const float v = x[uint64_t{t} * d + i];
            if (v != v) continue;
            lo = std::min(lo, v), hi = std::max(hi, v);
          }
          if (lo > hi) lo = hi = std::numeric_limits<float>::quiet_NaN();
          row[i] = lo, row[d + i] = hi;
        }
        w[0] = w[1] = static_cast<float>(n);
        break;
      case SummaryKind::kTopR: {
        // Rank tokens by score (or by key norm without scores): higher first, ties by
        // the lower token, NaN last.
        sc.mind.resize(n);
        for (uint32_t t = 0; t < n; ++t) {
          float v = scores.empty() ? simd::Dot(x + uint64_t{t} * d, x + uint64_t{t} * d, d)
                                   : scores[uint64_t{kv} * s.block_tokens + t];
          sc.mind[t] = v != v ? -std::numeric_limits<float>::infinity() : v;
        }
        sc.order.resize(n);
        std::iota(sc.order.begin(), sc.order.end(), 0u);
        const uint32_t take = std::min(rows, n);
        std::partial_sort(sc.order.begin(), sc.order.begin() + take, sc.order.end(),
                          [&](uint32_t a, uint32_t b) {
                            return sc.mind[a] != sc.mind[b] ? sc.mind[a] > sc.mind[b] : a < b;
                          });
        for (uint32_t j = 0; j < rows; ++j) {
          std::memcpy(row.data() + uint64_t{j} * d, x + uint64_t{sc.order[j % take]} * d, d * 4);
          w[j] = static_cast<float>(n) / static_cast<float>(rows);
        }
        break;
      }
    }
    simd::FloatToHalf(row.data(), out->vectors.data() + uint64_t{kv} * rows * d, row.size());
  }
  return Status::OK();
}

void CoarsenSummary(const SummaryShape& s, const BlockSummary& summary, uint32_t coarse_rows,
                    CoarseSummary* out) {
  const uint32_t d = s.head_dim, rows = s.rows, cc = coarse_rows;
  out->vectors.assign(uint64_t{s.num_kv_heads} * cc * d, 0);
  out->scales.assign(uint64_t{s.num_kv_heads} * cc, 0.0f);
  out->weights.assign(uint64_t{s.num_kv_heads} * cc, 0.0f);
  thread_local std::vector<float> x, center, sums, mind;
  thread_local std::vector<uint32_t> live, group;
  x.resize(uint64_t{rows} * d);
  center.resize(uint64_t{cc} * d);
  sums.resize(uint64_t{cc} * d);
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    const float* w = summary.weights.data() + uint64_t{kv} * rows;
    simd::HalfToFloat(summary.vectors.data() + uint64_t{kv} * rows * d, x.data(),
                      uint64_t{rows} * d);
    live.clear();
    for (uint32_t j = 0; j < rows; ++j) {
      if (w[j] > 0) live.push_back(j);
    }
    const uint32_t m = static_cast<uint32_t>(live.size());
    const auto xr = [&](uint32_t i) { return x.data() + uint64_t{live[i]} * d; };
    group.assign(m, 0);
    uint32_t groups = m;
    if (m <= cc) {
      for (uint32_t i = 0; i < m; ++i) {
        group[i] = i;
        std::memcpy(center.data() + uint64_t{i} * d, xr(i), d * 4);
      }
    } else {
      // Seeds: nearest the weighted mean, then farthest from the seeds so far.
      std::fill_n(sums.data(), d, 0.0f);
      float total = 0;
      for (uint32_t i = 0; i < m; ++i) {
        const float wi = w[live[i]];
        total += wi;
        for (uint32_t c = 0; c < d; ++c) sums[c] += wi * xr(i)[c];
      }
      for (uint32_t c = 0; c < d; ++c) sums[c] /= total;
      uint32_t pick = 0;
      float best = std::numeric_limits<float>::infinity();
      for (uint32_t i = 0; i < m; ++i) {
        const float dist = simd::SquaredDistance(xr(i), sums.data(), d);
        if (dist < best) best = dist, pick = i;
      }
      mind.assign(m, std::numeric_limits<float>::infinity());
      groups = 0;
      for (uint32_t g = 0; g < cc; ++g) {
        std::memcpy(center.data() + uint64_t{g} * d, xr(pick), d * 4);
        ++groups;
        float far_d = -1.0f;
        for (uint32_t i = 0; i < m; ++i) {
          mind[i] =
              std::min(mind[i], simd::SquaredDistance(xr(i), center.data() + uint64_t{g} * d, d));
          if (mind[i] > far_d) far_d = mind[i], pick = i;
        }
        if (far_d <= 0.0f) break;
      }
      for (uint32_t round = 0; round <= kKMeansRounds; ++round) {
        for (uint32_t i = 0; i < m; ++i) {
          float bd = std::numeric_limits<float>::infinity();
          for (uint32_t g = 0; g < groups; ++g) {
            const float dist = simd::SquaredDistance(xr(i), center.data() + uint64_t{g} * d, d);
            if (dist < bd) bd = dist, group[i] = g;
          }
        }
        std::fill_n(sums.data(), uint64_t{groups} * d, 0.0f);
        std::fill_n(out->weights.data() + uint64_t{kv} * cc, cc, 0.0f);
        for (uint32_t i = 0; i < m; ++i) {
          const float wi = w[live[i]];
          out->weights[uint64_t{kv} * cc + group[i]] += wi;
          float* dst = sums.data() + uint64_t{group[i]} * d;
          for (uint32_t c = 0; c < d; ++c) dst[c] += wi * xr(i)[c];
        }
        for (uint32_t g = 0; g < groups; ++g) {
          const float tw = out->weights[uint64_t{kv} * cc + g];
          if (tw <= 0) continue;  // an emptied group keeps its center
          for (uint32_t c = 0; c < d; ++c) {
            center[uint64_t{g} * d + c] = sums[uint64_t{g} * d + c] / tw;
          }
        }
      }
    }
    // Rows: each group's weighted mean (the centers after the last update), quantized.
    float* ow = out->weights.data() + uint64_t{kv} * cc;
    std::fill_n(ow, cc, 0.0f);
    for (uint32_t i = 0; i < m; ++i) ow[group[i]] += w[live[i]];
    for (uint32_t g = 0; g < groups && g < cc; ++g) {
      if (ow[g] <= 0) continue;
      const float* row = center.data() + uint64_t{g} * d;
      float amax = 0;
      for (uint32_t c = 0; c < d; ++c) amax = std::max(amax, std::abs(row[c]));
      if (!(amax > 0) || !std::isfinite(amax)) continue;
      const float scale = amax / 127.0f;
      out->scales[uint64_t{kv} * cc + g] = scale;
      int8_t* q = out->vectors.data() + (uint64_t{kv} * cc + g) * d;
      for (uint32_t c = 0; c < d; ++c) {
        q[c] = static_cast<int8_t>(std::clamp(std::lround(row[c] / scale), -127l, 127l));
      }
    }
  }
}

std::vector<std::byte> EncodeSummary(const SummaryShape& s, const BlockSummary& summary) {
  std::vector<std::byte> out(kSummaryHeaderBytes + s.weight_elements() * 4 +
                             s.vector_elements() * 2);
  std::byte* p = out.data();
  const auto put = [&p](const void* v, size_t n) {
    std::memcpy(p, v, n);
    p += n;
  };
  const uint8_t version = kSummaryVersion, kind = static_cast<uint8_t>(s.kind);
  const uint16_t rows = static_cast<uint16_t>(s.rows);
  put(&version, 1);
  put(&kind, 1);
  put(&rows, 2);
  put(&s.num_kv_heads, 4);
  put(&s.head_dim, 4);
  put(&summary.valid_tokens, 4);
  put(summary.weights.data(), s.weight_elements() * 4);
  put(summary.vectors.data(), s.vector_elements() * 2);
  return out;
}

Status DecodeSummary(const SummaryShape& s, std::span<const std::byte> bytes, BlockSummary* out) {
  const uint64_t want = kSummaryHeaderBytes + s.weight_elements() * 4 + s.vector_elements() * 2;
  if (bytes.size() < kSummaryHeaderBytes) return Status::Corruption("summary: truncated header");
  const std::byte* p = bytes.data();
  uint8_t version, kind;
  uint16_t rows;
  uint32_t kv, d, valid;
  std::memcpy(&version, p, 1);
  std::memcpy(&kind, p + 1, 1);
  std::memcpy(&rows, p + 2, 2);
  std::memcpy(&kv, p + 4, 4);
  std::memcpy(&d, p + 8, 4);
  std::memcpy(&valid, p + 12, 4);
  if (version != kSummaryVersion) {
    return Status::Corruption("summary: version " + std::to_string(version));
  }
  if (kind != static_cast<uint8_t>(s.kind) || rows != s.rows || kv != s.num_kv_heads ||
      d != s.head_dim) {
    return Status::Corruption(
        "summary: shape does not match the store's (kind " + std::to_string(kind) + ", rows " +
        std::to_string(rows) + ", " + std::to_string(kv) + " KV heads, head_dim " +
        std::to_string(d) + "; the store wants rows " + std::to_string(s.rows) +
        "): written with other retrieval options (the default clusters went from 3 to 12); "
        "re-index the block (Store::IndexBlock, or Put it again) or open the store with "
        "the options it was written with");
  }
  if (valid == 0 || valid > s.block_tokens) return Status::Corruption("summary: bad valid_tokens");
  if (bytes.size() != want) return Status::Corruption("summary: wrong length");
  out->valid_tokens = valid;
  out->weights.resize(s.weight_elements());
  out->vectors.resize(s.vector_elements());
  std::memcpy(out->weights.data(), p + kSummaryHeaderBytes, s.weight_elements() * 4);
  std::memcpy(out->vectors.data(), p + kSummaryHeaderBytes + s.weight_elements() * 4,
              s.vector_elements() * 2);
  for (float w : out->weights) {
    if (!(w >= 0.0f) || w > static_cast<float>(s.block_tokens)) {
      return Status::Corruption("summary: bad weight");
    }
  }
  return Status::OK();
}

}  // namespace kvtier
