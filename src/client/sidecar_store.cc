#include "src/client/sidecar_store.h"

#include <algorithm>
#include <cstring>

#include "src/core/paged_put.h"
#include "src/server/protocol/codec.h"

namespace kvtier::client {

Result<std::unique_ptr<SidecarStore>> SidecarStore::Open(const StoreOptions& options,
                                                         const ModelLayout& layout) {
  if (options.sidecar.socket.empty() && options.sidecar.tcp_address.empty()) {
    return Status::InvalidArgument("the sidecar options name neither a socket nor a TCP address");
  }
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<SidecarClient> client,
                          SidecarClient::Connect(options.sidecar, layout));
  std::unique_ptr<SidecarStore> store(new SidecarStore(options, layout, std::move(client)));
  KVTIER_ASSIGN_OR_RETURN(
      store->device_, SidecarDevice::Create(store.get(), store->client_.get(), options, layout));
  return store;
}

SidecarStore::SidecarStore(const StoreOptions& options, const ModelLayout& layout,
                           std::unique_ptr<SidecarClient> client)
    : options_(options),
      layout_(layout),
      block_bytes_(layout.BytesPerBlock()),
      client_(std::move(client)) {}

SidecarStore::~SidecarStore() { device_.reset(); }

// --- Local checks ------------------------------------------------------------------------

Status SidecarStore::CheckNamespace(uint32_t namespace_id) const {
  if (namespace_id != options_.sidecar.namespace_id) {
    return Status::PermissionDenied("namespace " + std::to_string(namespace_id) +
                                    ": this kvtierd client works in namespace " +
                                    std::to_string(options_.sidecar.namespace_id));
  }
  return Status::OK();
}

Status SidecarStore::CheckKey(const BlockKey& key) const {
  if (key.namespace_id != options_.sidecar.namespace_id) {
    return Status::PermissionDenied("block " + key.ToString() +
                                    ": this kvtierd client works in namespace " +
                                    std::to_string(options_.sidecar.namespace_id));
  }
  if (key.layer >= layout_.num_layers) {
    return Status::InvalidArgument("block " + key.ToString() + ": layer " +
                                   std::to_string(key.layer) + " outside the layout's " +
                                   std::to_string(layout_.num_layers) + " layers");
  }
  return Status::OK();
}

Status SidecarStore::CheckBuffer(const void* data, uint64_t bytes) const {
  if (data == nullptr) return Status::InvalidArgument("null block buffer");
  if (bytes != block_bytes_) {
    return Status::InvalidArgument("block buffer of " + std::to_string(bytes) +
                                   " bytes; this store's blocks are " +
                                   std::to_string(block_bytes_) + " bytes");
  }
  return Status::OK();
}

std::shared_ptr<Transfer> SidecarStore::MakePut(std::span<const BlockWrite> writes,
                                                std::span<Status> statuses, Status* refused) const {
  if (statuses.size() != writes.size()) {
    *refused =
        Status::InvalidArgument("PutBatch: " + std::to_string(statuses.size()) + " statuses for " +
                                std::to_string(writes.size()) + " writes");
    return nullptr;
  }
  auto t = std::make_shared<Transfer>();
  t->put = true;
  t->writes = writes;
  t->statuses = statuses;
  for (size_t i = 0; i < writes.size(); ++i) {
    statuses[i] = CheckKey(writes[i].key);
    if (statuses[i].ok()) statuses[i] = CheckBuffer(writes[i].data, writes[i].bytes);
  }
  return t;
}

std::shared_ptr<Transfer> SidecarStore::MakeGet(std::span<const BlockRead> reads,
                                                std::span<Status> statuses, Status* refused) const {
  if (statuses.size() != reads.size()) {
    *refused = Status::InvalidArgument("GetBatch: " + std::to_string(statuses.size()) +
                                       " statuses for " + std::to_string(reads.size()) + " reads");
    return nullptr;
  }
  auto t = std::make_shared<Transfer>();
  t->reads = reads;
  t->statuses = statuses;
  for (size_t i = 0; i < reads.size(); ++i) {
    statuses[i] = CheckKey(reads[i].key);
    if (statuses[i].ok()) statuses[i] = CheckBuffer(reads[i].data, reads[i].bytes);
  }
  return t;
}

void SidecarStore::CompleteLater(Completion done, Status status) const {
  client_->Post([done = std::move(done), status = std::move(status)] { done(status); });
}

namespace {

// The blocks of a Put (whatever its outcome) leave the client's GPU tier.
void InvalidateWrites(SidecarDevice* device, std::span<const BlockWrite> writes) {
  if (device == nullptr) return;
  for (const BlockWrite& w : writes) device->Invalidate(w.key);
}

}  // namespace

// --- Block transfers ---------------------------------------------------------------------

Status SidecarStore::PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) {
  Status refused;
  std::shared_ptr<Transfer> t = MakePut(writes, statuses, &refused);
  if (t == nullptr) return refused;
  Status s = client_->Submit(std::move(t));
  InvalidateWrites(device_.get(), writes);
  return s;
}

Status SidecarStore::GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) {
  Status refused;
  std::shared_ptr<Transfer> t = MakeGet(reads, statuses, &refused);
  return t != nullptr ? client_->Submit(std::move(t)) : refused;
}

void SidecarStore::PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                                 Completion done) {
  Status refused;
  std::shared_ptr<Transfer> t = MakePut(writes, statuses, &refused);
  if (t == nullptr) return CompleteLater(std::move(done), std::move(refused));
  t->done = [device = std::weak_ptr(device_), writes, done = std::move(done)](Status s) {
    InvalidateWrites(device.lock().get(), writes);
    done(std::move(s));
  };
  (void)client_->Submit(std::move(t));
}

void SidecarStore::GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                                 Completion done) {
  Status refused;
  std::shared_ptr<Transfer> t = MakeGet(reads, statuses, &refused);
  if (t == nullptr) return CompleteLater(std::move(done), std::move(refused));
  t->done = std::move(done);
  (void)client_->Submit(std::move(t));
}

void SidecarStore::PutAsync(const BlockKey& key, const void* data, uint64_t bytes,
                            Completion done) {
  auto t = std::make_shared<Transfer>();
  t->put = true;
  t->one_write = BlockWrite{key, data, bytes};
  t->writes = std::span<const BlockWrite>(&t->one_write, 1);
  t->one_status = CheckKey(key);
  if (t->one_status.ok()) t->one_status = CheckBuffer(data, bytes);
  t->statuses = std::span<Status>(&t->one_status, 1);
  // The span points into the transfer, which outlives its completion.
  t->done = [device = std::weak_ptr(device_), writes = t->writes,
             done = std::move(done)](Status s) {
    InvalidateWrites(device.lock().get(), writes);
    done(std::move(s));
  };
  (void)client_->Submit(std::move(t));
}

void SidecarStore::GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) {
  auto t = std::make_shared<Transfer>();
  t->one_read = BlockRead{key, data, bytes};
  t->reads = std::span<const BlockRead>(&t->one_read, 1);
  t->one_status = CheckKey(key);
  if (t->one_status.ok()) t->one_status = CheckBuffer(data, bytes);
  t->statuses = std::span<Status>(&t->one_status, 1);
  t->done = std::move(done);
  (void)client_->Submit(std::move(t));
}

Status SidecarStore::Put(const BlockKey& key, const void* data, uint64_t bytes) {
  const BlockWrite write{key, data, bytes};
  Status status;
  return PutBatch(std::span<const BlockWrite>(&write, 1), std::span<Status>(&status, 1));
}

Status SidecarStore::Get(const BlockKey& key, void* data, uint64_t bytes) {
  const BlockRead read{key, data, bytes};
  Status status;
  return GetBatch(std::span<const BlockRead>(&read, 1), std::span<Status>(&status, 1));
}

// --- Everything else: one request, one reply ----------------------------------------------

bool SidecarStore::Contains(const BlockKey& key) const {
  if (!CheckKey(key).ok()) return false;
  flatbuffers::FlatBufferBuilder fbb(128);
  const wire::Key k = wire::ToWire(key);
  fbb.Finish(wire::CreateKeysRequest(fbb, fbb.CreateVectorOfStructs(&k, 1)));
  bool present = false;
  Status s = client_->Call(wire::Opcode::kContains, fbb, [&](std::span<const uint8_t> body) {
    const auto* reply = flatbuffers::GetRoot<wire::ContainsReply>(body.data());
    KVTIER_RETURN_IF_ERROR(wire::FromWire(reply->outcome()));
    present =
        reply->present() != nullptr && reply->present()->size() == 1 && reply->present()->Get(0);
    return Status::OK();
  });
  return s.ok() && present;
}

Status SidecarStore::Delete(const BlockKey& key) {
  KVTIER_RETURN_IF_ERROR(CheckKey(key));
  flatbuffers::FlatBufferBuilder fbb(128);
  const wire::Key k = wire::ToWire(key);
  fbb.Finish(wire::CreateKeysRequest(fbb, fbb.CreateVectorOfStructs(&k, 1)));
  Status s = client_->Call(wire::Opcode::kDelete, fbb, [](std::span<const uint8_t> body) {
    const auto* reply = flatbuffers::GetRoot<wire::BatchReply>(body.data());
    if (reply->members() != nullptr && reply->members()->size() == 1) {
      return wire::FromWire(reply->members()->Get(0));
    }
    return wire::FromWire(reply->outcome());
  });
  device_->Invalidate(key);
  return s;
}

Result<uint64_t> SidecarStore::DropSequence(uint32_t namespace_id, const SequenceId& sequence) {
  KVTIER_RETURN_IF_ERROR(CheckNamespace(namespace_id));
  flatbuffers::FlatBufferBuilder fbb(128);
  fbb.Finish(wire::CreateDropSequenceRequest(fbb, namespace_id, sequence.hi, sequence.lo));
  uint64_t count = 0;
  KVTIER_RETURN_IF_ERROR(
      client_->Call(wire::Opcode::kDropSequence, fbb, [&](std::span<const uint8_t> body) {
        const auto* reply = flatbuffers::GetRoot<wire::CountReply>(body.data());
        count = reply->count();
        return wire::FromWire(reply->outcome());
      }));
  device_->InvalidateSequence(namespace_id, sequence);
  return count;
}

StoreStats SidecarStore::Stats() const {
  flatbuffers::FlatBufferBuilder fbb(64);
  fbb.Finish(wire::CreateEmpty(fbb));
  StoreStats stats;
  Status s = client_->Call(wire::Opcode::kStats, fbb, [&](std::span<const uint8_t> body) {
    const auto* reply = flatbuffers::GetRoot<wire::StatsReply>(body.data());
    KVTIER_RETURN_IF_ERROR(wire::FromWire(reply->outcome()));
    if (reply->stats() != nullptr) stats = wire::FromWire(*reply->stats());
    return Status::OK();
  });
  // Unreachable daemon: only what is known here.
  if (!s.ok()) stats = StoreStats{};
  stats.block_bytes = block_bytes_;
  device_->AddStats(&stats);  // the daemon has no GPU tier: this process's
  return stats;
}

Status SidecarStore::Flush() {
  flatbuffers::FlatBufferBuilder fbb(64);
  fbb.Finish(wire::CreateEmpty(fbb));
  return client_->Call(wire::Opcode::kFlush, fbb, [](std::span<const uint8_t> body) {
    return wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(body.data())->outcome());
  });
}

Status SidecarStore::IndexBlock(const BlockKey& key, const void* data, uint64_t bytes,
                                uint32_t valid_tokens, std::span<const float> token_scores) {
  KVTIER_RETURN_IF_ERROR(CheckKey(key));
  KVTIER_RETURN_IF_ERROR(CheckBuffer(data, bytes));
  // The block travels inline (slot -1): one block, no staging slot to wait for.
  flatbuffers::FlatBufferBuilder fbb(1024 + bytes + token_scores.size() * sizeof(float));
  auto block = fbb.CreateVector(static_cast<const uint8_t*>(data), bytes);
  auto scores = fbb.CreateVector(token_scores.data(), token_scores.size());
  const wire::Key k = wire::ToWire(key);
  fbb.Finish(wire::CreateIndexBlockRequest(fbb, &k, valid_tokens, scores, -1, block));
  return client_->Call(wire::Opcode::kIndexBlock, fbb, [](std::span<const uint8_t> body) {
    return wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(body.data())->outcome());
  });
}

Result<SelectInfo> SidecarStore::Select(uint32_t namespace_id, const SequenceId& sequence,
                                        uint32_t layer, std::span<const float> queries,
                                        uint64_t context_tokens, std::span<int64_t> selected,
                                        std::span<float> scores) {
  KVTIER_RETURN_IF_ERROR(CheckNamespace(namespace_id));
  if (!scores.empty() && scores.size() != selected.size()) {
    return Status::InvalidArgument("Select: " + std::to_string(scores.size()) + " scores for " +
                                   std::to_string(selected.size()) + " selected blocks");
  }
  // With a GPU tier that prefetches: the runners-up too, for the Acquire that follows.
  const RetrievalOptions& r = options_.retrieval;
  const uint32_t extra = device_->has_tier() && r.prefetch && r.scope == SelectionScope::kPerLayer
                             ? r.prefetch_extra
                             : 0;
  flatbuffers::FlatBufferBuilder fbb(256 + queries.size() * sizeof(float));
  auto q = fbb.CreateVector(queries.data(), queries.size());
  fbb.Finish(wire::CreateSelectRequest(fbb, namespace_id, sequence.hi, sequence.lo, layer,
                                       context_tokens, q, !scores.empty(), extra));
  SelectInfo info;
  std::vector<int64_t> runners_up;
  KVTIER_RETURN_IF_ERROR(
      client_->Call(wire::Opcode::kSelect, fbb, [&](std::span<const uint8_t> body) -> Status {
        const auto* reply = flatbuffers::GetRoot<wire::SelectReply>(body.data());
        KVTIER_RETURN_IF_ERROR(wire::FromWire(reply->outcome()));
        const auto* blocks = reply->blocks();
        const size_t n = blocks != nullptr ? blocks->size() : 0;
        if (n != selected.size()) {
          return Status::InvalidArgument(
              "Select: `selected` holds " + std::to_string(selected.size()) +
              " entries; kvtierd selects " + std::to_string(n) +
              " (its retrieval top_k and scope must agree with options().retrieval)");
        }
        std::copy(blocks->begin(), blocks->end(), selected.begin());
        if (!scores.empty()) {
          const auto* s = reply->scores();
          if (s == nullptr || s->size() != n) {
            return Status::Internal("kvtierd's Select reply lacks the scores asked for");
          }
          std::copy(s->begin(), s->end(), scores.begin());
        }
        info = SelectInfo{reply->sink_blocks(), reply->local_begin(), reply->local_end(),
                          reply->selected()};
        if (extra > 0 && reply->runners_up() != nullptr) {
          runners_up.assign(reply->runners_up()->begin(), reply->runners_up()->end());
        }
        return Status::OK();
      }));
  if (!runners_up.empty()) device_->NoteRunnersUp(namespace_id, sequence, layer, runners_up);
  return info;
}

// --- The GPU side: in this process (sidecar_device.h) --------------------------------------

Status SidecarStore::PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                                       const void* k_base, const void* v_base,
                                       std::span<const int32_t> page_table, CUstream_st* stream,
                                       std::span<Status> statuses) {
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedPut(layout_, keys.size(), cache, k_base, v_base, page_table, statuses.size()));
  for (const BlockKey& key : keys) KVTIER_RETURN_IF_ERROR(CheckKey(key));
  return device_->PutFromPagedCache(keys, cache, k_base, v_base, page_table, stream, statuses);
}

Result<AcquireInfo> SidecarStore::Acquire(uint32_t namespace_id, const SequenceId& sequence,
                                          uint32_t layer, std::span<const int64_t> blocks,
                                          CUstream_st* stream, std::span<uint64_t> device_addresses,
                                          std::span<const float> scores) {
  KVTIER_RETURN_IF_ERROR(CheckNamespace(namespace_id));
  return device_->Acquire(namespace_id, sequence, layer, blocks, stream, device_addresses, scores);
}

Status SidecarStore::Release(uint64_t lease) { return device_->Release(lease); }

}  // namespace kvtier::client

namespace kvtier {

std::optional<SidecarStatus> GetSidecarStatus(const Store& store) {
  if (const auto* s = dynamic_cast<const client::SidecarStore*>(&store)) return s->status();
  return std::nullopt;
}

}  // namespace kvtier
