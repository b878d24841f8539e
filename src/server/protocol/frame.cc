#include "src/server/protocol/frame.h"

#include <string>

#include "src/server/protocol/kvtier_generated.h"

namespace kvtier::wire {
namespace {

template <typename T, size_t N>
T Load(std::span<const uint8_t, N> bytes, size_t offset) {
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<T>(T{bytes[offset + i]} << (8 * i));
  return value;
}

template <typename T>
void Store(std::span<uint8_t, kHeaderBytes> out, size_t offset, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[offset + i] = static_cast<uint8_t>(value >> (8 * i));
}

template <typename Table>
Status Verify(std::span<const uint8_t> body, std::string_view what) {
  // A FlatBuffer's root offset needs 4 bytes; an empty body is never a valid table.
  flatbuffers::Verifier::Options options;
  options.max_depth = 16;
  options.max_tables = 1u << 20;
  flatbuffers::Verifier verifier(body.data(), body.size(), options);
  if (body.size() < sizeof(flatbuffers::uoffset_t) || !verifier.VerifyBuffer<Table>(nullptr)) {
    return Status::InvalidArgument("malformed " + std::string(what) + " body (" +
                                   std::to_string(body.size()) + " bytes)");
  }
  return Status::OK();
}

// The verifier checks a vector's length field (4-aligned), not that its elements are
// aligned for their type: a crafted body could place a vector of 8-byte structs at 4 mod
// 8, and reading it in place would be undefined behaviour. Builders never do that, so
// such a body is refused. `body` itself is 8-aligned (FrameReader, the client's reader).
template <typename V>
Status CheckAligned(const V* vector, std::string_view what) {
  if (vector != nullptr && reinterpret_cast<uintptr_t>(vector->Data()) % 8 != 0) {
    return Status::InvalidArgument("misaligned " + std::string(what) + " vector");
  }
  return Status::OK();
}

}  // namespace

std::string_view OpcodeName(uint16_t opcode) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kError:
      return "Error";
    case Opcode::kHello:
      return "Hello";
    case Opcode::kPut:
      return "Put";
    case Opcode::kGet:
      return "Get";
    case Opcode::kContains:
      return "Contains";
    case Opcode::kDelete:
      return "Delete";
    case Opcode::kDropSequence:
      return "DropSequence";
    case Opcode::kFlush:
      return "Flush";
    case Opcode::kStats:
      return "Stats";
    case Opcode::kIndexBlock:
      return "IndexBlock";
    case Opcode::kSelect:
      return "Select";
    case Opcode::kRegisterDevice:
      return "RegisterDevice";
    case Opcode::kGetToDevice:
      return "GetToDevice";
  }
  return "Unknown";
}

void EncodeHeader(const FrameHeader& header, std::span<uint8_t, kHeaderBytes> out) {
  Store<uint32_t>(out, 0, header.magic);
  Store<uint16_t>(out, 4, header.version);
  Store<uint16_t>(out, 6, header.opcode);
  Store<uint32_t>(out, 8, header.flags);
  Store<uint32_t>(out, 12, header.body_bytes);
  Store<uint64_t>(out, 16, header.request_id);
}

Result<FrameHeader> DecodeHeader(std::span<const uint8_t, kHeaderBytes> bytes,
                                 uint32_t max_frame_bytes, bool expect_reply) {
  FrameHeader h;
  h.magic = Load<uint32_t>(bytes, 0);
  h.version = Load<uint16_t>(bytes, 4);
  h.opcode = Load<uint16_t>(bytes, 6);
  h.flags = Load<uint32_t>(bytes, 8);
  h.body_bytes = Load<uint32_t>(bytes, 12);
  h.request_id = Load<uint64_t>(bytes, 16);
  if (h.magic != kMagic) return Status::InvalidArgument("bad frame magic (not a kvtierd peer)");
  if (h.version != kProtocolVersion) {
    return Status::InvalidArgument("protocol version " + std::to_string(h.version) +
                                   ", this side speaks " + std::to_string(kProtocolVersion));
  }
  const uint32_t allowed_flags = expect_reply ? kFlagReply : 0u;
  if ((h.flags & ~allowed_flags) != 0 || (expect_reply && (h.flags & kFlagReply) == 0)) {
    return Status::InvalidArgument("bad frame flags " + std::to_string(h.flags));
  }
  if (uint64_t{h.body_bytes} + kHeaderBytes > max_frame_bytes) {
    return Status::InvalidArgument(
        "frame of " + std::to_string(uint64_t{h.body_bytes} + kHeaderBytes) +
        " bytes exceeds the limit of " + std::to_string(max_frame_bytes));
  }
  return h;
}

Status VerifyRequestBody(uint16_t opcode, std::span<const uint8_t> body) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kHello:
      return Verify<HelloRequest>(body, "Hello request");
    case Opcode::kPut:
      KVTIER_RETURN_IF_ERROR(Verify<PutRequest>(body, "Put request"));
      return CheckAligned(flatbuffers::GetRoot<PutRequest>(body.data())->keys(), "key");
    case Opcode::kGet:
      KVTIER_RETURN_IF_ERROR(Verify<GetRequest>(body, "Get request"));
      return CheckAligned(flatbuffers::GetRoot<GetRequest>(body.data())->keys(), "key");
    case Opcode::kContains:
    case Opcode::kDelete:
      KVTIER_RETURN_IF_ERROR(Verify<KeysRequest>(body, "keys request"));
      return CheckAligned(flatbuffers::GetRoot<KeysRequest>(body.data())->keys(), "key");
    case Opcode::kDropSequence:
      return Verify<DropSequenceRequest>(body, "DropSequence request");
    case Opcode::kFlush:
    case Opcode::kStats:
      return Verify<Empty>(body, "empty request");
    case Opcode::kIndexBlock:
      return Verify<IndexBlockRequest>(body, "IndexBlock request");
    case Opcode::kSelect:
      return Verify<SelectRequest>(body, "Select request");
    case Opcode::kRegisterDevice:
      return Verify<RegisterDeviceRequest>(body, "RegisterDevice request");
    case Opcode::kGetToDevice: {
      KVTIER_RETURN_IF_ERROR(Verify<GetToDeviceRequest>(body, "GetToDevice request"));
      const auto* request = flatbuffers::GetRoot<GetToDeviceRequest>(body.data());
      KVTIER_RETURN_IF_ERROR(CheckAligned(request->keys(), "key"));
      return CheckAligned(request->offsets(), "offset");
    }
    case Opcode::kError:
      break;
  }
  return Status::InvalidArgument("unknown opcode " + std::to_string(opcode));
}

Status VerifyReplyBody(uint16_t opcode, std::span<const uint8_t> body) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kError:
    case Opcode::kFlush:
    case Opcode::kIndexBlock:
    case Opcode::kRegisterDevice:
      return Verify<StatusReply>(body, "status reply");
    case Opcode::kHello:
      return Verify<HelloReply>(body, "Hello reply");
    case Opcode::kPut:
    case Opcode::kGet:
    case Opcode::kDelete:
    case Opcode::kGetToDevice:
      return Verify<BatchReply>(body, "batch reply");
    case Opcode::kContains:
      return Verify<ContainsReply>(body, "Contains reply");
    case Opcode::kDropSequence:
      return Verify<CountReply>(body, "DropSequence reply");
    case Opcode::kStats:
      return Verify<StatsReply>(body, "Stats reply");
    case Opcode::kSelect:
      KVTIER_RETURN_IF_ERROR(Verify<SelectReply>(body, "Select reply"));
      return CheckAligned(flatbuffers::GetRoot<SelectReply>(body.data())->blocks(), "blocks");
  }
  return Status::InvalidArgument("unknown opcode " + std::to_string(opcode));
}

}  // namespace kvtier::wire
