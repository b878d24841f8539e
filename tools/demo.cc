#include "tools/demo.h"

#include <memory>

#include "tools/tool_util.h"

namespace kvtier::tools {

void AddDemoCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<DemoConfig>();
  CLI::App* cmd = app.add_subcommand(
      "demo",
      "Decode loop over a long synthetic context: prefill into the tiered store, then "
      "Select -> Acquire -> attention -> Release per step and layer, quality against exact "
      "attention");
  cmd->footer(
      "Default: 128K tokens of Llama-3-8B (16 GiB of KV) through a 4 GiB host tier, the disk "
      "tier and a 2 GiB GPU tier\n(emulated in host memory without a GPU), 8 needles, 8 steps, "
      "quality on 2 layers. About 2-4 minutes on 2 cores (4 min of CPU).\nEach evaluated (layer, "
      "step) keeps an "
      "oracle of head_dim + 2 doubles per block "
      "and query head\n(1M tokens of Llama-3-8B: 270 MB each); generating the context costs "
      "about 6 ms of CPU per 512 KiB block.\nExamples: kvtier demo --tokens "
      "32768 --steps 4     kvtier demo --verify-only --tokens 65536 --host-gib 2\n");
  cmd->add_option("--tokens", config->tokens, "Context length, tokens")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 20));
  cmd->add_option("--steps", config->steps, "Decoding steps")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  cmd->add_option("--needles", config->needles, "Needles planted at random depths (each layer)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 4096u));
  cmd->add_option("--eval-layers", config->eval_layers,
                  "Layers (evenly spaced) whose quality the exact oracle judges")
      ->capture_default_str();
  cmd->add_option("--host-gib", config->host_gib, "Host tier capacity, GiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--device-gib", config->device_gib,
                  "GPU tier capacity, GiB (host memory when there is no GPU)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  AddRetrievalFlags(cmd, &config->retrieval);
  cmd->add_option("--trace-out", config->trace_out,
                  "Record the access trace (per step and layer, the blocks acquired) for "
                  "`kvtier replay`");
  cmd->add_option("--dir", config->dir,
                  "Store directory (kept); default: a temporary one under /var/tmp, removed");
  cmd->add_flag("--keep", config->keep, "Keep the temporary store directory");
  cmd->add_option("--layers", config->layout.num_layers, "Model layers")->capture_default_str();
  cmd->add_option("--kv-heads", config->layout.num_kv_heads, "KV heads")->capture_default_str();
  cmd->add_option("--query-heads", config->layout.num_query_heads, "Query heads")
      ->capture_default_str();
  cmd->add_option("--head-dim", config->layout.head_dim, "Head dimension")->capture_default_str();
  cmd->add_option("--dtype", config->dtype, "f16, bf16, f32 or fp8-e4m3")->capture_default_str();
  cmd->add_option("--block-tokens", config->layout.block_tokens, "Tokens per block")
      ->capture_default_str();
  cmd->add_option("--seed", config->seed, "Seed of the synthetic data")->capture_default_str();
  cmd->add_flag("--json", config->json, "Print one JSON object instead of the tables");
  cmd->add_flag("--verify-only", config->verify_only,
                "The ingest / read back / verify-every-byte demo instead of the decode loop");
  cmd->add_option("--sequences", config->sequences, "Number of sequences (--verify-only)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 20));
  cmd->add_flag("--memory-only", config->memory_only,
                "No disk tier: blocks evicted from the host tier are lost (--verify-only)");
  cmd->callback([config, exit_code] {
    *exit_code = config->verify_only ? RunVerifyDemo(*config) : RunDecodeDemo(*config);
  });
}

}  // namespace kvtier::tools
