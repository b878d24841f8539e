// Conversions between kvtier's types and the wire tables of kvtier.fbs, and the framing
// of a finished FlatBuffer, shared by the daemon and the client.
#ifndef KVTIER_SERVER_PROTOCOL_CODEC_H_
#define KVTIER_SERVER_PROTOCOL_CODEC_H_

#include <cstdint>
#include <vector>

#include "kvtier/store.h"
#include "src/server/protocol/frame.h"
#include "src/server/protocol/kvtier_generated.h"

namespace kvtier::wire {

inline Key ToWire(const BlockKey& k) {
  return Key(k.sequence.hi, k.sequence.lo, k.namespace_id, k.layer, k.block);
}
inline BlockKey FromWire(const Key& k) {
  return BlockKey{k.namespace_id(), SequenceId{k.sequence_hi(), k.sequence_lo()}, k.layer(),
                  k.block()};
}

flatbuffers::Offset<Outcome> ToWire(flatbuffers::FlatBufferBuilder& fbb, const Status& s);
// A missing outcome is OK; an unknown code is kept (StatusCodeName says "Unknown").
Status FromWire(const Outcome* outcome);

flatbuffers::Offset<Stats> ToWire(flatbuffers::FlatBufferBuilder& fbb, const StoreStats& s,
                                  uint64_t connected_clients, uint64_t namespace_blocks);
StoreStats FromWire(const Stats& s);

// Header + the finished buffer of `fbb`, as one frame to send.
std::vector<uint8_t> MakeFrame(flatbuffers::FlatBufferBuilder& fbb, Opcode opcode,
                               uint64_t request_id, bool reply);

}  // namespace kvtier::wire

#endif  // KVTIER_SERVER_PROTOCOL_CODEC_H_
