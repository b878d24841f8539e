#include "src/client/sidecar_client.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "src/server/protocol/codec.h"
#include "src/util/log.h"

namespace kvtier::client {

using Clock = std::chrono::steady_clock;

// A chunk of a transfer in flight: members (indices into the transfer) and the slots
// their bytes are in, on the connection of `generation`.
struct SidecarClient::Chunk {
  std::shared_ptr<Transfer> transfer;
  std::shared_ptr<Connection> connection;
  uint64_t generation = 0;
  std::vector<uint32_t> members;
  std::vector<uint32_t> slots;
};

Status FirstFailure(std::span<const Status> statuses) {
  for (const Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return Status::OK();
}

namespace {

// Bytes of a frame besides its members (header, tables, vector lengths), generously.
constexpr uint64_t kFrameOverheadBytes = 4096;
// Bytes a member adds to a Put or Get frame or its reply, besides inline block bytes: a
// key (32), a slot (4), an outcome (a table and its message: bounded by the daemon's
// messages, which are short).
constexpr uint64_t kMemberBytes = 256;

uint64_t MembersPerFrame(const Connection& c, uint64_t block_bytes) {
  const uint64_t per = kMemberBytes + (c.staging() != nullptr ? 0 : block_bytes);
  const uint64_t room =
      c.max_frame_bytes() > kFrameOverheadBytes ? c.max_frame_bytes() - kFrameOverheadBytes : 0;
  return std::max<uint64_t>(1, room / per);
}

}  // namespace

SidecarClient::SidecarClient(const SidecarOptions& options, const ModelLayout& layout,
                             std::shared_ptr<Connection> connection)
    : options_(options), layout_(layout), block_bytes_(layout.BytesPerBlock()) {
  {
    MutexLock lock(&mu_);
    Install(std::move(connection));
  }
  reader_ = std::thread([this] { ReaderLoop(); });
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
      return std::unique_ptr<SidecarClient>(new SidecarClient(options, layout, std::move(*c)));
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
    // Let what is in flight finish while the daemon is there, for a bounded time.
    MutexLock lock(&mu_);
    const auto deadline = Clock::now() + std::chrono::milliseconds(options_.connect_timeout_ms);
    while (connection_ != nullptr && (!pending_.empty() || !waiting_.empty()) &&
           Clock::now() < deadline) {
      cv_.wait_until(mu_, deadline);
    }
    stopping_ = true;
    if (connection_ != nullptr) connection_->Shutdown();
  }
  closing_ = true;
  cv_.notify_all();
  reader_.join();
  dispatcher_.join();
}

void SidecarClient::Install(std::shared_ptr<Connection> connection) {
  connection_ = std::move(connection);
  ++generation_;
  total_slots_ =
      connection_->staging() != nullptr ? connection_->staging_blocks() : options_.staging_blocks;
  free_slots_.clear();
  for (uint32_t i = total_slots_; i > 0; --i) free_slots_.push_back(i - 1);
  daemon_version_ = connection_->daemon_version();
  shared_memory_ = connection_->staging() != nullptr;
}

// --- Requests and replies -------------------------------------------------------------

void SidecarClient::Send(wire::Opcode opcode, std::span<const uint8_t> body, ReplyHandler handler,
                         uint64_t generation) {
  std::shared_ptr<Connection> connection;
  uint64_t id = 0;
  Status refused;
  {
    MutexLock lock(&mu_);
    if (stopping_) {
      refused = Status::Cancelled("the store is closing");
    } else if (connection_ == nullptr || (generation != 0 && generation != generation_)) {
      refused = NotConnectedLocked();
    } else {
      id = next_request_id_++;
      connection = connection_;
      pending_.emplace(id, Pending{opcode, std::move(handler)});
    }
  }
  if (!refused.ok()) {
    handler(refused, {});
    return;
  }
  if (!connection->Send(opcode, id, body).ok()) {
    // The reader sees the broken socket too and fails every pending request, this one
    // included.
    connection->Shutdown();
  }
}

Status SidecarClient::NotConnectedLocked() const {
  return Status::Unavailable("not connected to kvtierd" +
                             (last_error_.empty() ? std::string() : " (" + last_error_ + ")") +
                             "; reconnecting");
}

Status SidecarClient::Call(wire::Opcode opcode, const flatbuffers::FlatBufferBuilder& fbb,
                           const std::function<Status(std::span<const uint8_t>)>& parse) {
  bool done = false;
  Status result;
  Send(opcode, std::span<const uint8_t>(fbb.GetBufferPointer(), fbb.GetSize()),
       [&](Status status, std::span<const uint8_t> body) {
         Status r = status.ok() ? parse(body) : std::move(status);
         MutexLock lock(&mu_);
         result = std::move(r);
         done = true;
         cv_.notify_all();
       });
  WaitUntil([&] { return done; });
  return result;
}

void SidecarClient::Post(std::function<void()> fn) {
  MutexLock lock(&mu_);
  completions_.push_back(std::move(fn));
  cv_.notify_all();
}

void SidecarClient::WaitUntil(const std::function<bool()>& done) {
  for (;;) {
    {
      MutexLock lock(&mu_);
      while (!done() && !PumpableLocked()) cv_.wait(mu_);
      if (done()) return;
    }
    Pump();
  }
}

// --- Transfers -------------------------------------------------------------------------

Status SidecarClient::Submit(std::shared_ptr<Transfer> transfer) {
  Transfer& t = *transfer;
  size_t unsettled = 0;
  for (const Status& s : t.statuses) unsettled += s.ok() ? 1 : 0;
  {
    MutexLock lock(&mu_);
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
      if (!PumpableLocked()) return;
      std::shared_ptr<Transfer> t = waiting_.front();
      // Half the slots at most, so that two chunks of a big batch overlap.
      const uint64_t limit = std::min<uint64_t>(std::max<uint32_t>(1, (total_slots_ + 1) / 2),
                                                MembersPerFrame(*connection_, block_bytes_));
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
    }
    SendChunk(std::move(chunk));
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
  }
  const uint64_t generation = chunk->generation;
  Send(
      t.put ? wire::Opcode::kPut : wire::Opcode::kGet,
      std::span<const uint8_t>(fbb.GetBufferPointer(), fbb.GetSize()),
      [this, chunk](Status status, std::span<const uint8_t> body) {
        OnChunkReply(*chunk, status, body);
      },
      generation);
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
    if (s.ok() && !t.put) {
      const uint8_t* from =
          inline_data != nullptr ? inline_data + j * block_bytes_ : c.slot(chunk.slots[j]);
      std::memcpy(t.reads[i].data, from, block_bytes_);
    }
    t.statuses[i] = std::move(s);
  }
  MutexLock lock(&mu_);
  if (chunk.generation == generation_ && connection_ != nullptr) {
    for (uint32_t slot : chunk.slots) free_slots_.push_back(slot);
  }
  SettleLocked(chunk.transfer, n);
  cv_.notify_all();
}

void SidecarClient::SettleLocked(const std::shared_ptr<Transfer>& transfer, size_t count) {
  transfer->unsettled -= count;
  if (transfer->unsettled == 0) FinishLocked(transfer);
}

void SidecarClient::FinishLocked(const std::shared_ptr<Transfer>& transfer) {
  transfer->finished = true;
  if (transfer->done) {
    completions_.push_back([transfer] { transfer->done(FirstFailure(transfer->statuses)); });
  }
  cv_.notify_all();
}

// --- The connection's life -------------------------------------------------------------

void SidecarClient::Break(const Status& why) {
  std::vector<Pending> failed;
  {
    MutexLock lock(&mu_);
    connection_ = nullptr;
    free_slots_.clear();
    if (why.code() != StatusCode::kCancelled) last_error_ = why.message();
    for (auto& [id, p] : pending_) failed.push_back(std::move(p));
    pending_.clear();
    // Members not sent yet fail with the rest.
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
    cv_.notify_all();
  }
  for (Pending& p : failed) p.handler(why, {});
}

Status SidecarClient::ReadReplies(Connection& connection) {
  std::vector<uint8_t> body;
  for (;;) {
    wire::FrameHeader header;
    Status s = connection.ReadFrame(&header, &body);
    if (!s.ok()) {
      return s.code() == StatusCode::kUnavailable
                 ? s
                 : Status::Unavailable("kvtierd at " + connection.peer() + ": " + s.ToString());
    }
    Pending p;
    {
      MutexLock lock(&mu_);
      auto it = pending_.find(header.request_id);
      if (it == pending_.end()) {
        p.handler = nullptr;
      } else {
        p = std::move(it->second);
        pending_.erase(it);
      }
    }
    if (!p.handler) {
      Log().warn("kvtierd at {}: a {} reply to request {}, which is not in flight",
                 connection.peer(), wire::OpcodeName(header.opcode), header.request_id);
      continue;
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
    p.handler(status, status.ok() ? std::span<const uint8_t>(body) : std::span<const uint8_t>());
  }
}

void SidecarClient::ReaderLoop() {
  auto backoff = std::chrono::milliseconds(10);
  const auto max_backoff =
      std::chrono::milliseconds(std::max<uint32_t>(options_.max_backoff_ms, 10));
  for (;;) {
    std::shared_ptr<Connection> connection;
    {
      MutexLock lock(&mu_);
      if (stopping_) break;
      connection = connection_;
    }
    if (connection != nullptr) {
      Status why = ReadReplies(*connection);
      connection->Shutdown();
      bool stopping;
      {
        MutexLock lock(&mu_);
        stopping = stopping_;
      }
      if (stopping) break;
      Log().warn("lost the connection to kvtierd: {}; reconnecting", why.ToString());
      Break(why);
      backoff = std::chrono::milliseconds(10);
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
    MutexLock lock(&mu_);
    if (stopping_) break;
    if (c.ok()) {
      Install(std::move(*c));
      ++reconnects_;
      backoff = std::chrono::milliseconds(10);
      Log().info("reconnected to kvtierd at {} (daemon {})", connection_->peer(), daemon_version_);
      cv_.notify_all();
    } else {
      last_error_ = c.status().ToString();
      backoff = std::min(backoff * 2, max_backoff);
    }
  }
  Break(Status::Cancelled("the store is closing"));
  MutexLock lock(&mu_);
  reader_done_ = true;
  cv_.notify_all();
}

void SidecarClient::DispatcherLoop() {
  for (;;) {
    std::function<void()> fn;
    {
      MutexLock lock(&mu_);
      while (completions_.empty() && !PumpableLocked() && !reader_done_) cv_.wait(mu_);
      if (!completions_.empty()) {
        fn = std::move(completions_.front());
        completions_.pop_front();
      } else if (!PumpableLocked()) {
        return;  // the reader is done and nothing is left to run
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
  return s;
}

}  // namespace kvtier::client
