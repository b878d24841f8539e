// IoQueue over io_uring (liburing). Requests wait in a backlog until the ring has room;
// short transfers are finished by submitting the remainder; -EAGAIN and -EINTR are
// retried. An eventfd read is kept armed in the ring so that Wake() can end a Reap that
// waits with nothing else in flight.
#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <string>
#include <unordered_map>
#include <vector>

#include "storage/env.h"

namespace kvtier {
namespace {

constexpr uint64_t kWakeTag = UINT64_MAX;
// io_uring transfers at most 2^31 bytes per SQE; stay well below.
constexpr uint64_t kMaxSqeBytes = uint64_t{1} << 30;

class UringQueue final : public IoQueue {
 public:
  static Result<std::unique_ptr<IoQueue>> Create(const IoQueueOptions& options) {
    if (options.depth == 0 || options.depth > 4096) {
      return Status::InvalidArgument("I/O queue depth must be in [1, 4096], got " +
                                     std::to_string(options.depth));
    }
    auto q = std::unique_ptr<UringQueue>(new UringQueue(options.depth));
    io_uring_params params = {};
    if (options.sqpoll) {
      params.flags |= IORING_SETUP_SQPOLL;
      params.sq_thread_idle = 2000;  // ms
    }
    // One extra entry for the armed eventfd read.
    int rc = io_uring_queue_init_params(options.depth + 1, &q->ring_, &params);
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_queue_init");
    q->ring_ok_ = true;
    q->event_fd_ = eventfd(0, EFD_CLOEXEC);
    if (q->event_fd_ < 0) return Status::FromErrno(errno, "eventfd");
    return std::unique_ptr<IoQueue>(std::move(q));
  }

  ~UringQueue() override {
    if (ring_ok_) {
      // Requests still in flight write into memory their owner is about to free: let
      // them finish (or be cancelled) first.
      if (wake_armed_) Wake();
      while (in_flight_ > 0 || wake_armed_) {
        io_uring_cqe* cqe = nullptr;
        int rc = io_uring_wait_cqe(&ring_, &cqe);
        if (rc == -EINTR) continue;
        if (rc < 0) break;
        if (cqe->user_data == kWakeTag) {
          wake_armed_ = false;
        } else {
          --in_flight_;
        }
        io_uring_cqe_seen(&ring_, cqe);
      }
      io_uring_queue_exit(&ring_);
    }
    if (event_fd_ >= 0) close(event_fd_);
  }

  Status RegisterBuffers(std::span<const MemoryRange> ranges) override {
    std::vector<iovec> iov;
    std::vector<MemoryRange> pieces;
    for (const MemoryRange& r : ranges) {
      auto* p = static_cast<char*>(r.data);
      for (uint64_t off = 0; off < r.bytes; off += kMaxSqeBytes) {
        uint64_t n = std::min(kMaxSqeBytes, r.bytes - off);
        iov.push_back(iovec{p + off, n});
        pieces.push_back(MemoryRange{p + off, n});
      }
    }
    if (!buffers_.empty()) {
      io_uring_unregister_buffers(&ring_);
      buffers_.clear();
    }
    int rc = io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size()));
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_register_buffers");
    buffers_ = std::move(pieces);
    return Status::OK();
  }

  Status RegisterFiles(std::span<File* const> files) override {
    std::vector<int> fds;
    for (File* f : files) fds.push_back(f->fd());
    if (!file_index_.empty()) {
      io_uring_unregister_files(&ring_);
      file_index_.clear();
    }
    int rc = io_uring_register_files(&ring_, fds.data(), static_cast<unsigned>(fds.size()));
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_register_files");
    for (size_t i = 0; i < files.size(); ++i) file_index_[files[i]] = static_cast<int>(i);
    return Status::OK();
  }

  Status Submit(std::span<const IoRequest> requests) override {
    for (const IoRequest& r : requests) {
      if (r.file == nullptr) return Status::InvalidArgument("I/O request without a file");
      uint32_t id;
      if (!free_ops_.empty()) {
        id = free_ops_.back();
        free_ops_.pop_back();
      } else {
        id = static_cast<uint32_t>(ops_.size());
        ops_.emplace_back();
      }
      ops_[id] = Op{r, 0, true};
      backlog_.push_back(id);
      ++pending_;
    }
    return Pump();
  }

  Result<size_t> Reap(std::span<IoCompletion> out, size_t min_completions) override {
    size_t produced = 0;
    while (!ready_.empty() && produced < out.size()) {
      out[produced++] = std::move(ready_.front());
      ready_.pop_front();
    }
    bool woken = false;
    min_completions = std::min(min_completions, out.size());
    for (;;) {
      KVTIER_RETURN_IF_ERROR(Drain(out, produced, woken));
      KVTIER_RETURN_IF_ERROR(Pump());
      if (produced >= min_completions || woken) break;
      KVTIER_RETURN_IF_ERROR(ArmWake());
      io_uring_cqe* cqe = nullptr;
      int rc = io_uring_wait_cqe(&ring_, &cqe);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN)
        return Status::FromErrno(-rc, "io_uring_wait_cqe");
    }
    pending_ -= produced;
    return produced;
  }

  void Wake() override {
    uint64_t one = 1;
    ssize_t n = write(event_fd_, &one, sizeof(one));
    (void)n;  // EAGAIN means the counter is already non-zero: a wake-up is pending
  }

  uint64_t pending() const override { return pending_; }

 private:
  struct Op {
    IoRequest req;
    uint64_t done = 0;  // bytes transferred so far
    bool active = false;
  };

  explicit UringQueue(uint32_t depth) : depth_(depth) {}

  // Moves backlog requests into the ring while it has room, then submits.
  Status Pump() {
    bool queued = false;
    while (in_flight_ < depth_ && !backlog_.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) {
        int rc = io_uring_submit(&ring_);  // the SQ is full: hand it to the kernel
        if (rc < 0 && rc != -EAGAIN && rc != -EBUSY && rc != -EINTR) {
          return Status::FromErrno(-rc, "io_uring_submit");
        }
        sqe = io_uring_get_sqe(&ring_);
        if (sqe == nullptr) break;  // the kernel is busy: try again after reaping
      }
      uint32_t id = backlog_.front();
      backlog_.pop_front();
      Prepare(sqe, id);
      ++in_flight_;
      queued = true;
    }
    if (queued || io_uring_sq_ready(&ring_) > 0) {
      int rc = io_uring_submit(&ring_);
      if (rc < 0 && rc != -EAGAIN && rc != -EBUSY && rc != -EINTR) {
        return Status::FromErrno(-rc, "io_uring_submit");
      }
    }
    return Status::OK();
  }

  void Prepare(io_uring_sqe* sqe, uint32_t id) {
    const Op& op = ops_[id];
    const IoRequest& r = op.req;
    int fd = r.file->fd();
    bool fixed_file = false;
    if (auto it = file_index_.find(r.file); it != file_index_.end()) {
      fd = it->second;
      fixed_file = true;
    }
    if (r.kind == IoKind::kDataSync) {
      io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    } else {
      char* buf = static_cast<char*>(r.buf) + op.done;
      const uint64_t offset = r.offset + op.done;
      const unsigned len = static_cast<unsigned>(std::min(kMaxSqeBytes, r.length - op.done));
      const int index = BufferIndex(buf, len);
      if (r.kind == IoKind::kRead) {
        if (index >= 0) {
          io_uring_prep_read_fixed(sqe, fd, buf, len, offset, index);
        } else {
          io_uring_prep_read(sqe, fd, buf, len, offset);
        }
      } else {
        if (index >= 0) {
          io_uring_prep_write_fixed(sqe, fd, buf, len, offset, index);
        } else {
          io_uring_prep_write(sqe, fd, buf, len, offset);
        }
      }
    }
    if (fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, id);
  }

  // The registered buffer holding [buf, buf + len), or -1.
  int BufferIndex(const char* buf, uint64_t len) const {
    for (size_t i = 0; i < buffers_.size(); ++i) {
      const char* base = static_cast<const char*>(buffers_[i].data);
      if (buf >= base && buf + len <= base + buffers_[i].bytes) return static_cast<int>(i);
    }
    return -1;
  }

  Status ArmWake() {
    if (wake_armed_) return Status::OK();
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) return Status::Internal("io_uring: no SQE for the wake-up read");
    }
    io_uring_prep_read(sqe, event_fd_, &event_value_, sizeof(event_value_), 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    int rc = io_uring_submit(&ring_);
    if (rc < 0) return Status::FromErrno(-rc, "io_uring_submit (wake-up read)");
    wake_armed_ = true;
    return Status::OK();
  }

  // Handles every CQE available now.
  Status Drain(std::span<IoCompletion> out, size_t& produced, bool& woken) {
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
      const uint64_t tag = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      if (tag == kWakeTag) {
        wake_armed_ = false;
        woken = true;
        continue;
      }
      --in_flight_;
      const uint32_t id = static_cast<uint32_t>(tag);
      Op& op = ops_[id];
      if (res == -EAGAIN || res == -EINTR) {
        backlog_.push_front(id);  // try again as it was
        continue;
      }
      Status status;
      if (res < 0) {
        status = Status::FromErrno(-res, Describe(op));
      } else if (op.req.kind != IoKind::kDataSync) {
        op.done += static_cast<uint64_t>(res);
        if (op.done < op.req.length) {
          if (res > 0) {
            backlog_.push_front(id);  // a short transfer: the rest goes next
            continue;
          }
          status = Status::IOError(Describe(op) + ": " +
                                   (op.req.kind == IoKind::kRead ? "short read (end of file)"
                                                                 : "short write (no progress)") +
                                   " after " + std::to_string(op.done) + " bytes");
        }
      }
      IoCompletion c{op.req.tag, std::move(status)};
      op.active = false;
      free_ops_.push_back(id);
      if (produced < out.size()) {
        out[produced++] = std::move(c);
      } else {
        ready_.push_back(std::move(c));
      }
    }
    return Status::OK();
  }

  static std::string Describe(const Op& op) {
    const char* what = op.req.kind == IoKind::kRead    ? "read"
                       : op.req.kind == IoKind::kWrite ? "write"
                                                       : "fdatasync";
    std::string s = std::string(what) + " " + op.req.file->path();
    if (op.req.kind != IoKind::kDataSync) {
      s += " [" + std::to_string(op.req.offset) + ", +" + std::to_string(op.req.length) + ")";
    }
    return s;
  }

  io_uring ring_ = {};
  bool ring_ok_ = false;
  const uint32_t depth_;
  int event_fd_ = -1;
  uint64_t event_value_ = 0;
  bool wake_armed_ = false;
  std::vector<Op> ops_;
  std::vector<uint32_t> free_ops_;
  std::deque<uint32_t> backlog_;
  std::deque<IoCompletion> ready_;
  uint32_t in_flight_ = 0;  // request SQEs in the kernel (not the wake-up read)
  uint64_t pending_ = 0;    // submitted and not yet reaped
  std::vector<MemoryRange> buffers_;
  std::unordered_map<const File*, int> file_index_;
};

}  // namespace

Result<std::unique_ptr<IoQueue>> NewUringQueue(const IoQueueOptions& options) {
  return UringQueue::Create(options);
}

}  // namespace kvtier
