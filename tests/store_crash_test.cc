// Crash consistency: a child process writes and flushes, and is killed with SIGKILL at
// a random instant; the parent reopens the store and checks that every block the child
// had acknowledged durable (a Flush returned) is there, byte-exact, at that version or
// a newer one the child wrote, and that no block is ever returned torn or corrupt.
// Many iterations on one directory (each reopening what the last crash left), bounded
// in time.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/crash_common.h"

namespace kvtier {
namespace {

TEST(StoreCrashTest, AcknowledgedBlocksSurviveSigkill) {
  char tmpl[] = "/tmp/kvtier-crash-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  std::mt19937_64 rng(std::random_device{}());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(25);
  std::vector<uint64_t> acked(crash::kKeys, 0);  // newest acknowledged version per key
  int iterations = 0, kills_mid_flight = 0;
  for (uint64_t it = 1; it <= 40 && std::chrono::steady_clock::now() < deadline; ++it) {
    int pipefd[2];
    ASSERT_EQ(pipe(pipefd), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      dup2(pipefd[1], 1);
      close(pipefd[0]);
      close(pipefd[1]);
      const std::string iteration = std::to_string(it), seed = std::to_string(rng());
      execl(KVTIER_CRASH_CHILD, KVTIER_CRASH_CHILD, dir.c_str(), iteration.c_str(), seed.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(pipefd[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(30 + rng() % 400));
    kill(pid, SIGKILL);
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(wstatus))
        << "the child exited by itself with status " << WEXITSTATUS(wstatus) << " (see its stderr)";
    // Whole records only: each report is one write() of whole records.
    std::vector<char> bytes;
    char buf[4096];
    for (ssize_t n; (n = read(pipefd[0], buf, sizeof(buf))) > 0;)
      bytes.insert(bytes.end(), buf, buf + n);
    close(pipefd[0]);
    ASSERT_EQ(bytes.size() % sizeof(crash::Record), 0u);
    const auto* records = reinterpret_cast<const crash::Record*>(bytes.data());
    for (size_t i = 0; i < bytes.size() / sizeof(crash::Record); ++i) {
      ASSERT_LT(records[i].key, crash::kKeys);
      acked[records[i].key] = std::max(acked[records[i].key], records[i].version);
    }
    kills_mid_flight += bytes.empty() ? 0 : 1;

    auto store = Store::Open(crash::Options(dir), testing::SmallLayout());
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    std::vector<std::byte> block((*store)->block_bytes());
    for (uint32_t k = 0; k < crash::kKeys; ++k) {
      Status s = (*store)->Get(crash::KeyOf(k), block.data(), block.size());
      if (acked[k] == 0) {
        ASSERT_TRUE(s.ok() || s.IsNotFound()) << s.ToString();
      } else {
        ASSERT_TRUE(s.ok()) << "iteration " << it << ", key " << k << " acknowledged at version "
                            << acked[k] << ": " << s.ToString();
      }
      if (!s.ok()) continue;
      const uint64_t v = crash::VersionOf(block, crash::KeyOf(k));
      ASSERT_NE(v, 0u) << "torn block for key " << k << " after iteration " << it;
      ASSERT_GE(v, acked[k]) << "key " << k << " went back to an older version";
      ASSERT_LE(v >> 32, it) << "a version no child wrote";
      acked[k] = v;  // what is durable now is the floor for later iterations
    }
    EXPECT_EQ((*store)->Stats().corrupt_blocks, 0u);
    ++iterations;
  }
  EXPECT_GE(iterations, 10);
  EXPECT_GT(kills_mid_flight, 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvtier
