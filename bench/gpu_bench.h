// `kvtier-bench gpu`: the device (GPU) tier's copies against the link's practical peak.
//
// Transfer: host->device and device->host GB/s of batches of full-size blocks
// (Llama-3-8B, 512 KiB; 256 blocks = 128 MiB per batch by default) through the
// CopyEngine, between pinned host slots (a HostPool of cudaHostAlloc memory, the host
// tier as it is with a GPU) and the DevicePool's slots in a shuffled order (scattered, as
// a block table's are), against one cudaMemcpy of the same total bytes between the same
// pinned host region and the same device memory, contiguous: the practical peak of the
// link. A batched copy is timed from the copy call until its CopyEvent has completed.
// One warm-up repetition, then `reps` timed ones; medians, and batched / peak ratios.
// Every block copied back from the device in the warm-up and the last repetition is
// compared with what was sent (untimed).
//
// Without a GPU (or in a build without CUDA) it says so and exits 0, measuring nothing;
// with --json that message is a JSON object with "gpu": false.
//
// Scoring: the block-scoring and top-k kernels at 128K and 1M tokens against the
// bandwidth bound (reading the representatives once at the measured device copy
// bandwidth).
//
// Estimator: the kGpu index's Select (index/gpu_index.cc) at 1M tokens of Llama-3-8B
// (8192 blocks of 128 tokens, 8 KV heads, 32 query heads, head dim 128, 3 cluster rows per
// KV head, top-16): the device time of EstimateBlockMass + TopKBlocks + GatherBlockScores
// (events), the wall-clock time of a whole Select (median and p90), and the bandwidth
// bound beside them; target on an H100: <= 20 us per layer. The kernels are checked
// against their CPU references and the Select against the emulated index.
//
// Output: a table, or with --json one JSON object on one line (the last stdout line).
// The file is organised as a list of measurements (transfer, scoring, estimator), each
// adding its rows to the table and its fields to the JSON.
#ifndef KVTIER_BENCH_GPU_BENCH_H_
#define KVTIER_BENCH_GPU_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

// Registers the subcommand; when it runs, its exit status lands in *exit_code
// (0 = measured, and every block copied back was byte-exact and every kernel result
// matched its reference, or no GPU to measure; 1 = a block copied back or a result was
// wrong; 2 = could not run).
void AddGpuCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_GPU_BENCH_H_
