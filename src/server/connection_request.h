// Connection::Request: the state of one request while it is served, shared by
// connection.cc (I/O, completion, replies) and connection_requests.cc (the handlers).
// Internal to src/server.
#ifndef KVTIER_SERVER_CONNECTION_REQUEST_H_
#define KVTIER_SERVER_CONNECTION_REQUEST_H_

#include <boost/asio/post.hpp>
#include <memory>
#include <vector>

#include "src/core/device_cache.h"
#include "src/server/connection.h"

namespace kvtier::server {

// A request's state while it is served; pooled per connection (the vectors keep their
// capacity), so the steady state allocates nothing here.
struct Connection::Request {
  uint64_t id = 0;
  uint16_t opcode = 0;
  Clock::time_point arrival;
  std::shared_ptr<StagingArea> staging;  // held while the store reads or writes its slots
  uint32_t slots_named = 0;
  // RegisterDevice (CUDA) and GetToDevice: the client's GPU tier, held while copies run.
  std::shared_ptr<DeviceMapping> device;
  // Set while in flight: keeps the connection alive until Complete runs on its shard
  // (and is dropped there, never on a store or worker thread).
  std::shared_ptr<Connection> owner;

  std::vector<BlockWrite> writes;      // Put: the members sent to the store
  std::vector<BlockRead> reads;        // Get: the members sent to the store
  std::vector<Status> store_statuses;  // one per write / read
  std::vector<uint32_t> members;       // write / read i is key members[i]
  std::vector<Status> outcomes;        // one per key
  std::vector<uint8_t> data;           // inline block bytes (Put, IndexBlock); RegisterDevice's ids
  // Get over TCP (null otherwise): the reply, begun with its data vector (`inline_out`,
  // `inline_vector`), into which the store copies the blocks; the builder then goes out with the
  // frame, so the blocks' bytes are copied once in the daemon (Connection::TakeBuilder).
  std::unique_ptr<flatbuffers::FlatBufferBuilder> reply;
  uint8_t* inline_out = nullptr;
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> inline_vector;
  // Or the blocks lent by the host tier, which the frame sends from (ReplyLent).
  std::unique_ptr<LentReply> lent;

  // Worker-pool requests.
  BlockKey key;
  uint32_t valid_tokens = 0;
  const void* block = nullptr;
  std::vector<float> floats;  // IndexBlock token scores, Select queries
  uint32_t namespace_id = 0;
  SequenceId sequence;
  uint32_t layer = 0;
  uint64_t context_tokens = 0;
  std::vector<int64_t> selected;
  std::vector<float> scores;
  std::vector<int64_t> runners_up;
  bool want_scores = false;
  Status status;
  uint64_t count = 0;
  SelectInfo info;

  // GetToDevice into a CUDA pool (on the workers): the members' keys, host pins and
  // destination offsets, compacted to those pinned before the copies. ReplyLent's keys.
  std::vector<BlockKey> device_keys;
  std::vector<HostBlockRef> host_blocks;
  std::vector<const std::byte*> sources;
  std::vector<uint64_t> offsets;

  void Reset() {
    staging.reset();
    device.reset();
    device_keys.clear();
    host_blocks.clear();
    sources.clear();
    offsets.clear();
    owner.reset();
    slots_named = 0;
    writes.clear();
    reads.clear();
    store_statuses.clear();
    members.clear();
    outcomes.clear();
    data.clear();
    inline_out = nullptr;
    inline_vector = 0;
    reply.reset();  // Recycle has given it back
    lent.reset();
    block = nullptr;
    floats.clear();
    selected.clear();
    scores.clear();
    runners_up.clear();
    want_scores = false;
    status = Status::OK();
    count = 0;
    info = SelectInfo{};
  }
};

// Runs `work(store, request)` on the server's worker pool, then completes the request on
// this connection's shard.
template <typename Work>
void Connection::RunOnWorkers(std::unique_ptr<Request> req, Work work) {
  PostToWorkers(BeginAsync(std::move(req)), std::move(work));
}

template <typename Work>
void Connection::PostToWorkers(Request* r, Work work) {
  boost::asio::post(*server_.workers, [r, work = std::move(work)]() mutable {
    work(*r->owner->server_.store, *r);
    PostComplete(r);
  });
}

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_CONNECTION_REQUEST_H_
