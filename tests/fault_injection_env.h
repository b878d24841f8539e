// FaultInjectionEnv: the real Env with faults on demand, for the disk-tier tests.
//
// - Failing I/O: reads or writes complete with an errno instead of running (all of
//   them, or those at one file offset), syncs fail.
// - A crash: SetActive(false) makes every later write and sync fail (EIO) so nothing
//   more reaches the disk; DropUnsyncedWrites() then overwrites, with garbage, every
//   range written since its file's last successful sync, as a power loss could leave
//   it (LevelDB's fault_injection_test does the same by truncating files).
//
// Thread safety: as Env; the fault switches may be flipped from any thread.
#ifndef KVTIER_TESTS_FAULT_INJECTION_ENV_H_
#define KVTIER_TESTS_FAULT_INJECTION_ENV_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "storage/env.h"

namespace kvtier::testing {

class FaultInjectionEnv final : public Env {
 public:
  FaultInjectionEnv() : base_(Env::Default()) {}

  // Faults. errno 0 = off.
  void FailWrites(int err) { write_errno_ = err; }
  void FailReads(int err) { read_errno_ = err; }
  void FailReadAt(const std::string& path, uint64_t offset, int err);
  void FailSyncs(int err) { sync_errno_ = err; }
  void SetActive(bool active) { active_ = active; }
  // Overwrites every range written since the last sync of its file with garbage.
  void DropUnsyncedWrites();
  uint64_t unsynced_ranges();

  // Env.
  Result<std::unique_ptr<File>> OpenFile(const std::string& path,
                                         const FileOptions& options) override;
  Status CreateDirs(const std::string& path) override { return base_->CreateDirs(path); }
  bool Exists(const std::string& path) override { return base_->Exists(path); }
  Status RemoveFile(const std::string& path) override { return base_->RemoveFile(path); }
  Status SyncDir(const std::string& path) override { return base_->SyncDir(path); }
  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    return base_->LockFile(path);
  }
  Result<std::unique_ptr<IoQueue>> NewIoQueue(const IoQueueOptions& options) override;

  // Called by the wrapped queue and files.
  int WriteFault() const { return active_ ? write_errno_.load() : EIO; }
  int ReadFault(const std::string& path, uint64_t offset);
  int SyncFault() const { return active_ ? sync_errno_.load() : EIO; }
  void RecordWrite(const std::string& path, uint64_t offset, uint64_t length);
  void RecordSync(const std::string& path);

 private:
  Env* base_;
  std::atomic<int> write_errno_{0};
  std::atomic<int> read_errno_{0};
  std::atomic<int> sync_errno_{0};
  std::atomic<bool> active_{true};
  std::mutex mu_;
  std::map<std::pair<std::string, uint64_t>, int> read_faults_;
  std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> unsynced_;
};

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_FAULT_INJECTION_ENV_H_
