// SidecarClient: the machinery under SidecarStore. It owns the connection to kvtierd and
// its three jobs: sending pipelined requests and matching their replies by request id,
// moving blocks through the staging slots (Transfers), and reconnecting when the
// connection breaks. SidecarStore turns Store calls into requests on top of it.
//
// Reading replies (leader/follower): at most one thread at a time holds the reading role
// of the current connection; it reads one frame, runs its request's handler, releases
// the role and decides again. A synchronous caller (Call, Submit without a completion)
// takes the role while it waits, so a lone caller reads its own reply on its own thread:
// one wake-up per round trip, as a blocking socket ping-pong. Handlers therefore run on
// whichever thread reads: the caller's, another synchronous caller's, or the background
// thread's.
//
// Threads: a background thread and a dispatcher. The background thread sleeps in poll()
// on the socket (for a hang-up only, not for data) and an eventfd while it is not needed;
// it takes the reading role when requests are in flight that no synchronous caller is
// there to read (asynchronous calls, or what is left when the last caller returns). It
// also breaks the connection (fails what was in flight) when a reader hit an error, a
// request timed out or the daemon hung up, then reconnects with backoff. The dispatcher
// runs the completions of asynchronous calls, issues the chunks of transfers that waited
// for free slots, and notices requests past SidecarOptions::request_timeout_ms (it waits
// until the oldest one's deadline; requests are kept in id order, which is deadline
// order; the background thread while idle and a caller waiting for the reading role
// watch them as well). Callers send on their own thread; a synchronous caller also
// issues waiting chunks and reads replies while it waits, so that a synchronous call
// made from a completion cannot wait on the dispatcher it occupies.
//
// Guarantees: Call's `parse` runs while its caller waits (so it may write into the
// caller's buffers); a synchronous caller returns once its request has its reply or was
// failed (by a break, a timeout, or the destructor); the destructor lets what is in flight
// finish (for up to connect_timeout_ms), then fails what is left with Cancelled.
//
// Thread safety: every public method may be called from any thread, until the destructor
// starts.
#ifndef KVTIER_CLIENT_SIDECAR_CLIENT_H_
#define KVTIER_CLIENT_SIDECAR_CLIENT_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "src/client/connection.h"
#include "src/server/protocol/kvtier_generated.h"
#include "src/util/fd.h"
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

class SidecarClient {
 public:
  // Connects to the daemon and performs the handshake, retrying a daemon that cannot be
  // reached (Unavailable) until options.connect_timeout_ms has passed; a refusal is
  // returned at once. Starts the background thread and the dispatcher.
  static Result<std::unique_ptr<SidecarClient>> Connect(const SidecarOptions& options,
                                                        const ModelLayout& layout);
  // Waits (up to connect_timeout_ms) for what is in flight to complete, then fails what
  // is left with Cancelled and joins the threads.
  ~SidecarClient();
  SidecarClient(const SidecarClient&) = delete;
  SidecarClient& operator=(const SidecarClient&) = delete;

  // Handles a reply: `body` is the reply's body, verified as the table of the request's
  // opcode; or `status` is not OK and `body` empty (an Error frame, or no reply will come:
  // Unavailable when the connection broke or a request timed out, Cancelled when the
  // client is closing). Runs on the thread that read the reply (see above), or on the
  // thread that failed the request.
  using ReplyHandler = std::function<void(Status status, std::span<const uint8_t> body)>;

  // Sends `fbb` (finished) as a request and waits for the reply, which `parse` reads
  // while this caller waits (usually on this thread; so it may write into the caller's
  // buffers); returns what `parse` returned, or the failure.
  Status Call(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
              const std::function<Status(std::span<const uint8_t>)>& parse);

  // Starts a transfer. With transfer->done set, returns at once and the completion runs on
  // the dispatcher; otherwise returns the outcome once every member is settled.
  Status Submit(std::shared_ptr<Transfer> transfer);

  // Runs `fn` on the dispatcher thread (the completions of asynchronous calls).
  void Post(std::function<void()> fn);

  // The direct path to the client's GPU tier (PROTOCOL.md, "Direct copies"). Registers
  // `request` (a finished RegisterDeviceRequest) with `fd` (the emulated pool's memfd,
  // or -1; duplicated, kept until UnregisterDevice) on the current connection, and again
  // on every connection made after a reconnection; returns this first registration's
  // outcome (OK when disconnected now: it is sent once connected).
  Status RegisterDevice(const flatbuffers::FlatBufferBuilder& request, int fd) KVTIER_EXCLUDES(mu_);
  // Stops registering (the pool is going away). What the daemon mapped stays mapped
  // until the connection closes.
  void UnregisterDevice() KVTIER_EXCLUDES(mu_);
  // The connection generation on which the registration is in effect; 0 when none (not
  // registered, refused, or not yet re-registered after a reconnection).
  uint64_t device_generation() const KVTIER_EXCLUDES(mu_);
  // GetToDevice on connection `generation` (device_generation()): copies keys[i]'s block
  // to byte offsets[i] of the registered pool; statuses[i] gets each member's outcome (a
  // failure of the whole request lands in every member). Returns FirstFailure.
  Status GetToDevice(std::span<const BlockKey> keys, std::span<const uint64_t> offsets,
                     std::span<Status> statuses, uint64_t generation) KVTIER_EXCLUDES(mu_);

  // Staging slots lent to a caller (Store::Borrow and Reserve; PROTOCOL.md, "Block
  // bytes: the staging area"): slot indices on the connection of `generation`, whose
  // mapping `connection` keeps alive (Connection::slot) after a reconnection too.
  struct LentSlots {
    std::shared_ptr<Connection> connection;
    uint64_t generation = 0;
    std::vector<uint32_t> slots;
  };
  // Takes `count` (> 0) free staging slots, waiting while chunks in flight hold them.
  // Errors: FailedPrecondition without a staging area (a TCP connection); InvalidArgument
  // for more slots than the area has; ResourceExhausted when the slots lent and not given
  // back leave fewer than `count` (they would never come); Unavailable while
  // disconnected; Cancelled once closing.
  Result<LentSlots> LendSlots(uint32_t count) KVTIER_EXCLUDES(mu_);
  // Gives lent slots back (each once). Those of an older connection went with it.
  void ReturnSlots(uint64_t generation, std::span<const uint32_t> slots) KVTIER_EXCLUDES(mu_);
  // A Put (`put`) or Get of keys[i]'s block from or into lent staging slot slots[i], on
  // connection `generation`; statuses[i] gets each member's outcome (a failure of the
  // whole request lands in every member). Returns FirstFailure.
  Status SlotBatch(bool put, std::span<const BlockKey> keys, std::span<const uint32_t> slots,
                   std::span<Status> statuses, uint64_t generation) KVTIER_EXCLUDES(mu_);

  SidecarStatus status() const;

 private:
  using Clock = std::chrono::steady_clock;
  // Where the last bytes of a reply go instead of the read buffer: an inline Get's
  // blocks (the daemon builds its reply with the blocks' bytes last), received straight
  // into the caller's buffers.
  struct ReplyTail {
    std::vector<iovec> to;  // in order; their total is `bytes`
    uint64_t bytes = 0;
    bool delivered = false;  // set by the reader before the handler runs, on its thread
  };
  struct Pending {
    wire::Opcode opcode = wire::Opcode::kError;
    ReplyHandler handler;
    Clock::time_point deadline;       // of its reply; time_point::max() without a timeout
    std::shared_ptr<ReplyTail> tail;  // null: the whole reply into the read buffer
    // A reader is receiving its reply into `tail`: Break leaves it for that reader,
    // which runs its handler (with the failure when the read fails).
    bool claimed = false;
  };
  struct Chunk;

  SidecarClient(const SidecarOptions& options, const ModelLayout& layout,
                std::shared_ptr<Connection> connection, int event_fd);

  // Registers `handler` for a new request id and sends on the current connection (which
  // must be of `generation`, unless that is 0). When there is none, the handler runs with
  // the failure on this thread; when the send fails, the connection is failed and with
  // it the request. `caller_waits`: the caller calls WaitUntil next (counted in waiters_
  // from now on, so that the background thread is not woken to read the reply).
  // `tail`: the reply's last bytes go there (see ReplyTail).
  void Send(wire::Opcode opcode, std::span<const uint8_t> body, ReplyHandler handler,
            uint64_t generation = 0, bool caller_waits = false, int fd = -1,
            std::shared_ptr<ReplyTail> tail = nullptr) KVTIER_EXCLUDES(mu_);
  // Call on connection `generation` (0: the current one), with `fd` attached.
  Status CallOn(wire::Opcode opcode, std::span<const uint8_t> body,
                const std::function<Status(std::span<const uint8_t>)>& parse, uint64_t generation,
                int fd) KVTIER_EXCLUDES(mu_);
  // Sends `fbb`, a request of `opcode` whose reply is a BatchReply of statuses.size()
  // members, on connection `generation` and sets statuses from it. Returns FirstFailure.
  Status CallBatch(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
                   std::span<Status> statuses, uint64_t generation) KVTIER_EXCLUDES(mu_);
  // LendSlots' decision, under the lock: true when done (*lent filled, or *refused set).
  bool TryLendLocked(uint32_t count, LentSlots* lent, Status* refused) KVTIER_REQUIRES(mu_);
  // Fails the unsent members of the waiting transfers with `why`.
  void FailWaitingLocked(const Status& why) KVTIER_REQUIRES(mu_);
  // When every slot is lent out, the waiting transfers can never be sent: fails them.
  void FailStarvedLocked() KVTIER_REQUIRES(mu_);
  // Whether the registration is in effect on the current connection.
  bool DirectDeviceLocked() const KVTIER_REQUIRES(mu_);
  // Sends the device registration on connection `generation`; its reply records the
  // outcome. `wait`: returns it (else OK at once).
  Status SendRegistration(uint64_t generation, bool wait) KVTIER_EXCLUDES(mu_);
  Status NotConnectedLocked() const KVTIER_REQUIRES(mu_);
  // Installs a handshaken connection (the first, or after a reconnection).
  void Install(std::shared_ptr<Connection> connection) KVTIER_REQUIRES(mu_);
  // The connection broke (or the client is closing) with `why`: fails every request in
  // flight and every transfer member not sent yet, and forgets the connection.
  void Break(const Status& why) KVTIER_EXCLUDES(mu_);
  // The connection of `generation` failed with `why` (the first reason is kept): shuts it
  // down and has the background thread Break it. Nothing when it is gone already.
  void FailLocked(uint64_t generation, Status why) KVTIER_REQUIRES(mu_);
  // Wakes the background thread (idle in poll) to look at the state again.
  void KickLocked() KVTIER_REQUIRES(mu_);
  // Whether a synchronous caller may take the reading role now.
  bool CanReadLocked() const KVTIER_REQUIRES(mu_);
  // With the reading role for `generation`: reads one frame and runs its handler, then
  // releases the role (and fails the connection when the read failed).
  void ReadOne(Connection& connection, uint64_t generation) KVTIER_EXCLUDES(mu_);
  // Runs the handler of the reply in `header` and `body`.
  void Dispatch(const Connection& connection, const wire::FrameHeader& header,
                std::span<const uint8_t> body) KVTIER_EXCLUDES(mu_);
  // Issues chunks of waiting transfers while slots are free. Any thread.
  void Pump() KVTIER_EXCLUDES(mu_);
  bool PumpableLocked() const KVTIER_REQUIRES(mu_);
  void SendChunk(std::shared_ptr<Chunk> chunk) KVTIER_EXCLUDES(mu_);
  void OnChunkReply(const Chunk& chunk, const Status& status, std::span<const uint8_t> body);
  // Settles `count` members of `transfer`; finishes it when none is left.
  void SettleLocked(const std::shared_ptr<Transfer>& transfer, size_t count) KVTIER_REQUIRES(mu_);
  void FinishLocked(const std::shared_ptr<Transfer>& transfer) KVTIER_REQUIRES(mu_);
  // Waits until `done`, reading replies (the reading role) and issuing waiting chunks
  // meanwhile. The caller counted itself in waiters_ before sending; this uncounts it.
  void WaitUntil(const std::function<bool()>& done) KVTIER_EXCLUDES(mu_);
  // Fails the connection when the oldest request is past its deadline; returns when to
  // look again.
  Clock::time_point CheckDeadlinesLocked() KVTIER_REQUIRES(mu_);

  void BackgroundLoop();
  // Sleeps in poll() until the eventfd is kicked, `connection` hangs up, or `until`.
  void Idle(const Connection& connection, uint64_t generation, Clock::time_point until)
      KVTIER_EXCLUDES(mu_);
  void DispatcherLoop();

  const SidecarOptions options_;
  const ModelLayout layout_;
  const uint64_t block_bytes_;
  const int event_fd_;                // kicks the background thread out of poll()
  std::atomic<bool> closing_{false};  // cancels a reconnection attempt in progress

  mutable Mutex mu_;
  // Synchronous callers (and the destructor) wait here: replies, the reading role
  // released, transfers settled, breaks.
  std::condition_variable_any cv_;
  // The dispatcher waits here: completions, chunks to issue, deadlines, the end.
  std::condition_variable_any dispatch_cv_;
  std::shared_ptr<Connection> connection_ KVTIER_GUARDED_BY(mu_);  // null: disconnected
  uint64_t generation_ KVTIER_GUARDED_BY(mu_) = 0;  // of connection_; bumped per connection
  uint64_t next_request_id_ KVTIER_GUARDED_BY(mu_) = 1;
  // In id order, which is deadline order.
  std::map<uint64_t, Pending> pending_ KVTIER_GUARDED_BY(mu_);
  // The generation whose reading role is held (0: none). A holder of an older one is
  // finishing a read on a connection that was shut down.
  uint64_t reader_generation_ KVTIER_GUARDED_BY(mu_) = 0;
  // Synchronous callers between their send and their return: they will read.
  uint32_t waiters_ KVTIER_GUARDED_BY(mu_) = 0;
  // Why the current connection failed, until the background thread Breaks it.
  Status failed_ KVTIER_GUARDED_BY(mu_);
  // The generation whose socket reported a hang-up while idle (0: none): the background
  // thread reads it to its end.
  uint64_t hangup_generation_ KVTIER_GUARDED_BY(mu_) = 0;
  bool kicked_ KVTIER_GUARDED_BY(mu_) = false;  // event_fd_ written, not yet drained
  // Slot indices free for a chunk (virtual ones, over TCP: a bound on bytes in flight).
  std::vector<uint32_t> free_slots_ KVTIER_GUARDED_BY(mu_);
  uint32_t total_slots_ KVTIER_GUARDED_BY(mu_) = 0;
  std::deque<std::shared_ptr<Transfer>> waiting_ KVTIER_GUARDED_BY(mu_);  // members unsent
  // Chunks Pump took off waiting_ that are not yet in pending_ (being built and sent).
  uint32_t chunks_in_transit_ KVTIER_GUARDED_BY(mu_) = 0;
  // Slots of the current connection lent out (LendSlots) and not given back.
  uint32_t lent_slots_ KVTIER_GUARDED_BY(mu_) = 0;
  // Callers of LendSlots waiting for slots: a slot coming free wakes them.
  uint32_t slot_waiters_ KVTIER_GUARDED_BY(mu_) = 0;
  std::deque<std::function<void()>> completions_ KVTIER_GUARDED_BY(mu_);
  bool stopping_ KVTIER_GUARDED_BY(mu_) = false;     // threads: exit
  bool reader_done_ KVTIER_GUARDED_BY(mu_) = false;  // no handler will run any more
  uint64_t reconnects_ KVTIER_GUARDED_BY(mu_) = 0;
  std::string last_error_ KVTIER_GUARDED_BY(mu_);
  std::string daemon_version_ KVTIER_GUARDED_BY(mu_);
  bool shared_memory_ KVTIER_GUARDED_BY(mu_) = false;
  // The device registration (empty: none), its descriptor (a duplicate, owned), the
  // generation it is in effect on, and why it was last refused.
  std::vector<uint8_t> device_request_ KVTIER_GUARDED_BY(mu_);
  std::shared_ptr<const UniqueFd> device_fd_ KVTIER_GUARDED_BY(mu_);  // null: none
  uint64_t device_generation_ KVTIER_GUARDED_BY(mu_) = 0;
  std::string device_error_ KVTIER_GUARDED_BY(mu_);

  std::thread background_;
  std::thread dispatcher_;
};

}  // namespace kvtier::client

#endif  // KVTIER_CLIENT_SIDECAR_CLIENT_H_
