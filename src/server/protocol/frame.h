// The kvtierd frame: a fixed 24-byte little-endian header, then `body_bytes` of body
// (a FlatBuffer of kvtier.fbs, which table depends on the opcode). PROTOCOL.md has the
// rules; this file is the one codec of the header, shared by the daemon and the client.
//
//   offset  size  field
//        0     4  magic        "KVTR" (0x5254564B)
//        4     2  version      kProtocolVersion
//        6     2  opcode       Opcode; never renumbered, never reused
//        8     4  flags        kFlagReply on replies; other bits must be zero
//       12     4  body_bytes   <= the receiver's max frame bytes - 24
//       16     8  request_id   chosen by the client; a reply carries its request's
#ifndef KVTIER_SERVER_PROTOCOL_FRAME_H_
#define KVTIER_SERVER_PROTOCOL_FRAME_H_

#include <cstdint>
#include <span>
#include <string_view>

#include "kvtier/block_key.h"
#include "kvtier/status.h"
#include "kvtier/store.h"

namespace kvtier::wire {

inline constexpr uint32_t kMagic = 0x5254564B;  // "KVTR" as little-endian bytes
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr uint32_t kHeaderBytes = 24;
inline constexpr uint32_t kFlagReply = 1u;
// The default limit on a whole frame (header and body); TCP frames carry block bytes.
inline constexpr uint32_t kDefaultMaxFrameBytes = 64u << 20;

enum class Opcode : uint16_t {
  kError = 0,            // reply only: a frame that could not be served (StatusReply)
  kHello = 1,            // HelloRequest -> HelloReply
  kPut = 2,              // PutRequest -> BatchReply
  kGet = 3,              // GetRequest -> BatchReply
  kContains = 4,         // KeysRequest -> ContainsReply
  kDelete = 5,           // KeysRequest -> BatchReply
  kDropSequence = 6,     // DropSequenceRequest -> CountReply
  kFlush = 7,            // Empty -> StatusReply
  kStats = 8,            // Empty -> StatsReply
  kIndexBlock = 9,       // IndexBlockRequest -> StatusReply
  kSelect = 10,          // SelectRequest -> SelectReply
  kRegisterDevice = 11,  // RegisterDeviceRequest (+ a memfd, emulated) -> StatusReply
  kGetToDevice = 12,     // GetToDeviceRequest -> BatchReply
};
inline constexpr uint16_t kMaxOpcode = 12;
// "Hello", "Put", ...; "Unknown" outside the enum.
std::string_view OpcodeName(uint16_t opcode);

struct FrameHeader {
  uint32_t magic = kMagic;
  uint16_t version = kProtocolVersion;
  uint16_t opcode = 0;
  uint32_t flags = 0;
  uint32_t body_bytes = 0;
  uint64_t request_id = 0;
};

void EncodeHeader(const FrameHeader& header, std::span<uint8_t, kHeaderBytes> out);
// Decodes and checks a header: magic, version, flags (only kFlagReply, and only when
// `expect_reply`), and header + body <= max_frame_bytes. The opcode is not checked here
// (an unknown opcode in a well-formed frame is answered, not fatal). Errors:
// InvalidArgument with what was wrong; after one the stream cannot be resynchronized.
Result<FrameHeader> DecodeHeader(std::span<const uint8_t, kHeaderBytes> bytes,
                                 uint32_t max_frame_bytes, bool expect_reply);

// Checks `body` as the table the opcode's request (or reply) is: a FlatBuffers verifier
// pass (bounds, offsets, nesting), so that reading it afterwards is safe. Errors:
// InvalidArgument for an unknown opcode or a body that fails verification.
Status VerifyRequestBody(uint16_t opcode, std::span<const uint8_t> body);
Status VerifyReplyBody(uint16_t opcode, std::span<const uint8_t> body);

}  // namespace kvtier::wire

#endif  // KVTIER_SERVER_PROTOCOL_FRAME_H_
