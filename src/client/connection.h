// Connection: one handshaken stream socket to kvtierd (PROTOCOL.md), and the staging
// area the daemon mapped for it. It knows frames, not operations: SidecarClient owns the
// request ids and what the replies mean.
//
// Threading: Send may be called from any number of threads (a mutex keeps frames whole);
// ReadFrame and read_body() from one thread at a time (whoever holds the client's reading
// role); Shutdown from any thread, at any time, to wake both. The staging area stays
// mapped while the object lives.
#ifndef KVTIER_CLIENT_CONNECTION_H_
#define KVTIER_CLIENT_CONNECTION_H_

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/options.h"
#include "kvtier/status.h"
#include "src/server/protocol/frame.h"
#include "src/util/mutex.h"

namespace kvtier::client {

class Connection {
 public:
  // Connects to the daemon `options` names (its Unix socket, else its TCP address) and
  // performs the handshake for `layout`, giving up at `deadline` or as soon as *cancel
  // (may be null) becomes true. Errors: Unavailable when the daemon cannot be reached or
  // the connection fails (retryable); the daemon's refusal as it sent it (for example
  // FailedPrecondition for a layout mismatch, PermissionDenied for a namespace or token);
  // InvalidArgument for an unusable address; Cancelled when cancelled.
  static Result<std::shared_ptr<Connection>> Open(const SidecarOptions& options,
                                                  const ModelLayout& layout,
                                                  std::chrono::steady_clock::time_point deadline,
                                                  const std::atomic<bool>* cancel);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Sends one request frame: the header, then `body` (a finished FlatBuffer), with the
  // descriptor `fd` attached to its first byte (SCM_RIGHTS; Unix socket only) unless it
  // is -1. Errors: Unavailable when the connection is broken or shut down.
  Status Send(wire::Opcode opcode, uint64_t request_id, std::span<const uint8_t> body, int fd = -1);

  // Reads the next reply frame; `body` is resized to its body. Errors: Unavailable when
  // the connection is closed or broken, InvalidArgument for a frame that cannot be
  // decoded (the stream cannot be resynchronized: drop the connection).
  Status ReadFrame(wire::FrameHeader* header, std::vector<uint8_t>* body);
  // ReadFrame in two steps, for a reply whose last bytes should land elsewhere (an inline
  // Get's blocks, in the caller's buffers): ReadHeader, then ReadBody, which resizes
  // `body` to the body's size and receives all but its last `tail` bytes into it (the
  // tail's place in `body` is left as it was) and those into `tail`'s buffers, in order
  // (their total, at most the body's size).
  Result<wire::FrameHeader> ReadHeader();
  Status ReadBody(const wire::FrameHeader& header, std::vector<uint8_t>* body,
                  std::span<const iovec> tail);

  // Shuts the socket down both ways: ReadFrame and Send return Unavailable from now on,
  // and a poll() on fd() reports a hang-up.
  void Shutdown();

  // The socket, for poll() only (for a hang-up: reading it is ReadFrame's job).
  int fd() const { return fd_; }
  // A buffer for the bodies that ReadFrame reads, reused from frame to frame; the same
  // one-thread-at-a-time rule as ReadFrame.
  std::vector<uint8_t>& read_body() { return read_body_; }

  // What the daemon granted. staging() is null when block bytes travel inline (TCP, or
  // no slots granted); slot i is staging_slot_bytes() bytes at staging() + i * that.
  uint8_t* staging() const { return staging_; }
  uint32_t staging_blocks() const { return staging_blocks_; }
  uint64_t staging_slot_bytes() const { return staging_slot_bytes_; }
  uint8_t* slot(uint32_t i) const { return staging_ + uint64_t{i} * staging_slot_bytes_; }
  uint32_t max_frame_bytes() const { return max_frame_bytes_; }
  // Whether an inline Get's reply ends with its blocks' bytes (HelloReply.get_data_last).
  bool get_data_last() const { return get_data_last_; }
  const std::string& daemon_version() const { return daemon_version_; }
  // "unix:<path>" or "tcp:<host:port>", for messages.
  const std::string& peer() const { return peer_; }

 private:
  Connection(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}
  Status Handshake(const SidecarOptions& options, const ModelLayout& layout, bool unix_socket,
                   std::chrono::steady_clock::time_point deadline, const std::atomic<bool>* cancel);

  const int fd_;
  const std::string peer_;
  Mutex send_mu_;  // a frame is written whole before the next one starts
  uint8_t* staging_ = nullptr;
  uint64_t staging_map_bytes_ = 0;
  uint32_t staging_blocks_ = 0;
  uint64_t staging_slot_bytes_ = 0;
  uint32_t max_frame_bytes_ = wire::kDefaultMaxFrameBytes;
  bool get_data_last_ = false;
  std::string daemon_version_;
  std::vector<uint8_t> read_body_;
};

}  // namespace kvtier::client

#endif  // KVTIER_CLIENT_CONNECTION_H_
