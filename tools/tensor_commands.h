// The `kvtier` commands that move tensors in and out of the retrieval path (besides
// `eval`, tools/eval.h, and `replay`, tools/replay.h):
//
//   kvtier import DIR     a sequence's keys and values from .npy into a store, created
//                         when DIR does not exist (import.cc)
//   kvtier explain DIR    one decoding step of one layer: the index's ranking, what was
//                         selected, the sinks and window, and each block's true attention
//                         mass from the stored keys (explain.cc)
//   kvtier plot JSON      PNG figures from the JSON of eval, replay and kvtier-bench
//                         (plot.cc, drawn by tools/plot.py with matplotlib)
//
// Each takes --json (one JSON document on stdout) and exits 0 = fine, 1 = a problem was
// found (a damaged store), 2 = a usage or I/O error, as the inspection commands do
// (tools/inspect.h).
#ifndef KVTIER_TOOLS_TENSOR_COMMANDS_H_
#define KVTIER_TOOLS_TENSOR_COMMANDS_H_

#include <CLI/CLI.hpp>
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvtier/retrieval.h"
#include "kvtier/status.h"

namespace kvtier::tools {

// Each registers its subcommand; when it runs, its exit status lands in *exit_code.
void AddImportCommand(CLI::App& app, int* exit_code);
void AddExplainCommand(CLI::App& app, int* exit_code);
void AddPlotCommand(CLI::App& app, int* exit_code);

// The kind and rows per KV head of a summary as the catalog stores it (index/summary.h's
// encoding), so a tool matches the store's retrieval options. Corruption when the bytes
// are not a summary header.
Status PeekStoredSummary(std::span<const std::byte> bytes, SummaryKind* kind, uint32_t* rows);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_TENSOR_COMMANDS_H_
