// kvtier: the command-line tool. Subcommands live one per file (demo.cc, ...), each
// registering itself on the CLI11 app.
#include <CLI/CLI.hpp>

#include "tools/demo.h"
#include "tools/eval.h"
#include "tools/inspect.h"
#include "tools/replay.h"
#include "tools/tensor_commands.h"

int main(int argc, char** argv) {
  CLI::App app{"kvtier: tiered KV-cache offload store, command-line tool"};
  app.require_subcommand(1);
  int exit_code = 0;
  kvtier::tools::AddDemoCommand(app, &exit_code);
  kvtier::tools::AddEvalCommand(app, &exit_code);
  kvtier::tools::AddInfoCommand(app, &exit_code);
  kvtier::tools::AddLsCommand(app, &exit_code);
  kvtier::tools::AddStatsCommand(app, &exit_code);
  kvtier::tools::AddVerifyCommand(app, &exit_code);
  kvtier::tools::AddExportCommand(app, &exit_code);
  kvtier::tools::AddImportCommand(app, &exit_code);
  kvtier::tools::AddExplainCommand(app, &exit_code);
  kvtier::tools::AddReplayCommand(app, &exit_code);
  kvtier::tools::AddPlotCommand(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return exit_code;
}
