// `kvtier demo`: the main job, an engine's decode loop over a long context.
//
// Default: a 128K-token Llama-3-8B context (16 GiB of KV in bf16) from bench/workload's
// synthetic generator, with needles planted at random depths. Prefill: one PutBatch per
// 128-token chunk across all layers, as an engine's prefill would, into a store whose
// host tier (4 GiB) is smaller than the context, so most blocks live on the disk tier;
// the next chunks are generated on worker threads while the store ingests. Then `steps`
// decoding steps; per step and layer: Store::Select (sinks, local window and the top-k
// blocks by the retrieval index) -> Store::Acquire (into the GPU tier, emulated in host
// memory without a GPU) -> sparse decode attention over the acquired blocks
// (DecodeAttentionRef on the CPU, LaunchDecodeAttention on a GPU) -> Store::Release.
// Quality (recall@k, coverage, output error against full attention, needles attended)
// is judged on a few evenly spaced layers by bench/workload's exact attention oracle,
// fed from the generator, not from the store; the attention the loop computed from the
// acquired blocks must agree with the oracle's, which checks the whole fetch path.
//
// `--verify-only`: the earlier demo: ingest, read every block back, verify every byte.
//
// Exit status: 0 when every needle planted in an evaluated (layer, step) was attended
// and nothing failed (for --verify-only: every block verified), 1 otherwise, 2 when it
// could not run.
#ifndef KVTIER_TOOLS_DEMO_H_
#define KVTIER_TOOLS_DEMO_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

#include "kvtier/layout.h"
#include "kvtier/retrieval.h"

namespace kvtier::tools {

struct DemoConfig {
  ModelLayout layout = ModelLayout::Llama3_8B();
  std::string dtype = "bf16";
  uint64_t tokens = 131072;
  double host_gib = 4.0;
  std::string dir;  // store directory; empty: a temporary one, removed at the end
  bool keep = false;
  uint64_t seed = 1;
  bool json = false;

  // Decode loop.
  uint32_t steps = 8;
  uint32_t needles = 8;
  uint32_t eval_layers = 2;
  double device_gib = 2.0;
  RetrievalOptions retrieval;  // enabled by the demo; the flags set the rest
  std::string trace_out;       // non-empty: record the access trace there (tools/trace.h)

  // --verify-only.
  bool verify_only = false;
  bool memory_only = false;
  uint32_t sequences = 1;
};

// Registers the subcommand; when it runs, its exit status lands in *exit_code.
void AddDemoCommand(CLI::App& app, int* exit_code);

// The two modes (exit status as above).
int RunDecodeDemo(const DemoConfig& config);
int RunVerifyDemo(const DemoConfig& config);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_DEMO_H_
