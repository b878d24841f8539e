// Loans (kvtier/store.h). EmbeddedStore's Borrow pins blocks in their host-tier slots and
// hands out the slots' bytes, with no copy; its Reserve lends memory of its own that
// Commit puts as PutBatch does (ReserveOnHeap, which a sidecar client over TCP uses too,
// with BorrowOnHeap).
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "src/core/lend.h"
#include "src/core/store_impl.h"

namespace kvtier {
namespace {

// Blocks pinned in the host tier: each is a slot that cannot be evicted or reused until
// the destructor unpins it (a block replaced or deleted meanwhile keeps its old slot
// until then: SlotTable's Retire frees a pinned slot at its last Unpin).
class PinnedBlocks final : public BorrowedBlocks {
 public:
  PinnedBlocks(EmbeddedStore::Impl* impl, size_t members)
      : BorrowedBlocks(members), impl_(impl), slots_(members, BlockIndex::kNoSlot) {}

  ~PinnedBlocks() override {
    MutexLock lock(&impl_->mu);
    for (SlotId slot : slots_) {
      if (slot != BlockIndex::kNoSlot) impl_->pool->Unpin(slot);
    }
    impl_->slot_cv.notify_all();  // a Put may wait for a slot to come free
  }

  // Member i is the pinned `slot`.
  void Hold(size_t i, SlotId slot) {
    slots_[i] = slot;
    blocks_[i] = std::span<const std::byte>(impl_->pool->SlotData(slot), impl_->block_bytes);
  }

 private:
  EmbeddedStore::Impl* const impl_;
  std::vector<SlotId> slots_;
};

// Page-aligned memory for a loan. Freed loan memory is kept for the next loan (up to
// kSpares of them, each at most kSpareBytes, process-wide): a batch's worth allocated
// afresh is page-faulted in, which costs about as much as copying the batch.
class LoanMemory {
 public:
  static constexpr size_t kSpares = 4;
  static constexpr uint64_t kSpareBytes = uint64_t{64} << 20;

  // `count` blocks of `block_bytes`, each at a multiple of 4 KiB (*stride apart).
  static Result<LoanMemory> Allocate(size_t count, uint64_t block_bytes, uint64_t* stride,
                                     const char* what) {
    *stride = (block_bytes + 4095) / 4096 * 4096;
    if (count == 0 || count > (uint64_t{1} << 40) / *stride) {
      return Status::InvalidArgument(std::string(what) + ": " + std::to_string(count) +
                                     " blocks of " + std::to_string(block_bytes) +
                                     " bytes; at least one, and less than 1 TiB");
    }
    const uint64_t bytes = count * *stride;
    {
      Spares& spares = TheSpares();
      MutexLock lock(&spares.mu);
      for (size_t k = 0; k < spares.list.size(); ++k) {
        if (spares.list[k].first >= bytes && spares.list[k].first / 2 <= bytes) {
          LoanMemory m(spares.list[k].second, spares.list[k].first);
          spares.list.erase(spares.list.begin() + static_cast<ptrdiff_t>(k));
          return m;
        }
      }
    }
    auto* data = static_cast<std::byte*>(std::aligned_alloc(4096, bytes));
    if (data == nullptr) {
      return Status::ResourceExhausted(std::string(what) + ": cannot allocate " +
                                       std::to_string(bytes) + " bytes");
    }
    return LoanMemory(data, bytes);
  }

  LoanMemory(LoanMemory&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(other.bytes_) {}
  LoanMemory& operator=(LoanMemory&&) = delete;
  ~LoanMemory() { Release(); }

  std::byte* data() const { return data_; }
  // To the spares, or freed. Once.
  void Release() {
    if (data_ == nullptr) return;
    std::byte* data = std::exchange(data_, nullptr);
    if (bytes_ <= kSpareBytes) {
      Spares& spares = TheSpares();
      MutexLock lock(&spares.mu);
      if (spares.list.size() < kSpares) {
        spares.list.emplace_back(bytes_, data);
        return;
      }
    }
    std::free(data);
  }

 private:
  struct Spares {
    Mutex mu;
    std::vector<std::pair<uint64_t, std::byte*>> list KVTIER_GUARDED_BY(mu);
  };
  static Spares& TheSpares() {
    static Spares* spares = new Spares;  // never destroyed: loans may outlive static ones
    return *spares;
  }
  LoanMemory(std::byte* data, uint64_t bytes) : data_(data), bytes_(bytes) {}

  std::byte* data_;
  uint64_t bytes_;
};

// Blocks copied by GetBatch into memory of their own.
class HeapBlocks final : public BorrowedBlocks {
 public:
  HeapBlocks(size_t members, std::optional<LoanMemory> memory)
      : BorrowedBlocks(members), memory_(std::move(memory)) {}
  void Hold(size_t i, std::span<const std::byte> block) { blocks_[i] = block; }

 private:
  std::optional<LoanMemory> memory_;
};

// Buffers whose Commit is PutBatch of them.
class HeapPutBuffers final : public PutBuffers {
 public:
  HeapPutBuffers(Store* store, size_t members, LoanMemory memory, uint64_t stride)
      : PutBuffers(members), store_(store), memory_(std::move(memory)) {
    for (size_t i = 0; i < members; ++i) {
      buffers_[i] = std::span<std::byte>(memory_.data() + i * stride, store_->block_bytes());
    }
  }

  Status Commit(std::span<const BlockKey> keys, std::span<Status> statuses) override {
    KVTIER_RETURN_IF_ERROR(
        CheckCommit(memory_.data() == nullptr, size(), keys.size(), statuses.size()));
    std::vector<BlockWrite> writes(size());
    for (size_t i = 0; i < size(); ++i) {
      writes[i] = BlockWrite{keys[i], buffers_[i].data(), buffers_[i].size()};
    }
    const Status s = store_->PutBatch(writes, statuses);
    for (std::span<std::byte>& b : buffers_) b = {};
    memory_.Release();
    return s;
  }

 private:
  Store* const store_;
  LoanMemory memory_;
};

}  // namespace

Status CheckBorrow(size_t keys, size_t statuses, const std::unique_ptr<BorrowedBlocks>* blocks) {
  if (statuses != keys) {
    return Status::InvalidArgument("Borrow: " + std::to_string(statuses) + " statuses for " +
                                   std::to_string(keys) + " keys");
  }
  if (blocks == nullptr) return Status::InvalidArgument("Borrow: no BorrowedBlocks to set");
  return Status::OK();
}

Status CheckCommit(bool committed, size_t buffers, size_t keys, size_t statuses) {
  if (committed) return Status::FailedPrecondition("PutBuffers: already committed");
  if (keys != buffers || statuses != buffers) {
    return Status::InvalidArgument("PutBuffers::Commit: " + std::to_string(keys) + " keys and " +
                                   std::to_string(statuses) + " statuses for " +
                                   std::to_string(buffers) + " buffers");
  }
  return Status::OK();
}

Status EmbeddedStore::Impl::Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                                   std::unique_ptr<BorrowedBlocks>* blocks, bool host_only,
                                   bool* declined) {
  KVTIER_RETURN_IF_ERROR(CheckBorrow(keys.size(), statuses.size(), blocks));
  std::vector<ReadPlan> plans(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) plans[i].status = CheckKey(keys[i]);
  PinReads(keys, plans, host_only, declined);
  if (host_only && *declined) return Status::OK();
  auto pinned = std::make_unique<PinnedBlocks>(this, keys.size());
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < keys.size(); ++i) {
      if (plans[i].slot == BlockIndex::kNoSlot) continue;
      if (!plans[i].status.ok()) {  // pinned but failed: unpinned, as RunReads does
        pool->Unpin(plans[i].slot);
        continue;
      }
      pinned->Hold(i, plans[i].slot);
      ++stats.gets;
      stats.bytes_got += block_bytes;
    }
  }
  for (size_t i = 0; i < keys.size(); ++i) statuses[i] = std::move(plans[i].status);
  *blocks = std::move(pinned);
  return FirstFailure(statuses);
}

Status BorrowOnHeap(Store& store, std::span<const BlockKey> keys, std::span<Status> statuses,
                    std::unique_ptr<BorrowedBlocks>* blocks) {
  KVTIER_RETURN_IF_ERROR(CheckBorrow(keys.size(), statuses.size(), blocks));
  if (keys.empty()) {
    *blocks = std::make_unique<HeapBlocks>(0, std::nullopt);
    return Status::OK();
  }
  uint64_t stride = 0;
  Result<LoanMemory> memory =
      LoanMemory::Allocate(keys.size(), store.block_bytes(), &stride, "Borrow");
  if (!memory.ok()) {
    for (Status& s : statuses) s = memory.status();
    *blocks = std::make_unique<HeapBlocks>(keys.size(), std::nullopt);
    return memory.status();
  }
  std::vector<BlockRead> reads(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    reads[i] = BlockRead{keys[i], memory->data() + i * stride, store.block_bytes()};
  }
  const Status s = store.GetBatch(reads, statuses);
  auto heap = std::make_unique<HeapBlocks>(keys.size(), std::move(*memory));
  for (size_t i = 0; i < keys.size(); ++i) {
    if (statuses[i].ok()) {
      heap->Hold(i, std::span<const std::byte>(static_cast<const std::byte*>(reads[i].data),
                                               store.block_bytes()));
    }
  }
  *blocks = std::move(heap);
  return s;
}

Result<std::unique_ptr<PutBuffers>> ReserveOnHeap(Store& store, size_t count) {
  uint64_t stride = 0;
  KVTIER_ASSIGN_OR_RETURN(LoanMemory memory,
                          LoanMemory::Allocate(count, store.block_bytes(), &stride, "Reserve"));
  return std::unique_ptr<PutBuffers>(
      std::make_unique<HeapPutBuffers>(&store, count, std::move(memory), stride));
}

Status EmbeddedStore::Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                             std::unique_ptr<BorrowedBlocks>* blocks) {
  return impl_->Borrow(keys, statuses, blocks);
}

bool EmbeddedStore::BorrowFromHost(std::span<const BlockKey> keys, std::span<Status> statuses,
                                   std::unique_ptr<BorrowedBlocks>* blocks) {
  bool declined = true;  // stays so when the arguments are malformed (Borrow says why)
  (void)impl_->Borrow(keys, statuses, blocks, /*host_only=*/true, &declined);
  return !declined;
}

Result<std::unique_ptr<PutBuffers>> EmbeddedStore::Reserve(size_t count) {
  return ReserveOnHeap(*this, count);
}

}  // namespace kvtier
