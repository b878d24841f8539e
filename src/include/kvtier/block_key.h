// BlockKey: the name of one block, (namespace, sequence, layer, block index).
//
// The sequence id is 128 bits so that it can be a content hash of the token prefix
// (prefix reuse across requests; see SequenceId::FromBytes) as well as a session id.
// Namespaces separate tenants: the sidecar maps each client to the namespaces it may
// use. Block index b covers tokens [b * block_tokens, (b + 1) * block_tokens).
//
// Thread safety: value types.
#ifndef KVTIER_BLOCK_KEY_H_
#define KVTIER_BLOCK_KEY_H_

#include <compare>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/status.h"

namespace kvtier {

struct SequenceId {
  uint64_t hi = 0;
  uint64_t lo = 0;

  // A session-style id: {0, id}.
  static constexpr SequenceId FromU64(uint64_t id) { return SequenceId{0, id}; }
  // A content id: the 128-bit XXH3 hash of `bytes` (for example the prefix's token ids).
  static SequenceId FromBytes(const void* bytes, size_t size);
  // 32 lowercase hex digits, hi first; ParseHex accepts exactly that form.
  std::string ToHex() const;
  static Result<SequenceId> ParseHex(std::string_view hex);

  friend constexpr auto operator<=>(const SequenceId&, const SequenceId&) = default;
};

struct BlockKey {
  uint32_t namespace_id = 0;
  SequenceId sequence;
  uint32_t layer = 0;
  uint32_t block = 0;  // block index inside the sequence

  // "ns/sequencehex/layer/block".
  std::string ToString() const;

  friend constexpr auto operator<=>(const BlockKey&, const BlockKey&) = default;
};

// Hash functors (for hash tables keyed by these types).
struct SequenceIdHash {
  size_t operator()(const SequenceId& id) const noexcept {
    uint64_t h = id.hi * 0x9E3779B97F4A7C15ull ^ id.lo;
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    return static_cast<size_t>(h);
  }
};
struct BlockKeyHash {
  size_t operator()(const BlockKey& key) const noexcept {
    uint64_t h = SequenceIdHash{}(key.sequence);
    h ^= (uint64_t{key.namespace_id} << 32 | key.layer) * 0x9E3779B97F4A7C15ull;
    h ^= uint64_t{key.block} * 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    return static_cast<size_t>(h);
  }
};

}  // namespace kvtier

#endif  // KVTIER_BLOCK_KEY_H_
