// The request handlers of Connection (connection.h): each validates its request, then
// answers it at once or hands it to the store's async threads or the worker pool.
#include <algorithm>
#include <string>

#include "src/server/connection.h"
#include "src/server/connection_request.h"
#include "src/util/log.h"

namespace kvtier::server {

namespace {

// Bytes a reply adds to its payload (FlatBuffers tables, outcomes); used to refuse an
// inline Get whose reply could not be framed.
constexpr uint64_t kReplyOverheadBytes = 4096;
constexpr uint64_t kReplyBytesPerMember = 64;
// A Get (or GetToDevice) of at most this many block bytes whose blocks are all in the
// host tier is served on the io thread (GetBatchInto).
constexpr uint64_t kHereGetBytes = uint64_t{1} << 20;
// Runners-up a Select may ask for (store_retrieval.h: kMaxPrefetchExtra).
constexpr uint32_t kMaxRunnersUp = 64;

#ifndef KVTIER_DAEMON_VERSION
#define KVTIER_DAEMON_VERSION "kvtierd"
#endif
constexpr const char* kDaemonVersion = KVTIER_DAEMON_VERSION;

std::span<const uint8_t> Bytes(const flatbuffers::Vector<uint8_t>* v) {
  return v == nullptr ? std::span<const uint8_t>() : std::span<const uint8_t>(v->data(), v->size());
}

}  // namespace

void Connection::HandleHello(Request& req, std::span<const uint8_t> body) {
  const wire::HelloRequest* hello = flatbuffers::GetRoot<wire::HelloRequest>(body.data());
  auto reply = [&](const Status& outcome, uint32_t slots, uint64_t slot_bytes, int fd) {
    fbb_.Clear();
    auto version = fbb_.CreateString(kDaemonVersion);
    auto o = wire::ToWire(fbb_, outcome);
    fbb_.Finish(wire::CreateHelloReply(fbb_, o, version, block_bytes_, slots, slot_bytes,
                                       server_.options.max_frame_bytes,
                                       /*get_data_last=*/block_bytes_ % 8 == 0));
    QueueReply(wire::Opcode::kHello, req.id, req.opcode, req.arrival, fd);
  };
  if (ns_ != nullptr) {
    SendError(req.id, req.opcode,
              Status::FailedPrecondition("Hello was already accepted on this connection"),
              req.arrival);
    return;
  }
  client_name_ = hello->client_name() != nullptr ? hello->client_name()->str() : "";
  kvtier::Result<const NamespaceConfig*> ns =
      CheckHello(*hello, peer_, server_.namespaces, server_.store->layout());
  if (!ns.ok()) {
    server_.counters.handshakes_refused++;
    Log().warn("kvtierd: connection {} ({}, client \"{}\") refused: {}", id_, peer_name_,
               client_name_, ns.status().ToString());
    reply(ns.status(), 0, 0, -1);
    StartDraining();
    return;
  }
  uint32_t slots = 0;
  const uint64_t slot_bytes = (block_bytes_ + 4095) / 4096 * 4096;
  if (peer_.unix_socket && hello->staging_blocks() > 0) {
    slots = std::max<uint32_t>(
        1, std::min(hello->staging_blocks(), server_.options.max_staging_blocks));
    kvtier::Result<std::shared_ptr<StagingArea>> area =
        StagingArea::Create(slots, slot_bytes, "kvtierd-staging");
    if (!area.ok()) {
      Log().warn("kvtierd: connection {}: no staging area: {}", id_, area.status().ToString());
      reply(Status::ResourceExhausted("staging area: " + area.status().ToString()), 0, 0, -1);
      StartDraining();
      return;
    }
    staging_ = std::move(area).value();
    server_.counters.staging_bytes_mapped += staging_->size_bytes();
    slot_marks_.assign(slots, 0);
  }
  ns_ = *ns;
  ns_index_ = static_cast<size_t>(ns_ - server_.namespaces.data());
  server_.counters.clients_per_namespace[ns_index_]++;
  Log().info("kvtierd: connection {} ({}, client \"{}\") in namespace {} ({}), {} staging slots",
             id_, peer_name_, client_name_, ns_->id, ns_->name, slots);
  reply(Status::OK(), slots, slots > 0 ? slot_bytes : 0, staging_ ? staging_->fd() : -1);
}

void Connection::CheckNamespaces(Request& req, const flatbuffers::Vector<const wire::Key*>* keys) {
  const uint32_t n = keys == nullptr ? 0 : keys->size();
  req.outcomes.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t ns = keys->Get(i)->namespace_id();
    req.outcomes[i] =
        ns == ns_->id
            ? Status::OK()
            : Status::PermissionDenied("key of namespace " + std::to_string(ns) +
                                       " on a connection of namespace " + std::to_string(ns_->id));
  }
}

void Connection::HandlePut(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const wire::PutRequest* put = flatbuffers::GetRoot<wire::PutRequest>(body.data());
  const uint32_t n = put->keys() == nullptr ? 0 : put->keys()->size();
  const uint32_t nslots = put->slots() == nullptr ? 0 : put->slots()->size();
  const std::span<const uint8_t> data = Bytes(put->data());
  Status bad;
  if (nslots > 0 && !data.empty()) {
    bad = Status::InvalidArgument("a Put has slots or data, not both");
  } else if (nslots > 0) {
    if (staging_ == nullptr) {
      bad = Status::InvalidArgument("a Put names staging slots, but this connection has none");
    } else if (nslots != n) {
      bad = Status::InvalidArgument("a Put of " + std::to_string(n) + " keys names " +
                                    std::to_string(nslots) + " slots");
    } else {
      for (uint32_t i = 0; i < n && bad.ok(); ++i) {
        if (put->slots()->Get(i) >= staging_->slots()) {
          bad = Status::InvalidArgument("staging slot " + std::to_string(put->slots()->Get(i)) +
                                        " out of range (" + std::to_string(staging_->slots()) +
                                        " slots)");
        }
      }
    }
  } else if (data.size() != uint64_t{n} * block_bytes_) {
    bad = Status::InvalidArgument("a Put of " + std::to_string(n) + " keys carries " +
                                  std::to_string(data.size()) + " bytes, not " +
                                  std::to_string(uint64_t{n} * block_bytes_));
  }
  if (!bad.ok()) {
    ReplyStatus(*req, wire::Opcode::kPut, bad);
    return Recycle(std::move(req));
  }
  CheckNamespaces(*req, put->keys());
  const bool use_slots = nslots > 0;
  if (!use_slots && n > 0) req->data.assign(data.begin(), data.end());
  for (uint32_t i = 0; i < n; ++i) {
    if (!req->outcomes[i].ok()) continue;
    const void* src = use_slots ? static_cast<const void*>(staging_->slot(put->slots()->Get(i)))
                                : req->data.data() + uint64_t{i} * block_bytes_;
    req->writes.push_back(BlockWrite{wire::FromWire(*put->keys()->Get(i)), src, block_bytes_});
    req->members.push_back(i);
  }
  const size_t members = req->writes.size();
  Request* r = BeginBatch(std::move(req), members, use_slots ? n : 0);
  if (r == nullptr) return;
  server_.store->PutBatchAsync(r->writes, r->store_statuses, [r](Status) { PostComplete(r); });
}

Connection::Request* Connection::BeginBatch(std::unique_ptr<Request> req, size_t members,
                                            uint32_t slots_named) {
  if (members == 0) {
    ReplyBatch(*req);
    Recycle(std::move(req));
    return nullptr;
  }
  if (slots_named > 0) {
    req->staging = staging_;
    req->slots_named = slots_named;
    server_.counters.staging_slots_in_use += slots_named;
  }
  req->store_statuses.resize(members);
  return BeginAsync(std::move(req));
}

void Connection::HandleGet(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const wire::GetRequest* get = flatbuffers::GetRoot<wire::GetRequest>(body.data());
  const uint32_t n = get->keys() == nullptr ? 0 : get->keys()->size();
  const uint32_t nslots = get->slots() == nullptr ? 0 : get->slots()->size();
  Status bad;
  if (nslots > 0) {
    if (staging_ == nullptr) {
      bad = Status::InvalidArgument("a Get names staging slots, but this connection has none");
    } else if (nslots != n) {
      bad = Status::InvalidArgument("a Get of " + std::to_string(n) + " keys names " +
                                    std::to_string(nslots) + " slots");
    } else {
      uint32_t marked = 0;
      for (; marked < n && bad.ok(); ++marked) {
        const uint32_t slot = get->slots()->Get(marked);
        if (slot >= staging_->slots()) {
          bad = Status::InvalidArgument("staging slot " + std::to_string(slot) + " out of range (" +
                                        std::to_string(staging_->slots()) + " slots)");
          break;
        }
        if (slot_marks_[slot] != 0) {
          bad = Status::InvalidArgument("staging slot " + std::to_string(slot) +
                                        " named twice in one Get");
          break;
        }
        slot_marks_[slot] = 1;
      }
      for (uint32_t i = 0; i < std::min(marked, n); ++i) {
        const uint32_t slot = get->slots()->Get(i);
        if (slot < slot_marks_.size()) slot_marks_[slot] = 0;
      }
    }
  } else if (uint64_t{n} * (block_bytes_ + kReplyBytesPerMember) + kReplyOverheadBytes +
                 wire::kHeaderBytes >
             server_.options.max_frame_bytes) {
    bad = Status::InvalidArgument("an inline Get of " + std::to_string(n) +
                                  " blocks would not fit in one frame of " +
                                  std::to_string(server_.options.max_frame_bytes) + " bytes");
  }
  if (!bad.ok()) {
    ReplyStatus(*req, wire::Opcode::kGet, bad);
    return Recycle(std::move(req));
  }
  const bool use_slots = nslots > 0;
  CheckNamespaces(*req, get->keys());
  if (!use_slots && ReplyLent(*req, get->keys())) return Recycle(std::move(req));
  // Inline: the store copies the blocks into the reply's data vector (ReplyBatch then
  // adds the rest).
  if (!use_slots) req->inline_out = BeginInlineReply(*req, uint64_t{n} * block_bytes_);
  GetBatchInto(std::move(req), get->keys(), use_slots ? n : 0,
               [&](Request& r, uint32_t i) -> void* {
                 return use_slots ? static_cast<void*>(staging_->slot(get->slots()->Get(i)))
                                  : r.inline_out + uint64_t{i} * block_bytes_;
               });
}

uint8_t* Connection::BeginInlineReply(Request& req, uint64_t bytes) {
  req.reply = TakeBuilder();
  // 8-aligned, so that Finish pads the front to a multiple of 8 and QueueReply adds no
  // padding after it: the blocks' bytes end the body (HelloReply.get_data_last, when
  // block_bytes is a multiple of 8; else padding would follow them here).
  req.reply->ForceVectorAlignment(bytes, 1, 8);
  uint8_t* data = nullptr;
  req.inline_vector = req.reply->CreateUninitializedVector(bytes, &data);
  return data;
}

bool Connection::ReplyLent(Request& req, const flatbuffers::Vector<const wire::Key*>* keys) {
  const size_t n = req.outcomes.size();
  const uint64_t bytes = n * block_bytes_;
  std::atomic<uint64_t>& pinned = server_.counters.reply_pinned_bytes;
  if (n == 0 ||
      pinned.fetch_add(bytes, std::memory_order_relaxed) + bytes > server_.max_reply_pinned_bytes) {
    if (n > 0) pinned.fetch_sub(bytes, std::memory_order_relaxed);
    return false;
  }
  auto lent = std::make_unique<LentReply>(&pinned, bytes);
  for (uint32_t i = 0; i < n; ++i) {
    if (!req.outcomes[i].ok()) continue;
    req.device_keys.push_back(wire::FromWire(*keys->Get(i)));
    req.members.push_back(i);
  }
  req.store_statuses.resize(req.members.size());
  if (!server_.store->BorrowFromHost(req.device_keys, req.store_statuses, &lent->blocks)) {
    req.device_keys.clear();
    req.members.clear();
    req.store_statuses.clear();
    return false;  // ~LentReply gives the bytes back
  }
  const std::span<const uint8_t> zeros(server_.zero_block);
  lent->spans.assign(n, zeros);
  for (size_t m = 0; m < req.members.size(); ++m) {
    const std::span<const std::byte> block = lent->blocks->block(m);
    if (!block.empty()) {
      lent->spans[req.members[m]] = {reinterpret_cast<const uint8_t*>(block.data()), block.size()};
    }
  }
  // The data vector left unwritten: the frame sends the spans in its place.
  const uint8_t* data = BeginInlineReply(req, bytes);
  lent->from_end =
      static_cast<size_t>(req.reply->GetCurrentBufferPointer() + req.reply->GetSize() - data);
  req.lent = std::move(lent);
  Reply(req);
  return true;
}

template <typename Destination>
void Connection::GetBatchInto(std::unique_ptr<Request> req,
                              const flatbuffers::Vector<const wire::Key*>* keys,
                              uint32_t slots_named, Destination destination) {
  for (uint32_t i = 0; i < req->outcomes.size(); ++i) {
    if (!req->outcomes[i].ok()) continue;
    req->reads.push_back(
        BlockRead{wire::FromWire(*keys->Get(i)), destination(*req, i), block_bytes_});
    req->members.push_back(i);
  }
  const size_t members = req->reads.size();
  // Small reads of blocks in the host tier are served here, on the io thread: the
  // store's worker would cost two thread hand-offs, more than the copies themselves.
  if (members > 0 && members * block_bytes_ <= kHereGetBytes) {
    req->store_statuses.resize(members);
    if (server_.store->GetBatchFromHost(req->reads, req->store_statuses)) {
      CountDirectBytes(*req);
      Reply(*req);
      return Recycle(std::move(req));
    }
  }
  Request* r = BeginBatch(std::move(req), members, slots_named);
  if (r == nullptr) return;
  server_.store->GetBatchAsync(r->reads, r->store_statuses, [r](Status) { PostComplete(r); });
}

void Connection::HandleContains(Request& req, std::span<const uint8_t> body) {
  const wire::KeysRequest* keys = flatbuffers::GetRoot<wire::KeysRequest>(body.data());
  CheckNamespaces(req, keys->keys());
  Status outcome;
  fbb_.Clear();
  std::vector<uint8_t>& present = req.data;  // bools as bytes
  present.resize(req.outcomes.size());
  for (size_t i = 0; i < req.outcomes.size(); ++i) {
    if (!req.outcomes[i].ok()) {
      if (outcome.ok()) outcome = req.outcomes[i];
      present[i] = 0;
      continue;
    }
    present[i] = server_.store->Contains(wire::FromWire(*keys->keys()->Get(i))) ? 1 : 0;
  }
  auto present_vec =
      fbb_.CreateVector(reinterpret_cast<const uint8_t*>(present.data()), present.size());
  auto o = wire::ToWire(fbb_, outcome);
  wire::ContainsReplyBuilder b(fbb_);
  b.add_outcome(o);
  b.add_present(flatbuffers::Offset<flatbuffers::Vector<uint8_t>>(present_vec.o));
  fbb_.Finish(b.Finish());
  QueueReply(wire::Opcode::kContains, req.id, req.opcode, req.arrival);
}

void Connection::HandleDelete(Request& req, std::span<const uint8_t> body) {
  const wire::KeysRequest* keys = flatbuffers::GetRoot<wire::KeysRequest>(body.data());
  CheckNamespaces(req, keys->keys());
  for (size_t i = 0; i < req.outcomes.size(); ++i) {
    if (req.outcomes[i].ok()) {
      req.outcomes[i] = server_.store->Delete(wire::FromWire(*keys->keys()->Get(i)));
    }
  }
  ReplyBatch(req);
}

void Connection::HandleDropSequence(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const auto* drop = flatbuffers::GetRoot<wire::DropSequenceRequest>(body.data());
  req->namespace_id = drop->namespace_id();
  req->sequence = SequenceId{drop->sequence_hi(), drop->sequence_lo()};
  if (req->namespace_id != ns_->id) {
    req->status =
        Status::PermissionDenied("DropSequence in namespace " + std::to_string(req->namespace_id) +
                                 " on a connection of namespace " + std::to_string(ns_->id));
    Reply(*req);
    return Recycle(std::move(req));
  }
  RunOnWorkers(std::move(req), [](EmbeddedStore& store, Request& r) {
    kvtier::Result<uint64_t> n = store.DropSequence(r.namespace_id, r.sequence);
    r.status = n.ok() ? Status::OK() : n.status();
    r.count = n.ok() ? *n : 0;
  });
}

void Connection::HandleFlush(std::unique_ptr<Request> req) {
  RunOnWorkers(std::move(req), [](EmbeddedStore& store, Request& r) { r.status = store.Flush(); });
}

void Connection::HandleStats(Request& req) {
  const StoreStats stats = server_.store->Stats();
  const uint64_t ns_blocks = server_.store->Usage(ns_->id).blocks;
  fbb_.Clear();
  auto s = wire::ToWire(fbb_, stats, server_.counters.connections_open.load(), ns_blocks);
  auto o = wire::ToWire(fbb_, Status::OK());
  fbb_.Finish(wire::CreateStatsReply(fbb_, o, s));
  QueueReply(wire::Opcode::kStats, req.id, req.opcode, req.arrival);
}

void Connection::HandleIndexBlock(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const auto* index = flatbuffers::GetRoot<wire::IndexBlockRequest>(body.data());
  req->valid_tokens = index->valid_tokens();
  if (index->key() != nullptr) req->key = wire::FromWire(*index->key());
  Status bad;
  if (index->key() == nullptr) {
    bad = Status::InvalidArgument("IndexBlock without a key");
  } else if (req->key.namespace_id != ns_->id) {
    bad = Status::PermissionDenied("key of namespace " + std::to_string(req->key.namespace_id) +
                                   " on a connection of namespace " + std::to_string(ns_->id));
  } else if (index->slot() >= 0) {
    if (staging_ == nullptr || static_cast<uint32_t>(index->slot()) >= staging_->slots()) {
      bad = Status::InvalidArgument("IndexBlock names staging slot " +
                                    std::to_string(index->slot()) + ", out of range");
    } else {
      req->staging = staging_;
      req->block = staging_->slot(static_cast<uint32_t>(index->slot()));
    }
  } else if (index->slot() != -1 || Bytes(index->data()).size() != block_bytes_) {
    bad = Status::InvalidArgument("IndexBlock needs a slot or " + std::to_string(block_bytes_) +
                                  " bytes of data");
  } else {
    req->data.assign(index->data()->begin(), index->data()->end());
    req->block = req->data.data();
  }
  if (!bad.ok()) {
    req->status = bad;
    Reply(*req);
    return Recycle(std::move(req));
  }
  if (index->token_scores() != nullptr) {
    req->floats.assign(index->token_scores()->begin(), index->token_scores()->end());
  }
  RunOnWorkers(std::move(req), [bytes = block_bytes_](EmbeddedStore& store, Request& r) {
    r.status = store.IndexBlock(r.key, r.block, bytes, r.valid_tokens, r.floats);
  });
}

void Connection::HandleSelect(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const auto* select = flatbuffers::GetRoot<wire::SelectRequest>(body.data());
  const ModelLayout& layout = server_.store->layout();
  const RetrievalOptions& retrieval = server_.store->options().retrieval;
  req->namespace_id = select->namespace_id();
  req->sequence = SequenceId{select->sequence_hi(), select->sequence_lo()};
  req->layer = select->layer();
  req->context_tokens = select->context_tokens();
  req->want_scores = select->want_scores();
  const uint64_t query_floats = uint64_t{layout.num_query_heads} * layout.head_dim;
  const uint32_t got = select->queries() == nullptr ? 0 : select->queries()->size();
  if (req->namespace_id != ns_->id) {
    req->status =
        Status::PermissionDenied("Select in namespace " + std::to_string(req->namespace_id) +
                                 " on a connection of namespace " + std::to_string(ns_->id));
  } else if (got != query_floats) {
    req->status = Status::InvalidArgument("Select needs " + std::to_string(query_floats) +
                                          " query floats (num_query_heads * head_dim), got " +
                                          std::to_string(got));
  } else if (!retrieval.enabled) {
    req->status = Status::FailedPrecondition("retrieval is not enabled in the daemon's store");
  }
  if (!req->status.ok()) {
    Reply(*req);
    return Recycle(std::move(req));
  }
  req->floats.assign(select->queries()->begin(), select->queries()->end());
  const uint64_t n = retrieval.scope == SelectionScope::kPerKvHead
                         ? uint64_t{layout.num_kv_heads} * retrieval.top_k
                         : retrieval.top_k;
  req->selected.assign(n, -1);
  if (req->want_scores) req->scores.assign(n, 0.0f);
  if (retrieval.scope == SelectionScope::kPerLayer) {
    req->runners_up.assign(std::min<uint32_t>(select->runners_up(), kMaxRunnersUp), -1);
  }
  RunOnWorkers(std::move(req), [](EmbeddedStore& store, Request& r) {
    kvtier::Result<SelectInfo> info =
        r.runners_up.empty()
            ? store.Select(r.namespace_id, r.sequence, r.layer, r.floats, r.context_tokens,
                           r.selected, r.scores)
            : store.SelectWithRunnersUp(r.namespace_id, r.sequence, r.layer, r.floats,
                                        r.context_tokens, r.selected, r.scores, r.runners_up);
    r.status = info.ok() ? Status::OK() : info.status();
    if (info.ok()) r.info = *info;
  });
}

// --- Direct copies into a client's GPU tier (PROTOCOL.md) ---------------------------

void Connection::HandleRegisterDevice(std::unique_ptr<Request> req, std::span<const uint8_t> body,
                                      UniqueFd fd) {
  const auto* reg = flatbuffers::GetRoot<wire::RegisterDeviceRequest>(body.data());
  const std::span<const uint8_t> uuid = Bytes(reg->gpu_uuid());
  const std::span<const uint8_t> handle = Bytes(reg->ipc_handle());
  Status bad;
  if (!peer_.unix_socket) {
    bad = Status::NotSupported("RegisterDevice over TCP: over TCP block bytes travel inline");
  } else if (device_ != nullptr || device_pending_) {
    bad = Status::FailedPrecondition("a device pool is already registered on this connection");
  } else if (reg->kind() == static_cast<uint8_t>(DeviceMapping::Kind::kEmulated)) {
    kvtier::Result<std::shared_ptr<DeviceMapping>> mapping =
        DeviceMapping::MapMemfd(fd.get(), reg->bytes(), block_bytes_);
    if (mapping.ok()) InstallDevice(std::move(mapping).value());
    bad = mapping.status();
  } else if (reg->kind() != static_cast<uint8_t>(DeviceMapping::Kind::kCuda)) {
    bad = Status::InvalidArgument("unknown device pool kind " + std::to_string(reg->kind()));
  } else if (!cuda::HasDevice()) {
    bad = Status::NotSupported("kvtierd has no GPU (" + cuda::Devices().reason +
                               "); the client feeds its GPU tier through Get");
  } else if (uuid.size() != 16 || handle.size() != 64) {
    bad = Status::InvalidArgument(
        "a CUDA device pool needs a 16-byte gpu_uuid and a 64-byte "
        "ipc_handle");
  } else {
    // Opening an IPC handle can take milliseconds: on the workers, not this shard.
    req->data.assign(uuid.begin(), uuid.end());
    req->data.insert(req->data.end(), handle.begin(), handle.end());
    req->count = reg->bytes();
    device_pending_ = true;
    return RunOnWorkers(std::move(req), [bytes = block_bytes_](EmbeddedStore&, Request& r) {
      kvtier::Result<std::shared_ptr<DeviceMapping>> mapping = DeviceMapping::OpenCuda(
          std::span<const uint8_t, 16>(r.data.data(), 16),
          std::span<const uint8_t, 64>(r.data.data() + 16, 64), r.count, bytes);
      r.status = mapping.status();
      if (mapping.ok()) r.device = std::move(mapping).value();
    });
  }
  ReplyStatus(*req, wire::Opcode::kRegisterDevice, bad);
  Recycle(std::move(req));
}

void Connection::InstallDevice(std::shared_ptr<DeviceMapping> device) {
  device_ = std::move(device);
  server_.counters.device_pools_registered++;
  Log().info("kvtierd: connection {} ({}{}{}) registered a {} device pool of {} bytes", id_,
             peer_name_, client_name_.empty() ? "" : ", ", client_name_,
             device_->kind() == DeviceMapping::Kind::kCuda ? "CUDA" : "emulated", device_->bytes());
}

void Connection::CopyToCudaPool(EmbeddedStore& store, Request& r, uint64_t block_bytes) {
  BlockSource& source = store.host_block_source();
  const size_t n = r.device_keys.size();
  r.host_blocks.assign(n, HostBlockRef{});
  (void)PinHostEach(source, r.device_keys, r.host_blocks, r.store_statuses);
  // Compact to the pinned members: their sources, offsets, keys and refs.
  size_t pinned = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!r.store_statuses[i].ok()) continue;
    r.sources.push_back(r.host_blocks[i].data);
    r.offsets[pinned] = r.offsets[i];
    r.device_keys[pinned] = r.device_keys[i];
    r.host_blocks[pinned] = r.host_blocks[i];
    ++pinned;
  }
  if (pinned == 0) return;
  const std::span<const uint64_t> offsets(r.offsets.data(), pinned);
  const Status copied = r.device->CopyFromHost(r.sources, offsets, block_bytes);
  source.UnpinHost(std::span(r.device_keys.data(), pinned),
                   std::span(r.host_blocks.data(), pinned));
  if (copied.ok()) return;
  for (Status& s : r.store_statuses) {
    if (s.ok()) s = copied;
  }
}

void Connection::HandleGetToDevice(std::unique_ptr<Request> req, std::span<const uint8_t> body) {
  const auto* get = flatbuffers::GetRoot<wire::GetToDeviceRequest>(body.data());
  const uint32_t n = get->keys() == nullptr ? 0 : get->keys()->size();
  const uint32_t noffsets = get->offsets() == nullptr ? 0 : get->offsets()->size();
  Status bad;
  if (device_ == nullptr) {
    bad = Status::FailedPrecondition(
        "GetToDevice without a device pool: RegisterDevice first (and wait for its reply)");
  } else if (noffsets != n) {
    bad = Status::InvalidArgument("a GetToDevice of " + std::to_string(n) + " keys names " +
                                  std::to_string(noffsets) + " offsets");
  } else {
    // bytes() >= block_bytes_ (RegisterDevice checked): no overflow.
    const uint64_t last = device_->bytes() - block_bytes_;
    for (uint32_t i = 0; i < n && bad.ok(); ++i) {
      if (get->offsets()->Get(i) > last) {
        bad = Status::InvalidArgument("offset " + std::to_string(get->offsets()->Get(i)) +
                                      " + one block (" + std::to_string(block_bytes_) +
                                      " bytes) is past the device pool's " +
                                      std::to_string(device_->bytes()) + " bytes");
      }
    }
  }
  if (!bad.ok()) {
    ReplyStatus(*req, wire::Opcode::kGetToDevice, bad);
    return Recycle(std::move(req));
  }
  req->device = device_;
  CheckNamespaces(*req, get->keys());
  if (device_->kind() == DeviceMapping::Kind::kEmulated) {
    uint8_t* const base = device_->base();
    const auto* offsets = get->offsets();
    return GetBatchInto(std::move(req), get->keys(), 0, [base, offsets](Request&, uint32_t i) {
      return static_cast<void*>(base + offsets->Get(i));
    });
  }
  for (uint32_t i = 0; i < n; ++i) {
    if (!req->outcomes[i].ok()) continue;
    req->device_keys.push_back(wire::FromWire(*get->keys()->Get(i)));
    req->offsets.push_back(get->offsets()->Get(i));
    req->members.push_back(i);
  }
  const size_t members = req->members.size();
  Request* r = BeginBatch(std::move(req), members, 0);
  if (r == nullptr) return;
  PostToWorkers(r, [bytes = block_bytes_](EmbeddedStore& store, Request& q) {
    CopyToCudaPool(store, q, bytes);
  });
}

}  // namespace kvtier::server
