// Mutex and MutexLock with clang thread-safety annotations (-Wthread-safety), so that
// GUARDED_BY / REQUIRES contracts are checked at compile time under clang and are
// documentation elsewhere.
#ifndef KVTIER_UTIL_MUTEX_H_
#define KVTIER_UTIL_MUTEX_H_

#include <mutex>

#if defined(__clang__)
#define KVTIER_THREAD_ANNOTATION_(x) __attribute__((x))
#else
#define KVTIER_THREAD_ANNOTATION_(x)
#endif

#define KVTIER_CAPABILITY(x) KVTIER_THREAD_ANNOTATION_(capability(x))
#define KVTIER_SCOPED_CAPABILITY KVTIER_THREAD_ANNOTATION_(scoped_lockable)
#define KVTIER_GUARDED_BY(x) KVTIER_THREAD_ANNOTATION_(guarded_by(x))
#define KVTIER_PT_GUARDED_BY(x) KVTIER_THREAD_ANNOTATION_(pt_guarded_by(x))
#define KVTIER_REQUIRES(...) KVTIER_THREAD_ANNOTATION_(requires_capability(__VA_ARGS__))
#define KVTIER_EXCLUDES(...) KVTIER_THREAD_ANNOTATION_(locks_excluded(__VA_ARGS__))
#define KVTIER_ACQUIRE(...) KVTIER_THREAD_ANNOTATION_(acquire_capability(__VA_ARGS__))
#define KVTIER_RELEASE(...) KVTIER_THREAD_ANNOTATION_(release_capability(__VA_ARGS__))
// For a lambda run with a lock held by its caller, which the analysis cannot see.
#define KVTIER_NO_THREAD_SAFETY_ANALYSIS KVTIER_THREAD_ANNOTATION_(no_thread_safety_analysis)

namespace kvtier {

class KVTIER_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() KVTIER_ACQUIRE() { mu_.lock(); }
  void Unlock() KVTIER_RELEASE() { mu_.unlock(); }
  // For std::condition_variable_any and friends.
  void lock() KVTIER_ACQUIRE() { mu_.lock(); }
  void unlock() KVTIER_RELEASE() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class KVTIER_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) KVTIER_ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() KVTIER_RELEASE() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* mu_;
};

}  // namespace kvtier

#endif  // KVTIER_UTIL_MUTEX_H_
