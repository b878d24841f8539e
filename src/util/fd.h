// File descriptors: an owning handle, and attaching one to a message on a Unix socket
// (SCM_RIGHTS), as the client and kvtierd both do.
#ifndef KVTIER_UTIL_FD_H_
#define KVTIER_UTIL_FD_H_

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <utility>

namespace kvtier {

// An owned file descriptor (-1: none); closed with the object.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Room for one descriptor's control message.
struct FdControl {
  alignas(cmsghdr) char bytes[CMSG_SPACE(sizeof(int))];
};

// Makes `msg` carry `fd` (SCM_RIGHTS) in `control`, which must outlive the sendmsg.
inline void AttachFd(msghdr* msg, FdControl* control, int fd) {
  std::memset(control->bytes, 0, sizeof(control->bytes));
  msg->msg_control = control->bytes;
  msg->msg_controllen = sizeof(control->bytes);
  cmsghdr* c = CMSG_FIRSTHDR(msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
}

}  // namespace kvtier

#endif  // KVTIER_UTIL_FD_H_
