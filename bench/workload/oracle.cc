#include "bench/workload/oracle.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "kernels/dtype_convert.h"

namespace kvtier::bench {
namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
}  // namespace

AttentionOracle::AttentionOracle(const OracleConfig& config, std::span<const float> queries)
    : config_(config),
      scale_(config.scale != 0.0 ? config.scale : 1.0 / std::sqrt(double(config.head_dim))),
      queries_(queries.begin(),
               queries.begin() + size_t{config.num_query_heads} * config.head_dim) {}

Result<std::unique_ptr<AttentionOracle>> AttentionOracle::Create(const OracleConfig& config,
                                                                 std::span<const float> queries) {
  if (config.num_query_heads == 0 || config.num_kv_heads == 0 || config.head_dim == 0 ||
      config.block_tokens == 0 || config.num_query_heads % config.num_kv_heads != 0) {
    return Status::InvalidArgument(
        "oracle: heads, head_dim and block_tokens must be positive, query heads a multiple of "
        "KV heads");
  }
  if (!std::isfinite(config.scale)) return Status::InvalidArgument("oracle: scale not finite");
  if (queries.size() < size_t{config.num_query_heads} * config.head_dim) {
    return Status::InvalidArgument("oracle: queries span too small");
  }
  return std::unique_ptr<AttentionOracle>(new AttentionOracle(config, queries));
}

Status AttentionOracle::AddTokens(std::span<const float> keys, std::span<const float> values,
                                  uint64_t count) {
  const uint32_t hq = config_.num_query_heads, hkv = config_.num_kv_heads, d = config_.head_dim;
  const uint32_t group = hq / hkv, bt = config_.block_tokens;
  const bool outputs = config_.keep_outputs;
  if (count > (uint64_t{1} << 40)) return Status::InvalidArgument("oracle: count too large");
  const uint64_t floats = count * hkv * d;
  if (keys.size() < floats || (outputs && values.size() < floats)) {
    return Status::InvalidArgument("oracle: keys or values span too small");
  }
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t token = num_tokens_ + i;
    const uint64_t block = token / bt;
    if (block >= num_blocks_) {
      num_blocks_ = block + 1;
      max_.resize(num_blocks_ * hq, kNegInf);
      sum_.resize(num_blocks_ * hq, 0.0);
      if (outputs) out_.resize(num_blocks_ * hq * d, 0.0);
    }
    for (uint32_t h = 0; h < hkv; ++h) {
      const float* k = &keys[(i * hkv + h) * d];
      const float* v = outputs ? &values[(i * hkv + h) * d] : nullptr;
      for (uint32_t j = h * group; j < (h + 1) * group; ++j) {
        const float* q = &queries_[size_t{j} * d];
        double s = 0.0;
        for (uint32_t c = 0; c < d; ++c) s += double(q[c]) * double(k[c]);
        s *= scale_;
        const size_t at = block * hq + j;
        double* o = outputs ? &out_[at * d] : nullptr;
        if (s > max_[at]) {  // rescale what the block holds to the new maximum
          const double shrink = std::exp(max_[at] - s);
          sum_[at] *= shrink;
          if (o != nullptr) {
            for (uint32_t c = 0; c < d; ++c) o[c] *= shrink;
          }
          max_[at] = s;
        }
        const double p = std::exp(s - max_[at]);
        sum_[at] += p;
        if (o != nullptr) {
          for (uint32_t c = 0; c < d; ++c) o[c] += p * double(v[c]);
        }
      }
    }
  }
  num_tokens_ += count;
  return Status::OK();
}

Status AttentionOracle::AddBlock(const void* block, DType dtype, uint32_t valid_tokens) {
  const uint32_t hkv = config_.num_kv_heads, d = config_.head_dim, bt = config_.block_tokens;
  if (block == nullptr || DTypeBytes(dtype) == 0 || valid_tokens > bt) {
    return Status::InvalidArgument("oracle: bad block, dtype or valid_tokens");
  }
  if (num_tokens_ % bt != 0) {
    return Status::FailedPrecondition("oracle: AddBlock after a partial block");
  }
  const uint64_t per_kind = uint64_t{hkv} * bt * d;  // elements of the keys (or values)
  const uint8_t* values = static_cast<const uint8_t*>(block) + per_kind * DTypeBytes(dtype);
  std::vector<float> k(uint64_t{valid_tokens} * hkv * d), v(k.size());
  for (uint32_t h = 0; h < hkv; ++h) {
    for (uint32_t t = 0; t < valid_tokens; ++t) {
      for (uint32_t c = 0; c < d; ++c) {
        const uint64_t in = (uint64_t{h} * bt + t) * d + c;
        const uint64_t out = (uint64_t{t} * hkv + h) * d + c;
        k[out] = LoadAsFloat(block, in, dtype);
        v[out] = LoadAsFloat(values, in, dtype);
      }
    }
  }
  return AddTokens(k, v, valid_tokens);
}

void AttentionOracle::Restricted(const std::vector<bool>& in_set, std::vector<double>& lse,
                                 std::vector<double>* out) const {
  const uint32_t hq = config_.num_query_heads, d = config_.head_dim;
  lse.assign(hq, kNegInf);
  if (out != nullptr) out->assign(size_t{hq} * d, 0.0);
  for (uint32_t j = 0; j < hq; ++j) {
    double m = kNegInf;
    for (uint64_t b = 0; b < num_blocks_; ++b) {
      if (in_set.empty() || in_set[b]) m = std::max(m, max_[b * hq + j]);
    }
    if (m == kNegInf) continue;
    double z = 0.0;
    for (uint64_t b = 0; b < num_blocks_; ++b) {
      if (!in_set.empty() && !in_set[b]) continue;
      const size_t at = b * hq + j;
      if (sum_[at] == 0.0) continue;
      const double w = std::exp(max_[at] - m);
      z += sum_[at] * w;
      if (out != nullptr) {
        for (uint32_t c = 0; c < d; ++c) (*out)[size_t{j} * d + c] += w * out_[at * d + c];
      }
    }
    lse[j] = m + std::log(z);
    if (out != nullptr) {
      for (uint32_t c = 0; c < d; ++c) (*out)[size_t{j} * d + c] /= z;
    }
  }
}

double AttentionOracle::LogSumExp(uint32_t query_head) const {
  std::vector<double> lse;
  Restricted({}, lse, nullptr);
  return query_head < lse.size() ? lse[query_head] : kNegInf;
}

std::vector<double> AttentionOracle::BlockMasses() const {
  const uint32_t hq = config_.num_query_heads;
  std::vector<double> lse;
  Restricted({}, lse, nullptr);
  std::vector<double> mass(num_blocks_, 0.0);
  for (uint64_t b = 0; b < num_blocks_; ++b) {
    for (uint32_t j = 0; j < hq; ++j) {
      const size_t at = b * hq + j;
      if (sum_[at] > 0.0) mass[b] += sum_[at] * std::exp(max_[at] - lse[j]);
    }
  }
  return mass;
}

double AttentionOracle::HeadBlockMass(uint32_t query_head, uint64_t block) const {
  const uint32_t hq = config_.num_query_heads;
  if (query_head >= hq || block >= num_blocks_) return 0.0;
  const size_t at = block * hq + query_head;
  if (sum_[at] == 0.0) return 0.0;
  return sum_[at] * std::exp(max_[at] - LogSumExp(query_head));
}

std::vector<double> AttentionOracle::FullOutput() const {
  if (!config_.keep_outputs) return {};
  std::vector<double> lse, out;
  Restricted({}, lse, &out);
  return out;
}

std::pair<uint64_t, uint64_t> AttentionOracle::SinkBlocks(const SparsePolicy& policy) const {
  const uint64_t bt = config_.block_tokens;
  const uint64_t sink_tokens = std::min<uint64_t>(policy.sink_tokens, num_tokens_);
  return {0, (sink_tokens + bt - 1) / bt};
}

std::pair<uint64_t, uint64_t> AttentionOracle::LocalBlocks(const SparsePolicy& policy) const {
  const uint64_t local = std::min<uint64_t>(policy.local_tokens, num_tokens_);
  if (local == 0) return {num_blocks_, num_blocks_};
  return {(num_tokens_ - local) / config_.block_tokens, num_blocks_};
}

std::vector<uint64_t> AttentionOracle::OracleTopK(const SparsePolicy& policy) const {
  const auto [sink_begin, sink_end] = SinkBlocks(policy);
  const auto [local_begin, local_end] = LocalBlocks(policy);
  const std::vector<double> mass = BlockMasses();
  std::vector<uint64_t> candidates;
  for (uint64_t b = sink_end; b < local_begin; ++b) candidates.push_back(b);
  const size_t k = std::min<size_t>(policy.top_k, candidates.size());
  std::partial_sort(
      candidates.begin(), candidates.begin() + k, candidates.end(),
      [&](uint64_t a, uint64_t b) { return mass[a] > mass[b] || (mass[a] == mass[b] && a < b); });
  candidates.resize(k);
  return candidates;
}

Result<SelectionMetrics> AttentionOracle::Evaluate(const SparsePolicy& policy,
                                                   std::span<const uint64_t> selected,
                                                   std::span<const uint64_t> needle_tokens) const {
  const uint32_t hq = config_.num_query_heads, d = config_.head_dim;
  for (const uint64_t b : selected) {
    if (b >= num_blocks_) {
      return Status::InvalidArgument("oracle: selected block " + std::to_string(b) + " of " +
                                     std::to_string(num_blocks_));
    }
  }
  for (const uint64_t t : needle_tokens) {
    if (t >= num_tokens_) return Status::InvalidArgument("oracle: needle token past the end");
  }
  SelectionMetrics m;
  // The attended set A.
  std::vector<bool> attended(num_blocks_, false);
  const auto [sink_begin, sink_end] = SinkBlocks(policy);
  const auto [local_begin, local_end] = LocalBlocks(policy);
  for (uint64_t b = sink_begin; b < sink_end; ++b) attended[b] = true;
  for (uint64_t b = local_begin; b < local_end; ++b) attended[b] = true;
  for (const uint64_t b : selected) attended[b] = true;
  m.attended_blocks = uint64_t(std::count(attended.begin(), attended.end(), true));

  // Recall against O.
  const std::vector<uint64_t> oracle = OracleTopK(policy);
  m.oracle_k = uint32_t(oracle.size());
  std::vector<bool> picked(num_blocks_, false);
  for (const uint64_t b : selected) picked[b] = true;
  uint64_t found = 0;
  for (const uint64_t b : oracle) found += picked[b] ? 1 : 0;
  m.recall = oracle.empty() ? 1.0 : double(found) / double(oracle.size());

  // Coverage and output error.
  std::vector<double> lse_all, lse_set, full, sparse;
  const bool outputs = config_.keep_outputs;
  Restricted({}, lse_all, outputs ? &full : nullptr);
  Restricted(attended, lse_set, outputs ? &sparse : nullptr);
  m.coverage_min_head = 1.0;
  double coverage_sum = 0.0, diff_sq = 0.0, full_sq = 0.0;
  m.output_rel_l2_max_head = 0.0;
  for (uint32_t j = 0; j < hq; ++j) {
    const double coverage =
        lse_all[j] == kNegInf ? 1.0 : std::min(1.0, std::exp(lse_set[j] - lse_all[j]));
    coverage_sum += coverage;
    m.coverage_min_head = std::min(m.coverage_min_head, coverage);
    if (!outputs) continue;
    double dj = 0.0, fj = 0.0;
    for (uint32_t c = 0; c < d; ++c) {
      const double f = full[size_t{j} * d + c], s = sparse[size_t{j} * d + c];
      dj += (s - f) * (s - f);
      fj += f * f;
    }
    diff_sq += dj;
    full_sq += fj;
    const double ej = fj > 0.0 ? std::sqrt(dj / fj) : (dj > 0.0 ? INFINITY : 0.0);
    m.output_rel_l2_max_head = std::max(m.output_rel_l2_max_head, ej);
  }
  m.coverage = coverage_sum / hq;
  if (outputs) {
    m.output_rel_l2 =
        full_sq > 0.0 ? std::sqrt(diff_sq / full_sq) : (diff_sq > 0.0 ? INFINITY : 0.0);
  } else {
    m.output_rel_l2 = m.output_rel_l2_max_head = std::numeric_limits<double>::quiet_NaN();
  }
  for (const uint64_t t : needle_tokens)
    m.needle_hits.push_back(attended[t / config_.block_tokens]);
  return m;
}

}  // namespace kvtier::bench
