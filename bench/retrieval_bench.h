// `kvtier-bench retrieval`: the retrieval index measured against the attention oracle.
//
// Quality. A structured synthetic context (bench/workload: RoPE, sinks, outlier
// channels, topic spans, drifting queries, planted needles) of a Llama-3-8B layer is
// generated block by block; every block is summarised once per summary kind, fed to one
// AttentionOracle per decoding step (the exact full attention, double precision), and
// each formulation selects top_k blocks per step under InfLLM's budget (n_init sink
// tokens, n_local window, top_k blocks). Per formulation: mean block recall@k against the
// oracle's top-k (sinks and window excluded), attention-mass coverage of the attended
// set, relative L2 error of the sparse attention output, needle hit rate, bytes of
// summary per block, and the Select time per layer on one core (median over steps and
// layers). The formulations: kvtier's estimator over clusters (3, the default, 4 and 2 per KV
// head), the mean key, Quest's min/max and the top-R keys by norm, each on the scan backend, the
// default also on FAISS flat and HNSW; and InfLLM's own FAISS formulation (concatenated
// per-head means, IndexFlatIP) over the mean key and over top-R keys chosen by the
// attention they receive from the step-0 queries (InfLLM's scores; this gives InfLLM the
// first step's queries in advance, a favourable baseline).
//
// Contexts: --tokens (default 32768,131072); needles only (no oracle) at --needle-tokens
// (default 1048576) where the oracle would take too long.
//
// Output: a table per context, then with --json one JSON object on the last line.
#ifndef KVTIER_BENCH_RETRIEVAL_BENCH_H_
#define KVTIER_BENCH_RETRIEVAL_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

// Registers the subcommand; exit status in *exit_code (0 = measured and every target
// met, 1 = measured but a target missed, 2 = could not run).
void AddRetrievalCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_RETRIEVAL_BENCH_H_
