// kvtier-bench: kvtier's benchmarks. One subcommand per tier or feature, one file each
// (host_bench.cc, ...), each registering itself on the CLI11 app.
#include <CLI/CLI.hpp>

#include "bench/host_bench.h"

int main(int argc, char** argv) {
  CLI::App app{"kvtier-bench: kvtier's benchmarks, one subcommand per tier"};
  app.require_subcommand(1);
  int exit_code = 0;
  kvtier::bench::AddHostCommand(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return exit_code;
}
