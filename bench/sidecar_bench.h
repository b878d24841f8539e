// `kvtier-bench sidecar`: kvtierd's request round trip and pipelined throughput, each
// against a peer measured in the same run: a raw Unix-socket ping-pong between two
// processes (the floor of any request over a socket) and redis-server answering
// pipelined GETs over its Unix socket.
#ifndef KVTIER_BENCH_SIDECAR_BENCH_H_
#define KVTIER_BENCH_SIDECAR_BENCH_H_

#include <CLI/CLI.hpp>

namespace kvtier::bench {

void AddSidecarCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_SIDECAR_BENCH_H_
