#include "kvtier/block_key.h"

#include <xxhash.h>

#include <string>

namespace kvtier {

SequenceId SequenceId::FromBytes(const void* bytes, size_t size) {
  XXH128_hash_t h = XXH3_128bits(bytes, size);
  return SequenceId{h.high64, h.low64};
}

std::string SequenceId::ToHex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[15 - i] = kDigits[(hi >> (4 * i)) & 0xF];
    out[31 - i] = kDigits[(lo >> (4 * i)) & 0xF];
  }
  return out;
}

Result<SequenceId> SequenceId::ParseHex(std::string_view hex) {
  if (hex.size() != 32) {
    return Status::InvalidArgument("sequence id \"" + std::string(hex) +
                                   "\": expected 32 hex digits");
  }
  SequenceId id;
  for (size_t i = 0; i < 32; ++i) {
    char c = hex[i];
    uint64_t v;
    if (c >= '0' && c <= '9') {
      v = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      v = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      v = c - 'A' + 10;
    } else {
      return Status::InvalidArgument("sequence id \"" + std::string(hex) +
                                     "\": not a hex digit at position " + std::to_string(i));
    }
    uint64_t& half = i < 16 ? id.hi : id.lo;
    half = (half << 4) | v;
  }
  return id;
}

std::string BlockKey::ToString() const {
  return std::to_string(namespace_id) + "/" + sequence.ToHex() + "/" + std::to_string(layer) + "/" +
         std::to_string(block);
}

}  // namespace kvtier
