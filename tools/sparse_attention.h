// SparseAttention: one decoding step's attention over the blocks Store::Acquire put in
// the GPU tier, for `kvtier demo`. With the GPU tier emulated in host memory the block
// addresses are host pointers and DecodeAttentionRef runs on the CPU, the table split
// between the cores and the parts' results merged (MergeAttentionStatesRef: the split-K
// of flash-decoding); with a real GPU
// they are device pointers and LaunchDecodeAttention runs on the Acquire's stream (the
// queries, the block table and the valid counts are copied in, the output back).
//
// Thread safety: one thread's object.
#ifndef KVTIER_TOOLS_SPARSE_ATTENTION_H_
#define KVTIER_TOOLS_SPARSE_ATTENTION_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier::tools {

class SparseAttention {
 public:
  // `on_gpu`: the addresses passed to Run are device memory. `max_entries`: the most
  // blocks one Run attends. `cpu_threads`: the CPU path's parallelism (at least 1).
  static Result<std::unique_ptr<SparseAttention>> Create(const ModelLayout& layout, bool on_gpu,
                                                         uint32_t max_entries,
                                                         uint32_t cpu_threads);
  ~SparseAttention();
  SparseAttention(const SparseAttention&) = delete;
  SparseAttention& operator=(const SparseAttention&) = delete;

  // Attention of `queries` (float [num_query_heads][head_dim], host) over the blocks at
  // `addresses` (their first valid_tokens[i] tokens each) into `out` (float
  // [num_query_heads][head_dim], host). On a GPU it runs on `stream` and returns once
  // `out` is written.
  Status Run(std::span<const float> queries, std::span<const uint64_t> addresses,
             std::span<const uint32_t> valid_tokens, std::span<float> out, StreamHandle stream);

 private:
  SparseAttention(const ModelLayout& layout, bool on_gpu, uint32_t max_entries,
                  uint32_t cpu_threads)
      : layout_(layout), on_gpu_(on_gpu), max_entries_(max_entries), cpu_threads_(cpu_threads) {}
  Status RunOnCpu(std::span<const float> queries, const void* const* table,
                  std::span<const uint32_t> valid_tokens, std::span<float> out);

  const ModelLayout layout_;
  const bool on_gpu_;
  const uint32_t max_entries_;
  const uint32_t cpu_threads_;
  // CPU: each part's output and lse, [parts][query_heads][head_dim] and [parts][query_heads].
  std::vector<float> part_out_, part_lse_;
  // Device buffers (on_gpu_ only).
  float* d_queries_ = nullptr;
  void** d_table_ = nullptr;
  uint32_t* d_valid_ = nullptr;
  float* d_out_ = nullptr;
  void* d_workspace_ = nullptr;
  uint64_t workspace_bytes_ = 0;
  cuda::Event done_;
};

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_SPARSE_ATTENTION_H_
