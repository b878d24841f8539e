#include "bench/workload/workload.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/dtype_convert.h"
#include "kernels/pattern.h"

namespace kvtier::bench {
namespace {

// Fixed shape constants of the model (workload.h explains each).
constexpr float kKeyNoise = 0.3f;
constexpr float kQueryNoise = 0.3f;
constexpr float kRecencyKey = 0.7f;  // |recency component of a key| / sqrt(D)
constexpr float kSinkKey = 2.5f;     // |sink component of a sink key| / sqrt(D)
constexpr float kValueContent = 0.8f;
constexpr float kValueNoise = 0.6f;
constexpr float kSinkValueScale = 0.2f;
constexpr float kPhraseWeight = 0.5f;
constexpr float kTokenJitter = 0.35f;
constexpr float kSpanContinuity = 0.5f;
constexpr uint32_t kMaxDefaultRank = 32;

// Pairs reserved for the sink direction: the slowest max(1, P / 16).
uint32_t SinkPairs(uint32_t pairs) { return std::max(1u, pairs / 16); }

// Independent random streams: one tag per use.
enum Tag : uint32_t {
  kTagSpanBoundary = 1,
  kTagPhraseBoundary,
  kTagSpanTopic,
  kTagPhraseTopic,
  kTagTokenJitter,
  kTagKeyNoise,
  kTagValueNoise,
  kTagFrame,
  kTagQueryHead,
  kTagSteps,
  kTagQueryNoise,
  kTagNeedles,
  kTagNeedleValue,
};

uint64_t Key(uint64_t seed, uint64_t tag, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0,
             uint64_t d = 0) {
  uint64_t k = PatternWord(seed, tag);
  k = PatternWord(k, a);
  k = PatternWord(k, b);
  k = PatternWord(k, c);
  return PatternWord(k, d);
}

// A counter-based stream: word i is PatternWord(key, i), so a stream is a pure function
// of its key and any token's randomness is reachable without generating the others.
class Rng {
 public:
  explicit Rng(uint64_t key) : key_(key) {}
  uint64_t Next() { return PatternWord(key_, counter_++); }
  double Uniform() { return double(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  uint64_t Below(uint64_t n) {
    return uint64_t((static_cast<unsigned __int128>(Next()) * n) >> 64);
  }
  // Standard normal (Box-Muller).
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = double((Next() >> 11) + 1) * 0x1.0p-53;  // (0, 1]
    const double u2 = Uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return radius * std::cos(2.0 * std::numbers::pi * u2);
  }
  // An approximately normal value, cheap: the sum of four 16-bit uniforms (Irwin-Hall),
  // standardized; tails end at +-3.46. For full-rank noise, where tails do not matter.
  float FastNormal() {
    const uint64_t w = Next();
    const uint64_t sum = (w & 0xFFFF) + ((w >> 16) & 0xFFFF) + ((w >> 32) & 0xFFFF) + (w >> 48);
    return float((double(sum) - 131070.0) * (1.0 / 37837.23));
  }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

float Dot(const float* a, const float* b, uint32_t n) {
  float s = 0.0f;
  for (uint32_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Orthonormalizes `v` against the unit vectors `basis` (twice, for accuracy) and
// normalizes it. False when nothing is left of it.
bool Orthonormalize(std::vector<double>& v, const std::vector<std::vector<double>>& basis) {
  for (int pass = 0; pass < 2; ++pass) {
    for (const std::vector<double>& b : basis) {
      double d = 0.0;
      for (size_t i = 0; i < v.size(); ++i) d += v[i] * b[i];
      for (size_t i = 0; i < v.size(); ++i) v[i] -= d * b[i];
    }
  }
  double n = 0.0;
  for (const double x : v) n += x * x;
  n = std::sqrt(n);
  if (n < 1e-6) return false;
  for (double& x : v) x /= n;
  return true;
}

// Solves a x = b for a small dense n x n system (row-major `a`, n = b.size()) by Gaussian
// elimination with partial pivoting; x replaces b, `a` is destroyed.
void SolveInPlace(std::vector<double>& a, std::vector<double>& b) {
  const size_t n = b.size();
  for (size_t col = 0; col < n; ++col) {
    size_t pivot = col;
    for (size_t row = col + 1; row < n; ++row) {
      if (std::fabs(a[row * n + col]) > std::fabs(a[pivot * n + col])) pivot = row;
    }
    for (size_t c = 0; c < n; ++c) std::swap(a[col * n + c], a[pivot * n + c]);
    std::swap(b[col], b[pivot]);
    for (size_t row = col + 1; row < n; ++row) {
      const double factor = a[row * n + col] / a[col * n + col];
      for (size_t c = col; c < n; ++c) a[row * n + c] -= factor * a[col * n + c];
      b[row] -= factor * b[col];
    }
  }
  for (size_t col = n; col-- > 0;) {
    for (size_t c = col + 1; c < n; ++c) b[col] -= a[col * n + c] * b[c];
    b[col] /= a[col * n + col];
  }
}

}  // namespace

struct Workload::HeadFrame {
  std::vector<float> key_basis;    // [D][r]: B, row per channel
  std::vector<float> value_basis;  // [D][r]: C
  std::vector<float> key_const;    // [D] pre-rotary part of every key: mk + outliers + u
  std::vector<float> sink_key;     // [D] added to sink keys (pre-rotary)
  std::vector<float> query_const;  // [D] pre-rotary part of every query: mq + recency
  std::vector<float> sink_query;   // [D] post-rotary part of every query
  std::vector<uint32_t> outliers;  // sorted channels
};

struct Workload::QueryHead {
  float content_scale = 0.0f;  // topic_logit * a_j
  float retrieval = 0.0f;      // ret_j
  float recent = 0.0f;         // rec_j
  uint32_t slot = 0;           // which working-set span it follows
  float sink = 1.0f;           // the head's sink logit / sink_logit
};

struct Workload::NeedleData {
  uint32_t layer = 0;
  uint64_t token = 0;
  std::vector<float> key;    // [kv_heads][D] post-rotary
  std::vector<float> value;  // [kv_heads][D]
};

struct Workload::TokenLatent {
  uint64_t span = UINT64_MAX;
  uint64_t phrase = UINT64_MAX;
  std::vector<float> z, y;
};

Workload::Workload(const WorkloadOptions& options) : options_(options) {}
Workload::~Workload() = default;

Result<std::unique_ptr<Workload>> Workload::Create(const WorkloadOptions& options) {
  std::unique_ptr<Workload> w(new Workload(options));
  KVTIER_RETURN_IF_ERROR(w->Init());
  return w;
}

Status Workload::Init() {
  const WorkloadOptions& o = options_;
  KVTIER_RETURN_IF_ERROR(o.layout.Validate());
  const uint32_t d = o.layout.head_dim;
  auto bad = [](const std::string& why) { return Status::InvalidArgument("workload: " + why); };
  if (d % 2 != 0 || d < 16) return bad("head_dim must be even and at least 16");
  if (o.tokens == 0 || o.tokens > (uint64_t{1} << 40)) return bad("tokens must be in [1, 2^40]");
  if (o.span_tokens == 0 || o.phrase_tokens == 0 || o.recency_tokens == 0) {
    return bad("span_tokens, phrase_tokens and recency_tokens must be positive");
  }
  if (o.outlier_channels > d / 4) return bad("outlier_channels must be at most head_dim / 4");
  if (o.key_rank > d / 2) return bad("key_rank must be at most head_dim / 2");
  rank_ = o.key_rank != 0 ? o.key_rank : std::min(kMaxDefaultRank, d / 2);
  // Room for the rank, the recency direction and the offsets in the pairs queries use.
  rank_ = std::min<uint32_t>(rank_, 2 * (d / 2 - SinkPairs(d / 2) - o.outlier_channels) - 3);
  if (!(o.rope_theta > 1.0) || !std::isfinite(o.rope_theta)) return bad("rope_theta must be > 1");
  if (!(o.rope_scaling >= 1.0f) || !std::isfinite(o.rope_scaling)) {
    return bad("rope_scaling must be >= 1");
  }
  if (o.working_set_spans == 0) return bad("working_set_spans must be positive");
  if (!(o.target_switch_prob >= 0.0f && o.target_switch_prob <= 1.0f)) {
    return bad("target_switch_prob must be in [0, 1]");
  }
  if (!(o.query_drift >= 0.0f && o.query_drift < 1.0f)) return bad("query_drift must be in [0, 1)");
  for (const float v :
       {o.key_norm_spread, o.outlier_scale, o.topic_logit, o.sink_logit, o.recency_logit,
        o.query_key_shift, o.retrieval_weight, o.recent_topic_weight, o.drift_weight,
        o.needle_logit, o.needle_value_scale}) {
    if (!(v >= 0.0f) || !std::isfinite(v)) return bad("scales and logits must be finite, >= 0");
  }
  if (o.needles > 0) {
    if (o.steps == 0) return bad("needles need at least one step");
    if (o.needle_layer < -1 || o.needle_layer >= int64_t(o.layout.num_layers)) {
      return bad("needle_layer must be -1 or a layer");
    }
    if (!(o.needle_min_depth >= 0.0f && o.needle_min_depth < o.needle_max_depth &&
          o.needle_max_depth <= 1.0f)) {
      return bad("needle depths must satisfy 0 <= min < max <= 1");
    }
  }

  const uint32_t pairs = d / 2;
  omega_.resize(pairs);
  for (uint32_t i = 0; i < pairs; ++i) {
    double w = std::pow(o.rope_theta, -2.0 * i / d);
    if (o.rope_scaling > 1.0f) {  // Llama 3.1's "llama3" scaling of the slow frequencies
      const double original = 8192.0, low = 1.0, high = 4.0;
      const double wavelength = 2.0 * std::numbers::pi / w;
      if (wavelength > original / low) {
        w /= o.rope_scaling;
      } else if (wavelength >= original / high) {
        const double smooth = (original / wavelength - low) / (high - low);
        w = (1.0 - smooth) * w / o.rope_scaling + smooth * w;
      }
    }
    omega_[i] = w;
  }
  BuildFrames();
  BuildSteps();
  return PlantNeedles();
}

void Workload::BuildFrames() {
  const WorkloadOptions& o = options_;
  const uint32_t d = o.layout.head_dim, pairs = d / 2, r = rank_;
  const uint32_t sink_pair_begin = pairs - SinkPairs(pairs);
  const double sqrt_d = std::sqrt(double(d));
  const double sink_center = o.sink_tokens > 0 ? (o.sink_tokens - 1) / 2.0 : 0.0;
  frames_.resize(size_t{o.layout.num_layers} * o.layout.num_kv_heads);
  query_heads_.resize(size_t{o.layout.num_layers} * o.layout.num_query_heads);
  for (uint32_t layer = 0; layer < o.layout.num_layers; ++layer) {
    for (uint32_t h = 0; h < o.layout.num_kv_heads; ++h) {
      HeadFrame& f = frames_[size_t{layer} * o.layout.num_kv_heads + h];
      Rng rng(Key(o.seed, kTagFrame, layer, h));
      // Outlier channels: distinct pairs outside the sink pairs, either channel of each.
      std::vector<bool> dead(pairs, false);
      std::vector<float> outlier_bias(d, 0.0f);
      for (uint32_t n = 0; n < o.outlier_channels; ++n) {
        uint32_t pair;
        do {
          pair = uint32_t(rng.Below(sink_pair_begin));
        } while (dead[pair]);
        dead[pair] = true;
        const uint32_t ch = pair + (rng.Below(2) ? pairs : 0);
        f.outliers.push_back(ch);
        const double sign = rng.Below(2) ? 1.0 : -1.0;
        outlier_bias[ch] = float(sign * o.outlier_scale * (0.75 + 0.5 * rng.Uniform()));
      }
      std::sort(f.outliers.begin(), f.outliers.end());
      // A random vector over the pairs `use` allows, amplitude(i) in pair i.
      auto random_vector = [&](auto use, auto amplitude) {
        std::vector<double> v(d, 0.0);
        for (uint32_t i = 0; i < pairs; ++i) {
          if (!use(i)) continue;
          v[i] = amplitude(i) * rng.Normal();
          v[i + pairs] = amplitude(i) * rng.Normal();
        }
        return v;
      };
      auto flat = [](uint32_t) { return 1.0; };
      // Pairs a query may use: neither the sinks' nor an outlier's.
      auto live = [&](uint32_t i) { return i < sink_pair_begin && !dead[i]; };
      std::vector<std::vector<double>> basis;
      // Sink direction e: the sink pairs, the slowest; nothing else of a query lives there,
      // so the sinks' logit holds at any distance.
      std::vector<double> e = random_vector([&](uint32_t i) { return i >= sink_pair_begin; }, flat);
      Orthonormalize(e, basis);
      // Recency direction u: pairs turning at least once per 4 * recency_tokens.
      const double slowest = 1.0 / (4.0 * o.recency_tokens);
      std::vector<double> u =
          random_vector([&](uint32_t i) { return live(i) && omega_[i] >= slowest; }, flat);
      const bool have_u = Orthonormalize(u, basis);
      if (have_u) basis.push_back(u);
      // Content basis B: energy falling exponentially from the slowest live pairs (which
      // keep a match at long distance) towards the fast ones (positional), with a floor.
      const double content_scale = std::max(1.0, pairs / 10.0);
      auto profile = [&](uint32_t i) {
        return std::sqrt(0.02 + std::exp(-double(sink_pair_begin - 1 - i) / content_scale));
      };
      f.key_basis.assign(size_t{d} * r, 0.0f);
      for (uint32_t c = 0; c < r; ++c) {
        std::vector<double> b;
        do {
          b = random_vector(live, profile);
        } while (!Orthonormalize(b, basis));
        basis.push_back(b);
        for (uint32_t ch = 0; ch < d; ++ch) f.key_basis[size_t{ch} * r + c] = float(b[ch]);
      }
      // Offsets, orthogonal to all above and to each other: mk on every non-sink pair, mq
      // on the live ones.
      std::vector<double> mk, mq;
      do {
        mk = random_vector([&](uint32_t i) { return i < sink_pair_begin; }, flat);
      } while (!Orthonormalize(mk, basis));
      basis.push_back(mk);
      do {
        mq = random_vector(live, flat);
      } while (!Orthonormalize(mq, basis));
      // Values: an independent orthonormal basis C.
      f.value_basis.assign(size_t{d} * r, 0.0f);
      std::vector<std::vector<double>> value_basis;
      for (uint32_t c = 0; c < r; ++c) {
        std::vector<double> b;
        do {
          b = random_vector([](uint32_t) { return true; }, flat);
        } while (!Orthonormalize(b, value_basis));
        value_basis.push_back(b);
        for (uint32_t ch = 0; ch < d; ++ch) f.value_basis[size_t{ch} * r + c] = float(b[ch]);
      }
      const double shift = o.query_key_shift * sqrt_d;
      const double recency_q = have_u ? o.recency_logit / kRecencyKey : 0.0;
      const double recency_k = have_u ? kRecencyKey * sqrt_d : 0.0;
      f.key_const.resize(d);
      f.query_const.resize(d);
      f.sink_key.resize(d);
      f.sink_query.assign(d, 0.0f);
      for (uint32_t ch = 0; ch < d; ++ch) {
        f.key_const[ch] = float(shift * mk[ch] + recency_k * u[ch]) + outlier_bias[ch];
        f.query_const[ch] = float(shift * mq[ch] + recency_q * u[ch]);
        f.sink_key[ch] = float(kSinkKey * sqrt_d * e[ch]);
        if (o.sink_tokens > 0) f.sink_query[ch] = float(o.sink_logit / kSinkKey * e[ch]);
      }
      // Post-rotary, the queries' sink part points at the sinks' position.
      Rotate(f.sink_query.data(), sink_center, +1);
    }
    for (uint32_t j = 0; j < o.layout.num_query_heads; ++j) {
      Rng rng(Key(o.seed, kTagQueryHead, layer, j));
      QueryHead& q = query_heads_[size_t{layer} * o.layout.num_query_heads + j];
      q.content_scale = float(o.topic_logit * (0.85 + 0.3 * rng.Uniform()));
      q.retrieval = float(o.retrieval_weight * (0.75 + 0.5 * rng.Uniform()));
      q.recent = float(o.recent_topic_weight * (0.75 + 0.5 * rng.Uniform()));
      q.sink = float(0.8 + 0.5 * rng.Uniform());
      q.slot = uint32_t(rng.Below(o.working_set_spans));
    }
  }
}

void Workload::BuildSteps() {
  const WorkloadOptions& o = options_;
  const uint32_t w = o.working_set_spans, hq = o.layout.num_query_heads, r = rank_;
  Rng rng(Key(o.seed, kTagSteps));
  const uint64_t lo = o.tokens > o.sink_tokens ? o.sink_tokens : 0;
  working_set_.resize(size_t{o.steps} * w);
  drift_.resize(size_t{o.steps} * hq * r);
  const double inv_sqrt_r = 1.0 / std::sqrt(double(r));
  const double innovation = std::sqrt(1.0 - double(o.query_drift) * o.query_drift);
  for (uint32_t s = 0; s < o.steps; ++s) {
    for (uint32_t i = 0; i < w; ++i) {
      uint64_t& token = working_set_[size_t{s} * w + i];
      token = s == 0 || rng.Uniform() < o.target_switch_prob ? lo + rng.Below(o.tokens - lo)
                                                             : working_set_[size_t{s - 1} * w + i];
    }
    for (size_t k = 0; k < size_t{hq} * r; ++k) {
      float& f = drift_[size_t{s} * hq * r + k];
      const double fresh = rng.Normal() * inv_sqrt_r;
      f = s == 0 ? float(fresh)
                 : float(o.query_drift * drift_[size_t{s - 1} * hq * r + k] + innovation * fresh);
    }
  }
}

Status Workload::PlantNeedles() {
  const WorkloadOptions& o = options_;
  if (o.needles == 0) return Status::OK();
  const uint32_t d = o.layout.head_dim, hkv = o.layout.num_kv_heads;
  const uint32_t group = o.layout.QueryGroupSize();
  const uint64_t lo = std::max<uint64_t>(o.sink_tokens, uint64_t(o.needle_min_depth * o.tokens));
  const uint64_t hi = std::min<uint64_t>(o.tokens, uint64_t(o.needle_max_depth * o.tokens));
  if (hi <= lo || hi - lo < o.needles) {
    return Status::InvalidArgument("workload: the needle depth range holds fewer tokens than " +
                                   std::to_string(o.needles) + " needles");
  }
  Rng rng(Key(o.seed, kTagNeedles));
  std::vector<std::pair<uint64_t, uint32_t>> planted;  // (token, step)
  while (planted.size() < o.needles) {
    const uint64_t token = lo + rng.Below(hi - lo);
    const uint32_t step = uint32_t(rng.Below(o.steps));
    bool taken = false;
    for (const auto& p : planted) taken = taken || p.first == token;
    if (!taken) planted.emplace_back(token, step);
  }
  const double target = double(o.needle_logit) * std::sqrt(double(d));
  std::vector<float> queries(size_t{o.layout.num_query_heads} * d), varying(queries.size());
  std::vector<float> code(rank_);
  TokenLatent cache;
  for (uint32_t layer = 0; layer < o.layout.num_layers; ++layer) {
    if (o.needle_layer >= 0 && uint32_t(o.needle_layer) != layer) continue;
    for (uint32_t n = 0; n < planted.size(); ++n) {
      const auto [token, step] = planted[n];
      needles_.push_back({layer, step, token, token / o.layout.block_tokens});
      NeedleData data{layer, token, std::vector<float>(size_t{hkv} * d),
                      std::vector<float>(size_t{hkv} * d)};
      ComputeQueries(layer, step, queries.data(), varying.data());
      TokenCode(token, cache, code.data());
      for (uint32_t h = 0; h < hkv; ++h) {
        float* key = &data.key[size_t{h} * d];
        float* value = &data.value[size_t{h} * d];
        BaseKeyValue(layer, h, token, code.data(), key, value);
        Rotate(key, double(token), +1);
        // A change of the key inside span{v_a} (v_a: the step-specific part of query a,
        // its content and noise, post-rotary) with q_a . key = target for every query head
        // a of the group: solve (Q V^T) x = target - Q key, key += V^T x. Leaving out the
        // parts every step shares (offset, recency, sink) keeps the needle about its step.
        const float* q = &queries[size_t{h} * group * d];
        const float* v = &varying[size_t{h} * group * d];
        std::vector<double> gram(size_t{group} * group), x(group);
        double trace = 0.0;
        for (uint32_t a = 0; a < group; ++a) {
          for (uint32_t b = 0; b < group; ++b) {
            double s = 0.0;
            for (uint32_t c = 0; c < d; ++c) s += double(q[a * d + c]) * v[b * d + c];
            gram[a * group + b] = s;
          }
          trace += std::fabs(gram[a * group + a]);
          double s = 0.0;
          for (uint32_t c = 0; c < d; ++c) s += double(q[a * d + c]) * key[c];
          x[a] = target - s;
        }
        for (uint32_t a = 0; a < group; ++a) gram[a * group + a] += 1e-12 * trace;
        SolveInPlace(gram, x);
        for (uint32_t c = 0; c < d; ++c) {
          double k = key[c];
          for (uint32_t a = 0; a < group; ++a) k += x[a] * v[a * d + c];
          key[c] = float(k);
        }
        // A distinctive value: a large random direction on top of the ordinary value.
        Rng vrng(Key(o.seed, kTagNeedleValue, n, layer, h));
        std::vector<double> dir(d);
        for (double& x_c : dir) x_c = vrng.Normal();
        Orthonormalize(dir, {});
        for (uint32_t c = 0; c < d; ++c) {
          value[c] += float(o.needle_value_scale * std::sqrt(double(d)) * dir[c]);
        }
      }
      needle_data_.push_back(std::move(data));
    }
  }
  std::sort(needles_.begin(), needles_.end(), [](const Needle& a, const Needle& b) {
    return std::tie(a.layer, a.step, a.token) < std::tie(b.layer, b.step, b.token);
  });
  std::sort(needle_data_.begin(), needle_data_.end(), [](const NeedleData& a, const NeedleData& b) {
    return std::tie(a.layer, a.token) < std::tie(b.layer, b.token);
  });
  return Status::OK();
}

uint64_t Workload::num_blocks() const {
  return (options_.tokens + options_.layout.block_tokens - 1) / options_.layout.block_tokens;
}

// Segments: cell c = [c * mean, (c + 1) * mean) holds one boundary at a random offset;
// segment 0 starts at token 0, segment k >= 1 at the boundary of cell k - 1.
uint64_t Workload::SegmentId(uint64_t token, uint32_t tag, uint32_t mean_tokens) const {
  const uint64_t cell = token / mean_tokens;
  Rng rng(Key(options_.seed, tag, cell));
  return token - cell * mean_tokens >= rng.Below(mean_tokens) ? cell + 1 : cell;
}

uint64_t Workload::SegmentStart(uint64_t id, uint32_t tag, uint32_t mean_tokens) const {
  if (id == 0) return 0;
  Rng rng(Key(options_.seed, tag, id - 1));
  return (id - 1) * mean_tokens + rng.Below(mean_tokens);
}

void Workload::SegmentTopic(uint64_t id, uint32_t tag, float continuity, float* z) const {
  const uint32_t r = rank_;
  const double inv_sqrt_r = 1.0 / std::sqrt(double(r));
  const double norm = 1.0 / std::sqrt(1.0 + double(continuity) * continuity);
  Rng own(Key(options_.seed, tag, id));
  for (uint32_t i = 0; i < r; ++i) z[i] = float(own.Normal() * inv_sqrt_r * norm);
  if (continuity == 0.0f) return;
  Rng prev(Key(options_.seed, tag, id - 1));  // id 0 wraps: still a fixed stream
  for (uint32_t i = 0; i < r; ++i) z[i] += float(continuity * prev.Normal() * inv_sqrt_r * norm);
}

void Workload::TokenCode(uint64_t token, TokenLatent& cache, float* c) const {
  const uint32_t r = rank_;
  const uint64_t span = SegmentId(token, kTagSpanBoundary, options_.span_tokens);
  const uint64_t phrase = SegmentId(token, kTagPhraseBoundary, options_.phrase_tokens);
  cache.z.resize(r);
  cache.y.resize(r);
  if (span != cache.span) {
    SegmentTopic(span, kTagSpanTopic, kSpanContinuity, cache.z.data());
    cache.span = span;
  }
  if (phrase != cache.phrase) {
    SegmentTopic(phrase, kTagPhraseTopic, 0.0f, cache.y.data());
    cache.phrase = phrase;
  }
  static const float kNorm =
      1.0f / std::sqrt(1.0f + kPhraseWeight * kPhraseWeight + kTokenJitter * kTokenJitter);
  Rng jitter(Key(options_.seed, kTagTokenJitter, token));
  const double inv_sqrt_r = 1.0 / std::sqrt(double(r));
  for (uint32_t i = 0; i < r; ++i) {
    const float x = float(jitter.Normal() * inv_sqrt_r);
    c[i] = (cache.z[i] + kPhraseWeight * cache.y[i] + kTokenJitter * x) * kNorm;
  }
}

void Workload::TopicAt(uint64_t token, float* z) const {
  const uint32_t r = rank_;
  std::vector<float> y(r);
  SegmentTopic(SegmentId(token, kTagSpanBoundary, options_.span_tokens), kTagSpanTopic,
               kSpanContinuity, z);
  SegmentTopic(SegmentId(token, kTagPhraseBoundary, options_.phrase_tokens), kTagPhraseTopic, 0.0f,
               y.data());
  const float norm = 1.0f / std::sqrt(1.0f + kPhraseWeight * kPhraseWeight);
  for (uint32_t i = 0; i < r; ++i) z[i] = (z[i] + kPhraseWeight * y[i]) * norm;
}

void Workload::RotationAt(double pos, int sign, double* cs, double* sn) const {
  const uint32_t pairs = options_.layout.head_dim / 2;
  for (uint32_t i = 0; i < pairs; ++i) {
    const double angle = sign * pos * omega_[i];
    cs[i] = std::cos(angle);
    sn[i] = std::sin(angle);
  }
}

void Workload::ApplyRotation(float* v, const double* cs, const double* sn) const {
  if (!options_.rope) return;
  const uint32_t pairs = options_.layout.head_dim / 2;
  for (uint32_t i = 0; i < pairs; ++i) {
    const double x = v[i], y = v[i + pairs];
    v[i] = float(x * cs[i] - y * sn[i]);
    v[i + pairs] = float(y * cs[i] + x * sn[i]);
  }
}

void Workload::Rotate(float* v, double pos, int sign) const {
  if (!options_.rope) return;
  std::vector<double> cs(omega_.size()), sn(omega_.size());
  RotationAt(pos, sign, cs.data(), sn.data());
  ApplyRotation(v, cs.data(), sn.data());
}

void Workload::BaseKeyValue(uint32_t layer, uint32_t kv_head, uint64_t token, const float* code,
                            float* key, float* value) const {
  const WorkloadOptions& o = options_;
  const uint32_t d = o.layout.head_dim, r = rank_;
  const HeadFrame& f = frames_[size_t{layer} * o.layout.num_kv_heads + kv_head];
  const float sqrt_d = std::sqrt(float(d));
  if (key != nullptr) {
    Rng noise(Key(o.seed, kTagKeyNoise, layer, kv_head, token));
    const float g = sqrt_d * std::exp(o.key_norm_spread * noise.FastNormal());
    const bool sink = token < o.sink_tokens;
    for (uint32_t ch = 0; ch < d; ++ch) {
      float k = g * Dot(&f.key_basis[size_t{ch} * r], code, r) + kKeyNoise * noise.FastNormal() +
                f.key_const[ch];
      if (sink) k += f.sink_key[ch];
      key[ch] = k;
    }
  }
  if (value != nullptr) {
    Rng noise(Key(o.seed, kTagValueNoise, layer, kv_head, token));
    const float scale = sqrt_d * (token < o.sink_tokens ? kSinkValueScale : 1.0f);
    for (uint32_t ch = 0; ch < d; ++ch) {
      value[ch] = scale * (kValueContent * Dot(&f.value_basis[size_t{ch} * r], code, r) +
                           kValueNoise * noise.FastNormal());
    }
  }
}

const Workload::NeedleData* Workload::FindNeedle(uint32_t layer, uint64_t token) const {
  auto it = std::lower_bound(needle_data_.begin(), needle_data_.end(), std::pair(layer, token),
                             [](const NeedleData& n, const std::pair<uint32_t, uint64_t>& k) {
                               return std::tie(n.layer, n.token) < std::tie(k.first, k.second);
                             });
  if (it == needle_data_.end() || it->layer != layer || it->token != token) return nullptr;
  return &*it;
}

Status Workload::KeysAndValues(uint32_t layer, uint64_t first_token, uint64_t count,
                               std::span<float> keys, std::span<float> values) const {
  const ModelLayout& l = options_.layout;
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads;
  if (layer >= l.num_layers) return Status::InvalidArgument("workload: no such layer");
  if (first_token > (uint64_t{1} << 41) || count > (uint64_t{1} << 41)) {
    return Status::InvalidArgument("workload: token range out of bounds");
  }
  const uint64_t floats = count * hkv * d;
  if ((!keys.empty() && keys.size() < floats) || (!values.empty() && values.size() < floats)) {
    return Status::InvalidArgument("workload: output span too small");
  }
  std::vector<float> code(rank_);
  std::vector<double> cs(omega_.size()), sn(omega_.size());
  TokenLatent cache;
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t token = first_token + i;
    TokenCode(token, cache, code.data());
    if (!keys.empty() && options_.rope) RotationAt(double(token), +1, cs.data(), sn.data());
    const NeedleData* needle = FindNeedle(layer, token);
    for (uint32_t h = 0; h < hkv; ++h) {
      float* key = keys.empty() ? nullptr : &keys[(i * hkv + h) * d];
      float* value = values.empty() ? nullptr : &values[(i * hkv + h) * d];
      BaseKeyValue(layer, h, token, code.data(), key, value);
      if (key != nullptr) ApplyRotation(key, cs.data(), sn.data());
      if (needle != nullptr) {
        if (key != nullptr) memcpy(key, &needle->key[size_t{h} * d], d * sizeof(float));
        if (value != nullptr) memcpy(value, &needle->value[size_t{h} * d], d * sizeof(float));
      }
    }
  }
  return Status::OK();
}

Status Workload::FillBlock(uint32_t layer, uint64_t block_index, void* dst) const {
  const ModelLayout& l = options_.layout;
  if (block_index >= num_blocks()) return Status::InvalidArgument("workload: no such block");
  if (dst == nullptr) return Status::InvalidArgument("workload: null destination");
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads, bt = l.block_tokens;
  const uint64_t first = block_index * bt;
  const uint64_t count = std::min<uint64_t>(bt, options_.tokens - first);
  std::vector<float> keys(count * hkv * d), values(count * hkv * d);
  KVTIER_RETURN_IF_ERROR(KeysAndValues(layer, first, count, keys, values));
  memset(dst, 0, l.BytesPerBlock());
  uint8_t* value_base = static_cast<uint8_t*>(dst) + l.KeyBytesPerBlock();
  for (uint32_t h = 0; h < hkv; ++h) {
    for (uint64_t t = 0; t < count; ++t) {
      const uint64_t out = (uint64_t{h} * bt + t) * d;
      const uint64_t in = (t * hkv + h) * d;
      for (uint32_t c = 0; c < d; ++c) {
        StoreFromFloat(dst, out + c, l.dtype, keys[in + c]);
        StoreFromFloat(value_base, out + c, l.dtype, values[in + c]);
      }
    }
  }
  return Status::OK();
}

void Workload::ComputeQueries(uint32_t layer, uint32_t step, float* out, float* varying) const {
  const WorkloadOptions& o = options_;
  const uint32_t d = o.layout.head_dim, r = rank_, hq = o.layout.num_query_heads;
  const uint32_t group = o.layout.QueryGroupSize(), w = o.working_set_spans;
  const uint64_t position = o.tokens + step;
  std::vector<float> recent(r), m(r);
  std::vector<std::vector<float>> targets(w, std::vector<float>(r));
  TopicAt(position - 1, recent.data());
  for (uint32_t i = 0; i < w; ++i) TopicAt(working_set_[size_t{step} * w + i], targets[i].data());
  for (uint32_t j = 0; j < hq; ++j) {
    const QueryHead& qh = query_heads_[size_t{layer} * hq + j];
    const HeadFrame& f = frames_[size_t{layer} * o.layout.num_kv_heads + j / group];
    const float* drift = &drift_[(size_t{step} * hq + j) * r];
    for (uint32_t i = 0; i < r; ++i) {
      m[i] = qh.retrieval * targets[qh.slot][i] + qh.recent * recent[i] + o.drift_weight * drift[i];
    }
    Rng noise(Key(o.seed, kTagQueryNoise, layer, step, j));
    float* q = out + size_t{j} * d;
    for (uint32_t ch = 0; ch < d; ++ch) {
      q[ch] = qh.content_scale * Dot(&f.key_basis[size_t{ch} * r], m.data(), r) +
              kQueryNoise * noise.FastNormal();
    }
    if (varying != nullptr) {
      memcpy(varying + size_t{j} * d, q, d * sizeof(float));
      Rotate(varying + size_t{j} * d, double(position), +1);
    }
    for (uint32_t ch = 0; ch < d; ++ch) q[ch] += f.query_const[ch];
    Rotate(q, double(position), +1);
    for (uint32_t ch = 0; ch < d; ++ch) q[ch] += qh.sink * f.sink_query[ch];
  }
}

Status Workload::Query(uint32_t layer, uint32_t step, std::span<float> out) const {
  const ModelLayout& l = options_.layout;
  if (layer >= l.num_layers || step >= options_.steps) {
    return Status::InvalidArgument("workload: no such layer or step");
  }
  if (out.size() < size_t{l.num_query_heads} * l.head_dim) {
    return Status::InvalidArgument("workload: output span too small");
  }
  ComputeQueries(layer, step, out.data(), nullptr);
  return Status::OK();
}

std::vector<Needle> Workload::NeedlesAt(uint32_t layer, uint32_t step) const {
  std::vector<Needle> out;
  for (const Needle& n : needles_) {
    if (n.layer == layer && n.step == step) out.push_back(n);
  }
  return out;
}

std::vector<uint32_t> Workload::OutlierChannels(uint32_t layer, uint32_t kv_head) const {
  if (layer >= options_.layout.num_layers || kv_head >= options_.layout.num_kv_heads) return {};
  return frames_[size_t{layer} * options_.layout.num_kv_heads + kv_head].outliers;
}

uint64_t Workload::TargetToken(uint32_t layer, uint32_t step, uint32_t query_head) const {
  const WorkloadOptions& o = options_;
  if (layer >= o.layout.num_layers || step >= o.steps || query_head >= o.layout.num_query_heads) {
    return 0;
  }
  const QueryHead& qh = query_heads_[size_t{layer} * o.layout.num_query_heads + query_head];
  return working_set_[size_t{step} * o.working_set_spans + qh.slot];
}

uint64_t Workload::TargetSpanBegin(uint32_t layer, uint32_t step, uint32_t query_head) const {
  return SegmentStart(
      SegmentId(TargetToken(layer, step, query_head), kTagSpanBoundary, options_.span_tokens),
      kTagSpanBoundary, options_.span_tokens);
}

}  // namespace kvtier::bench
