// `kvtier-bench verify`: how fast `kvtier verify` reads a store, against the disk tier's
// own read rate, in one run on the same store.
//
// One store of --gib of Llama-3-8B blocks (512 KiB) is written once (PutBatch, Flush,
// closed). Then, --reps times, two sides, alternating which goes first, the page cache
// dropped before each (when root):
//   store    the disk tier's read path: a reopened Store (empty host tier) reads every
//            block once with GetBatchAsync of --io-depth blocks, two batches in flight
//            (as `kvtier-bench disk` reads), each a promotion from disk, checksum
//            verified;
//   verify   verify's read path: tools/StoreReader opened read-only, ReadBlocks over
//            every catalog entry (io_uring, O_DIRECT, --io-depth reads in flight), each
//            block's XXH3 checksummed, as `kvtier verify` does.
// Both read the blocks in the same order (key order). Reported: GB/s per side (median,
// min, max) and the ratio verify / store of the medians; the target is >= 0.8.
//
// Output: a table, or with --json one JSON object on one line.
#ifndef KVTIER_BENCH_VERIFY_BENCH_H_
#define KVTIER_BENCH_VERIFY_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

// Registers the subcommand; when it runs, its exit status lands in *exit_code (0 =
// measured and every block read clean on both sides; 1 = a block failed; 2 = could not
// run). Missing the target is not a failure: the output says so.
void AddVerifyBenchCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_VERIFY_BENCH_H_
