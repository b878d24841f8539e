// The real Env: POSIX files, flock, io_uring (uring_queue.cc).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <system_error>

#include "storage/env.h"

namespace kvtier {
namespace {

class PosixFile final : public File {
 public:
  PosixFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~PosixFile() override { close(fd_); }

  const std::string& path() const override { return path_; }
  int fd() const override { return fd_; }

  Status Allocate(uint64_t bytes) override {
    int err = posix_fallocate(fd_, 0, static_cast<off_t>(bytes));
    if (err != 0) return Status::FromErrno(err, "fallocate " + path_);
    return Status::OK();
  }

  Status DataSync() override {
    if (fdatasync(fd_) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
    return Status::OK();
  }

  Result<uint64_t> Size() const override {
    struct stat st;
    if (fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + path_);
    return static_cast<uint64_t>(st.st_size);
  }

  Status ReadAt(uint64_t offset, void* buf, uint64_t length) override {
    auto* p = static_cast<char*>(buf);
    while (length > 0) {
      ssize_t n = pread(fd_, p, length, static_cast<off_t>(offset));
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n < 0) return Status::FromErrno(errno, "read " + path_);
      if (n == 0) {
        return Status::IOError("short read: " + path_ + " ends before offset " +
                               std::to_string(offset + length));
      }
      p += n;
      offset += uint64_t(n);
      length -= uint64_t(n);
    }
    return Status::OK();
  }

  Status WriteAt(uint64_t offset, const void* buf, uint64_t length) override {
    const auto* p = static_cast<const char*>(buf);
    while (length > 0) {
      ssize_t n = pwrite(fd_, p, length, static_cast<off_t>(offset));
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n < 0) return Status::FromErrno(errno, "write " + path_);
      if (n == 0) return Status::IOError("write " + path_ + ": no progress");
      p += n;
      offset += uint64_t(n);
      length -= uint64_t(n);
    }
    return Status::OK();
  }

 private:
  std::string path_;
  int fd_;
};

class PosixFileLock final : public FileLock {
 public:
  explicit PosixFileLock(int fd) : fd_(fd) {}
  ~PosixFileLock() override { close(fd_); }  // releases the flock

 private:
  int fd_;
};

class PosixEnv final : public Env {
 public:
  Result<std::unique_ptr<File>> OpenFile(const std::string& path,
                                         const FileOptions& options) override {
    int flags = O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR);
    if (options.create) flags |= O_CREAT;
    if (options.direct) flags |= O_DIRECT;
    if (options.dsync) flags |= O_DSYNC;
    int fd = open(path.c_str(), flags, 0640);
    if (fd < 0) return Status::FromErrno(errno, "open " + path);
    return std::unique_ptr<File>(new PosixFile(path, fd));
  }

  Status CreateDirs(const std::string& path) override {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) return Status::FromErrno(ec.value(), "create directory " + path);
    return Status::OK();
  }

  bool Exists(const std::string& path) override { return access(path.c_str(), F_OK) == 0; }

  Status RemoveFile(const std::string& path) override {
    if (unlink(path.c_str()) != 0) return Status::FromErrno(errno, "remove " + path);
    return Status::OK();
  }

  Status SyncDir(const std::string& path) override {
    int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "open directory " + path);
    int rc = fsync(fd);
    int err = errno;
    close(fd);
    if (rc != 0) return Status::FromErrno(err, "fsync directory " + path);
    return Status::OK();
  }

  Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0) return Status::FromErrno(errno, "open lock file " + path);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      close(fd);
      if (err == EWOULDBLOCK) {
        return Status::FailedPrecondition(path + " is locked: the store is open elsewhere");
      }
      return Status::FromErrno(err, "lock " + path);
    }
    return std::unique_ptr<FileLock>(new PosixFileLock(fd));
  }

  Result<std::unique_ptr<IoQueue>> NewIoQueue(const IoQueueOptions& options) override {
    return NewUringQueue(options);
  }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv;  // never destroyed: used until process exit
  return env;
}

}  // namespace kvtier
