// The argument checks of Store::PutFromPagedCache that do not depend on the store's
// state, shared by the embedded store and the kvtierd client (which gathers on the
// client's side): the statuses' count, the cache descriptor against the layout, the page
// table's size and every entry (the GPU kernel cannot report a bad one), the tensors.
#ifndef KVTIER_CORE_PAGED_PUT_H_
#define KVTIER_CORE_PAGED_PUT_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/paged_cache.h"
#include "kvtier/status.h"
#include "src/util/mutex.h"

namespace kvtier {

// InvalidArgument (naming what is wrong) unless a put of `blocks` blocks with these
// arguments is well formed.
Status ValidatePagedPut(const ModelLayout& layout, size_t blocks, const PagedCacheDesc& cache,
                        const void* k_base, const void* v_base, std::span<const int32_t> page_table,
                        size_t statuses);

// The GPU gather of a put into page-locked host slots: the kernel reads the page table
// and the slot addresses from page-locked scratch (mapped into the device's address
// space), grown on demand and kept for the next call. Thread safety: one mutex.
class PinnedGather {
 public:
  PinnedGather() = default;
  ~PinnedGather();
  PinnedGather(const PinnedGather&) = delete;
  PinnedGather& operator=(const PinnedGather&) = delete;

  // Gathers block i (page-table entries [i * n, (i + 1) * n)) into slots[i] on `stream`
  // (after the engine's work there) and returns once it has run.
  Status Run(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
             std::span<const int32_t> page_table, std::span<void* const> slots, StreamHandle stream)
      KVTIER_EXCLUDES(mu_);

 private:
  Mutex mu_;
  void* scratch_ KVTIER_GUARDED_BY(mu_) = nullptr;
  uint64_t bytes_ KVTIER_GUARDED_BY(mu_) = 0;
};

}  // namespace kvtier

#endif  // KVTIER_CORE_PAGED_PUT_H_
