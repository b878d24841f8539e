#include "tools/sparse_attention.h"

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/decode_attention.h"

namespace kvtier::tools {

Result<std::unique_ptr<SparseAttention>> SparseAttention::Create(const ModelLayout& layout,
                                                                 bool on_gpu, uint32_t max_entries,
                                                                 uint32_t cpu_threads) {
  if (max_entries == 0) return Status::InvalidArgument("SparseAttention: no entries");
  cpu_threads = std::max(1u, cpu_threads);
  std::unique_ptr<SparseAttention> a(new SparseAttention(layout, on_gpu, max_entries, cpu_threads));
  a->part_out_.resize(uint64_t{cpu_threads} * layout.num_query_heads * layout.head_dim);
  a->part_lse_.resize(uint64_t{cpu_threads} * layout.num_query_heads);
  if (on_gpu) {
    const uint64_t q_bytes = uint64_t{layout.num_query_heads} * layout.head_dim * sizeof(float);
    void* p = nullptr;
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(q_bytes, &p));
    a->d_queries_ = static_cast<float*>(p);
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{max_entries} * sizeof(void*), &p));
    a->d_table_ = static_cast<void**>(p);
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{max_entries} * sizeof(uint32_t), &p));
    a->d_valid_ = static_cast<uint32_t*>(p);
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(q_bytes, &p));
    a->d_out_ = static_cast<float*>(p);
    a->workspace_bytes_ =
        DecodeAttentionWorkspaceBytes(layout.num_query_heads, layout.head_dim, max_entries);
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(a->workspace_bytes_, &a->d_workspace_));
    KVTIER_ASSIGN_OR_RETURN(a->done_, cuda::Event::Create());
  }
  return a;
}

SparseAttention::~SparseAttention() {
  for (void* p : {static_cast<void*>(d_queries_), static_cast<void*>(d_table_),
                  static_cast<void*>(d_valid_), static_cast<void*>(d_out_), d_workspace_}) {
    if (p != nullptr) (void)cuda::DeviceFree(p);
  }
}

Status SparseAttention::Run(std::span<const float> queries, std::span<const uint64_t> addresses,
                            std::span<const uint32_t> valid_tokens, std::span<float> out,
                            StreamHandle stream) {
  const uint32_t hq = layout_.num_query_heads, hkv = layout_.num_kv_heads, d = layout_.head_dim;
  const uint64_t q_floats = uint64_t{hq} * d;
  if (queries.size() != q_floats || out.size() != q_floats ||
      addresses.size() != valid_tokens.size() || addresses.empty() ||
      addresses.size() > max_entries_) {
    return Status::InvalidArgument("SparseAttention: " + std::to_string(addresses.size()) +
                                   " entries (at most " + std::to_string(max_entries_) +
                                   ") or buffer sizes that do not fit the layout");
  }
  const uint32_t n = static_cast<uint32_t>(addresses.size());
  static_assert(sizeof(uint64_t) == sizeof(void*));
  const void* const* table = reinterpret_cast<const void* const*>(addresses.data());
  if (!on_gpu_) return RunOnCpu(queries, table, valid_tokens, out);
  KVTIER_RETURN_IF_ERROR(
      cuda::MemcpyAsync(d_queries_, queries.data(), q_floats * sizeof(float), stream));
  KVTIER_RETURN_IF_ERROR(cuda::MemcpyAsync(d_table_, table, n * sizeof(void*), stream));
  KVTIER_RETURN_IF_ERROR(
      cuda::MemcpyAsync(d_valid_, valid_tokens.data(), n * sizeof(uint32_t), stream));
  KVTIER_RETURN_IF_ERROR(LaunchDecodeAttention(
      d_queries_, hq, hkv, d, d_table_, d_valid_, n, layout_.block_tokens, layout_.dtype, 0.0f,
      d_out_, nullptr, nullptr, d_workspace_, workspace_bytes_, stream));
  KVTIER_RETURN_IF_ERROR(cuda::MemcpyAsync(out.data(), d_out_, q_floats * sizeof(float), stream));
  // `out` is pageable: wait for the stream to pass the copy.
  KVTIER_RETURN_IF_ERROR(done_.Record(stream));
  return done_.Synchronize();
}

Status SparseAttention::RunOnCpu(std::span<const float> queries, const void* const* table,
                                 std::span<const uint32_t> valid_tokens, std::span<float> out) {
  const uint32_t hq = layout_.num_query_heads, hkv = layout_.num_kv_heads, d = layout_.head_dim;
  const uint32_t n = static_cast<uint32_t>(valid_tokens.size());
  const uint32_t parts = std::min(cpu_threads_, n);
  if (parts == 1) {
    return DecodeAttentionRef(queries.data(), hq, hkv, d, table, valid_tokens.data(), n,
                              layout_.block_tokens, layout_.dtype, 0.0f, out.data(), nullptr,
                              nullptr, nullptr, 0, nullptr);
  }
  // Part p attends entries [p * n / parts, (p + 1) * n / parts); part 0 on this thread.
  std::vector<Status> statuses(parts);
  auto run_part = [&](uint32_t p) {
    const uint32_t begin = p * n / parts, end = (p + 1) * n / parts;
    statuses[p] = DecodeAttentionRef(queries.data(), hq, hkv, d, table + begin,
                                     valid_tokens.data() + begin, end - begin, layout_.block_tokens,
                                     layout_.dtype, 0.0f, &part_out_[uint64_t{p} * hq * d],
                                     &part_lse_[uint64_t{p} * hq], nullptr, nullptr, 0, nullptr);
  };
  std::vector<std::thread> helpers;
  for (uint32_t p = 1; p < parts; ++p) helpers.emplace_back(run_part, p);
  run_part(0);
  for (std::thread& t : helpers) t.join();
  for (const Status& s : statuses) KVTIER_RETURN_IF_ERROR(s);
  std::vector<float> lse(hq);
  return MergeAttentionStatesRef(part_out_.data(), part_lse_.data(), parts, hq, d, out.data(),
                                 lse.data(), nullptr);
}

}  // namespace kvtier::tools
