// The C API: a thin translation onto kvtier::Store. No exception or C++ type crosses it.
#include "kvtier/kvtier_c.h"

#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"

struct kvtier_store {
  std::unique_ptr<kvtier::Store> store;
};

struct kvtier_borrowed {
  std::unique_ptr<kvtier::BorrowedBlocks> blocks;
};

struct kvtier_put_buffers {
  std::unique_ptr<kvtier::PutBuffers> buffers;
};

namespace {

thread_local std::string last_error;

kvtier_code Report(const kvtier::Status& s) {
  if (!s.ok()) last_error = s.ToString();
  return static_cast<kvtier_code>(s.code());
}

// The C enums' fields may hold any int a C caller stores; kvtier's enums are uint8_t.
// Read the raw integer (loading an out-of-range value as the C++ enum type is undefined)
// and map a value outside [0, 255] to 255, which no enum uses, so that validation
// rejects it instead of seeing it wrap onto a valid value (256 -> 0).
template <typename E, typename CEnum>
E FromCEnum(const CEnum& field) {
  std::underlying_type_t<CEnum> raw;
  std::memcpy(&raw, &field, sizeof(raw));
  const long long v = static_cast<long long>(raw);
  return static_cast<E>(v >= 0 && v <= 255 ? v : 255);
}

kvtier::ModelLayout ToLayout(const kvtier_layout& l) {
  return kvtier::ModelLayout{.num_layers = l.num_layers,
                             .num_kv_heads = l.num_kv_heads,
                             .num_query_heads = l.num_query_heads,
                             .head_dim = l.head_dim,
                             .dtype = FromCEnum<kvtier::DType>(l.dtype),
                             .block_tokens = l.block_tokens};
}

kvtier::BlockKey ToKey(const kvtier_block_key& k) {
  return kvtier::BlockKey{.namespace_id = k.namespace_id,
                          .sequence = {k.sequence_hi, k.sequence_lo},
                          .layer = k.layer,
                          .block = k.block};
}

// A valid layout's size, or 0 with the error recorded.
template <typename F>
uint64_t LayoutQuery(const kvtier_layout* layout, F f) {
  if (layout == nullptr) {
    Report(kvtier::Status::InvalidArgument("null layout"));
    return 0;
  }
  kvtier::ModelLayout l = ToLayout(*layout);
  kvtier::Status s = l.Validate();
  if (!s.ok()) {
    Report(s);
    return 0;
  }
  return f(l);
}

kvtier_code NullArgument(const char* what) {
  return Report(kvtier::Status::InvalidArgument(std::string("null ") + what));
}

// Runs `f` (returning Status), turning an escaping exception (bad_alloc) into a code.
template <typename F>
kvtier_code Guard(F f) {
  try {
    return Report(f());
  } catch (const std::bad_alloc&) {
    return Report(kvtier::Status::ResourceExhausted("out of memory"));
  } catch (const std::exception& e) {
    return Report(kvtier::Status::Internal(e.what()));
  }
}

// Each member's code, into codes[0, statuses.size()). A call that failed while every
// member stayed OK was refused as a whole (nothing reached the members): each member
// gets the call's code.
void MemberCodes(std::span<const kvtier::Status> statuses, const kvtier::Status& whole,
                 kvtier_code* codes) {
  const bool refused = !whole.ok() && kvtier::FirstFailure(statuses).ok();
  for (size_t i = 0; i < statuses.size(); ++i) {
    codes[i] = static_cast<kvtier_code>(refused ? whole.code() : statuses[i].code());
  }
}

kvtier::Store::Completion ToCompletion(kvtier_completion done, void* user_data) {
  return [done, user_data](kvtier::Status s) {
    done(user_data, static_cast<kvtier_code>(s.code()), s.message().c_str());
  };
}

}  // namespace

extern "C" {

const char* kvtier_last_error(void) { return last_error.c_str(); }

const char* kvtier_code_name(kvtier_code code) {
  // The names are string literals: NUL-terminated.
  return kvtier::StatusCodeName(static_cast<kvtier::StatusCode>(code)).data();
}

void kvtier_options_init(kvtier_options* options) {
  if (options == nullptr) return;
  kvtier::StoreOptions d;
  options->host_capacity_bytes = d.host_capacity_bytes;
  options->host_memory = static_cast<kvtier_host_memory>(d.host_memory);
  options->async_threads = d.async_threads;
  const kvtier::RetrievalOptions& r = d.retrieval;
  options->retrieval = kvtier_retrieval_options{r.enabled ? 1 : 0,
                                                static_cast<kvtier_summary_kind>(r.summary),
                                                r.clusters,
                                                r.top_r,
                                                static_cast<kvtier_index_backend>(r.backend),
                                                r.hnsw_m,
                                                r.hnsw_ef_search,
                                                r.top_k,
                                                r.n_init,
                                                r.n_local,
                                                static_cast<kvtier_selection_scope>(r.scope),
                                                r.device_capacity_bytes,
                                                static_cast<kvtier_replacement>(r.replacement),
                                                r.score_decay,
                                                r.prefetch ? 1 : 0,
                                                r.prefetch_extra,
                                                r.device_blocks_per_layer,
                                                r.force_emulated_device ? 1 : 0,
                                                r.coarse_clusters,
                                                r.shortlist_factor};
  options->sidecar_socket = nullptr;
  options->sidecar_tcp_address = nullptr;
  options->sidecar_token = nullptr;
  options->sidecar_namespace_id = d.sidecar.namespace_id;
  options->sidecar_connect_timeout_ms = d.sidecar.connect_timeout_ms;
  options->sidecar_max_backoff_ms = d.sidecar.max_backoff_ms;
  options->sidecar_staging_blocks = d.sidecar.staging_blocks;
  options->sidecar_request_timeout_ms = d.sidecar.request_timeout_ms;
  options->sidecar_direct_device = d.sidecar.direct_device ? 1 : 0;
}

void kvtier_layout_llama3_8b(kvtier_layout* layout) {
  if (layout == nullptr) return;
  kvtier::ModelLayout l = kvtier::ModelLayout::Llama3_8B();
  *layout = kvtier_layout{l.num_layers,
                          l.num_kv_heads,
                          l.num_query_heads,
                          l.head_dim,
                          static_cast<kvtier_dtype>(l.dtype),
                          l.block_tokens};
}

uint64_t kvtier_layout_block_bytes(const kvtier_layout* layout) {
  return LayoutQuery(layout, [](const kvtier::ModelLayout& l) { return l.BytesPerBlock(); });
}

uint64_t kvtier_layout_token_bytes(const kvtier_layout* layout) {
  return LayoutQuery(layout, [](const kvtier::ModelLayout& l) { return l.BytesPerToken(); });
}

uint64_t kvtier_layout_fingerprint(const kvtier_layout* layout) {
  return LayoutQuery(layout, [](const kvtier::ModelLayout& l) { return l.Fingerprint(); });
}

kvtier_code kvtier_open(const kvtier_options* options, const kvtier_layout* layout,
                        kvtier_store** store) {
  if (store == nullptr) return NullArgument("store out-pointer");
  *store = nullptr;
  if (options == nullptr) return NullArgument("options");
  if (layout == nullptr) return NullArgument("layout");
  return Guard([&]() -> kvtier::Status {
    kvtier::StoreOptions o;
    o.host_capacity_bytes = options->host_capacity_bytes;
    o.host_memory = FromCEnum<kvtier::HostMemoryKind>(options->host_memory);
    o.async_threads = options->async_threads;
    const kvtier_retrieval_options& r = options->retrieval;
    o.retrieval.enabled = r.enabled != 0;
    o.retrieval.summary = FromCEnum<kvtier::SummaryKind>(r.summary);
    o.retrieval.clusters = r.clusters;
    o.retrieval.top_r = r.top_r;
    o.retrieval.backend = FromCEnum<kvtier::IndexBackend>(r.backend);
    o.retrieval.hnsw_m = r.hnsw_m;
    o.retrieval.hnsw_ef_search = r.hnsw_ef_search;
    o.retrieval.top_k = r.top_k;
    o.retrieval.n_init = r.n_init;
    o.retrieval.n_local = r.n_local;
    o.retrieval.scope = FromCEnum<kvtier::SelectionScope>(r.scope);
    o.retrieval.device_capacity_bytes = r.device_capacity_bytes;
    o.retrieval.replacement = FromCEnum<kvtier::ReplacementPolicy>(r.replacement);
    o.retrieval.score_decay = r.score_decay;
    o.retrieval.prefetch = r.prefetch != 0;
    o.retrieval.prefetch_extra = r.prefetch_extra;
    o.retrieval.device_blocks_per_layer = r.device_blocks_per_layer;
    o.retrieval.force_emulated_device = r.force_emulated_device != 0;
    o.retrieval.coarse_clusters = r.coarse_clusters;
    o.retrieval.shortlist_factor = r.shortlist_factor;
    if (options->sidecar_socket != nullptr) o.sidecar.socket = options->sidecar_socket;
    if (options->sidecar_tcp_address != nullptr) {
      o.sidecar.tcp_address = options->sidecar_tcp_address;
    }
    if (options->sidecar_token != nullptr) o.sidecar.token = options->sidecar_token;
    o.sidecar.namespace_id = options->sidecar_namespace_id;
    if (options->sidecar_connect_timeout_ms != 0) {
      o.sidecar.connect_timeout_ms = options->sidecar_connect_timeout_ms;
    }
    if (options->sidecar_max_backoff_ms != 0) {
      o.sidecar.max_backoff_ms = options->sidecar_max_backoff_ms;
    }
    if (options->sidecar_staging_blocks != 0) {
      o.sidecar.staging_blocks = options->sidecar_staging_blocks;
    }
    o.sidecar.request_timeout_ms = options->sidecar_request_timeout_ms;
    o.sidecar.direct_device = options->sidecar_direct_device != 0;
    KVTIER_ASSIGN_OR_RETURN(auto s, kvtier::Store::Open(o, ToLayout(*layout)));
    *store = new kvtier_store{std::move(s)};
    return kvtier::Status::OK();
  });
}

void kvtier_close(kvtier_store* store) { delete store; }

uint64_t kvtier_block_bytes(const kvtier_store* store) {
  return store == nullptr ? 0 : store->store->block_bytes();
}

kvtier_code kvtier_put(kvtier_store* store, const kvtier_block_key* key, const void* data,
                       uint64_t bytes) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  return Guard([&] { return store->store->Put(ToKey(*key), data, bytes); });
}

kvtier_code kvtier_get(kvtier_store* store, const kvtier_block_key* key, void* data,
                       uint64_t bytes) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  return Guard([&] { return store->store->Get(ToKey(*key), data, bytes); });
}

int kvtier_contains(const kvtier_store* store, const kvtier_block_key* key) {
  if (store == nullptr || key == nullptr) return 0;
  return store->store->Contains(ToKey(*key)) ? 1 : 0;
}

kvtier_code kvtier_delete(kvtier_store* store, const kvtier_block_key* key) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  return Guard([&] { return store->store->Delete(ToKey(*key)); });
}

kvtier_code kvtier_drop_sequence(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                                 uint64_t sequence_lo, uint64_t* dropped) {
  if (store == nullptr) return NullArgument("store");
  return Guard([&]() -> kvtier::Status {
    KVTIER_ASSIGN_OR_RETURN(uint64_t n,
                            store->store->DropSequence(namespace_id, {sequence_hi, sequence_lo}));
    if (dropped != nullptr) *dropped = n;
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_stats_get(const kvtier_store* store, kvtier_stats* stats) {
  if (store == nullptr) return NullArgument("store");
  if (stats == nullptr) return NullArgument("stats");
  kvtier::StoreStats s = store->store->Stats();
  *stats = kvtier_stats{s.block_bytes,
                        s.host_capacity_bytes,
                        s.host_slot_bytes,
                        s.host_slots,
                        s.host_blocks,
                        s.host_pinned_slots,
                        static_cast<kvtier_host_memory>(s.host_memory),
                        s.puts,
                        s.gets,
                        s.get_misses,
                        s.deletes,
                        s.dropped_sequences,
                        s.dropped_blocks,
                        s.evictions,
                        s.evictions_lost,
                        s.busy_rejections,
                        s.bytes_put,
                        s.bytes_got,
                        s.indexed_blocks,
                        s.index_memory_bytes,
                        s.selects,
                        s.select_nanos,
                        s.put_waits,
                        s.disk_capacity_bytes,
                        s.disk_used_bytes,
                        s.disk_free_extents,
                        s.disk_blocks,
                        s.dirty_blocks,
                        s.corrupt_blocks,
                        s.disk_writes,
                        s.disk_bytes_written,
                        s.disk_reads,
                        s.disk_bytes_read,
                        s.disk_write_errors,
                        s.disk_read_errors,
                        s.catalog_commits,
                        s.device_capacity_bytes,
                        s.device_slots,
                        s.device_blocks,
                        s.device_emulated ? 1 : 0,
                        s.acquires,
                        s.acquired_blocks,
                        s.device_hits,
                        s.device_fetches_host,
                        s.device_fetches_disk,
                        s.device_bytes_in,
                        s.device_evictions,
                        s.prefetches,
                        s.prefetch_hits,
                        s.acquire_stall_nanos,
                        s.device_direct_blocks};
  return KVTIER_OK;
}

kvtier_code kvtier_put_batch(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                             const void* const* datas, kvtier_code* codes) {
  if (store == nullptr) return NullArgument("store");
  if (n > 0 && (keys == nullptr || datas == nullptr)) return NullArgument("keys or datas");
  return Guard([&] {
    const uint64_t bytes = store->store->block_bytes();
    std::vector<kvtier::BlockWrite> writes(n);
    for (size_t i = 0; i < n; ++i) writes[i] = {ToKey(keys[i]), datas[i], bytes};
    std::vector<kvtier::Status> statuses(n);
    kvtier::Status s = store->store->PutBatch(writes, statuses);
    if (codes != nullptr) {
      for (size_t i = 0; i < n; ++i) codes[i] = static_cast<kvtier_code>(statuses[i].code());
    }
    return s;
  });
}

kvtier_code kvtier_get_batch(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                             void* const* datas, kvtier_code* codes) {
  if (store == nullptr) return NullArgument("store");
  if (n > 0 && (keys == nullptr || datas == nullptr)) return NullArgument("keys or datas");
  return Guard([&] {
    const uint64_t bytes = store->store->block_bytes();
    std::vector<kvtier::BlockRead> reads(n);
    for (size_t i = 0; i < n; ++i) reads[i] = {ToKey(keys[i]), datas[i], bytes};
    std::vector<kvtier::Status> statuses(n);
    kvtier::Status s = store->store->GetBatch(reads, statuses);
    if (codes != nullptr) {
      for (size_t i = 0; i < n; ++i) codes[i] = static_cast<kvtier_code>(statuses[i].code());
    }
    return s;
  });
}

kvtier_code kvtier_borrow(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                          const void** datas, kvtier_code* codes, kvtier_borrowed** borrowed) {
  if (borrowed == nullptr) return NullArgument("borrowed out-pointer");
  *borrowed = nullptr;
  if (store == nullptr) return NullArgument("store");
  if (n > 0 && (keys == nullptr || datas == nullptr)) return NullArgument("keys or datas");
  return Guard([&]() -> kvtier::Status {
    std::vector<kvtier::BlockKey> k(n);
    for (size_t i = 0; i < n; ++i) k[i] = ToKey(keys[i]);
    std::vector<kvtier::Status> statuses(n);
    auto loan = std::make_unique<kvtier_borrowed>();
    kvtier::Status s = store->store->Borrow(k, statuses, &loan->blocks);
    const kvtier::BorrowedBlocks* blocks = loan->blocks.get();
    if (blocks != nullptr && blocks->size() != n) {
      return kvtier::Status::Internal("Borrow lent " + std::to_string(blocks->size()) +
                                      " blocks for " + std::to_string(n) + " keys");
    }
    std::vector<kvtier_code> member_codes(n);
    MemberCodes(statuses, s, member_codes.data());
    for (size_t i = 0; i < n; ++i) {
      const void* data = nullptr;
      if (member_codes[i] == KVTIER_OK) {
        if (blocks != nullptr && !blocks->block(i).empty()) {
          data = blocks->block(i).data();
        } else {  // never NULL data with KVTIER_OK (a broken Borrow)
          if (s.ok()) s = kvtier::Status::Internal("Borrow lent no bytes for a block it found");
          member_codes[i] = static_cast<kvtier_code>(s.code());
        }
      }
      datas[i] = data;
      if (codes != nullptr) codes[i] = member_codes[i];
    }
    if (blocks != nullptr) *borrowed = loan.release();
    return s;
  });
}

void kvtier_borrowed_release(kvtier_borrowed* borrowed) { delete borrowed; }

kvtier_code kvtier_reserve(kvtier_store* store, size_t n, void** datas,
                           kvtier_put_buffers** buffers) {
  if (buffers == nullptr) return NullArgument("buffers out-pointer");
  *buffers = nullptr;
  if (store == nullptr) return NullArgument("store");
  if (n > 0 && datas == nullptr) return NullArgument("datas");
  return Guard([&]() -> kvtier::Status {
    auto loan = std::make_unique<kvtier_put_buffers>();
    KVTIER_ASSIGN_OR_RETURN(loan->buffers, store->store->Reserve(n));
    if (loan->buffers == nullptr || loan->buffers->size() != n) {
      return kvtier::Status::Internal("Reserve lent a wrong number of buffers for " +
                                      std::to_string(n));
    }
    for (size_t i = 0; i < n; ++i) datas[i] = loan->buffers->buffer(i).data();
    *buffers = loan.release();
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_commit(kvtier_put_buffers* buffers, const kvtier_block_key* keys,
                          kvtier_code* codes) {
  if (buffers == nullptr) return NullArgument("buffers");
  if (keys == nullptr) return NullArgument("keys");
  return Guard([&] {
    const size_t n = buffers->buffers->size();
    std::vector<kvtier::BlockKey> k(n);
    for (size_t i = 0; i < n; ++i) k[i] = ToKey(keys[i]);
    std::vector<kvtier::Status> statuses(n);
    kvtier::Status s = buffers->buffers->Commit(k, statuses);
    if (codes != nullptr) MemberCodes(statuses, s, codes);
    return s;
  });
}

void kvtier_put_buffers_release(kvtier_put_buffers* buffers) { delete buffers; }

kvtier_code kvtier_put_async(kvtier_store* store, const kvtier_block_key* key, const void* data,
                             uint64_t bytes, kvtier_completion done, void* user_data) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  if (done == nullptr) return NullArgument("completion");
  return Guard([&] {
    store->store->PutAsync(ToKey(*key), data, bytes, ToCompletion(done, user_data));
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_get_async(kvtier_store* store, const kvtier_block_key* key, void* data,
                             uint64_t bytes, kvtier_completion done, void* user_data) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  if (done == nullptr) return NullArgument("completion");
  return Guard([&] {
    store->store->GetAsync(ToKey(*key), data, bytes, ToCompletion(done, user_data));
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_select(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                          uint64_t sequence_lo, uint32_t layer, const float* queries,
                          size_t n_queries, uint64_t context_tokens, int64_t* selected,
                          size_t n_selected, float* scores, kvtier_select_info* info) {
  if (store == nullptr) return NullArgument("store");
  if (queries == nullptr && n_queries > 0) return NullArgument("queries");
  if (selected == nullptr && n_selected > 0) return NullArgument("selected");
  return Guard([&]() -> kvtier::Status {
    KVTIER_ASSIGN_OR_RETURN(
        kvtier::SelectInfo i,
        store->store->Select(
            namespace_id, {sequence_hi, sequence_lo}, layer,
            std::span<const float>(queries, n_queries), context_tokens,
            std::span<int64_t>(selected, n_selected),
            scores != nullptr ? std::span<float>(scores, n_selected) : std::span<float>()));
    if (info != nullptr) {
      *info = kvtier_select_info{i.sink_blocks, i.local_begin, i.local_end, i.selected};
    }
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_sidecar_status_get(const kvtier_store* store, kvtier_sidecar_status* status) {
  if (store == nullptr) return NullArgument("store");
  if (status == nullptr) return NullArgument("status");
  std::optional<kvtier::SidecarStatus> s = kvtier::GetSidecarStatus(*store->store);
  if (!s.has_value()) {
    return Report(kvtier::Status::NotSupported("an embedded store has no sidecar connection"));
  }
  *status = kvtier_sidecar_status{s->connected ? 1 : 0, s->reconnects};
  return KVTIER_OK;
}

kvtier_code kvtier_acquire(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                           uint64_t sequence_lo, uint32_t layer, const int64_t* blocks,
                           size_t n_blocks, void* stream, uint64_t* device_addresses,
                           const float* scores, kvtier_acquire_info* info) {
  if (store == nullptr) return NullArgument("store");
  if (info == nullptr) return NullArgument("info (its lease is the only handle to release)");
  if (n_blocks > 0 && (blocks == nullptr || device_addresses == nullptr)) {
    return NullArgument("blocks or device_addresses");
  }
  return Guard([&]() -> kvtier::Status {
    KVTIER_ASSIGN_OR_RETURN(
        kvtier::AcquireInfo i,
        store->store->Acquire(namespace_id, {sequence_hi, sequence_lo}, layer,
                              std::span<const int64_t>(blocks, n_blocks),
                              static_cast<CUstream_st*>(stream),
                              std::span<uint64_t>(device_addresses, n_blocks),
                              scores != nullptr ? std::span<const float>(scores, n_blocks)
                                                : std::span<const float>()));
    *info = kvtier_acquire_info{i.lease, i.hits, i.from_host, i.from_disk, i.stall_nanos};
    return kvtier::Status::OK();
  });
}

kvtier_code kvtier_release(kvtier_store* store, uint64_t lease) {
  if (store == nullptr) return NullArgument("store");
  return Guard([&] { return store->store->Release(lease); });
}

kvtier_code kvtier_index_block(kvtier_store* store, const kvtier_block_key* key, const void* data,
                               uint64_t bytes, uint32_t valid_tokens, const float* token_scores,
                               size_t n_scores) {
  if (store == nullptr) return NullArgument("store");
  if (key == nullptr) return NullArgument("key");
  if (token_scores == nullptr && n_scores > 0) return NullArgument("token_scores");
  return Guard([&] {
    return store->store->IndexBlock(ToKey(*key), data, bytes, valid_tokens,
                                    std::span<const float>(token_scores, n_scores));
  });
}

}  // extern "C"
