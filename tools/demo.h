// `kvtier demo`: the main job. Ingests a synthetic context for a model layout
// (Llama-3-8B by default) through the store, one 32-layer batch per 128-token chunk as
// an engine's prefill would, reads every block back, verifies every byte, and prints
// what it measured.
#ifndef KVTIER_TOOLS_DEMO_H_
#define KVTIER_TOOLS_DEMO_H_

#include <CLI/CLI.hpp>

namespace kvtier::tools {

// Registers the subcommand; when it runs, its exit status lands in *exit_code
// (0 = every block verified, 1 = a block was wrong or missing, 2 = could not run).
void AddDemoCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_DEMO_H_
