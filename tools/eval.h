// `kvtier eval`: how well the store's retrieval picks the blocks attention needs, on a
// KV cache and decoding queries given as .npy files (dumped from a real model, or from
// bench/workload).
//
// Inputs: --keys and --values float16 or float32 (both the same) of shape
// [layers, tokens, kv_heads, head_dim], post-rotary as the engine caches them; --queries
// float16 or float32 [layers, steps, query_heads, head_dim]: the queries of `steps`
// decoding steps, each attending all `tokens` tokens.
//
// What it does, layer by layer (so the store and the oracles hold one layer at a time):
// opens a memory-only Store with retrieval enabled and the layout of the input (its
// dtype, --block-tokens), Puts the layer's blocks in kvtier's block format (the last one
// zero-padded and re-indexed with IndexBlock and its valid tokens, so padding is not
// summarised), then for each step calls Store::Select with context_tokens = tokens and
// judges the selection against bench/workload/oracle.h's exact attention: recall@k,
// coverage, output rel L2 (definitions there). Each layer is stored under a sequence of
// its own and dropped once evaluated.
//
// Cost: the oracle is exact attention in double precision, about 2 ns per token x query
// head x head_dim x step on one core (128K tokens, 32 query heads, head dim 128, 8 steps:
// about 9 s per layer), spread over the machine's cores; the store holds one layer (128K
// tokens of Llama-3-8B in f16: 256 MiB) and the input layer is read whole.
//
// Output: a table (means per layer and overall, median Select time), or with --json one
// JSON object, fields in this order: tokens, layers, steps, kv_heads, query_heads,
// head_dim, block_tokens, blocks, dtype, summary, backend, scope, top_k, n_init, n_local,
// sink_blocks, local_begin, recall, coverage, coverage_min_head, output_rel_l2,
// select_us_median, select_us_mean, ingest_s, oracle_s, wall_s, per_layer: [{layer,
// recall, coverage, output_rel_l2, select_us_median, recall_steps, coverage_steps,
// output_rel_l2_steps, select_us_steps}]. --selection-out writes the selections as int32
// [layers, steps, top_k] (--scope kv-head: [layers, steps, kv_heads, top_k]), best
// first, -1 padded: the retrieved blocks only (sinks and the window are implied).
//
// Exit status: 0 when it ran, 2 for a usage or input error (missing file, wrong shapes
// or dtype, options the store rejects), with the reason on stderr.
#ifndef KVTIER_TOOLS_EVAL_H_
#define KVTIER_TOOLS_EVAL_H_

#include <CLI/CLI.hpp>

namespace kvtier::tools {

// Registers the subcommand; when it runs, its exit status lands in *exit_code.
void AddEvalCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_EVAL_H_
