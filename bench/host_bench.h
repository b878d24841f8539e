// `kvtier-bench host`: the host (warm) tier against plain memcpy, in one run.
//
// Throughput: Put, PutBatch, Get and GetBatch of full-size blocks (Llama-3-8B, 512 KiB)
// against memcpy of the same bytes between the same kind of buffers. The store's
// host tier and the memcpy baseline's destination region are equally large (the tier's
// capacity) and allocated the same way; both sides read from (Put) or write to (Get)
// the same caller buffers; every timed phase starts with the caches scrubbed; the
// sides alternate within each repetition and the medians over repetitions are reported.
//
// Per-operation overhead: Put and Get of small blocks (a one-layer, one-head layout),
// time per store operation minus time per memcpy of the same size, in microseconds.
// Puts write new keys into a full tier, so each one also evicts (the steady state of a
// cache); Gets read resident blocks.
//
// Output: a table, or with --json one JSON object on one line (the last stdout line).
#ifndef KVTIER_BENCH_HOST_BENCH_H_
#define KVTIER_BENCH_HOST_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

// Registers the subcommand; when it runs, its exit status lands in *exit_code
// (0 = measured, and every block read back was byte-exact; 1 = a block read back was
// wrong; 2 = could not run). Missing a performance target is not a failure: the JSON
// says so in `targets_met`.
void AddHostCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_HOST_BENCH_H_
