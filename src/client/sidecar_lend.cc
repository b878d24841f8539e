// SidecarStore's loans (kvtier/store.h): staging slots lent to the caller
// (SidecarClient::LendSlots). Borrow has kvtierd copy the blocks into the slots (a Get
// naming them) and lends the slots; Reserve lends slots for the caller to fill, and
// Commit has kvtierd copy them into its host tier (a Put naming them). Either way the
// block's bytes are copied once, by the daemon. Over TCP there is no staging area: the
// loans are memory of the client's own (src/core/lend.h).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/client/sidecar_store.h"
#include "src/core/lend.h"

namespace kvtier::client {
namespace {

// Staging slots holding borrowed blocks; the destructor gives them back.
class StagedBlocks final : public BorrowedBlocks {
 public:
  StagedBlocks(SidecarClient* client, size_t members, std::shared_ptr<Connection> connection,
               uint64_t generation)
      : BorrowedBlocks(members),
        client_(client),
        connection_(std::move(connection)),
        generation_(generation) {}
  ~StagedBlocks() override { client_->ReturnSlots(generation_, slots_); }

  // Member i is in staging slot `slot`.
  void Hold(size_t i, uint32_t slot, uint64_t block_bytes) {
    slots_.push_back(slot);
    blocks_[i] = std::span<const std::byte>(
        reinterpret_cast<const std::byte*>(connection_->slot(slot)), block_bytes);
  }

 private:
  SidecarClient* const client_;
  const std::shared_ptr<Connection> connection_;  // keeps the mapping
  const uint64_t generation_;
  std::vector<uint32_t> slots_;
};

// Staging slots lent to be filled; Commit puts them.
class StagedPutBuffers final : public PutBuffers {
 public:
  StagedPutBuffers(SidecarClient* client, SidecarDevice* device, SidecarClient::LentSlots lent,
                   uint64_t block_bytes)
      : PutBuffers(lent.slots.size()), client_(client), device_(device), lent_(std::move(lent)) {
    for (size_t i = 0; i < size(); ++i) {
      buffers_[i] = std::span<std::byte>(
          reinterpret_cast<std::byte*>(lent_.connection->slot(lent_.slots[i])), block_bytes);
    }
  }
  ~StagedPutBuffers() override { client_->ReturnSlots(lent_.generation, lent_.slots); }

  Status Commit(std::span<const BlockKey> keys, std::span<Status> statuses) override {
    KVTIER_RETURN_IF_ERROR(CheckCommit(committed_, size(), keys.size(), statuses.size()));
    committed_ = true;
    for (std::span<std::byte>& b : buffers_) b = {};
    Status s = client_->SlotBatch(/*put=*/true, keys, lent_.slots, statuses, lent_.generation);
    // Whatever the outcome, as a Put: the client's GPU tier forgets the old bytes.
    if (device_ != nullptr) {
      for (const BlockKey& key : keys) device_->Invalidate(key);
    }
    client_->ReturnSlots(lent_.generation, lent_.slots);
    lent_.slots.clear();
    return s;
  }

 private:
  SidecarClient* const client_;
  SidecarDevice* const device_;
  SidecarClient::LentSlots lent_;
  bool committed_ = false;
};

}  // namespace

Status SidecarStore::Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                            std::unique_ptr<BorrowedBlocks>* blocks) {
  KVTIER_RETURN_IF_ERROR(CheckBorrow(keys.size(), statuses.size(), blocks));
  std::vector<BlockKey> sent;
  std::vector<size_t> members;  // sent[j] is keys[members[j]]
  for (size_t i = 0; i < keys.size(); ++i) {
    statuses[i] = CheckKey(keys[i]);
    if (statuses[i].ok()) {
      sent.push_back(keys[i]);
      members.push_back(i);
    }
  }
  if (sent.empty()) {
    *blocks = std::make_unique<StagedBlocks>(client_.get(), keys.size(), nullptr, 0);
    return FirstFailure(statuses);
  }
  Result<SidecarClient::LentSlots> lent =
      client_->LendSlots(static_cast<uint32_t>(std::min<size_t>(sent.size(), UINT32_MAX)));
  if (!lent.ok() && lent.status().code() == StatusCode::kFailedPrecondition) {
    return BorrowOnHeap(*this, keys, statuses, blocks);  // TCP: no staging area
  }
  if (!lent.ok()) {
    for (size_t i : members) statuses[i] = lent.status();
    *blocks = std::make_unique<StagedBlocks>(client_.get(), keys.size(), nullptr, 0);
    return FirstFailure(statuses);
  }
  std::vector<Status> outcomes(sent.size());
  (void)client_->SlotBatch(/*put=*/false, sent, lent->slots, outcomes, lent->generation);
  auto staged = std::make_unique<StagedBlocks>(client_.get(), keys.size(), lent->connection,
                                               lent->generation);
  std::vector<uint32_t> unused;
  for (size_t j = 0; j < sent.size(); ++j) {
    if (outcomes[j].ok()) {
      staged->Hold(members[j], lent->slots[j], block_bytes_);
    } else {
      unused.push_back(lent->slots[j]);
    }
    statuses[members[j]] = std::move(outcomes[j]);
  }
  client_->ReturnSlots(lent->generation, unused);
  *blocks = std::move(staged);
  return FirstFailure(statuses);
}

Result<std::unique_ptr<PutBuffers>> SidecarStore::Reserve(size_t count) {
  if (count == 0 || count > UINT32_MAX) {
    return Status::InvalidArgument("Reserve: " + std::to_string(count) + " buffers");
  }
  Result<SidecarClient::LentSlots> lent = client_->LendSlots(static_cast<uint32_t>(count));
  if (!lent.ok() && lent.status().code() == StatusCode::kFailedPrecondition) {
    return ReserveOnHeap(*this, count);  // TCP: no staging area
  }
  if (!lent.ok()) return lent.status();
  return std::unique_ptr<PutBuffers>(std::make_unique<StagedPutBuffers>(
      client_.get(), device_.get(), std::move(*lent), block_bytes_));
}

}  // namespace kvtier::client
