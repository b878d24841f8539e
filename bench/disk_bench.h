// `kvtier-bench disk`: the disk (cold) tier against fio and RocksDB, in one run.
//
// Write (demotion) and read (promotion) GB/s of full-size blocks (Llama-3-8B, 512 KiB)
// through the store, checksums on, against two baselines on the same file system:
//   fio        ioengine=io_uring, direct=1, the same block size and queue depth,
//              registered files and buffers (sequential write of a new file with
//              end_fsync=1, then random read of it). Its buffers are in huge pages when
//              root can reserve them, as the store's host tier is (on a virtual disk a
//              buffer of 4 KiB pages costs a descriptor per page, which shows); fio with
//              its default buffers is run and reported besides ("fio-4k").
//   RocksDB    the same blocks as values, blob files enabled, no compression.
// The store has a small host tier, so nearly every block is demoted; its write phase is
// PutBatch of every block then Flush (everything durable), its read phase a reopened
// store (empty host tier) reading every block once in random order with GetBatch of
// `io_depth` blocks, `read_batches` of them in flight (GetBatchAsync when more than
// one), each block a promotion from disk with its checksum verified. RocksDB's write
// phase ends with a flush of its memtables (durable), its read phase reads every block
// once, in the same random order, with MultiGet of `io_depth` keys. The page cache is
// dropped before every read phase (when root). The sides alternate (a different one
// goes first in each repetition) and medians are reported. Every block the store and
// RocksDB read back is compared with what was written (untimed, except between
// asynchronous batches in flight, where it overlaps the reads and is counted).
//
// Output: a table, or with --json one JSON object on one line (the last stdout line).
#ifndef KVTIER_BENCH_DISK_BENCH_H_
#define KVTIER_BENCH_DISK_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

// Registers the subcommand; when it runs, its exit status lands in *exit_code
// (0 = measured, and every block read back was byte-exact; 1 = a block read back was
// wrong; 2 = could not run). A missing fio skips that side (its numbers are null), it
// does not fail. Missing a performance target is not a failure: the JSON says so in
// `targets_met`.
void AddDiskCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_DISK_BENCH_H_
