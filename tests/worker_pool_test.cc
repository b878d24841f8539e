#include "src/core/worker_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <set>
#include <thread>

namespace kvtier {
namespace {

TEST(WorkerPoolTest, RunsEverythingBeforeDestruction) {
  std::atomic<int> ran{0};
  {
    WorkerPool pool(3);
    for (int i = 0; i < 1000; ++i) pool.Submit([&] { ran.fetch_add(1); });
  }
  EXPECT_EQ(ran.load(), 1000);
}

TEST(WorkerPoolTest, TasksMaySubmitTasks) {
  std::atomic<int> ran{0};
  {
    WorkerPool pool(2);
    for (int i = 0; i < 10; ++i) {
      pool.Submit([&] {
        ran.fetch_add(1);
        pool.Submit([&] { ran.fetch_add(1); });
      });
    }
  }
  EXPECT_EQ(ran.load(), 20);
}

TEST(WorkerPoolTest, UsesItsThreadsOnly) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  {
    WorkerPool pool(2);
    for (int i = 0; i < 200; ++i) {
      pool.Submit([&] {
        std::lock_guard<std::mutex> lock(mu);
        ids.insert(std::this_thread::get_id());
      });
    }
  }
  EXPECT_LE(ids.size(), 2u);
  EXPECT_GE(ids.size(), 1u);
  EXPECT_EQ(ids.count(std::this_thread::get_id()), 0u);
}

}  // namespace
}  // namespace kvtier
