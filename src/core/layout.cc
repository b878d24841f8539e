#include "kvtier/layout.h"

#include <xxhash.h>

#include <cstring>
#include <string>

namespace kvtier {

uint32_t DTypeBytes(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 2;
    case DType::kF32:
      return 4;
    case DType::kFP8E4M3:
      return 1;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kF32:
      return "f32";
    case DType::kFP8E4M3:
      return "fp8-e4m3";
  }
  return "unknown";
}

Result<DType> ParseDType(std::string_view name) {
  if (name == "f16" || name == "fp16" || name == "float16") return DType::kF16;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "f32" || name == "fp32" || name == "float32") return DType::kF32;
  if (name == "fp8-e4m3" || name == "fp8" || name == "float8_e4m3fn") return DType::kFP8E4M3;
  return Status::InvalidArgument("unknown dtype \"" + std::string(name) +
                                 "\" (expected f16, bf16, f32 or fp8-e4m3)");
}

ModelLayout ModelLayout::Llama3_8B() {
  return ModelLayout{.num_layers = 32,
                     .num_kv_heads = 8,
                     .num_query_heads = 32,
                     .head_dim = 128,
                     .dtype = DType::kBF16,
                     .block_tokens = 128};
}

ModelLayout ModelLayout::Llama2_7B() {
  return ModelLayout{.num_layers = 32,
                     .num_kv_heads = 32,
                     .num_query_heads = 32,
                     .head_dim = 128,
                     .dtype = DType::kF16,
                     .block_tokens = 128};
}

Status ModelLayout::Validate() const {
  auto invalid = [this](const std::string& why) {
    return Status::InvalidArgument("model layout (" + ToString() + "): " + why);
  };
  if (DTypeBytes(dtype) == 0) return invalid("unknown dtype value");
  if (num_layers == 0) return invalid("num_layers is 0");
  if (num_kv_heads == 0) return invalid("num_kv_heads is 0");
  if (num_query_heads == 0) return invalid("num_query_heads is 0");
  if (head_dim == 0) return invalid("head_dim is 0");
  if (block_tokens == 0) return invalid("block_tokens is 0");
  if (num_query_heads % num_kv_heads != 0) {
    return invalid("num_query_heads is not a multiple of num_kv_heads");
  }
  // Every size must fit in 64 bits: the product of all factors bounds them all.
  uint64_t block = 2;
  for (uint64_t f : {uint64_t{num_kv_heads}, uint64_t{head_dim}, uint64_t{DTypeBytes(dtype)},
                     uint64_t{block_tokens}}) {
    if (__builtin_mul_overflow(block, f, &block)) return invalid("block size overflows");
  }
  if (block > kMaxBlockBytes) {
    return invalid("block of " + std::to_string(block) + " bytes exceeds the limit of " +
                   std::to_string(kMaxBlockBytes));
  }
  uint64_t token = 0;
  if (__builtin_mul_overflow(2 * KeyBytesPerTokenPerLayer(), uint64_t{num_layers}, &token)) {
    return invalid("bytes per token overflow");
  }
  return Status::OK();
}

uint64_t ModelLayout::Fingerprint() const {
  // A fixed little-endian encoding, versioned: the fingerprint must not change with the
  // compiler, the machine or the order of struct fields.
  unsigned char buf[32] = {};
  std::memcpy(buf, "kvtlay01", 8);
  const uint32_t fields[] = {
      num_layers,  num_kv_heads, num_query_heads, head_dim, static_cast<uint32_t>(dtype),
      block_tokens};
  for (size_t i = 0; i < 6; ++i) {
    for (int b = 0; b < 4; ++b)
      buf[8 + 4 * i + b] = static_cast<unsigned char>(fields[i] >> (8 * b));
  }
  return XXH3_64bits(buf, sizeof(buf));
}

std::string ModelLayout::ToString() const {
  return "layers=" + std::to_string(num_layers) + " kv_heads=" + std::to_string(num_kv_heads) +
         " query_heads=" + std::to_string(num_query_heads) +
         " head_dim=" + std::to_string(head_dim) + " dtype=" + std::string(DTypeName(dtype)) +
         " block_tokens=" + std::to_string(block_tokens);
}

}  // namespace kvtier
