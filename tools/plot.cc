// `kvtier plot RESULT.json --out DIR`: PNG figures from the JSON of `kvtier eval`,
// `replay`, `explain` and `kvtier-bench`, drawn by tools/plot.py with matplotlib
// (Debian's python3-matplotlib); this command finds the script and runs it with
// python3, without a shell. The script is looked for, in order, at $KVTIER_PLOT_SCRIPT,
// next to the binary's install tree (BIN/../share/kvtier/plot.py), at the install
// prefix's copy and in the source tree the binary was built from (KVTIER_PLOT_SCRIPT_*,
// compile definitions from tools/CMakeLists.txt).
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "tools/inspect.h"
#include "tools/tensor_commands.h"

#ifndef KVTIER_PLOT_SCRIPT_SOURCE
#define KVTIER_PLOT_SCRIPT_SOURCE ""
#endif
#ifndef KVTIER_PLOT_SCRIPT_INSTALLED
#define KVTIER_PLOT_SCRIPT_INSTALLED ""
#endif

namespace kvtier::tools {
namespace {

struct PlotConfig {
  std::string result;
  std::string out;
  std::string python;  // empty: the first of python3 (PATH), /usr/bin/python3 with matplotlib
  bool json = false;
};

// Runs `args` (no shell; stdout and stderr silenced when `quiet`) and returns its exit
// status: 127 when it could not be started, -1 when fork failed or it died by a signal.
int Spawn(std::vector<std::string> args, bool quiet) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (quiet) {
      const int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
      if (null >= 0) {
        dup2(null, 1);
        dup2(null, 2);
      }
    }
    execvp(argv[0], argv.data());
    if (!quiet) {
      std::fprintf(stderr, "kvtier plot: cannot run %s: %s\n", argv[0], std::strerror(errno));
    }
    _exit(127);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The Python to run the script with: --python, else the first candidate that imports
// matplotlib (a pyenv or venv python3 first in PATH may lack Debian's python3-matplotlib).
Result<std::string> FindPython(const PlotConfig& c) {
  if (!c.python.empty()) return c.python;
  for (const char* candidate : {"python3", "/usr/bin/python3"}) {
    if (Spawn({candidate, "-c", "import matplotlib"}, /*quiet=*/true) == 0) {
      return std::string(candidate);
    }
  }
  return Status::NotFound(
      "no python3 with matplotlib (tried python3 in PATH and /usr/bin/python3): apt-get install "
      "python3-matplotlib, or pass --python");
}

Result<std::string> FindScript() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KVTIER_PLOT_SCRIPT"); env != nullptr && *env != '\0') {
    candidates.push_back(env);
  }
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) candidates.push_back((exe.parent_path() / "../share/kvtier/plot.py").string());
  candidates.push_back(KVTIER_PLOT_SCRIPT_INSTALLED);
  candidates.push_back(KVTIER_PLOT_SCRIPT_SOURCE);
  for (const std::string& c : candidates) {
    if (!c.empty() && std::filesystem::is_regular_file(c, ec)) return c;
  }
  std::string looked;
  for (const std::string& c : candidates) {
    if (!c.empty()) looked += (looked.empty() ? "" : ", ") + c;
  }
  return Status::NotFound("the plotting script plot.py is not installed (looked at " + looked +
                          "); set KVTIER_PLOT_SCRIPT to tools/plot.py");
}

int RunPlot(const PlotConfig& c) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(c.result, ec)) {
    return ReportInspectError("plot", Status::NotFound(c.result + ": no such file"), c.json);
  }
  Result<std::string> script = FindScript();
  if (!script.ok()) return ReportInspectError("plot", script.status(), c.json);
  Result<std::string> python = FindPython(c);
  if (!python.ok()) return ReportInspectError("plot", python.status(), c.json);
  std::vector<std::string> args{*python, *script, c.result, "--out", c.out};
  if (c.json) args.push_back("--json");
  const int code = Spawn(std::move(args), /*quiet=*/false);
  if (code == 0) return 0;
  if (code == 127 || code < 0) {
    return ReportInspectError("plot", Status::Internal("could not run " + *python), c.json);
  }
  return 2;  // the script said why (on stderr, or as JSON with --json)
}

}  // namespace

void AddPlotCommand(CLI::App& app, int* exit_code) {
  auto c = std::make_shared<PlotConfig>();
  CLI::App* cmd = app.add_subcommand(
      "plot", "PNG figures from the JSON of kvtier eval, replay, explain and kvtier-bench");
  cmd->footer(
      "eval: recall and coverage per layer; replay: hit rate and stall against GPU blocks per "
      "policy, and the\nacquired blocks over steps as a heat map; explain: estimated and true "
      "attention per block; kvtier-bench:\neach figure beside its anchor. Needs python3 with "
      "matplotlib. Exit status: 0 written, 2 usage or input error.\nExample: kvtier replay "
      "trace.txt --json > replay.json && kvtier plot replay.json --out plots/\n");
  cmd->add_option("result", c->result, "JSON printed by a kvtier command with --json")->required();
  cmd->add_option("--out", c->out, "Directory for the PNG files (created)")->required();
  cmd->add_option("--python", c->python,
                  "Python interpreter (default: python3, else /usr/bin/python3, whichever has "
                  "matplotlib)");
  cmd->add_flag("--json", c->json, "Print one JSON object: the files written");
  cmd->callback([c, exit_code] { *exit_code = RunPlot(*c); });
}

}  // namespace kvtier::tools
