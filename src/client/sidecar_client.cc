#include "src/client/sidecar_client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "src/server/protocol/codec.h"
#include "src/util/log.h"

namespace kvtier::client {

// A chunk of a transfer in flight: members (indices into the transfer) and the slots
// their bytes are in, on the connection of `generation`.
struct SidecarClient::Chunk {
  std::shared_ptr<Transfer> transfer;
  std::shared_ptr<Connection> connection;
  uint64_t generation = 0;
  std::vector<uint32_t> members;
  std::vector<uint32_t> slots;
  std::shared_ptr<ReplyTail> tail;  // an inline Get: the blocks go straight to the reads
};

namespace {

// Bytes of a frame besides its members (header, tables, vector lengths), generously.
constexpr uint64_t kFrameOverheadBytes = 4096;
// Bytes a member adds to a Put or Get frame or its reply, besides inline block bytes: a
// key (32), a slot (4), an outcome (a table and its message: bounded by the daemon's
// messages, which are short).
constexpr uint64_t kMemberBytes = 256;

// A chunk's block bytes at most: a batch moves in several chunks, so that this side's
// copies of one (into or out of the staging slots) overlap the daemon's of another.
constexpr uint64_t kChunkBytes = uint64_t{1} << 20;

flatbuffers::Offset<flatbuffers::Vector<const wire::Key*>> WireKeys(
    flatbuffers::FlatBufferBuilder& fbb, std::span<const BlockKey> keys) {
  std::vector<wire::Key> wire_keys(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) wire_keys[i] = wire::ToWire(keys[i]);
  return fbb.CreateVectorOfStructs(wire_keys);
}

uint64_t MembersPerFrame(const Connection& c, uint64_t block_bytes) {
  const uint64_t per = kMemberBytes + (c.staging() != nullptr ? 0 : block_bytes);
  const uint64_t room =
      c.max_frame_bytes() > kFrameOverheadBytes ? c.max_frame_bytes() - kFrameOverheadBytes : 0;
  return std::max<uint64_t>(1, room / per);
}

}  // namespace

SidecarClient::SidecarClient(const SidecarOptions& options, const ModelLayout& layout,
                             std::shared_ptr<Connection> connection, int event_fd)
    : options_(options),
      layout_(layout),
      block_bytes_(layout.BytesPerBlock()),
      event_fd_(event_fd) {
  {
    MutexLock lock(&mu_);
    Install(std::move(connection));
  }
  background_ = std::thread([this] { BackgroundLoop(); });
  dispatcher_ = std::thread([this] { DispatcherLoop(); });
}

Result<std::unique_ptr<SidecarClient>> SidecarClient::Connect(const SidecarOptions& options,
                                                              const ModelLayout& layout) {
  KVTIER_RETURN_IF_ERROR(layout.Validate());
  if (options.staging_blocks == 0 || options.staging_blocks > (1u << 16)) {
    return Status::InvalidArgument("sidecar staging_blocks must be in [1, 65536], got " +
                                   std::to_string(options.staging_blocks));
  }
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::milliseconds(options.connect_timeout_ms);
  auto backoff = std::chrono::milliseconds(10);
  const auto max_backoff =
      std::chrono::milliseconds(std::max<uint32_t>(options.max_backoff_ms, 10));
  for (;;) {
    Result<std::shared_ptr<Connection>> c = Connection::Open(options, layout, deadline, nullptr);
    if (c.ok()) {
      Connection& conn = **c;
      if (conn.staging() == nullptr &&
          layout.BytesPerBlock() + kFrameOverheadBytes + kMemberBytes > conn.max_frame_bytes()) {
        return Status::NotSupported("blocks of " + std::to_string(layout.BytesPerBlock()) +
                                    " bytes do not fit kvtierd's frames of " +
                                    std::to_string(conn.max_frame_bytes()) +
                                    " bytes, and block bytes travel inline over " + conn.peer());
      }
      const int event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      if (event_fd < 0) {
        return Status::Internal(std::string("eventfd for the sidecar client: ") +
                                std::strerror(errno));
      }
      return std::unique_ptr<SidecarClient>(
          new SidecarClient(options, layout, std::move(*c), event_fd));
    }
    const Status& s = c.status();
    if (s.code() != StatusCode::kUnavailable) return s;
    const auto now = Clock::now();
    if (now >= deadline) {
      const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(now - start);
      return Status::Unavailable(s.message() + " (gave up after " + std::to_string(waited.count()) +
                                 " ms)");
    }
    // Once more at the deadline at the latest.
    std::this_thread::sleep_for(
        std::min<Clock::duration>(backoff, deadline - now + std::chrono::milliseconds(1)));
    backoff = std::min(backoff * 2, max_backoff);
  }
}

SidecarClient::~SidecarClient() {
  {
    // Let what is in flight finish while the daemon is there, for a bounded time (the
    // background thread reads the replies).
    MutexLock lock(&mu_);
    const auto deadline = Clock::now() + std::chrono::milliseconds(options_.connect_timeout_ms);
    while (connection_ != nullptr &&
           (!pending_.empty() || !waiting_.empty() || chunks_in_transit_ != 0) &&
           Clock::now() < deadline) {
      cv_.wait_until(mu_, deadline);
    }
    stopping_ = true;
    if (connection_ != nullptr) connection_->Shutdown();
    KickLocked();
  }
  closing_ = true;
  cv_.notify_all();
  dispatch_cv_.notify_all();
  background_.join();
  dispatcher_.join();
  ::close(event_fd_);
}

void SidecarClient::Install(std::shared_ptr<Connection> connection) {
  connection_ = std::move(connection);
  ++generation_;
  failed_ = Status::OK();
  hangup_generation_ = 0;
  total_slots_ =
      connection_->staging() != nullptr ? connection_->staging_blocks() : options_.staging_blocks;
  free_slots_.clear();
  for (uint32_t i = total_slots_; i > 0; --i) free_slots_.push_back(i - 1);
  lent_slots_ = 0;
  daemon_version_ = connection_->daemon_version();
  shared_memory_ = connection_->staging() != nullptr;
}

// --- Requests and replies -------------------------------------------------------------

void SidecarClient::Send(wire::Opcode opcode, std::span<const uint8_t> body, ReplyHandler handler,
                         uint64_t generation, bool caller_waits, int fd,
                         std::shared_ptr<ReplyTail> tail) {
  std::shared_ptr<Connection> connection;
  uint64_t id = 0;
  uint64_t sent_generation = 0;
  Status refused;
  {
    MutexLock lock(&mu_);
    if (caller_waits) ++waiters_;
    if (stopping_) {
      refused = Status::Cancelled("the store is closing");
    } else if (connection_ == nullptr || (generation != 0 && generation != generation_)) {
      refused = NotConnectedLocked();
    } else {
      id = next_request_id_++;
      connection = connection_;
      sent_generation = generation_;
      const Clock::time_point deadline =
          options_.request_timeout_ms == 0
              ? Clock::time_point::max()
              : Clock::now() + std::chrono::milliseconds(options_.request_timeout_ms);
      pending_.emplace_hint(pending_.end(), id,
                            Pending{opcode, std::move(handler), deadline, std::move(tail)});
      if (reader_generation_ != generation_) {
        if (waiters_ == 0) {
          KickLocked();  // nobody to read the reply: the background thread does
        } else if (!caller_waits) {
          cv_.notify_all();  // a caller may wait with nothing to read until now
        }
      }
    }
  }
  if (!refused.ok()) {
    handler(refused, {});
    return;
  }
  Status sent = connection->Send(opcode, id, body, fd);
  if (!sent.ok()) {
    // Fails every pending request, this one included.
    MutexLock lock(&mu_);
    FailLocked(sent_generation, std::move(sent));
  }
}

Status SidecarClient::NotConnectedLocked() const {
  return Status::Unavailable("not connected to kvtierd" +
                             (last_error_.empty() ? std::string() : " (" + last_error_ + ")") +
                             "; reconnecting");
}

Status SidecarClient::Call(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
                           const std::function<Status(std::span<const uint8_t>)>& parse) {
  return CallOn(opcode, std::span<const uint8_t>(fbb.GetBufferPointer(), fbb.GetSize()), parse,
                /*generation=*/0, /*fd=*/-1);
}

Status SidecarClient::CallOn(wire::Opcode opcode, std::span<const uint8_t> body,
                             const std::function<Status(std::span<const uint8_t>)>& parse,
                             uint64_t generation, int fd) {
  bool done = false;
  Status result;
  Send(
      opcode, body,
      [&](Status status, std::span<const uint8_t> reply) {
        Status r = status.ok() ? parse(reply) : std::move(status);
        MutexLock lock(&mu_);
        result = std::move(r);
        done = true;
        cv_.notify_all();
      },
      generation, /*caller_waits=*/true, fd);
  WaitUntil([&] { return done; });
  return result;
}

// --- The direct path to the client's GPU tier ----------------------------------------

Status SidecarClient::RegisterDevice(const flatbuffers::FlatBufferBuilder& request, int fd) {
  std::shared_ptr<const UniqueFd> held;
  if (fd >= 0) {
    const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) return Status::FromErrno(errno, "dup of the GPU tier's memfd");
    held = std::make_shared<const UniqueFd>(copy);
  }
  uint64_t generation = 0;
  {
    MutexLock lock(&mu_);
    device_request_.assign(request.GetBufferPointer(),
                           request.GetBufferPointer() + request.GetSize());
    device_fd_ = std::move(held);
    device_generation_ = 0;
    device_error_.clear();
    // Connections installed from now on register in the background thread.
    if (connection_ != nullptr) generation = generation_;
  }
  return generation == 0 ? Status::OK() : SendRegistration(generation, /*wait=*/true);
}

void SidecarClient::UnregisterDevice() {
  MutexLock lock(&mu_);
  device_request_.clear();
  device_fd_.reset();
  device_generation_ = 0;
}

uint64_t SidecarClient::device_generation() const {
  MutexLock lock(&mu_);
  return DirectDeviceLocked() ? device_generation_ : 0;
}

bool SidecarClient::DirectDeviceLocked() const {
  return connection_ != nullptr && device_generation_ == generation_;
}

Status SidecarClient::SendRegistration(uint64_t generation, bool wait) {
  std::vector<uint8_t> request;
  std::shared_ptr<const UniqueFd> fd;
  {
    MutexLock lock(&mu_);
    if (device_request_.empty()) return Status::OK();
    request = device_request_;
    fd = device_fd_;  // kept open while it is sent
  }
  // The reply's outcome, recorded for device_generation() and status().
  auto record = [this, generation](Status status, std::span<const uint8_t> body) {
    if (status.ok()) {
      status = wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(body.data())->outcome());
    }
    MutexLock lock(&mu_);
    if (status.ok()) {
      if (generation == generation_ && !device_request_.empty()) device_generation_ = generation;
      device_error_.clear();
    } else {
      device_error_ = status.ToString();
      Log().warn(
          "kvtierd did not take this client's GPU tier ({}); its misses go through the "
          "staging area",
          device_error_);
    }
    return status;
  };
  const int raw_fd = fd != nullptr ? fd->get() : -1;  // `fd` keeps it open until sent
  if (wait) {
    // CallOn hands `parse` replies only; a failure to get one is recorded here.
    Status s = CallOn(
        wire::Opcode::kRegisterDevice, request,
        [&](std::span<const uint8_t> body) { return record(Status::OK(), body); }, generation,
        raw_fd);
    if (!s.ok()) {
      MutexLock lock(&mu_);
      device_error_ = s.ToString();
    }
    return s;
  }
  Send(
      wire::Opcode::kRegisterDevice, request,
      [record](Status status, std::span<const uint8_t> body) { (void)record(status, body); },
      generation, /*caller_waits=*/false, raw_fd);
  return Status::OK();
}

Status SidecarClient::GetToDevice(std::span<const BlockKey> keys, std::span<const uint64_t> offsets,
                                  std::span<Status> statuses, uint64_t generation) {
  flatbuffers::FlatBufferBuilder fbb(256 + keys.size() * (sizeof(wire::Key) + sizeof(uint64_t)));
  auto key_vector = WireKeys(fbb, keys);
  auto offset_vector = fbb.CreateVector(offsets.data(), offsets.size());
  fbb.Finish(wire::CreateGetToDeviceRequest(fbb, key_vector, offset_vector));
  return CallBatch(wire::Opcode::kGetToDevice, fbb, statuses, generation);
}

Status SidecarClient::CallBatch(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
                                std::span<Status> statuses, uint64_t generation) {
  const size_t n = statuses.size();
  const Status whole = CallOn(
      opcode, std::span<const uint8_t>(fbb.GetBufferPointer(), fbb.GetSize()),
      [&](std::span<const uint8_t> body) -> Status {
        const auto* reply = flatbuffers::GetRoot<wire::BatchReply>(body.data());
        const auto* members = reply->members();
        if (members != nullptr && members->size() != n) {
          return Status::Internal("kvtierd answered " + std::to_string(members->size()) +
                                  " outcomes to a batch of " + std::to_string(n));
        }
        const Status outcome = wire::FromWire(reply->outcome());
        for (size_t i = 0; i < n; ++i) {
          statuses[i] = members != nullptr ? wire::FromWire(members->Get(i)) : outcome;
        }
        return Status::OK();
      },
      generation, /*fd=*/-1);
  if (!whole.ok()) {
    for (Status& st : statuses) st = whole;
  }
  return FirstFailure(statuses);
}

// --- Staging slots lent to the caller ------------------------------------------------

bool SidecarClient::TryLendLocked(uint32_t count, LentSlots* lent, Status* refused) {
  if (stopping_) {
    *refused = Status::Cancelled("the store is closing");
  } else if (connection_ == nullptr) {
    *refused = NotConnectedLocked();
  } else if (!shared_memory_) {
    *refused = Status::FailedPrecondition("kvtierd at " + connection_->peer() +
                                          " is reached over TCP: there is no staging area");
  } else if (count == 0 || count > total_slots_) {
    *refused = Status::InvalidArgument(
        "cannot lend " + std::to_string(count) + " staging slots: the staging area has " +
        std::to_string(total_slots_) + " (SidecarOptions::staging_blocks); borrow fewer at once");
  } else if (total_slots_ - lent_slots_ < count) {
    *refused = Status::ResourceExhausted(
        std::to_string(lent_slots_) + " of the staging area's " + std::to_string(total_slots_) +
        " slots are lent out (BorrowedBlocks, PutBuffers not yet destroyed), " +
        std::to_string(count) + " wanted: give some back first");
  } else if (free_slots_.size() >= count) {
    lent->connection = connection_;
    lent->generation = generation_;
    lent->slots.assign(free_slots_.end() - count, free_slots_.end());
    free_slots_.resize(free_slots_.size() - count);
    lent_slots_ += count;
    FailStarvedLocked();
  } else {
    return false;  // chunks in flight hold the rest: they come back with their replies
  }
  return true;
}

Result<SidecarClient::LentSlots> SidecarClient::LendSlots(uint32_t count) {
  LentSlots lent;
  Status refused;
  {
    MutexLock lock(&mu_);
    if (TryLendLocked(count, &lent, &refused)) {
      if (!refused.ok()) return refused;
      return lent;
    }
    ++waiters_;  // WaitUntil uncounts
    ++slot_waiters_;
  }
  WaitUntil([&]() KVTIER_NO_THREAD_SAFETY_ANALYSIS {  // WaitUntil holds mu_
    if (!TryLendLocked(count, &lent, &refused)) return false;
    --slot_waiters_;
    return true;
  });
  if (!refused.ok()) return refused;
  return lent;
}

void SidecarClient::ReturnSlots(uint64_t generation, std::span<const uint32_t> slots) {
  if (slots.empty()) return;
  MutexLock lock(&mu_);
  if (generation != generation_ || connection_ == nullptr) return;
  lent_slots_ -= static_cast<uint32_t>(slots.size());
  free_slots_.insert(free_slots_.end(), slots.begin(), slots.end());
  if (!waiting_.empty()) dispatch_cv_.notify_one();
  if (!waiting_.empty() || slot_waiters_ > 0) cv_.notify_all();
}

Status SidecarClient::SlotBatch(bool put, std::span<const BlockKey> keys,
                                std::span<const uint32_t> slots, std::span<Status> statuses,
                                uint64_t generation) {
  flatbuffers::FlatBufferBuilder fbb(256 + keys.size() * (sizeof(wire::Key) + sizeof(uint32_t)));
  auto key_vector = WireKeys(fbb, keys);
  auto slot_vector = fbb.CreateVector(slots.data(), slots.size());
  if (put) {
    fbb.Finish(wire::CreatePutRequest(fbb, key_vector, slot_vector));
  } else {
    fbb.Finish(wire::CreateGetRequest(fbb, key_vector, slot_vector));
  }
  return CallBatch(put ? wire::Opcode::kPut : wire::Opcode::kGet, fbb, statuses, generation);
}

void SidecarClient::Post(std::function<void()> fn) {
  MutexLock lock(&mu_);
  completions_.push_back(std::move(fn));
  dispatch_cv_.notify_one();
}

bool SidecarClient::CanReadLocked() const {
  return connection_ != nullptr && !stopping_ && failed_.ok() &&
         reader_generation_ != generation_ && !pending_.empty();
}

void SidecarClient::WaitUntil(const std::function<bool()>& done) {
  for (;;) {
    std::shared_ptr<Connection> connection;
    uint64_t generation = 0;
    {
      MutexLock lock(&mu_);
      for (;;) {
        if (done()) {
          --waiters_;
          // Hand the reading role over: requests of others are still in flight.
          if (waiters_ == 0 && !pending_.empty() && reader_generation_ != generation_) {
            KickLocked();
          }
          return;
        }
        if (PumpableLocked()) break;
        if (CanReadLocked()) {
          reader_generation_ = generation_;
          generation = generation_;
          connection = connection_;
          break;
        }
        // Watching the deadlines too: the dispatcher may be this thread's caller.
        if (options_.request_timeout_ms == 0) {
          cv_.wait(mu_);
        } else {
          cv_.wait_until(mu_, CheckDeadlinesLocked());
        }
      }
    }
    if (connection != nullptr) {
      ReadOne(*connection, generation);
    } else {
      Pump();
    }
  }
}

void SidecarClient::ReadOne(Connection& connection, uint64_t generation) {
  std::vector<uint8_t>& body = connection.read_body();
  Result<wire::FrameHeader> header = connection.ReadHeader();
  Status s = header.status();
  std::shared_ptr<ReplyTail> tail;
  if (s.ok()) {
    {
      MutexLock lock(&mu_);
      auto it = pending_.find(header->request_id);
      if (it != pending_.end() && it->second.tail != nullptr &&
          header->opcode == static_cast<uint16_t>(it->second.opcode) &&
          header->body_bytes >= it->second.tail->bytes) {
        it->second.claimed = true;
        tail = it->second.tail;
      }
    }
    s = connection.ReadBody(
        *header, &body,
        tail != nullptr ? std::span<const iovec>(tail->to) : std::span<const iovec>());
  }
  if (s.ok()) {
    if (tail != nullptr) tail->delivered = true;
    Dispatch(connection, *header, body);
  }
  if (!s.ok() && s.code() != StatusCode::kUnavailable) {
    s = Status::Unavailable("kvtierd at " + connection.peer() + ": " + s.ToString());
  }
  Pending claimed;
  {
    MutexLock lock(&mu_);
    if (!s.ok() && tail != nullptr) {
      // Its reply was being received into the caller's buffers: Break left it to us.
      auto it = pending_.find(header->request_id);
      if (it != pending_.end()) {
        claimed = std::move(it->second);
        pending_.erase(it);
      }
    }
    if (reader_generation_ == generation) reader_generation_ = 0;
    if (!s.ok()) FailLocked(generation, s);
    cv_.notify_all();
  }
  if (claimed.handler) claimed.handler(s, {});
}

void SidecarClient::Dispatch(const Connection& connection, const wire::FrameHeader& header,
                             std::span<const uint8_t> body) {
  Pending p;
  {
    MutexLock lock(&mu_);
    auto it = pending_.find(header.request_id);
    if (it != pending_.end()) {
      p = std::move(it->second);
      pending_.erase(it);
    }
  }
  if (!p.handler) {
    Log().warn("kvtierd at {}: a {} reply to request {}, which is not in flight", connection.peer(),
               wire::OpcodeName(header.opcode), header.request_id);
    return;
  }
  Status status;
  if (header.opcode == static_cast<uint16_t>(wire::Opcode::kError)) {
    status = wire::VerifyReplyBody(header.opcode, body);
    if (status.ok()) {
      status = wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(body.data())->outcome());
      if (status.ok()) status = Status::Internal("kvtierd sent an Error frame with no error");
    }
  } else if (header.opcode != static_cast<uint16_t>(p.opcode)) {
    status = Status::Internal(
        "kvtierd answered a " + std::string(wire::OpcodeName(static_cast<uint16_t>(p.opcode))) +
        " request with a " + std::string(wire::OpcodeName(header.opcode)) + " reply");
  } else {
    status = wire::VerifyReplyBody(header.opcode, body);
    if (!status.ok()) status = Status::Internal("kvtierd's reply: " + status.message());
  }
  p.handler(status, status.ok() ? body : std::span<const uint8_t>());
}

void SidecarClient::FailLocked(uint64_t generation, Status why) {
  if (stopping_ || generation != generation_ || connection_ == nullptr || !failed_.ok()) return;
  failed_ = std::move(why);
  connection_->Shutdown();
  KickLocked();
  cv_.notify_all();
}

void SidecarClient::KickLocked() {
  if (kicked_) return;
  kicked_ = true;
  const uint64_t one = 1;
  // Cannot fail short of a counter at its maximum, which kicked_ rules out.
  (void)!::write(event_fd_, &one, sizeof(one));
}

SidecarClient::Clock::time_point SidecarClient::CheckDeadlinesLocked() {
  const auto now = Clock::now();
  // A request sent after this has a deadline after `next`: no need to be told of it.
  const auto next = now + std::chrono::milliseconds(options_.request_timeout_ms);
  if (pending_.empty() || connection_ == nullptr || !failed_.ok()) return next;
  const auto& [id, oldest] = *pending_.begin();
  if (oldest.deadline > now) return std::min(oldest.deadline, next);
  FailLocked(generation_,
             Status::Unavailable(
                 "kvtierd at " + connection_->peer() + ": no reply to " +
                 std::string(wire::OpcodeName(static_cast<uint16_t>(oldest.opcode))) + " request " +
                 std::to_string(id) + " within " + std::to_string(options_.request_timeout_ms) +
                 " ms; dropped the connection"));
  return next;
}

// --- Transfers -------------------------------------------------------------------------

Status SidecarClient::Submit(std::shared_ptr<Transfer> transfer) {
  Transfer& t = *transfer;
  size_t unsettled = 0;
  for (const Status& s : t.statuses) unsettled += s.ok() ? 1 : 0;
  {
    MutexLock lock(&mu_);
    if (!t.done) ++waiters_;  // WaitUntil below
    Status refused;
    if (stopping_) {
      refused = Status::Cancelled("the store is closing");
    } else if (connection_ == nullptr) {
      refused = NotConnectedLocked();
    }
    if (!refused.ok()) {
      for (Status& s : t.statuses) {
        if (s.ok()) s = refused;
      }
      unsettled = 0;
    }
    t.unsettled = unsettled;
    if (unsettled == 0) {
      t.next = t.size();
      FinishLocked(transfer);
    } else {
      waiting_.push_back(transfer);
    }
  }
  Pump();
  if (t.done) return Status::OK();
  WaitUntil([&] { return t.finished; });
  return FirstFailure(t.statuses);
}

bool SidecarClient::PumpableLocked() const {
  return connection_ != nullptr && !waiting_.empty() && !free_slots_.empty();
}

void SidecarClient::Pump() {
  for (;;) {
    auto chunk = std::make_shared<Chunk>();
    {
      MutexLock lock(&mu_);
      FailStarvedLocked();
      if (!PumpableLocked()) return;
      std::shared_ptr<Transfer> t = waiting_.front();
      // Half the slots at most, and kChunkBytes, so that chunks of a big batch overlap.
      const uint64_t limit =
          std::min<uint64_t>({std::max<uint32_t>(1, (total_slots_ + 1) / 2),
                              MembersPerFrame(*connection_, block_bytes_),
                              std::max<uint64_t>(1, kChunkBytes / block_bytes_)});
      while (t->next < t->size() && chunk->members.size() < limit && !free_slots_.empty()) {
        const size_t i = t->next++;
        if (!t->statuses[i].ok()) continue;  // refused locally
        chunk->members.push_back(static_cast<uint32_t>(i));
        chunk->slots.push_back(free_slots_.back());
        free_slots_.pop_back();
      }
      if (t->next == t->size()) waiting_.pop_front();
      if (chunk->members.empty()) continue;
      chunk->transfer = std::move(t);
      chunk->connection = connection_;
      chunk->generation = generation_;
      ++chunks_in_transit_;
    }
    SendChunk(std::move(chunk));
    MutexLock lock(&mu_);
    // In pending_ now, or failed: what the destructor's drain waits for.
    if (--chunks_in_transit_ == 0) cv_.notify_all();
  }
}

void SidecarClient::SendChunk(std::shared_ptr<Chunk> chunk) {
  const Transfer& t = *chunk->transfer;
  const Connection& c = *chunk->connection;
  const size_t n = chunk->members.size();
  const bool inline_bytes = c.staging() == nullptr;
  flatbuffers::FlatBufferBuilder fbb(1024 + n * 64 +
                                     (t.put && inline_bytes ? n * block_bytes_ : 0));
  if (t.put) {
    // The bytes first: a vector written through its pointer before anything else is built.
    flatbuffers::Offset<flatbuffers::Vector<uint8_t>> data;
    if (inline_bytes) {
      uint8_t* out = nullptr;
      data = fbb.CreateUninitializedVector(n * block_bytes_, &out);
      for (size_t j = 0; j < n; ++j) {
        std::memcpy(out + j * block_bytes_, t.writes[chunk->members[j]].data, block_bytes_);
      }
    } else {
      for (size_t j = 0; j < n; ++j) {
        std::memcpy(c.slot(chunk->slots[j]), t.writes[chunk->members[j]].data, block_bytes_);
      }
    }
    std::vector<wire::Key> keys(n);
    for (size_t j = 0; j < n; ++j) keys[j] = wire::ToWire(t.key(chunk->members[j]));
    auto key_vector = fbb.CreateVectorOfStructs(keys);
    auto slot_vector = inline_bytes ? 0 : fbb.CreateVector(chunk->slots);
    fbb.Finish(wire::CreatePutRequest(fbb, key_vector, slot_vector, data));
  } else {
    std::vector<wire::Key> keys(n);
    for (size_t j = 0; j < n; ++j) keys[j] = wire::ToWire(t.key(chunk->members[j]));
    auto key_vector = fbb.CreateVectorOfStructs(keys);
    auto slot_vector = inline_bytes ? 0 : fbb.CreateVector(chunk->slots);
    fbb.Finish(wire::CreateGetRequest(fbb, key_vector, slot_vector));
    if (inline_bytes && c.get_data_last()) {
      // The reply ends with the blocks' bytes: received straight into the reads.
      chunk->tail = std::make_shared<ReplyTail>();
      for (size_t j = 0; j < n; ++j) {
        chunk->tail->to.push_back(iovec{t.reads[chunk->members[j]].data, block_bytes_});
      }
      chunk->tail->bytes = n * block_bytes_;
    }
  }
  const uint64_t generation = chunk->generation;
  std::shared_ptr<ReplyTail> tail = chunk->tail;
  Send(
      t.put ? wire::Opcode::kPut : wire::Opcode::kGet,
      std::span<const uint8_t>(fbb.GetBufferPointer(), fbb.GetSize()),
      [this, chunk](Status status, std::span<const uint8_t> body) {
        OnChunkReply(*chunk, status, body);
      },
      generation, /*caller_waits=*/false, /*fd=*/-1, std::move(tail));
}

void SidecarClient::OnChunkReply(const Chunk& chunk, const Status& status,
                                 std::span<const uint8_t> body) {
  Transfer& t = *chunk.transfer;
  const Connection& c = *chunk.connection;
  const size_t n = chunk.members.size();
  Status whole = status;
  const wire::BatchReply* reply = nullptr;
  const flatbuffers::Vector<flatbuffers::Offset<wire::Outcome>>* members = nullptr;
  const uint8_t* inline_data = nullptr;
  bool delivered = false;  // the blocks' bytes are in the reads already
  if (whole.ok()) {
    reply = flatbuffers::GetRoot<wire::BatchReply>(body.data());
    members = reply->members();
    if (members != nullptr && members->size() != n) {
      whole = Status::Internal("kvtierd answered " + std::to_string(members->size()) +
                               " outcomes to a batch of " + std::to_string(n));
    } else if (!t.put && c.staging() == nullptr) {
      const Status outcome = wire::FromWire(reply->outcome());
      if (reply->data() != nullptr && reply->data()->size() == n * block_bytes_) {
        inline_data = reply->data()->data();
        if (chunk.tail != nullptr && chunk.tail->delivered) {
          // Received into the reads already: valid only where the body ends with them.
          if (inline_data + n * block_bytes_ != body.data() + body.size()) {
            whole = Status::Internal("kvtierd's Get reply does not end with its blocks' bytes");
          }
          inline_data = nullptr;
          delivered = true;
        }
      } else if (members != nullptr || outcome.ok()) {
        whole = Status::Internal("kvtierd's Get reply holds " +
                                 std::to_string(reply->data() ? reply->data()->size() : 0) +
                                 " bytes for " + std::to_string(n) + " blocks");
      }
    }
  }
  for (size_t j = 0; j < n; ++j) {
    const uint32_t i = chunk.members[j];
    if (!whole.ok()) {
      t.statuses[i] = whole;
      continue;
    }
    Status s =
        members != nullptr ? wire::FromWire(members->Get(j)) : wire::FromWire(reply->outcome());
    if (s.ok() && !t.put && !delivered) {
      const uint8_t* from =
          inline_data != nullptr ? inline_data + j * block_bytes_ : c.slot(chunk.slots[j]);
      std::memcpy(t.reads[i].data, from, block_bytes_);
    }
    t.statuses[i] = std::move(s);
  }
  MutexLock lock(&mu_);
  if (chunk.generation == generation_ && connection_ != nullptr) {
    for (uint32_t slot : chunk.slots) free_slots_.push_back(slot);
    if (!waiting_.empty()) dispatch_cv_.notify_one();
    if (!waiting_.empty() || slot_waiters_ > 0) cv_.notify_all();
  }
  SettleLocked(chunk.transfer, n);
}

void SidecarClient::SettleLocked(const std::shared_ptr<Transfer>& transfer, size_t count) {
  transfer->unsettled -= count;
  if (transfer->unsettled == 0) FinishLocked(transfer);
}

void SidecarClient::FinishLocked(const std::shared_ptr<Transfer>& transfer) {
  transfer->finished = true;
  if (transfer->done) {
    completions_.push_back([transfer] { transfer->done(FirstFailure(transfer->statuses)); });
    dispatch_cv_.notify_one();
  } else {
    cv_.notify_all();
  }
}

// --- The connection's life -------------------------------------------------------------

void SidecarClient::Break(const Status& why) {
  std::vector<Pending> failed;
  {
    MutexLock lock(&mu_);
    // Wakes a reader still in recv on it.
    if (connection_ != nullptr) connection_->Shutdown();
    connection_ = nullptr;
    failed_ = Status::OK();
    hangup_generation_ = 0;
    free_slots_.clear();
    if (why.code() != StatusCode::kCancelled) last_error_ = why.message();
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.claimed) {  // its reader runs its handler once its read ends
        ++it;
        continue;
      }
      failed.push_back(std::move(it->second));
      it = pending_.erase(it);
    }
    FailWaitingLocked(why);  // members not sent yet fail with the rest
    cv_.notify_all();
    dispatch_cv_.notify_all();
  }
  for (Pending& p : failed) p.handler(why, {});
}

void SidecarClient::FailWaitingLocked(const Status& why) {
  for (const std::shared_ptr<Transfer>& t : waiting_) {
    size_t count = 0;
    for (; t->next < t->size(); ++t->next) {
      if (t->statuses[t->next].ok()) {
        t->statuses[t->next] = why;
        ++count;
      }
    }
    SettleLocked(t, count);
  }
  waiting_.clear();
}

void SidecarClient::FailStarvedLocked() {
  if (waiting_.empty() || connection_ == nullptr || lent_slots_ < total_slots_) return;
  FailWaitingLocked(Status::ResourceExhausted(
      "every one of the staging area's " + std::to_string(total_slots_) +
      " slots is lent out (BorrowedBlocks, PutBuffers not yet destroyed): give some back"));
}

void SidecarClient::Idle(const Connection& connection, uint64_t generation,
                         Clock::time_point until) {
  // POLLRDHUP without POLLIN: a reply arriving does not wake this thread (the caller that
  // waits for it reads it); the daemon closing does (POLLHUP and POLLERR always do).
  pollfd fds[2] = {{connection.fd(), POLLRDHUP, 0}, {event_fd_, POLLIN, 0}};
  int timeout_ms = -1;
  if (until != Clock::time_point::max()) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now()).count();
    timeout_ms = static_cast<int>(std::clamp<int64_t>(left, 0, 1 << 30));
  }
  if (::poll(fds, 2, timeout_ms) < 0) {
    if (errno != EINTR) {
      Log().warn("sidecar client: poll: {}", std::strerror(errno));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return;
  }
  MutexLock lock(&mu_);
  if ((fds[1].revents & POLLIN) != 0) {
    // Cleared before the drain, under mu_: a kick after this writes again.
    kicked_ = false;
    uint64_t count;
    (void)!::read(event_fd_, &count, sizeof(count));
  }
  if ((fds[0].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0 &&
      generation == generation_) {
    hangup_generation_ = generation;
  }
}

void SidecarClient::BackgroundLoop() {
  auto backoff = std::chrono::milliseconds(10);
  const auto max_backoff =
      std::chrono::milliseconds(std::max<uint32_t>(options_.max_backoff_ms, 10));
  for (;;) {
    std::shared_ptr<Connection> connection;
    uint64_t generation = 0;
    Status why;
    bool read = false;
    // While idle, the deadlines are watched here too (the dispatcher may be busy running
    // a completion that waits for a reply).
    Clock::time_point until = Clock::time_point::max();
    {
      MutexLock lock(&mu_);
      if (stopping_) break;
      if (!failed_.ok()) {
        why = failed_;
      } else if (connection_ != nullptr) {
        connection = connection_;
        generation = generation_;
        const bool hangup = hangup_generation_ == generation_;
        if (reader_generation_ != generation_) {
          // Read when nobody else will: requests in flight and no synchronous caller
          // waiting, or to the end of a connection that hung up.
          read = hangup || (!pending_.empty() && waiters_ == 0);
          if (read) reader_generation_ = generation_;
        } else if (hangup) {
          // Another thread reads; it reaches the end (or releases the role) and notifies.
          cv_.wait(mu_);
          continue;
        }
        if (!read && options_.request_timeout_ms != 0) {
          until = CheckDeadlinesLocked();
          if (!failed_.ok()) continue;
        }
      }
    }
    if (!why.ok()) {
      Log().warn("lost the connection to kvtierd: {}; reconnecting", why.ToString());
      Break(why);
      backoff = std::chrono::milliseconds(10);
      continue;
    }
    if (connection != nullptr) {
      if (read) {
        ReadOne(*connection, generation);
      } else {
        Idle(*connection, generation, until);
      }
      continue;
    }
    {
      MutexLock lock(&mu_);
      const auto until = Clock::now() + backoff;
      while (!stopping_ && Clock::now() < until) cv_.wait_until(mu_, until);
      if (stopping_) break;
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(options_.connect_timeout_ms);
    Result<std::shared_ptr<Connection>> c =
        Connection::Open(options_, layout_, deadline, &closing_);
    uint64_t registration = 0;  // the new connection's generation, to register the GPU tier
    {
      MutexLock lock(&mu_);
      if (stopping_) break;
      if (c.ok()) {
        Install(std::move(*c));
        ++reconnects_;
        backoff = std::chrono::milliseconds(10);
        Log().info("reconnected to kvtierd at {} (daemon {})", connection_->peer(),
                   daemon_version_);
        if (!device_request_.empty()) registration = generation_;
        cv_.notify_all();
        dispatch_cv_.notify_all();
      } else {
        last_error_ = c.status().ToString();
        backoff = std::min(backoff * 2, max_backoff);
      }
    }
    if (registration != 0) (void)SendRegistration(registration, /*wait=*/false);
  }
  Break(Status::Cancelled("the store is closing"));
  MutexLock lock(&mu_);
  reader_done_ = true;
  cv_.notify_all();
  dispatch_cv_.notify_all();
}

void SidecarClient::DispatcherLoop() {
  for (;;) {
    std::function<void()> fn;
    {
      MutexLock lock(&mu_);
      for (;;) {
        if (!completions_.empty()) {
          fn = std::move(completions_.front());
          completions_.pop_front();
          break;
        }
        if (PumpableLocked()) break;
        if (reader_done_) return;  // nothing is left to run
        if (options_.request_timeout_ms == 0) {
          dispatch_cv_.wait(mu_);
        } else {
          dispatch_cv_.wait_until(mu_, CheckDeadlinesLocked());
        }
      }
    }
    if (fn) {
      fn();
    } else {
      Pump();
    }
  }
}

SidecarStatus SidecarClient::status() const {
  MutexLock lock(&mu_);
  SidecarStatus s;
  s.connected = connection_ != nullptr;
  s.reconnects = reconnects_;
  s.last_error = last_error_;
  s.daemon_version = daemon_version_;
  s.shared_memory = shared_memory_;
  s.staging_blocks = shared_memory_ ? total_slots_ : 0;
  s.requests_in_flight = pending_.size();
  s.direct_device = DirectDeviceLocked();
  s.direct_device_error = device_error_;
  return s;
}

}  // namespace kvtier::client
