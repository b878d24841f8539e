#include "tests/fault_injection_env.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <deque>
#include <random>

namespace kvtier::testing {
namespace {

class FaultFile final : public File {
 public:
  FaultFile(FaultInjectionEnv* env, std::unique_ptr<File> base)
      : env_(env), base_(std::move(base)) {}
  const std::string& path() const override { return base_->path(); }
  int fd() const override { return base_->fd(); }
  Status Allocate(uint64_t bytes) override { return base_->Allocate(bytes); }
  Status DataSync() override {
    if (int err = env_->SyncFault()) return Status::FromErrno(err, "injected: fdatasync");
    KVTIER_RETURN_IF_ERROR(base_->DataSync());
    env_->RecordSync(path());
    return Status::OK();
  }
  Result<uint64_t> Size() const override { return base_->Size(); }
  Status ReadAt(uint64_t offset, void* buf, uint64_t length) override {
    if (int err = env_->ReadFault(path(), offset)) return Status::FromErrno(err, "injected: read");
    return base_->ReadAt(offset, buf, length);
  }
  Status WriteAt(uint64_t offset, const void* buf, uint64_t length) override {
    if (int err = env_->WriteFault()) return Status::FromErrno(err, "injected: write");
    KVTIER_RETURN_IF_ERROR(base_->WriteAt(offset, buf, length));
    env_->RecordWrite(path(), offset, length);
    return Status::OK();
  }
  File* base() { return base_.get(); }

 private:
  FaultInjectionEnv* env_;
  std::unique_ptr<File> base_;
};

// Requests that draw a fault complete with it without reaching the disk; the others
// go to the real queue (with the real files underneath).
class FaultQueue final : public IoQueue {
 public:
  FaultQueue(FaultInjectionEnv* env, std::unique_ptr<IoQueue> base)
      : env_(env), base_(std::move(base)) {}

  Status RegisterBuffers(std::span<const MemoryRange> ranges) override {
    return base_->RegisterBuffers(ranges);
  }
  Status RegisterFiles(std::span<File* const> files) override {
    std::vector<File*> real;
    for (File* f : files) real.push_back(static_cast<FaultFile*>(f)->base());
    return base_->RegisterFiles(real);
  }
  Status Submit(std::span<const IoRequest> requests) override {
    std::vector<IoRequest> pass;
    for (const IoRequest& r : requests) {
      auto* file = static_cast<FaultFile*>(r.file);
      int err = 0;
      if (r.kind == IoKind::kWrite) err = env_->WriteFault();
      if (r.kind == IoKind::kRead) err = env_->ReadFault(file->path(), r.offset);
      if (r.kind == IoKind::kDataSync) err = env_->SyncFault();
      if (err != 0) {
        injected_.push_back(
            IoCompletion{r.tag, Status::FromErrno(err, "injected: " + file->path())});
        continue;
      }
      IoRequest real = r;
      real.file = file->base();
      meta_[r.tag] = r;
      pass.push_back(real);
    }
    if (!injected_.empty()) base_->Wake();
    return base_->Submit(pass);
  }
  Result<size_t> Reap(std::span<IoCompletion> out, size_t min_completions) override {
    size_t n = 0;
    while (!injected_.empty() && n < out.size()) {
      out[n++] = std::move(injected_.front());
      injected_.pop_front();
    }
    KVTIER_ASSIGN_OR_RETURN(
        size_t got, base_->Reap(out.subspan(n), n >= min_completions ? 0 : min_completions - n));
    for (size_t i = n; i < n + got; ++i) {
      auto it = meta_.find(out[i].tag);
      const IoRequest& r = it->second;
      if (out[i].status.ok()) {
        auto* file = static_cast<FaultFile*>(r.file);
        if (r.kind == IoKind::kWrite) env_->RecordWrite(file->path(), r.offset, r.length);
        if (r.kind == IoKind::kDataSync) env_->RecordSync(file->path());
      }
      meta_.erase(it);
    }
    return n + got;
  }
  void Wake() override { base_->Wake(); }
  uint64_t pending() const override { return base_->pending() + injected_.size(); }

 private:
  FaultInjectionEnv* env_;
  std::unique_ptr<IoQueue> base_;
  std::deque<IoCompletion> injected_;
  std::map<uint64_t, IoRequest> meta_;
};

}  // namespace

void FaultInjectionEnv::FailReadAt(const std::string& path, uint64_t offset, int err) {
  std::lock_guard<std::mutex> lock(mu_);
  read_faults_[{path, offset}] = err;
}

int FaultInjectionEnv::ReadFault(const std::string& path, uint64_t offset) {
  if (int err = read_errno_.load()) return err;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = read_faults_.find({path, offset});
  return it == read_faults_.end() ? 0 : it->second;
}

void FaultInjectionEnv::RecordWrite(const std::string& path, uint64_t offset, uint64_t length) {
  std::lock_guard<std::mutex> lock(mu_);
  unsynced_[path].push_back({offset, length});
}

void FaultInjectionEnv::RecordSync(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  unsynced_.erase(path);
}

uint64_t FaultInjectionEnv::unsynced_ranges() {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t n = 0;
  for (auto& [path, ranges] : unsynced_) n += ranges.size();
  return n;
}

void FaultInjectionEnv::DropUnsyncedWrites() {
  std::lock_guard<std::mutex> lock(mu_);
  std::mt19937_64 rng(12345);
  for (auto& [path, ranges] : unsynced_) {
    int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) continue;
    for (auto [offset, length] : ranges) {
      std::vector<uint64_t> garbage((length + 7) / 8);
      for (auto& w : garbage) w = rng();
      // A torn write: keep a random prefix of what was written, garbage after it.
      uint64_t keep = (rng() % (length / 512 + 1)) * 512;
      if (keep < length) {
        ssize_t n = pwrite(fd, garbage.data(), length - keep, static_cast<off_t>(offset + keep));
        (void)n;
      }
    }
    fdatasync(fd);
    close(fd);
  }
  unsynced_.clear();
}

Result<std::unique_ptr<File>> FaultInjectionEnv::OpenFile(const std::string& path,
                                                          const FileOptions& options) {
  KVTIER_ASSIGN_OR_RETURN(auto file, base_->OpenFile(path, options));
  return std::unique_ptr<File>(new FaultFile(this, std::move(file)));
}

Result<std::unique_ptr<IoQueue>> FaultInjectionEnv::NewIoQueue(const IoQueueOptions& options) {
  KVTIER_ASSIGN_OR_RETURN(auto queue, base_->NewIoQueue(options));
  return std::unique_ptr<IoQueue>(new FaultQueue(this, std::move(queue)));
}

}  // namespace kvtier::testing
