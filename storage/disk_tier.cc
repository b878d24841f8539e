#include "storage/disk_tier.h"

#include <utility>

#include "src/util/log.h"

namespace kvtier {

struct SyncGroup {
  int remaining = 0;
  Status status;
  DiskTier::Callback done;
};

Result<std::unique_ptr<DiskTier>> DiskTier::Open(Env* env, const DiskTierOptions& options) {
  if (options.files.empty()) return Status::InvalidArgument("disk tier without slab files");
  auto tier = std::unique_ptr<DiskTier>(new DiskTier(env, options));
  for (const SlabFileInfo& info : options.files) {
    if (info.bytes == 0 || info.bytes % 4096 != 0) {
      return Status::InvalidArgument("slab file " + info.path + ": size " +
                                     std::to_string(info.bytes) + " is not a multiple of 4096");
    }
    const bool exists = env->Exists(info.path);
    FileOptions fo{.create = true, .direct = true, .dsync = options.dsync, .read_only = false};
    KVTIER_ASSIGN_OR_RETURN(auto file, env->OpenFile(info.path, fo));
    if (!exists) {
      KVTIER_RETURN_IF_ERROR(file->Allocate(info.bytes).WithContext("preallocate slab file"));
      KVTIER_RETURN_IF_ERROR(file->DataSync());
    } else {
      KVTIER_ASSIGN_OR_RETURN(uint64_t size, file->Size());
      if (size != info.bytes) {
        return Status::Corruption("slab file " + info.path + " is " + std::to_string(size) +
                                  " bytes; the catalog says " + std::to_string(info.bytes));
      }
    }
    tier->files_.push_back(std::move(file));
  }
  tier->written_since_sync_.assign(tier->files_.size(), false);
  KVTIER_ASSIGN_OR_RETURN(tier->queue_, env->NewIoQueue(IoQueueOptions{.depth = options.io_depth,
                                                                       .sqpoll = options.sqpoll}));
  std::vector<File*> raw;
  for (auto& f : tier->files_) raw.push_back(f.get());
  if (Status s = tier->queue_->RegisterFiles(raw); !s.ok()) {
    Log().warn("kvtier: slab files not registered with io_uring ({}); using plain fds",
               s.ToString());
  }
  if (!options.buffers.empty()) {
    Status s = tier->queue_->RegisterBuffers(options.buffers);
    tier->registered_buffers_ = s.ok();
    if (!s.ok()) {
      Log().warn("kvtier: host tier not registered as io_uring buffers ({})", s.ToString());
    }
  }
  tier->thread_ = std::thread([t = tier.get()] { t->Run(); });
  return tier;
}

DiskTier::DiskTier(Env* env, DiskTierOptions options) : env_(env), options_(std::move(options)) {}

DiskTier::~DiskTier() {
  if (thread_.joinable()) {
    {
      MutexLock lock(&mu_);
      stopping_ = true;
    }
    queue_->Wake();
    thread_.join();
  }
}

void DiskTier::Write(uint32_t file, uint64_t offset, const void* buf, uint64_t length,
                     Callback done) {
  Enqueue(Op{OpKind::kWrite, file, offset, const_cast<void*>(buf), length, std::move(done)});
}

void DiskTier::Read(uint32_t file, uint64_t offset, void* buf, uint64_t length, Callback done) {
  Enqueue(Op{OpKind::kRead, file, offset, buf, length, std::move(done)});
}

void DiskTier::Sync(Callback done) {
  Enqueue(Op{OpKind::kSync, 0, 0, nullptr, 0, std::move(done)});
}

void DiskTier::Enqueue(Op op) {
  bool first;
  {
    MutexLock lock(&mu_);
    first = incoming_.empty();
    incoming_.push_back(std::move(op));
  }
  if (first) queue_->Wake();  // later ones ride on the same wake-up
}

void DiskTier::Run() {
  std::vector<Op> batch;
  std::vector<IoCompletion> completions(256);
  for (;;) {
    bool stopping;
    {
      MutexLock lock(&mu_);
      batch.swap(incoming_);
      stopping = stopping_;
    }
    for (Op& op : batch) Start(op);
    batch.clear();
    if (stopping && queue_->pending() == 0) {
      MutexLock lock(&mu_);
      if (incoming_.empty()) return;
      continue;
    }
    // Waits for a completion, or for Wake() (new requests, or stop).
    Result<size_t> n = queue_->Reap(completions, 1);
    if (!n.ok()) {
      // The ring itself failed: nothing can complete any more. Fail what is pending
      // rather than hang its waiters.
      Log().error("kvtier: I/O queue failed: {}", n.status().ToString());
      for (uint64_t tag = 0; tag < pending_.size(); ++tag) {
        if (pending_[tag].done || pending_[tag].group) Finish(tag, n.status());
      }
      continue;
    }
    for (size_t i = 0; i < *n; ++i) Finish(completions[i].tag, std::move(completions[i].status));
  }
}

void DiskTier::Start(Op& op) {
  auto new_tag = [this] {
    if (!free_tags_.empty()) {
      uint64_t t = free_tags_.back();
      free_tags_.pop_back();
      return t;
    }
    pending_.emplace_back();
    return uint64_t(pending_.size() - 1);
  };
  if (op.file >= files_.size()) {
    op.done(
        Status::InvalidArgument("slab file index " + std::to_string(op.file) + " out of range"));
    return;
  }
  if (op.kind == OpKind::kSync) {
    auto group = std::make_shared<SyncGroup>();
    group->done = std::move(op.done);
    std::vector<IoRequest> requests;
    if (!options_.dsync) {
      for (uint32_t f = 0; f < files_.size(); ++f) {
        if (!written_since_sync_[f]) continue;
        written_since_sync_[f] = false;
        uint64_t tag = new_tag();
        pending_[tag] = Pending{nullptr, f, false, group};
        requests.push_back(IoRequest{IoKind::kDataSync, files_[f].get(), 0, nullptr, 0, tag});
      }
    }
    group->remaining = static_cast<int>(requests.size());
    if (requests.empty()) {
      group->done(Status::OK());
      return;
    }
    if (Status s = queue_->Submit(requests); !s.ok()) {
      for (const IoRequest& r : requests) Finish(r.tag, s);
    }
    return;
  }
  uint64_t tag = new_tag();
  pending_[tag] = Pending{std::move(op.done), op.file, op.kind == OpKind::kWrite, nullptr};
  IoRequest r{op.kind == OpKind::kWrite ? IoKind::kWrite : IoKind::kRead,
              files_[op.file].get(),
              op.offset,
              op.buf,
              op.length,
              tag};
  if (Status s = queue_->Submit({&r, 1}); !s.ok()) Finish(tag, s);
}

void DiskTier::Finish(uint64_t tag, Status status) {
  Pending p = std::move(pending_[tag]);
  pending_[tag] = Pending{};
  free_tags_.push_back(tag);
  if (p.group) {
    if (!status.ok() && p.group->status.ok()) p.group->status = status;
    if (--p.group->remaining == 0) p.group->done(p.group->status);
    return;
  }
  if (p.is_write && status.ok()) written_since_sync_[p.file] = true;
  p.done(std::move(status));
}

}  // namespace kvtier
