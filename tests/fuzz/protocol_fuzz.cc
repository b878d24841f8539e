// libFuzzer target: the daemon's request path up to the store — the incremental frame
// parser (FrameReader), the body verifier of every opcode, the reads the dispatcher makes
// of a verified body, and the handshake decision (CheckHello).
//
// Input: byte 0 picks the peer (bit 0: Unix socket or TCP; bits 1-2: its uid), byte 1
// the receive chunk size (1..256, as if the bytes arrived in pieces), the rest is the
// byte stream a client sent. Any crash, sanitizer report, hang or broken invariant is a
// bug; a refusal is not.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "src/server/frame_reader.h"
#include "src/server/handshake.h"
#include "src/server/protocol/codec.h"
#include "src/server/protocol/frame.h"

namespace {

using kvtier::server::FrameReader;

// What the dispatcher reads of each verified request: every field, every element.
uint64_t Touch(uint16_t opcode, const uint8_t* body) {
  using namespace kvtier::wire;
  uint64_t sum = 0;
  auto keys = [&](const flatbuffers::Vector<const Key*>* v) {
    if (v == nullptr) return;
    for (const Key* k : *v) sum += kvtier::wire::FromWire(*k).block;
  };
  auto bytes = [&](const auto* v) {
    if (v != nullptr && v->size() > 0) sum += v->Get(0) + v->Get(v->size() - 1);
  };
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kPut: {
      const auto* r = flatbuffers::GetRoot<PutRequest>(body);
      keys(r->keys());
      bytes(r->slots());
      bytes(r->data());
      break;
    }
    case Opcode::kGet: {
      const auto* r = flatbuffers::GetRoot<GetRequest>(body);
      keys(r->keys());
      bytes(r->slots());
      break;
    }
    case Opcode::kContains:
    case Opcode::kDelete:
      keys(flatbuffers::GetRoot<KeysRequest>(body)->keys());
      break;
    case Opcode::kDropSequence:
      sum += flatbuffers::GetRoot<DropSequenceRequest>(body)->sequence_lo();
      break;
    case Opcode::kIndexBlock: {
      const auto* r = flatbuffers::GetRoot<IndexBlockRequest>(body);
      if (r->key() != nullptr) sum += r->key()->block();
      bytes(r->data());
      if (r->token_scores() != nullptr) sum += r->token_scores()->size();
      break;
    }
    case Opcode::kSelect: {
      const auto* r = flatbuffers::GetRoot<SelectRequest>(body);
      if (r->queries() != nullptr) sum += r->queries()->size();
      sum += r->layer() + r->context_tokens() + r->runners_up();
      break;
    }
    case Opcode::kRegisterDevice: {
      const auto* r = flatbuffers::GetRoot<RegisterDeviceRequest>(body);
      sum += r->kind() + r->bytes();
      bytes(r->gpu_uuid());
      bytes(r->ipc_handle());
      break;
    }
    case Opcode::kGetToDevice: {
      const auto* r = flatbuffers::GetRoot<GetToDeviceRequest>(body);
      keys(r->keys());
      bytes(r->offsets());
      break;
    }
    default:
      break;
  }
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  static const kvtier::ModelLayout layout = kvtier::ModelLayout::Llama3_8B();
  static const std::vector<kvtier::server::NamespaceConfig> namespaces = [] {
    std::vector<kvtier::server::NamespaceConfig> n(2);
    n[0].id = 0;
    n[0].name = "default";
    n[0].uids = {1000};
    n[1].id = 7;
    n[1].name = "tenant";
    n[1].gids = {2000};
    n[1].tokens = {"0123456789abcdef0123"};
    return n;
  }();
  kvtier::server::PeerIdentity peer;
  peer.unix_socket = (data[0] & 1) != 0;
  peer.uid = (data[0] & 2) != 0 ? 1000 : 0;
  peer.gid = (data[0] & 4) != 0 ? 2000 : 0;
  const size_t chunk = 1 + data[1];
  data += 2;
  size -= 2;

  constexpr uint32_t kMaxFrame = 1u << 20;
  FrameReader reader(kMaxFrame);
  bool hello_done = false;
  uint64_t sink = 0;
  size_t offset = 0;
  for (;;) {
    FrameReader::Frame frame;
    const FrameReader::Result r = reader.Next(&frame);
    if (r == FrameReader::kError) {
      if (reader.error().ok()) std::abort();  // an error must say why
      break;
    }
    if (r == FrameReader::kFrame) {
      if (frame.body.size() != frame.header.body_bytes) std::abort();
      if (frame.body.size() + kvtier::wire::kHeaderBytes > kMaxFrame) std::abort();
      const uint16_t op = frame.header.opcode;
      if (kvtier::wire::VerifyRequestBody(op, frame.body).ok()) {
        if (op == static_cast<uint16_t>(kvtier::wire::Opcode::kHello) && !hello_done) {
          const auto* hello = flatbuffers::GetRoot<kvtier::wire::HelloRequest>(frame.body.data());
          auto ns = kvtier::server::CheckHello(*hello, peer, namespaces, layout);
          if (ns.ok()) {
            hello_done = true;
            // Only a namespace the peer may use, and only the one it asked for.
            if ((*ns)->id != hello->namespace_id()) std::abort();
            if (!peer.unix_socket && (*ns)->tokens.empty()) std::abort();
          } else if (ns.status().message().empty()) {
            std::abort();
          }
        } else {
          sink += Touch(op, frame.body.data());
        }
      }
      reader.Consume();
      continue;
    }
    if (offset == size) break;
    const std::span<uint8_t> room = reader.WritableSpan();
    if (room.empty()) std::abort();  // kNeedMore must leave room to receive
    const size_t n = std::min({room.size(), chunk, size - offset});
    std::memcpy(room.data(), data + offset, n);
    reader.Commit(n);
    offset += n;
  }
  volatile uint64_t keep = sink;
  (void)keep;
  return 0;
}
