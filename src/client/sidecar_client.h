// SidecarClient: the machinery under SidecarStore. It owns the connection to kvtierd and
// its three jobs: sending pipelined requests and matching their replies by request id,
// moving blocks through the staging slots (Transfers), and reconnecting when the
// connection breaks. SidecarStore turns Store calls into requests on top of it.
//
// Threads: a reader (reads replies and runs their handlers; when the connection breaks it
// fails what was in flight, then reconnects with backoff) and a dispatcher (runs the
// completions of asynchronous calls, and issues the chunks of transfers that waited for
// free slots). Callers send on their own thread; a synchronous caller also issues waiting
// chunks while it waits, so that a synchronous call made from a completion cannot wait
// on the dispatcher it occupies.
//
// Thread safety: every public method may be called from any thread, until the destructor
// starts.
#ifndef KVTIER_CLIENT_SIDECAR_CLIENT_H_
#define KVTIER_CLIENT_SIDECAR_CLIENT_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "src/client/connection.h"
#include "src/server/protocol/kvtier_generated.h"
#include "src/util/mutex.h"

namespace kvtier::client {

// A Put or Get of a batch of blocks, moved in chunks that fit the free staging slots.
// The caller fills the members, sets statuses[i] to the local verdict (non-OK members
// are not sent) and hands it to SidecarClient::Submit.
struct Transfer {
  bool put = false;
  std::span<const BlockWrite> writes;  // put
  std::span<const BlockRead> reads;    // get
  std::span<Status> statuses;          // one per member; the caller's, or `one_status`
  // Storage for the single-block forms (the spans above point here).
  BlockWrite one_write;
  BlockRead one_read;
  Status one_status;
  // Runs (on the dispatcher) with the first failure once every member is settled; empty
  // for a synchronous caller, which waits on `finished`.
  Store::Completion done;

  // Guarded by SidecarClient::mu_ (a Transfer is reached only through the client).
  size_t next = 0;       // members [0, next) are sent or settled
  size_t unsettled = 0;  // members without their outcome yet
  bool finished = false;

  size_t size() const { return put ? writes.size() : reads.size(); }
  const BlockKey& key(size_t i) const { return put ? writes[i].key : reads[i].key; }
};

// The outcome of every member: the first failure in member order, or OK.
Status FirstFailure(std::span<const Status> statuses);

class SidecarClient {
 public:
  // Connects to the daemon and performs the handshake, retrying a daemon that cannot be
  // reached (Unavailable) until options.connect_timeout_ms has passed; a refusal is
  // returned at once. Starts the reader and the dispatcher.
  static Result<std::unique_ptr<SidecarClient>> Connect(const SidecarOptions& options,
                                                        const ModelLayout& layout);
  // Waits (up to connect_timeout_ms) for what is in flight to complete, then fails what
  // is left with Cancelled and joins the threads.
  ~SidecarClient();
  SidecarClient(const SidecarClient&) = delete;
  SidecarClient& operator=(const SidecarClient&) = delete;

  // Handles a reply: `body` is the reply's body, verified as the table of the request's
  // opcode; or `status` is not OK and `body` empty (an Error frame, or no reply will come:
  // Unavailable when the connection broke, Cancelled when the client is closing).
  using ReplyHandler = std::function<void(Status status, std::span<const uint8_t> body)>;

  // Sends `fbb` (finished) as a request and waits for the reply, which `parse` reads on
  // the reader thread while this caller waits (so it may write into the caller's
  // buffers); returns what `parse` returned, or the failure.
  Status Call(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
              const std::function<Status(std::span<const uint8_t>)>& parse);

  // Starts a transfer. With transfer->done set, returns at once and the completion runs on
  // the dispatcher; otherwise returns the outcome once every member is settled.
  Status Submit(std::shared_ptr<Transfer> transfer);

  // Runs `fn` on the dispatcher thread (the completions of asynchronous calls).
  void Post(std::function<void()> fn);

  SidecarStatus status() const;

 private:
  struct Pending {
    wire::Opcode opcode = wire::Opcode::kError;
    ReplyHandler handler;
  };
  struct Chunk;

  SidecarClient(const SidecarOptions& options, const ModelLayout& layout,
                std::shared_ptr<Connection> connection);

  // Registers `handler` for a new request id and sends on the current connection (which
  // must be of `generation`, unless that is 0). When there is none, the handler runs with
  // the failure on this thread; when the send fails, the reader fails the request.
  void Send(wire::Opcode opcode, std::span<const uint8_t> body, ReplyHandler handler,
            uint64_t generation = 0) KVTIER_EXCLUDES(mu_);
  Status NotConnectedLocked() const KVTIER_REQUIRES(mu_);
  // Installs a handshaken connection (the first, or after a reconnection).
  void Install(std::shared_ptr<Connection> connection) KVTIER_REQUIRES(mu_);
  // The connection broke (or the client is closing) with `why`: fails every request in
  // flight and every transfer member not sent yet, and forgets the connection.
  void Break(const Status& why) KVTIER_EXCLUDES(mu_);
  // Reads replies and runs their handlers until the connection fails; returns why.
  Status ReadReplies(Connection& connection) KVTIER_EXCLUDES(mu_);
  // Issues chunks of waiting transfers while slots are free. Any thread.
  void Pump() KVTIER_EXCLUDES(mu_);
  bool PumpableLocked() const KVTIER_REQUIRES(mu_);
  void SendChunk(std::shared_ptr<Chunk> chunk) KVTIER_EXCLUDES(mu_);
  void OnChunkReply(const Chunk& chunk, const Status& status, std::span<const uint8_t> body);
  // Settles `count` members of `transfer`; finishes it when none is left.
  void SettleLocked(const std::shared_ptr<Transfer>& transfer, size_t count) KVTIER_REQUIRES(mu_);
  void FinishLocked(const std::shared_ptr<Transfer>& transfer) KVTIER_REQUIRES(mu_);
  // Waits on cv_ until `done`, issuing waiting chunks meanwhile.
  void WaitUntil(const std::function<bool()>& done) KVTIER_EXCLUDES(mu_);

  void ReaderLoop();
  void DispatcherLoop();

  const SidecarOptions options_;
  const ModelLayout layout_;
  const uint64_t block_bytes_;
  std::atomic<bool> closing_{false};  // cancels a reconnection attempt in progress

  mutable Mutex mu_;
  std::condition_variable_any cv_;                                 // any change below
  std::shared_ptr<Connection> connection_ KVTIER_GUARDED_BY(mu_);  // null: disconnected
  uint64_t generation_ KVTIER_GUARDED_BY(mu_) = 0;  // of connection_; bumped per connection
  uint64_t next_request_id_ KVTIER_GUARDED_BY(mu_) = 1;
  std::unordered_map<uint64_t, Pending> pending_ KVTIER_GUARDED_BY(mu_);
  // Slot indices free for a chunk (virtual ones, over TCP: a bound on bytes in flight).
  std::vector<uint32_t> free_slots_ KVTIER_GUARDED_BY(mu_);
  uint32_t total_slots_ KVTIER_GUARDED_BY(mu_) = 0;
  std::deque<std::shared_ptr<Transfer>> waiting_ KVTIER_GUARDED_BY(mu_);  // members unsent
  std::deque<std::function<void()>> completions_ KVTIER_GUARDED_BY(mu_);
  bool stopping_ KVTIER_GUARDED_BY(mu_) = false;     // threads: exit
  bool reader_done_ KVTIER_GUARDED_BY(mu_) = false;  // no handler will run any more
  uint64_t reconnects_ KVTIER_GUARDED_BY(mu_) = 0;
  std::string last_error_ KVTIER_GUARDED_BY(mu_);
  std::string daemon_version_ KVTIER_GUARDED_BY(mu_);
  bool shared_memory_ KVTIER_GUARDED_BY(mu_) = false;

  std::thread reader_;
  std::thread dispatcher_;
};

}  // namespace kvtier::client

#endif  // KVTIER_CLIENT_SIDECAR_CLIENT_H_
