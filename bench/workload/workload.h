// Workload: synthetic keys, values and decoding-step queries that attend the way a real
// model's do, for the retrieval benchmarks, `kvtier demo` and the tests. Deterministic
// from a seed, and generated on demand: any token of any layer is a pure function of
// (seed, options, layer, token), so a million-token context is produced block by block
// without ever holding a layer's keys in memory.
//
// ## The generative model
// Notation: D = head_dim, P = D / 2 rotary pairs, r = key_rank, group = query heads per
// KV head. Logits are q.k / sqrt(D), the softmax argument.
//
// Rotary embedding (RoPE), rotate-half convention (HF Llama, vLLM "neox"): channels i and
// i + P form pair i, turned by position * w_i, w_i = rope_theta^(-2i/D) (pair 0 fastest),
// the slow ones divided by rope_scaling as Llama 3.1 does. R(p) is that rotation. Keys and
// queries are built pre-rotary and returned post-rotary: key_t = R(t) k_t, query = R(P) q
// at P = tokens + step. A logit thus depends on distance through cos(w_i * distance),
// and inside a block the fast pairs of the keys cancel in the mean.
//
// Topics (shared by all layers and heads, latents in R^r of norm about 1): the token
// axis is cut into spans (one boundary at a random offset in each cell of span_tokens
// tokens: contiguous regions of mean length span_tokens) and, finer, phrases
// (phrase_tokens). A span has a topic z (correlated with the previous span's), a phrase
// a sub-topic y, a token a jitter x; token t's latent is c_t ~ z + 0.5 y + 0.35 x.
//
// Per layer and KV head, a random frame: the slowest max(1, P / 16) pairs hold only the
// sink direction e; outlier_channels channels (one per pair, elsewhere) hold the outlier
// biases; in the remaining "live" pairs lie an orthonormal content basis B of r
// directions (energy falling off exponentially from the slowest live pairs, which keep a
// match over long distances, towards the fast ones, with a floor), a recency direction u
// (the pairs that turn within 4 * recency_tokens), and offsets mk, mq, all orthogonal.
//   key   k_t = sqrt(D) g_t B c_t          content, channel RMS ~1; g_t = exp(
//                                          key_norm_spread * n), n ~ N(0,1) cut at 3.46
//             + 0.3 noise                  full rank
//             + query_key_shift sqrt(D) mk
//             + outlier bias               +-outlier_scale in outlier_channels channels
//             + 0.7 sqrt(D) u              a position signal (recency)
//             + [t < sink_tokens] 2.5 sqrt(D) e
//   query q   = topic_logit a_j B m_{j,s} + 0.3 noise + query_key_shift sqrt(D) mq
//             + (recency_logit / 0.7) u,   rotated to P, plus (sink_logit / 2.5) R(c) e
//             with c the sinks' centre, so the sink logit holds at any distance.
//   m_{j,s}   = ret_j z_target + rec_j z_recent + drift_weight f_{j,s}
// z_target: the topic of the span and phrase of one of working_set_spans target tokens
// drawn at random depths (the layer's heads share them, head j follows one; each is
// redrawn with probability target_switch_prob per step), so a whole span is relevant and
// one phrase of it most. z_recent: the same for the token at P - 1. f: an AR(1) latent,
// f_s = query_drift f_{s-1} + sqrt(1 - query_drift^2) noise, so consecutive queries stay
// close (cosine ~0.9) and drift. a_j, ret_j, rec_j and the head's sink logit vary by
// 15..30% per head. Queries have no energy in outlier pairs (outliers swell key norms
// and block means without steering attention), and mq, mk are orthogonal: they shift
// the query and key distributions apart (a nearest-neighbour index over keys sees
// queries out of distribution) at little cost in logits.
// Logits that result, before RoPE's decay with distance (a matched key keeps ~0.8 of its
// logit at 32K tokens, ~0.7 at 128K with the default scaling):
//   keys of the target phrase  ~ topic_logit ret_j 0.95 g_t, its span ~ 0.76 instead
//   keys of the current phrase and span: the same with rec_j
//   any other key              content noise of deviation ~ topic_logit / sqrt(r)
//   recency                    + recency_logit at distance 0, ~1/4 of it out to
//                              recency_tokens / 2, ~0 (+-0.15) past recency_tokens
//   sinks                      ~ sink_logit for every query
// a heavy-tailed mixture: most keys in the background, contiguous target spans, the
// current span, the sinks, times the key magnitudes g_t; the largest non-sink logits
// reach ~25.
// Measured by tests/workload_test.cc at 16K tokens with Llama-3-8B's heads: the first
// block holds 28% of the attention (35 times its uniform share); the last 64 tokens'
// logits sit 4.2 above the mean; the top 1% of non-sink logits hold ~60% of their mass (a
// Gaussian fitted to the bulk: ~43%); |block mean key| / mean |key| is 0.78 (0.95
// without RoPE); outlier pairs are 2.5..5 times the median pair's RMS; sinks, a 512-token
// window and the oracle's top 10% of blocks cover 78% of the mass (27% without those
// blocks). At head_dim 64 logits are noisier (deviation ~2.7) and closer to Gaussian.
//
// Values: sqrt(D) (0.8 C c_t + 0.6 noise), C another per-head orthonormal basis (values,
// like keys, are alike within a span); sink tokens' values are scaled by 0.2 (sinks
// absorb attention and contribute little, as in real models).
//
// Needles: `needles` distinct tokens at random depths, each aimed at one decoding step
// of a layer (every layer by default). Per KV head the needle key is the ordinary key
// plus a correction inside the span of its query heads' step-specific parts (content and
// noise, post-rotary) that makes the logit exactly needle_logit for every query head of
// the group: pre-rotary alignment with the queries inverse-rotated to the needle's
// position. Its value is the ordinary value plus needle_value_scale * sqrt(D) times a
// random unit direction. The query content persists while the head's target does, so
// nearby steps with the same target attend the needle too (logits ~20-26 at 30).
//
// Positions: keys and values are defined at every position >= 0; [0, tokens) is the
// context. Positions >= tokens are what decoding would append (step s writes position
// tokens + s); FillBlock leaves them zero, Keys/Values return them when asked.
//
// Thread safety: a Workload is immutable after Create; every method is const and may be
// called from any number of threads at once.
#ifndef KVTIER_BENCH_WORKLOAD_WORKLOAD_H_
#define KVTIER_BENCH_WORKLOAD_WORKLOAD_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier::bench {

struct WorkloadOptions {
  // The cache's shape; FillBlock writes blocks of this layout (its dtype and block_tokens).
  // head_dim must be even and at least 16. Default: Llama-3-8B's attention (8 KV heads,
  // 32 query heads, head dim 128, bf16, 128-token blocks) with 4 layers.
  ModelLayout layout = {4, 8, 32, 128, DType::kBF16, 128};
  // Context tokens (positions [0, tokens)). Default: 32768.
  uint64_t tokens = 32768;
  // Decoding steps; step s's queries sit at position tokens + s. Default: 16.
  uint32_t steps = 16;
  // Default: 1.
  uint64_t seed = 1;

  // --- Keys ---
  // Rank of the topic subspace keys and queries share, per KV head; at most head_dim / 2,
  // lowered where the outlier pairs leave less room (key_rank() says what is used).
  // 0 = min(32, head_dim / 2). Default: 0.
  uint32_t key_rank = 0;
  // Mean length of a topic span (a contiguous region about one thing). Default: 512.
  uint32_t span_tokens = 512;
  // Mean length of a sub-topic phrase inside spans. Default: 32.
  uint32_t phrase_tokens = 32;
  // Deviation of the log of each key's content magnitude (per token and head; the normal
  // variate is cut at 3.46 deviations): part of the heavy tail of logits. Default: 0.15.
  float key_norm_spread = 0.15f;
  // Outlier channels per KV head (at most head_dim / 4), each a constant bias of
  // +-outlier_scale (a typical channel's RMS is about 1). Default: 4 channels, 8.
  uint32_t outlier_channels = 4;
  float outlier_scale = 8.0f;
  // Rotary embedding. rope = false gives the pre-rotary keys and queries (same seed, same
  // everything else): for tests and comparisons only. Default: true, theta 500000 (Llama 3).
  bool rope = true;
  double rope_theta = 500000.0;
  // Llama 3.1's "llama3" frequency scaling: frequencies whose wavelength passes 8192
  // tokens are divided by this factor (smoothly between 2048 and 8192); 1 = none (plain
  // Llama 3). It keeps content matching alive at long distance: the logit of a matched
  // key keeps about 0.8 of its strength at 32K tokens, 0.7 at 128K, 0.35 at 512K (without
  // scaling: 0.6, 0.1, ~0). Past a few hundred thousand tokens raise rope_theta as well
  // (Qwen2.5-1M uses 10^7). Default: 8 (Llama 3.1).
  float rope_scaling = 8.0f;

  // --- Attention, in logit units (q.k / sqrt(head_dim)) ---
  // Logit of a query and a key that share the same unit topic latent (before the head's
  // weights, g_t and RoPE's decay with distance). Default: 10.
  float topic_logit = 10.0f;
  // The first sink_tokens tokens draw about sink_logit from every query. Default: 4, 9.
  uint32_t sink_tokens = 4;
  float sink_logit = 9.0f;
  // Positional recency (on top of the current span's topic): recency_logit at distance 0,
  // fading out by about recency_tokens. Default: 3, 256.
  float recency_logit = 3.0f;
  uint32_t recency_tokens = 256;
  // Norm of the query and key mean offsets, in units of sqrt(head_dim). Default: 0.5.
  float query_key_shift = 0.5f;
  // Mean weights of the query latent: the retrieval target's topic, the current span's
  // topic, the free drifting part. Default: 0.9, 0.4, 0.35.
  float retrieval_weight = 0.9f;
  float recent_topic_weight = 0.4f;
  float drift_weight = 0.35f;
  // AR(1) coefficient of the free part from one step to the next, in [0, 1). Default: 0.9.
  float query_drift = 0.9f;
  // Retrieval targets in play at a step (each query head follows one), and the chance
  // per step that one is replaced by another. Default: 4, 0.05.
  uint32_t working_set_spans = 4;
  float target_switch_prob = 0.05f;

  // --- Needles ---
  // Planted needles (distinct tokens). Default: 0.
  uint32_t needles = 0;
  // The layer each needle is planted in; -1: every layer. Default: -1.
  int32_t needle_layer = -1;
  // The needle key's logit for each query head of its step (above the heaviest tail of
  // the other keys, ~25), and the size of its value's distinctive component (in units of
  // sqrt(head_dim)). Default: 30, 4.
  float needle_logit = 30.0f;
  float needle_value_scale = 4.0f;
  // Needle depths, uniform in [min, max) as fractions of tokens (never a sink token).
  // Default: [0.02, 0.9).
  float needle_min_depth = 0.02f;
  float needle_max_depth = 0.9f;
};

// A planted needle: its key, at `token` of `layer`, answers the queries of `step`.
struct Needle {
  uint32_t layer = 0;
  uint32_t step = 0;
  uint64_t token = 0;
  uint64_t block = 0;  // token / block_tokens
  friend bool operator==(const Needle&, const Needle&) = default;
};

class Workload {
 public:
  // InvalidArgument for a bad layout or options out of range.
  static Result<std::unique_ptr<Workload>> Create(const WorkloadOptions& options);
  ~Workload();
  Workload(const Workload&) = delete;
  Workload& operator=(const Workload&) = delete;

  const WorkloadOptions& options() const { return options_; }
  const ModelLayout& layout() const { return options_.layout; }
  uint64_t tokens() const { return options_.tokens; }
  uint32_t steps() const { return options_.steps; }
  uint32_t key_rank() const { return rank_; }
  // Blocks holding the context: ceil(tokens / block_tokens).
  uint64_t num_blocks() const;

  // Post-rotary keys and values of tokens [first_token, first_token + count) of `layer`,
  // as float [count][num_kv_heads][head_dim]. Either span may be empty (not wanted);
  // otherwise it must hold count * num_kv_heads * head_dim floats.
  Status KeysAndValues(uint32_t layer, uint64_t first_token, uint64_t count, std::span<float> keys,
                       std::span<float> values) const;
  Status Keys(uint32_t layer, uint64_t first_token, uint64_t count, std::span<float> keys) const {
    return KeysAndValues(layer, first_token, count, keys, {});
  }
  Status Values(uint32_t layer, uint64_t first_token, uint64_t count,
                std::span<float> values) const {
    return KeysAndValues(layer, first_token, count, {}, values);
  }

  // Writes block `block_index` of `layer` in kvtier's block format (kvtier/layout.h):
  // keys then values, each [num_kv_heads][block_tokens][head_dim] of layout().dtype, to
  // `dst` (layout().BytesPerBlock() bytes). Positions >= tokens() are written as zero.
  Status FillBlock(uint32_t layer, uint64_t block_index, void* dst) const;

  // The post-rotary queries of `step` (position tokens + step) of `layer`, as float
  // [num_query_heads][head_dim].
  Status Query(uint32_t layer, uint32_t step, std::span<float> out) const;

  // Every needle, one entry per layer it is planted in, sorted by (layer, step, token).
  const std::vector<Needle>& needles() const { return needles_; }
  // The needles of one layer and step.
  std::vector<Needle> NeedlesAt(uint32_t layer, uint32_t step) const;

  // For tests and reports: the outlier channels of a KV head (sorted); a token of the
  // phrase the query head retrieves at a step (0 for arguments out of range), and the
  // first token of that phrase's span.
  std::vector<uint32_t> OutlierChannels(uint32_t layer, uint32_t kv_head) const;
  uint64_t TargetToken(uint32_t layer, uint32_t step, uint32_t query_head) const;
  uint64_t TargetSpanBegin(uint32_t layer, uint32_t step, uint32_t query_head) const;

 private:
  struct HeadFrame;
  struct QueryHead;
  struct NeedleData;
  struct TokenLatent;

  explicit Workload(const WorkloadOptions& options);
  Status Init();
  void BuildFrames();
  void BuildSteps();
  Status PlantNeedles();

  // Topic machinery (layer-independent): segment ids, the topic of a segment, and the
  // latent of a token (with a cache of the last span's and phrase's topics).
  uint64_t SegmentId(uint64_t token, uint32_t tag, uint32_t mean_tokens) const;
  uint64_t SegmentStart(uint64_t id, uint32_t tag, uint32_t mean_tokens) const;
  void SegmentTopic(uint64_t id, uint32_t tag, float continuity, float* z) const;
  void TokenCode(uint64_t token, TokenLatent& cache, float* c) const;
  // The topic of the span and phrase holding `token` (what a query about it seeks).
  void TopicAt(uint64_t token, float* z) const;

  // Rotates `v` (head_dim floats) by position `pos` (backwards when `sign` is -1); the
  // cosines and sines of one position, to rotate several vectors by it.
  void Rotate(float* v, double pos, int sign) const;
  void RotationAt(double pos, int sign, double* cs, double* sn) const;
  void ApplyRotation(float* v, const double* cs, const double* sn) const;
  // Pre-rotary key and value of one token and KV head, without needle changes; either
  // output may be null.
  void BaseKeyValue(uint32_t layer, uint32_t kv_head, uint64_t token, const float* code, float* key,
                    float* value) const;
  const NeedleData* FindNeedle(uint32_t layer, uint64_t token) const;
  // Post-rotary queries of a step (no validation); with `varying`, also the part of each
  // query that changes from step to step (content and noise, post-rotary).
  void ComputeQueries(uint32_t layer, uint32_t step, float* out, float* varying) const;

  WorkloadOptions options_;
  uint32_t rank_ = 0;
  std::vector<double> omega_;           // [P] rotary frequencies
  std::vector<HeadFrame> frames_;       // [layer][kv_head]
  std::vector<QueryHead> query_heads_;  // [layer][query_head]
  std::vector<uint64_t> working_set_;   // [step][working_set_spans] a target token
  std::vector<float> drift_;            // [step][query_head][rank] AR(1) latents
  std::vector<Needle> needles_;
  std::vector<NeedleData> needle_data_;  // sorted by (layer, token)
};

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_WORKLOAD_WORKLOAD_H_
