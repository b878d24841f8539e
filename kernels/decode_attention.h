// Decode attention over a block table: one decoding step's queries attend to the tokens
// of a list of kvtier blocks. Tests and the demo use it to compare sparse attention
// (over the blocks retrieval selected) with full attention, and its per-block attention
// mass is the oracle quantity retrieval is judged by.
//
// Inputs of one call (one layer, one sequence, one step):
//   queries       float32 [num_query_heads][head_dim]. GQA: query head h reads KV head
//                 h / (num_query_heads / num_kv_heads).
//   block_table   num_entries pointers to kvtier blocks (keys, then values, each
//                 [num_kv_heads][block_tokens][head_dim] of `dtype`, head_dim fastest;
//                 see kvtier/layout.h). Each block address must be 16-byte aligned
//                 (kvtier's slots are 4 KiB-aligned).
//   valid_tokens  per entry, how many of its tokens take part: tokens [0, n) of the
//                 block. Any entry may be partial (usually only the newest one is); an
//                 entry with 0 tokens contributes nothing and gets block mass 0.
// The table is a list, not a set: entries may come in any order (softmax does not care)
// and a block listed twice counts twice. There is no causal mask and no position: the
// caller lists exactly the tokens the query may see. "Sinks and local window" are not a
// mode of this kernel: they are entries the caller puts in the table (the first blocks of
// the sequence and the newest ones, the newest one partial) beside the retrieved blocks.
//
// Outputs, per query head h, with s_t = scale * (q_h . k_t) over every listed token t:
//   out[h][:]          sum_t softmax(s)_t * v_t                 (float32 [heads][head_dim])
//   lse[h]             log sum_t exp(s_t)  (natural log)        (optional, float [heads])
//   block_mass[e][h]   sum over entry e's tokens of exp(s_t - lse[h])
//                                                               (optional, [entries][heads])
// The masses of one head sum to 1 over the entries. When the table has no token at all,
// out is 0, lse is -infinity and every mass is 0, which is the neutral element of the
// merge below.
//
// Merging: attention over a table split in parts (say, retrieved blocks and the local
// window computed apart) is recovered exactly from the parts' (out, lse) by
// MergeAttentionStates: lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i.
// A part's block masses become masses of the whole by multiplying by exp(lse_i - lse).
//
// Softmax is numerically stable: scores are taken relative to a running maximum (online
// softmax), so logits of any magnitude (|s| ~ 1e3 and beyond) stay finite. Accumulation
// is in float32.
//
// GPU design (decode_attention.cu), flash-decoding style:
//   1. A split kernel: one thread block per (KV head, group of up to 4 of its query heads,
//      chunk of consecutive table entries). A key or value row is read once for up to 4
//      query heads (GQA reuse; groups of 5 to 8 read it twice, the second time mostly
//      from L2), with 16-byte vector loads (8 bytes for fp8) spread over a power-of-two
//      number of threads per row; a 64-token tile at a time, scores go through shared
//      memory, warp h keeps head h's online softmax, and each thread accumulates its
//      slice of head_dim (at most 8 channels) in registers, which is what bounds head_dim.
//      It writes the chunk's normalized output and lse, and each entry's log mass.
//   2. A merge kernel: one thread block per query head combines the chunks' states and
//      turns log masses into masses.
// The number of chunks is chosen to fill the device (about two thread blocks per SM),
// at most one chunk per entry and at most what `workspace` holds. Without a workspace
// (nullptr / 0 bytes) there is a single chunk and the split kernel writes the result
// itself: correct, but only num_kv_heads * ceil(group / 4) thread blocks run.
// Results agree with DecodeAttentionRef to float rounding (the summation order differs).
//
// Limits, shared by the reference and the kernel: head_dim a multiple of 8 and at most
// 256; num_query_heads a multiple of num_kv_heads (any group size); any block_tokens;
// scale finite (0 selects the default 1/sqrt(head_dim)); a block at most kMaxBlockBytes.
//
// Thread safety: the functions are pure; concurrent calls on distinct outputs are safe.
#ifndef KVTIER_KERNELS_DECODE_ATTENTION_H_
#define KVTIER_KERNELS_DECODE_ATTENTION_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier {

inline constexpr uint32_t kMaxAttentionHeadDim = 256;
// The most chunks one split-K launch uses (bounds the workspace).
inline constexpr uint32_t kMaxAttentionSplits = 128;

// Element index, within a block's keys (or within its values), of channel `channel` of
// token `token` of KV head `kv_head`.
KVTIER_HOST_DEVICE uint64_t AttentionKvIndex(uint32_t kv_head, uint32_t token, uint32_t channel,
                                             uint32_t block_tokens, uint32_t head_dim) {
  return (uint64_t{kv_head} * block_tokens + token) * head_dim + channel;
}

// Elements from the start of a block to the start of its values.
KVTIER_HOST_DEVICE uint64_t AttentionValuesOffset(uint32_t num_kv_heads, uint32_t block_tokens,
                                                  uint32_t head_dim) {
  return uint64_t{num_kv_heads} * block_tokens * head_dim;
}

// The scale applied to q.k: `scale`, or 1/sqrt(head_dim) when `scale` is 0.
inline float AttentionScaleOrDefault(float scale, uint32_t head_dim) {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

// A block's mass from its log mass log(sum_t exp(s_t)) and the head's lse; 0 for an entry
// without tokens (or a table without tokens).
KVTIER_HOST_DEVICE float AttentionMassFromLogMass(float log_mass, float lse) {
  if (log_mass == -INFINITY || lse == -INFINITY) return 0.0f;
  return expf(log_mass - lse);
}

// Bytes of device memory (4-byte aligned) that let LaunchDecodeAttention split a table of
// `num_entries` entries as finely as it ever does: the chunks' partial outputs and lses.
// Less (or none) is allowed: it splits less. The workspace may be reused once the launch's
// stream has passed it.
inline uint64_t DecodeAttentionWorkspaceBytes(uint32_t num_query_heads, uint32_t head_dim,
                                              uint32_t num_entries) {
  const uint64_t chunks = num_entries < kMaxAttentionSplits ? num_entries : kMaxAttentionSplits;
  return chunks * num_query_heads * (uint64_t{head_dim} + 1) * sizeof(float);
}

// Argument checks shared by DecodeAttentionRef and LaunchDecodeAttention (which cannot
// read the table's contents on the host: the reference also checks those).
inline Status ValidateDecodeAttentionArgs(const float* queries, uint32_t num_query_heads,
                                          uint32_t num_kv_heads, uint32_t head_dim,
                                          const void* const* block_table,
                                          const uint32_t* valid_tokens, uint32_t num_entries,
                                          uint32_t block_tokens, DType dtype, float scale,
                                          const float* out) {
  auto invalid = [](const std::string& what) {
    return Status::InvalidArgument("DecodeAttention: " + what);
  };
  if (queries == nullptr || block_table == nullptr || valid_tokens == nullptr || out == nullptr) {
    return invalid("null queries, block_table, valid_tokens or out");
  }
  if (num_query_heads == 0 || num_kv_heads == 0 || head_dim == 0 || block_tokens == 0 ||
      num_entries == 0) {
    return invalid("zero heads, head_dim, block_tokens or entries");
  }
  if (num_query_heads % num_kv_heads != 0) {
    return invalid("num_query_heads " + std::to_string(num_query_heads) +
                   " is not a multiple of num_kv_heads " + std::to_string(num_kv_heads));
  }
  if (head_dim % 8 != 0 || head_dim > kMaxAttentionHeadDim) {
    return invalid("head_dim " + std::to_string(head_dim) +
                   " must be a multiple of 8 and at most 256");
  }
  const uint32_t dtype_bytes = DTypeBytes(dtype);
  if (dtype_bytes == 0) return invalid("unknown dtype");
  const uint64_t block_bytes =
      2 * AttentionValuesOffset(num_kv_heads, block_tokens, head_dim) * dtype_bytes;
  if (uint64_t{num_kv_heads} * block_tokens > kMaxBlockBytes || block_bytes > kMaxBlockBytes) {
    return invalid("a block would exceed kMaxBlockBytes");
  }
  if (!std::isfinite(scale)) return invalid("scale is not finite");
  return Status::OK();
}

// Attention of one decoding step over `block_table` (see the top of this file), on the
// GPU: every pointer (queries, the table and the blocks it points to, valid_tokens, the
// outputs, the workspace) is device memory. `lse` and `block_mass` may be null. The
// kernel cannot check the table's contents: it clamps a valid count above block_tokens to
// block_tokens, and a null block pointer with valid tokens is a fault. Asynchronous on
// `stream`. NotSupported in a build without CUDA; the driver's error without a device.
Status LaunchDecodeAttention(const float* queries, uint32_t num_query_heads, uint32_t num_kv_heads,
                             uint32_t head_dim, const void* const* block_table,
                             const uint32_t* valid_tokens, uint32_t num_entries,
                             uint32_t block_tokens, DType dtype, float scale, float* out,
                             float* lse, float* block_mass, void* workspace,
                             uint64_t workspace_bytes, StreamHandle stream);

// CPU reference: the same contract on host memory (synchronous; `workspace` and `stream`
// are ignored). Two passes per head (maximum, then sums), float accumulation. Also
// rejects a valid count above block_tokens and a null block with valid tokens.
Status DecodeAttentionRef(const float* queries, uint32_t num_query_heads, uint32_t num_kv_heads,
                          uint32_t head_dim, const void* const* block_table,
                          const uint32_t* valid_tokens, uint32_t num_entries, uint32_t block_tokens,
                          DType dtype, float scale, float* out, float* lse, float* block_mass,
                          void* workspace, uint64_t workspace_bytes, StreamHandle stream);

// Checks shared by MergeAttentionStatesRef and LaunchMergeAttentionStates.
inline Status ValidateMergeAttentionStatesArgs(const float* outs, const float* lses,
                                               uint32_t num_states, uint32_t num_heads,
                                               uint32_t head_dim, const float* out,
                                               const float* lse) {
  if (outs == nullptr || lses == nullptr || out == nullptr || lse == nullptr) {
    return Status::InvalidArgument("MergeAttentionStates: null outs, lses, out or lse");
  }
  if (num_states == 0 || num_heads == 0 || head_dim == 0) {
    return Status::InvalidArgument("MergeAttentionStates: zero states, heads or head_dim");
  }
  if (head_dim > kMaxAttentionHeadDim) {
    return Status::InvalidArgument("MergeAttentionStates: head_dim above 256");
  }
  return Status::OK();
}

// Merges `num_states` attention results over disjoint parts of one table into the result
// over the whole: outs float [num_states][num_heads][head_dim], lses float
// [num_states][num_heads] (as DecodeAttention writes them; a state with lse -infinity is
// empty and ignored) into out [num_heads][head_dim] and lse [num_heads]. If every state
// is empty, out is 0 and lse -infinity. `out` may not overlap `outs`. Device memory,
// asynchronous on `stream`; NotSupported without CUDA.
Status LaunchMergeAttentionStates(const float* outs, const float* lses, uint32_t num_states,
                                  uint32_t num_heads, uint32_t head_dim, float* out, float* lse,
                                  StreamHandle stream);

// CPU reference of LaunchMergeAttentionStates (host memory, synchronous).
Status MergeAttentionStatesRef(const float* outs, const float* lses, uint32_t num_states,
                               uint32_t num_heads, uint32_t head_dim, float* out, float* lse,
                               StreamHandle stream);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_DECODE_ATTENTION_H_
