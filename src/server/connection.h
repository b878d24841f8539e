// Connection: one client of kvtierd, from accept to close (PROTOCOL.md). It reads
// frames (FrameReader), serves them (the handshake first, then block transfers and the
// other requests, up to max_in_flight at once) and writes the replies from a queue,
// with the staging area's descriptor attached to the HelloReply. On the Unix socket it
// reads with recvmsg, so that a descriptor sent with a RegisterDevice frame (SCM_RIGHTS)
// arrives with it; the client's GPU tier it names is then this connection's
// DeviceMapping, which GetToDevice copies into.
//
// Threading: a connection lives on one IoShard; every member function runs on that
// shard's thread (no locks). Store work runs elsewhere (the store's async threads, the
// server's worker pool) and holds a shared_ptr to the connection (and its staging area)
// until its completion, posted back to the shard, has run; so a connection closed with
// requests in flight is destroyed only after they finish, and their replies are dropped.
#ifndef KVTIER_SERVER_CONNECTION_H_
#define KVTIER_SERVER_CONNECTION_H_

#include <sys/uio.h>

#include <atomic>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "src/server/device_mapping.h"
#include "src/server/frame_reader.h"
#include "src/server/handshake.h"
#include "src/server/protocol/codec.h"
#include "src/server/server_context.h"
#include "src/server/staging_area.h"

namespace kvtier::server {

class Connection;

// One io thread's connections.
struct IoShard {
  boost::asio::io_context ctx{1};
  // Open connections by id; touched only on ctx's thread.
  std::unordered_map<uint64_t, std::shared_ptr<Connection>> connections;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Socket = boost::asio::generic::stream_protocol::socket;

  // `socket` must belong to shard.ctx. `server` and `shard` must outlive the connection.
  Connection(ServerContext& server, IoShard& shard, Socket socket, const PeerIdentity& peer,
             std::string peer_name);
  ~Connection();

  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Registers with the shard and starts reading.
  void Start();
  // Closes the socket now, dropping unsent replies; requests in flight finish and their
  // completions find the connection closed. Idempotent.
  void Close();

 private:
  using Clock = std::chrono::steady_clock;
  struct Request;
  // A reply frame's bytes: resized without zero-filling (QueueReply writes them all).
  template <typename T>
  struct NoInitAllocator : std::allocator<T> {
    template <typename U>
    struct rebind {
      using other = NoInitAllocator<U>;
    };
    template <typename U>
    void construct(U* p) noexcept {
      ::new (static_cast<void*>(p)) U;
    }
    template <typename U, typename... Args>
    void construct(U* p, Args&&... args) {
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
  };
  using FrameBytes = std::vector<uint8_t, NoInitAllocator<uint8_t>>;
  // An inline Get's blocks that its reply sends from their host-tier slots, pinned until
  // the frame is sent or dropped (counted in reply_pinned_bytes meanwhile): the body's
  // data vector, at `at`, is `spans` one after the other, not the builder's bytes there
  // (which are left unwritten: ReplyLent).
  struct LentReply {
    LentReply(std::atomic<uint64_t>* counter, uint64_t bytes) : counter(counter), bytes(bytes) {}
    ~LentReply() {
      blocks.reset();
      counter->fetch_sub(bytes, std::memory_order_relaxed);
    }
    LentReply(const LentReply&) = delete;
    LentReply& operator=(const LentReply&) = delete;

    std::atomic<uint64_t>* const counter;
    const uint64_t bytes;                         // of the data vector, counted in *counter
    std::unique_ptr<BorrowedBlocks> blocks;       // the pins
    std::vector<std::span<const uint8_t>> spans;  // one per key: its block, or zeros
    size_t from_end = 0;  // where the data vector begins: bytes before the builder's end
  };
  struct OutFrame {
    // Bytes of the frame, and its iovecs from `offset` on (at most `room`): returns how
    // many it wrote, *whole telling whether they reach the frame's end.
    size_t size() const;
    int AppendIov(iovec* iov, int room, bool* whole) const;

    // The header and body; or, with `body`, the header then the body's padding.
    FrameBytes bytes;
    std::unique_ptr<flatbuffers::FlatBufferBuilder> body;  // a request's own (inline Get)
    std::unique_ptr<LentReply> lent;                       // with `body`: sent from slots
    size_t offset = 0;
    int fd = -1;  // sent with the frame's first byte (SCM_RIGHTS), not owned
  };

  // A descriptor received with bytes [begin, end) of the stream (offsets since the
  // connection opened).
  struct ReceivedFd {
    UniqueFd fd;
    uint64_t begin = 0;
    uint64_t end = 0;
  };

  // Reading and dispatch.
  void ReadMore();
  void OnRead(const boost::system::error_code& ec, size_t bytes);
  // ReadMore on the Unix socket: recvmsg, keeping the descriptors that come with bytes.
  void ReceiveMore();
  // Queues the SCM_RIGHTS descriptors of `msg` (received with the `bytes` that follow
  // bytes_received_). False when they break the rules: too many pending, or truncated.
  bool KeepReceivedFds(const struct msghdr& msg, size_t bytes);
  // The descriptor a frame at [begin, end) of the stream takes (a RegisterDevice: the
  // oldest that came with its first byte), after closing those no later frame can take.
  UniqueFd TakeFrameFd(uint16_t opcode, uint64_t begin, uint64_t end);
  void ProcessFrames();
  void HandleFrame(const wire::FrameHeader& header, std::span<const uint8_t> body);
  void HandleHello(Request& req, std::span<const uint8_t> body);
  void HandlePut(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  void HandleGet(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  void HandleContains(Request& req, std::span<const uint8_t> body);
  void HandleDelete(Request& req, std::span<const uint8_t> body);
  void HandleDropSequence(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  void HandleFlush(std::unique_ptr<Request> req);
  void HandleStats(Request& req);
  void HandleIndexBlock(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  void HandleSelect(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  void HandleRegisterDevice(std::unique_ptr<Request> req, std::span<const uint8_t> body,
                            UniqueFd fd);
  void HandleGetToDevice(std::unique_ptr<Request> req, std::span<const uint8_t> body);
  // On a worker, for a GetToDevice into a CUDA pool: pins the members' blocks in the
  // host tier (per key when the batch cannot be pinned whole, for per-member outcomes),
  // copies the pinned ones into the pool, waits until they have landed, unpins.
  static void CopyToCudaPool(EmbeddedStore& store, Request& r, uint64_t block_bytes);
  // The registered pool is device_ from now on.
  void InstallDevice(std::shared_ptr<DeviceMapping> device);
  // Begins req's own reply (req.reply, req.inline_vector) with its data vector of `bytes`,
  // and returns where the vector's bytes go: nothing else may be added to the builder
  // until they are written (or, for ReplyLent, in their place).
  uint8_t* BeginInlineReply(Request& req, uint64_t bytes);
  // A Get over TCP (inline), its namespaces checked (req.outcomes), whose found blocks
  // are all in the host tier, while the server's replies pin less than
  // max_reply_pinned_bytes: replied at once, the frame sending the blocks from their
  // pinned slots, with no copy in the daemon, and true. False, having done nothing,
  // otherwise.
  bool ReplyLent(Request& req, const flatbuffers::Vector<const wire::Key*>* keys);
  // The tail of a Get (and an emulated GetToDevice), its namespaces checked: reads each
  // allowed key's block (req.outcomes[i] OK) from the store into destination(req, i)
  // (void*, block_bytes_ bytes), holding `slots_named` staging slots, and replies when
  // done.
  template <typename Destination>
  void GetBatchInto(std::unique_ptr<Request> req, const flatbuffers::Vector<const wire::Key*>* keys,
                    uint32_t slots_named, Destination destination);
  // Checks the keys' namespaces: req.outcomes gets one entry per key (PermissionDenied
  // for another namespace's key, else OK).
  void CheckNamespaces(Request& req, const flatbuffers::Vector<const wire::Key*>* keys);

  // Asynchronous work: the request goes in flight until Complete runs on this shard.
  Request* BeginAsync(std::unique_ptr<Request> req);
  // The tail of a Put or Get whose `members` blocks go to the store: answered at once
  // when there is none (every key refused; returns null), else the `slots_named` staging
  // slots (0 inline) are held for it and it is begun (BeginAsync).
  Request* BeginBatch(std::unique_ptr<Request> req, size_t members, uint32_t slots_named);
  template <typename Work>
  void RunOnWorkers(std::unique_ptr<Request> req, Work work);
  // The same for a request already begun (BeginAsync, BeginBatch).
  template <typename Work>
  void PostToWorkers(Request* req, Work work);
  static void PostComplete(Request* req);
  void Complete(Request* req);
  // The reply of a request that went to the store or the workers, or failed before.
  void Reply(Request& req);
  // GetToDevice: adds the bytes that landed to the daemon's counter.
  void CountDirectBytes(const Request& req);

  // Replies.
  std::unique_ptr<Request> NewRequest();
  void Recycle(std::unique_ptr<Request> req);
  void ReplyBatch(Request& req);
  void ReplyStatus(Request& req, wire::Opcode opcode, const Status& status);
  void SendError(uint64_t request_id, uint16_t opcode, const Status& status, Clock::time_point t0);
  // Frames the finished fbb_ (or `body`, a request's own builder, which the frame then
  // owns until it is sent: its bytes are not copied) and queues it.
  void QueueReply(wire::Opcode opcode, uint64_t request_id, uint16_t latency_opcode,
                  Clock::time_point t0, int fd = -1,
                  std::unique_ptr<flatbuffers::FlatBufferBuilder> body = nullptr,
                  std::unique_ptr<LentReply> lent = nullptr);
  // Builders for the replies of inline Gets, reused.
  std::unique_ptr<flatbuffers::FlatBufferBuilder> TakeBuilder();
  void GiveBuilder(std::unique_ptr<flatbuffers::FlatBufferBuilder> builder);
  void WriteMore();
  // Stops reading; closes once nothing is in flight and every reply has been written
  // (or after kDrainTimeout).
  void StartDraining();
  void MaybeFinishDraining();

  ServerContext& server_;
  IoShard& shard_;
  Socket socket_;
  const PeerIdentity peer_;
  const std::string peer_name_;
  const uint64_t id_;
  const uint64_t block_bytes_;

  // Session (after a successful Hello).
  const NamespaceConfig* ns_ = nullptr;
  size_t ns_index_ = 0;
  std::string client_name_;
  std::shared_ptr<StagingArea> staging_;
  std::vector<uint8_t> slot_marks_;  // Get: slots named so far (one per staging slot)
  // The client's GPU tier (RegisterDevice); device_pending_ while a CUDA one is opened.
  std::shared_ptr<DeviceMapping> device_;
  bool device_pending_ = false;

  FrameReader reader_;
  uint64_t bytes_received_ = 0;          // Unix socket: stream offset of the next byte received
  uint64_t frame_offset_ = 0;            // stream offset of the next frame handled
  std::deque<ReceivedFd> received_fds_;  // Unix socket, in arrival order
  bool reading_ = false;
  bool closed_ = false;
  bool draining_ = false;
  uint32_t in_flight_ = 0;

  std::deque<OutFrame> out_;
  uint64_t queued_bytes_ = 0;
  bool write_waiting_ = false;
  boost::asio::steady_timer drain_timer_;

  flatbuffers::FlatBufferBuilder fbb_;
  std::vector<std::unique_ptr<Request>> free_requests_;
  std::vector<FrameBytes> free_buffers_;
  std::vector<std::unique_ptr<flatbuffers::FlatBufferBuilder>> free_builders_;
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_CONNECTION_H_
