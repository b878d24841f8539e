// SidecarStore: the Store that is a client of kvtierd (kvtier/client.h), made by
// Store::Open when StoreOptions::sidecar names a daemon. Each call becomes requests of
// the protocol (src/server/protocol/PROTOCOL.md) on SidecarClient's connection; what can
// be refused without the daemon (a buffer of the wrong size, a key of another namespace)
// is refused here. The GPU tier and the gather from a paged cache stay in this process
// (src/client/sidecar_device.h).
//
// Thread safety: as Store. Completions of the asynchronous calls run on the client's
// dispatcher thread, never the caller's.
#ifndef KVTIER_CLIENT_SIDECAR_STORE_H_
#define KVTIER_CLIENT_SIDECAR_STORE_H_

#include <memory>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "src/client/sidecar_client.h"
#include "src/client/sidecar_device.h"

namespace kvtier::client {

class SidecarStore final : public Store {
 public:
  // Connects and performs the handshake (SidecarClient::Connect). `options.sidecar` must
  // name a socket or a TCP address.
  static Result<std::unique_ptr<SidecarStore>> Open(const StoreOptions& options,
                                                    const ModelLayout& layout);
  ~SidecarStore() override;

  const ModelLayout& layout() const override { return layout_; }
  const StoreOptions& options() const override { return options_; }
  uint64_t block_bytes() const override { return block_bytes_; }
  Status Put(const BlockKey& key, const void* data, uint64_t bytes) override;
  Status Get(const BlockKey& key, void* data, uint64_t bytes) override;
  bool Contains(const BlockKey& key) const override;
  Status Delete(const BlockKey& key) override;
  Result<uint64_t> DropSequence(uint32_t namespace_id, const SequenceId& sequence) override;
  StoreStats Stats() const override;
  Status Flush() override;
  Status PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                           const void* k_base, const void* v_base,
                           std::span<const int32_t> page_table, CUstream_st* stream,
                           std::span<Status> statuses) override;
  Status PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) override;
  Status GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) override;
  using Store::GetAsync;
  using Store::GetBatchAsync;
  using Store::PutAsync;
  using Store::PutBatchAsync;
  void PutAsync(const BlockKey& key, const void* data, uint64_t bytes, Completion done) override;
  void GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) override;
  void PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                     Completion done) override;
  void GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                     Completion done) override;
  Status Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                std::unique_ptr<BorrowedBlocks>* blocks) override;
  Result<std::unique_ptr<PutBuffers>> Reserve(size_t count) override;
  Status IndexBlock(const BlockKey& key, const void* data, uint64_t bytes, uint32_t valid_tokens,
                    std::span<const float> token_scores) override;
  Result<SelectInfo> Select(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                            std::span<const float> queries, uint64_t context_tokens,
                            std::span<int64_t> selected, std::span<float> scores = {}) override;
  Result<AcquireInfo> Acquire(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                              std::span<const int64_t> blocks, CUstream_st* stream,
                              std::span<uint64_t> device_addresses,
                              std::span<const float> scores = {}) override;
  Status Release(uint64_t lease) override;

  SidecarStatus status() const { return client_->status(); }

 private:
  SidecarStore(const StoreOptions& options, const ModelLayout& layout,
               std::unique_ptr<SidecarClient> client);

  // What a key may be refused for here: another namespace than the Hello's
  // (PermissionDenied), a layer outside the layout (InvalidArgument).
  Status CheckKey(const BlockKey& key) const;
  Status CheckNamespace(uint32_t namespace_id) const;
  Status CheckBuffer(const void* data, uint64_t bytes) const;
  // A transfer of the batch, its members checked; null (and *refused set) when the
  // statuses do not match the batch.
  std::shared_ptr<Transfer> MakePut(std::span<const BlockWrite> writes, std::span<Status> statuses,
                                    Status* refused) const;
  std::shared_ptr<Transfer> MakeGet(std::span<const BlockRead> reads, std::span<Status> statuses,
                                    Status* refused) const;
  // Runs `done(status)` on the dispatcher.
  void CompleteLater(Completion done, Status status) const;

  const StoreOptions options_;
  const ModelLayout layout_;
  const uint64_t block_bytes_;
  const std::unique_ptr<SidecarClient> client_;
  // Reset first when the store closes (its prefetches Get through the client). The
  // completions of asynchronous Puts hold it weakly: they run until the client is gone.
  std::shared_ptr<SidecarDevice> device_;
};

}  // namespace kvtier::client

#endif  // KVTIER_CLIENT_SIDECAR_STORE_H_
