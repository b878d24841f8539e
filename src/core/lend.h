// Loans (Store::Borrow, Store::Reserve) made of memory of the lender's own, for a Store
// that has nothing better to lend: BorrowOnHeap Gets the blocks into it (GetBatch), and
// ReserveOnHeap's Commit is PutBatch of it. The embedded store reserves this way (its
// host-tier slots are allocated by key, at the Put), and so does a sidecar client over
// TCP (it has no staging area).
#ifndef KVTIER_CORE_LEND_H_
#define KVTIER_CORE_LEND_H_

#include <memory>
#include <span>

#include "kvtier/store.h"

namespace kvtier {

// The argument checks every lender shares: Store::Borrow's (statuses of the keys' size,
// somewhere to put the loan) and PutBuffers::Commit's (once; keys and statuses of the
// buffers' number). InvalidArgument / FailedPrecondition, naming what is wrong.
Status CheckBorrow(size_t keys, size_t statuses, const std::unique_ptr<BorrowedBlocks>* blocks);
Status CheckCommit(bool committed, size_t buffers, size_t keys, size_t statuses);

// Store::Borrow through store.GetBatch, into page-aligned memory that *blocks owns.
Status BorrowOnHeap(Store& store, std::span<const BlockKey> keys, std::span<Status> statuses,
                    std::unique_ptr<BorrowedBlocks>* blocks);
// Store::Reserve: page-aligned buffers; Commit calls store.PutBatch.
Result<std::unique_ptr<PutBuffers>> ReserveOnHeap(Store& store, size_t count);

}  // namespace kvtier

#endif  // KVTIER_CORE_LEND_H_
