// The argument checks of Store::PutFromPagedCache that do not depend on the store's
// state, shared by the embedded store and the kvtierd client (which gathers on the
// client's side): the statuses' count, the cache descriptor against the layout, the page
// table's size and every entry (the GPU kernel cannot report a bad one), the tensors.
#ifndef KVTIER_CORE_PAGED_PUT_H_
#define KVTIER_CORE_PAGED_PUT_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "kvtier/layout.h"
#include "kvtier/paged_cache.h"
#include "kvtier/status.h"

namespace kvtier {

// InvalidArgument (naming what is wrong) unless a put of `blocks` blocks with these
// arguments is well formed.
Status ValidatePagedPut(const ModelLayout& layout, size_t blocks, const PagedCacheDesc& cache,
                        const void* k_base, const void* v_base, std::span<const int32_t> page_table,
                        size_t statuses);

}  // namespace kvtier

#endif  // KVTIER_CORE_PAGED_PUT_H_
