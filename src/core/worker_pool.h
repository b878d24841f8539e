// WorkerPool: a fixed set of threads running submitted tasks in FIFO order.
//
// Thread safety: Submit may be called from any thread, including from a task. The
// destructor runs every task already submitted, then joins the threads; no Submit may
// race with it.
#ifndef KVTIER_CORE_WORKER_POOL_H_
#define KVTIER_CORE_WORKER_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "src/util/mutex.h"

namespace kvtier {

class WorkerPool {
 public:
  explicit WorkerPool(uint32_t threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  void Submit(std::function<void()> task);

 private:
  void Run();

  Mutex mu_;
  std::condition_variable_any cv_;
  std::deque<std::function<void()>> tasks_ KVTIER_GUARDED_BY(mu_);
  bool stopping_ KVTIER_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace kvtier

#endif  // KVTIER_CORE_WORKER_POOL_H_
