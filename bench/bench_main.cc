// kvtier-bench: kvtier's benchmarks. One subcommand per tier or feature, one file each
// (host_bench.cc, disk_bench.cc, ...), each registering itself on the CLI11 app.
#include <CLI/CLI.hpp>

#include "bench/disk_bench.h"
#include "bench/gpu_bench.h"
#include "bench/host_bench.h"
#include "bench/retrieval_bench.h"
#include "bench/sidecar_bench.h"
#include "bench/verify_bench.h"

int main(int argc, char** argv) {
  CLI::App app{"kvtier-bench: kvtier's benchmarks, one subcommand per tier"};
  app.require_subcommand(1);
  int exit_code = 0;
  kvtier::bench::AddHostCommand(app, &exit_code);
  kvtier::bench::AddDiskCommand(app, &exit_code);
  kvtier::bench::AddGpuCommand(app, &exit_code);
  kvtier::bench::AddRetrievalCommand(app, &exit_code);
  kvtier::bench::AddVerifyBenchCommand(app, &exit_code);
  kvtier::bench::AddSidecarCommand(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return exit_code;
}
