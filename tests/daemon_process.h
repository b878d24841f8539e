// Daemon: kvtierd run as a process by a test, with a config of its own in a directory.
// Shared by the tests that need the real binary (tests/daemon.cmake): KVTIER_KVTIERD
// names it.
#ifndef KVTIER_TESTS_DAEMON_PROCESS_H_
#define KVTIER_TESTS_DAEMON_PROCESS_H_

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/store.h"
#include "tests/test_util.h"

namespace kvtier::testing {

namespace fs = std::filesystem;

class Daemon {
 public:
  // A config in `dir` for a store there of SmallLayout (1 MiB host tier, 64 MiB disk),
  // plus `extra` (more TOML sections).
  explicit Daemon(fs::path dir, const std::string& extra = "") : dir_(std::move(dir)) {
    fs::create_directories(dir_);
    std::ofstream(dir_ / "kvtierd.toml")
        << "[store]\ndirectory = \"" << (dir_ / "store").string()
        << "\"\nhost_capacity = \"1MiB\"\ndisk_capacity = \"64MiB\"\n"
        << "[layout]\nlayers = 4\nkv_heads = 2\nquery_heads = 4\nhead_dim = 64\n"
        << "dtype = \"fp16\"\nblock_tokens = 16\n"
        << "[server]\nsocket = \"" << socket() << "\"\n"
        << "[metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n"
        << extra;
  }
  // The kvtierd binary: $KVTIER_KVTIERD when set (a bundle run elsewhere), else the
  // build's.
  static std::string Binary() {
    const char* env = std::getenv("KVTIER_KVTIERD");
    return env != nullptr && *env != '\0' ? env : KVTIER_KVTIERD;
  }
  ~Daemon() {
    if (pid_ > 0) Kill(SIGKILL);
  }

  std::string socket() const { return (dir_ / "kvtierd.sock").string(); }
  std::string config() const { return (dir_ / "kvtierd.toml").string(); }
  std::string log() const { return (dir_ / "kvtierd.log").string(); }

  // Starts kvtierd and waits until its socket answers.
  ::testing::AssertionResult Start() {
    pid_ = Run({Binary(), "--config", config()}, log());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      if (fs::exists(socket())) {
        StoreOptions o;
        o.sidecar.socket = socket();
        o.sidecar.connect_timeout_ms = 500;
        if (Store::Open(o, SmallLayout()).ok()) return ::testing::AssertionSuccess();
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return ::testing::AssertionFailure() << "kvtierd exited at start: " << ReadLog();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return ::testing::AssertionFailure() << "kvtierd did not come up: " << ReadLog();
  }
  // Sends `sig` and waits for the process; its exit status (or 128 + signal).
  int Kill(int sig) {
    kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  std::string ReadLog() const {
    std::ifstream in(log());
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  static pid_t Run(const std::vector<std::string>& argv, const std::string& log) {
    const pid_t pid = fork();
    if (pid == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    return pid;
  }
  // Runs to completion; the exit code.
  static int RunToEnd(const std::vector<std::string>& argv, const std::string& log) {
    const pid_t pid = Run(argv, log);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  fs::path dir_;
  pid_t pid_ = -1;
};

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_DAEMON_PROCESS_H_
