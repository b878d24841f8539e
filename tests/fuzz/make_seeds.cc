// Writes the seed corpus of kvtier_protocol_fuzz (tests/fuzz/corpus was made with it):
// one file per request kind, each a Hello then that request, plus framing mistakes.
//   kvtier_protocol_seeds OUT_DIR
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "kvtier/layout.h"
#include "src/server/protocol/codec.h"

namespace {

using namespace kvtier::wire;

std::vector<uint8_t> Hello(uint32_t ns, const char* token) {
  flatbuffers::FlatBufferBuilder fbb;
  const kvtier::ModelLayout layout = kvtier::ModelLayout::Llama3_8B();
  const auto text = fbb.CreateString(layout.ToString());
  const auto tok = fbb.CreateString(token);
  const auto name = fbb.CreateString("seed");
  fbb.Finish(
      CreateHelloRequest(fbb, kProtocolVersion, layout.Fingerprint(), text, ns, tok, 4, name));
  return MakeFrame(fbb, Opcode::kHello, 1, false);
}

std::vector<uint8_t> Keys(Opcode op, uint32_t ns) {
  flatbuffers::FlatBufferBuilder fbb;
  const Key keys[2] = {ToWire(kvtier::BlockKey{ns, {0, 9}, 1, 2}),
                       ToWire(kvtier::BlockKey{ns, {0, 9}, 1, 3})};
  const auto k = fbb.CreateVectorOfStructs(keys, 2);
  if (op == Opcode::kPut) {
    const std::vector<uint32_t> slots = {0, 1};
    fbb.Finish(CreatePutRequest(fbb, k, fbb.CreateVector(slots)));
  } else if (op == Opcode::kGet) {
    const std::vector<uint32_t> slots = {2, 3};
    fbb.Finish(CreateGetRequest(fbb, k, fbb.CreateVector(slots)));
  } else {
    fbb.Finish(CreateKeysRequest(fbb, k));
  }
  return MakeFrame(fbb, op, 2, false);
}

std::vector<uint8_t> Other(Opcode op) {
  flatbuffers::FlatBufferBuilder fbb;
  switch (op) {
    case Opcode::kDropSequence:
      fbb.Finish(CreateDropSequenceRequest(fbb, 0, 0, 9));
      break;
    case Opcode::kIndexBlock: {
      const Key key = ToWire(kvtier::BlockKey{0, {0, 9}, 1, 2});
      fbb.Finish(CreateIndexBlockRequest(fbb, &key, 128, 0, 0));
      break;
    }
    case Opcode::kSelect: {
      const std::vector<float> q(32 * 128, 0.5f);
      fbb.Finish(CreateSelectRequest(fbb, 0, 0, 9, 3, 8192, fbb.CreateVector(q), true, 4));
      break;
    }
    case Opcode::kRegisterDevice: {
      const std::vector<uint8_t> uuid(16, 7), handle(64, 9);
      fbb.Finish(CreateRegisterDeviceRequest(fbb, 1, uint64_t{16} << 20, fbb.CreateVector(uuid),
                                             fbb.CreateVector(handle)));
      break;
    }
    case Opcode::kGetToDevice: {
      const Key keys[2] = {ToWire(kvtier::BlockKey{0, {0, 9}, 1, 2}),
                           ToWire(kvtier::BlockKey{0, {0, 9}, 1, 3})};
      const std::vector<uint64_t> offsets = {0, 524288};
      fbb.Finish(CreateGetToDeviceRequest(fbb, fbb.CreateVectorOfStructs(keys, 2),
                                          fbb.CreateVector(offsets)));
      break;
    }
    default:
      fbb.Finish(CreateEmpty(fbb));
  }
  return MakeFrame(fbb, op, 3, false);
}

void Write(const std::string& dir, const std::string& name, uint8_t peer,
           const std::vector<std::vector<uint8_t>>& frames) {
  std::vector<uint8_t> bytes = {peer, 31};
  for (const auto& f : frames) bytes.insert(bytes.end(), f.begin(), f.end());
  std::ofstream(dir + "/" + name, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const uint8_t unix_uid = 1 | 2;  // Unix socket, uid 1000: namespace 0
  const auto hello = Hello(0, "");
  Write(dir, "hello_unix", unix_uid, {hello});
  Write(dir, "hello_tcp_token", 0, {Hello(7, "0123456789abcdef0123")});
  Write(dir, "hello_wrong_token", 0, {Hello(7, "0123456789abcdef0124")});
  Write(dir, "put", unix_uid, {hello, Keys(Opcode::kPut, 0)});
  Write(dir, "get", unix_uid, {hello, Keys(Opcode::kGet, 0)});
  Write(dir, "contains_delete", unix_uid,
        {hello, Keys(Opcode::kContains, 0), Keys(Opcode::kDelete, 0)});
  Write(dir, "other_namespace", unix_uid, {hello, Keys(Opcode::kGet, 7)});
  Write(dir, "drop_flush_stats", unix_uid,
        {hello, Other(Opcode::kDropSequence), Other(Opcode::kFlush), Other(Opcode::kStats)});
  Write(dir, "index_select", unix_uid, {hello, Other(Opcode::kIndexBlock), Other(Opcode::kSelect)});
  Write(dir, "device", unix_uid,
        {hello, Other(Opcode::kRegisterDevice), Other(Opcode::kGetToDevice)});
  auto bad_magic = hello;
  bad_magic[0] ^= 0xFF;
  Write(dir, "bad_magic", unix_uid, {bad_magic});
  auto oversized = Keys(Opcode::kContains, 0);
  oversized[12] = 0xFF;
  oversized[13] = 0xFF;
  oversized[14] = 0xFF;
  Write(dir, "oversized", unix_uid, {hello, oversized});
  auto unknown = Keys(Opcode::kContains, 0);
  unknown[6] = 99;
  Write(dir, "unknown_opcode", unix_uid, {hello, unknown});
  auto truncated = Keys(Opcode::kPut, 0);
  truncated.resize(truncated.size() - 5);
  Write(dir, "truncated", unix_uid, {hello, truncated});
  auto garbage_body = Keys(Opcode::kGet, 0);
  for (size_t i = kHeaderBytes; i < garbage_body.size(); i += 3) garbage_body[i] ^= 0x5A;
  Write(dir, "garbage_body", unix_uid, {hello, garbage_body});
  return 0;
}
