#include "src/server/connection.h"

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <cerrno>
#include <cstring>

#include "src/server/connection_request.h"
#include "src/util/log.h"

namespace kvtier::server {

namespace asio = boost::asio;

namespace {

constexpr auto kDrainTimeout = std::chrono::seconds(2);
constexpr int kMaxIov = 128;
// Unix socket: descriptors one recvmsg takes (more are a truncation), and that may wait
// for their frame (more close the connection: a client sends one, with RegisterDevice).
constexpr size_t kMaxFdsPerRead = 8;
constexpr size_t kMaxPendingFds = 4;
// Reads one connection makes in a row before letting the shard's others run.
constexpr int kMaxReadsPerTurn = 16;
uint64_t Nanos(std::chrono::steady_clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

}  // namespace

Connection::Connection(ServerContext& server, IoShard& shard, Socket socket,
                       const PeerIdentity& peer, std::string peer_name)
    : server_(server),
      shard_(shard),
      socket_(std::move(socket)),
      peer_(peer),
      peer_name_(std::move(peer_name)),
      id_(server.next_connection_id.fetch_add(1)),
      block_bytes_(server.store->block_bytes()),
      reader_(server.options.max_frame_bytes),
      drain_timer_(shard.ctx) {
  server_.ConnectionCreated();
}

Connection::~Connection() {
  if (staging_ != nullptr) server_.counters.staging_bytes_mapped -= staging_->size_bytes();
  staging_.reset();
  if (device_ != nullptr) server_.counters.device_pools_registered--;
  device_.reset();  // requests in flight hold their own reference
  free_requests_.clear();
  server_.ConnectionDestroyed();
}

void Connection::Start() {
  if (server_.stopping.load()) {
    boost::system::error_code ec;
    socket_.close(ec);
    closed_ = true;
    server_.counters.connections_open--;
    return;
  }
  shard_.connections.emplace(id_, shared_from_this());
  boost::system::error_code ec;
  socket_.non_blocking(true, ec);
  Log().info("kvtierd: connection {} from {}", id_, peer_name_);
  ReadMore();
}

void Connection::Close() {
  if (closed_) return;
  const std::shared_ptr<Connection> keep = shared_from_this();
  closed_ = true;
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
  drain_timer_.cancel();
  out_.clear();
  queued_bytes_ = 0;
  if (ns_ != nullptr) server_.counters.clients_per_namespace[ns_index_]--;
  server_.counters.connections_open--;
  Log().info("kvtierd: connection {} ({}{}{}) closed", id_, peer_name_,
             client_name_.empty() ? "" : ", ", client_name_);
  shard_.connections.erase(id_);
}

// --- Reading -----------------------------------------------------------------------

void Connection::ReadMore() {
  if (reading_ || closed_ || draining_ || in_flight_ >= server_.options.max_in_flight) return;
  const std::span<uint8_t> space = reader_.WritableSpan();
  if (space.empty()) return;  // a complete frame waits (ProcessFrames takes it)
  if (peer_.unix_socket) return ReceiveMore();
  reading_ = true;
  socket_.async_read_some(asio::buffer(space.data(), space.size()),
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      size_t bytes) { self->OnRead(ec, bytes); });
}

void Connection::OnRead(const boost::system::error_code& ec, size_t bytes) {
  reading_ = false;
  if (closed_) return;
  if (ec) {
    // End of stream or a reset: what is in flight finishes; its replies go if they can.
    if (ec != asio::error::eof) {
      Log().debug("kvtierd: connection {}: read: {}", id_, ec.message());
    }
    StartDraining();
    return;
  }
  reader_.Commit(bytes);
  ProcessFrames();
  ReadMore();
}

void Connection::ReceiveMore() {
  // Like async_read_some (a speculative read, then a wait for readability when there is
  // nothing), but with recvmsg, so that SCM_RIGHTS descriptors are received; no more
  // system calls than Asio makes, and frames are handled here rather than posted.
  const std::shared_ptr<Connection> self = shared_from_this();  // ProcessFrames may Close
  for (int reads = 0;; ++reads) {
    if (closed_ || draining_ || in_flight_ >= server_.options.max_in_flight) return;
    const std::span<uint8_t> space = reader_.WritableSpan();
    if (space.empty()) return;
    if (reads == kMaxReadsPerTurn) {
      reading_ = true;
      asio::post(shard_.ctx, [self] {
        self->reading_ = false;
        self->ReadMore();
      });
      return;
    }
    iovec iov{space.data(), space.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerRead)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const ssize_t n = ::recvmsg(socket_.native_handle(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      reading_ = true;
      socket_.async_wait(Socket::wait_read, [self](const boost::system::error_code& ec) {
        self->reading_ = false;
        if (self->closed_) return;
        if (ec) return self->OnRead(ec, 0);
        self->ReadMore();
      });
      return;
    }
    const bool fds_ok = n < 0 || KeepReceivedFds(msg, static_cast<size_t>(n));
    if (n <= 0) {
      return OnRead(n == 0 ? asio::error::eof
                           : boost::system::error_code(errno, boost::system::system_category()),
                    0);
    }
    reader_.Commit(static_cast<size_t>(n));
    bytes_received_ += static_cast<uint64_t>(n);
    if (!fds_ok) {
      server_.counters.frames_rejected++;
      const Status s = Status::InvalidArgument(
          "more than " + std::to_string(kMaxPendingFds) +
          " file descriptors received without a RegisterDevice to take them");
      Log().warn("kvtierd: connection {} ({}): {}; closing", id_, peer_name_, s.ToString());
      received_fds_.clear();
      SendError(0, 0xFFFF, s, Clock::now());
      StartDraining();
      return;
    }
    ProcessFrames();
  }
}

bool Connection::KeepReceivedFds(const msghdr& msg, size_t bytes) {
  bool ok = (msg.msg_flags & MSG_CTRUNC) == 0;
  for (const cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr;
       c = CMSG_NXTHDR(const_cast<msghdr*>(&msg), const_cast<cmsghdr*>(c))) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t fds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < fds; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      received_fds_.push_back(ReceivedFd{UniqueFd(fd), bytes_received_, bytes_received_ + bytes});
    }
  }
  return ok && received_fds_.size() <= kMaxPendingFds;
}

UniqueFd Connection::TakeFrameFd(uint16_t opcode, uint64_t begin, uint64_t end) {
  // The kernel ends a read with the bytes a descriptor came with, so the frame that
  // carries one is among those that end at or after its bytes. Once a frame that holds
  // the last of them has been handled, no later frame can be the descriptor's: closed.
  UniqueFd taken;
  if (opcode == static_cast<uint16_t>(wire::Opcode::kRegisterDevice)) {
    while (!received_fds_.empty() && received_fds_.front().end <= begin) {
      received_fds_.pop_front();
    }
    if (!received_fds_.empty() && received_fds_.front().begin <= begin) {
      taken = std::move(received_fds_.front().fd);
      received_fds_.pop_front();
    }
  }
  while (!received_fds_.empty() && received_fds_.front().end <= end) received_fds_.pop_front();
  return taken;
}

void Connection::ProcessFrames() {
  FrameReader::Frame frame;
  while (!closed_ && !draining_ && in_flight_ < server_.options.max_in_flight) {
    const FrameReader::Result r = reader_.Next(&frame);
    if (r == FrameReader::kNeedMore) break;
    if (r == FrameReader::kError) {
      server_.counters.frames_rejected++;
      Log().warn("kvtierd: connection {} ({}): {}; closing", id_, peer_name_,
                 reader_.error().ToString());
      SendError(reader_.error_request_id(), 0xFFFF, reader_.error(), Clock::now());
      StartDraining();
      break;
    }
    HandleFrame(frame.header, frame.body);
    reader_.Consume();
  }
}

void Connection::HandleFrame(const wire::FrameHeader& header, std::span<const uint8_t> body) {
  const Clock::time_point t0 = Clock::now();
  server_.counters.requests++;
  const uint16_t opcode = header.opcode;
  const uint64_t frame_begin = frame_offset_;
  frame_offset_ += wire::kHeaderBytes + body.size();
  UniqueFd fd;
  if (!received_fds_.empty()) fd = TakeFrameFd(opcode, frame_begin, frame_offset_);
  if (ns_ == nullptr && opcode != static_cast<uint16_t>(wire::Opcode::kHello)) {
    server_.counters.handshakes_refused++;
    Log().warn("kvtierd: connection {} ({}): {} before Hello; closing", id_, peer_name_,
               wire::OpcodeName(opcode));
    SendError(header.request_id, opcode,
              Status::FailedPrecondition("the first request must be Hello"), t0);
    StartDraining();
    return;
  }
  if (Status s = wire::VerifyRequestBody(opcode, body); !s.ok()) {
    server_.counters.frames_rejected++;
    SendError(header.request_id, opcode, s, t0);
    if (ns_ == nullptr) StartDraining();  // a malformed Hello: no session to keep
    return;
  }
  std::unique_ptr<Request> req = NewRequest();
  req->id = header.request_id;
  req->opcode = opcode;
  req->arrival = t0;
  switch (static_cast<wire::Opcode>(opcode)) {
    case wire::Opcode::kHello:
      HandleHello(*req, body);
      break;
    case wire::Opcode::kPut:
      return HandlePut(std::move(req), body);
    case wire::Opcode::kGet:
      return HandleGet(std::move(req), body);
    case wire::Opcode::kContains:
      HandleContains(*req, body);
      break;
    case wire::Opcode::kDelete:
      HandleDelete(*req, body);
      break;
    case wire::Opcode::kDropSequence:
      return HandleDropSequence(std::move(req), body);
    case wire::Opcode::kFlush:
      return HandleFlush(std::move(req));
    case wire::Opcode::kStats:
      HandleStats(*req);
      break;
    case wire::Opcode::kIndexBlock:
      return HandleIndexBlock(std::move(req), body);
    case wire::Opcode::kSelect:
      return HandleSelect(std::move(req), body);
    case wire::Opcode::kRegisterDevice:
      return HandleRegisterDevice(std::move(req), body, std::move(fd));
    case wire::Opcode::kGetToDevice:
      return HandleGetToDevice(std::move(req), body);
    case wire::Opcode::kError:
      break;  // VerifyRequestBody refused it
  }
  Recycle(std::move(req));
}

// --- Asynchronous completion ---------------------------------------------------------

Connection::Request* Connection::BeginAsync(std::unique_ptr<Request> req) {
  ++in_flight_;
  req->owner = shared_from_this();
  return req.release();
}

void Connection::PostComplete(Request* req) {
  // Runs on a store or worker thread: hands the request back to its connection's shard.
  // Nothing here holds a reference, so the connection is never released on this thread.
  asio::post(req->owner->shard_.ctx, [req] { req->owner->Complete(req); });
}

void Connection::Complete(Request* raw) {
  std::unique_ptr<Request> req(raw);
  const std::shared_ptr<Connection> self = std::move(req->owner);  // released on return
  --in_flight_;
  if (req->slots_named > 0) server_.counters.staging_slots_in_use -= req->slots_named;
  CountDirectBytes(*req);
  if (!closed_) Reply(*req);
  Recycle(std::move(req));
  if (closed_) return;
  if (draining_) return MaybeFinishDraining();
  ProcessFrames();
  ReadMore();
}

void Connection::CountDirectBytes(const Request& req) {
  if (req.opcode != static_cast<uint16_t>(wire::Opcode::kGetToDevice)) return;
  uint64_t landed = 0;
  for (const Status& s : req.store_statuses) landed += s.ok() ? block_bytes_ : 0;
  server_.counters.direct_device_bytes += landed;
}

void Connection::Reply(Request& r) {
  Request* req = &r;
  {
    switch (static_cast<wire::Opcode>(req->opcode)) {
      case wire::Opcode::kPut:
      case wire::Opcode::kGet:
      case wire::Opcode::kGetToDevice:
        for (size_t i = 0; i < req->members.size(); ++i) {
          req->outcomes[req->members[i]] = req->store_statuses[i];
        }
        ReplyBatch(*req);
        break;
      case wire::Opcode::kDropSequence: {
        fbb_.Clear();
        auto o = wire::ToWire(fbb_, req->status);
        fbb_.Finish(wire::CreateCountReply(fbb_, o, req->count));
        QueueReply(wire::Opcode::kDropSequence, req->id, req->opcode, req->arrival);
        break;
      }
      case wire::Opcode::kSelect: {
        fbb_.Clear();
        auto blocks = fbb_.CreateVector(req->selected);
        auto scores = req->want_scores && req->status.ok()
                          ? fbb_.CreateVector(req->scores)
                          : flatbuffers::Offset<flatbuffers::Vector<float>>();
        auto runners_up = !req->runners_up.empty() && req->status.ok()
                              ? fbb_.CreateVector(req->runners_up)
                              : flatbuffers::Offset<flatbuffers::Vector<int64_t>>();
        auto o = wire::ToWire(fbb_, req->status);
        wire::SelectReplyBuilder b(fbb_);
        b.add_outcome(o);
        if (req->status.ok()) {
          b.add_sink_blocks(req->info.sink_blocks);
          b.add_local_begin(req->info.local_begin);
          b.add_local_end(req->info.local_end);
          b.add_selected(req->info.selected);
          b.add_blocks(blocks);
          if (!scores.IsNull()) b.add_scores(scores);
          if (!runners_up.IsNull()) b.add_runners_up(runners_up);
        }
        fbb_.Finish(b.Finish());
        QueueReply(wire::Opcode::kSelect, req->id, req->opcode, req->arrival);
        break;
      }
      case wire::Opcode::kRegisterDevice:  // a CUDA pool, opened on the workers
        device_pending_ = false;
        if (req->status.ok()) InstallDevice(std::move(req->device));
        ReplyStatus(*req, wire::Opcode::kRegisterDevice, req->status);
        break;
      default:  // Flush, IndexBlock
        ReplyStatus(*req, static_cast<wire::Opcode>(req->opcode), req->status);
        break;
    }
  }
}

// --- Replies -------------------------------------------------------------------------

std::unique_ptr<Connection::Request> Connection::NewRequest() {
  if (free_requests_.empty()) return std::make_unique<Request>();
  std::unique_ptr<Request> req = std::move(free_requests_.back());
  free_requests_.pop_back();
  return req;
}

void Connection::Recycle(std::unique_ptr<Request> req) {
  GiveBuilder(std::move(req->reply));  // a reply that was not sent (closed, failed)
  req->Reset();
  // A few spares cover a pipelined client; more would only hold memory.
  if (free_requests_.size() < 16) free_requests_.push_back(std::move(req));
}

void Connection::ReplyBatch(Request& req) {
  Status first;
  for (const Status& s : req.outcomes) {
    if (!s.ok()) {
      first = s;
      break;
    }
  }
  // A Get over TCP continues the reply its blocks were read into (HandleGet).
  const bool inline_get = req.reply != nullptr;
  flatbuffers::FlatBufferBuilder& fbb = inline_get ? *req.reply : fbb_;
  if (inline_get && req.lent == nullptr) {  // lent: the frame sends zeros for these
    for (size_t i = 0; i < req.outcomes.size(); ++i) {
      if (!req.outcomes[i].ok()) std::memset(req.inline_out + i * block_bytes_, 0, block_bytes_);
    }
  }
  if (inline_get) {
    req.inline_out = nullptr;  // the builder may move it from here on
  } else {
    fbb.Clear();
  }
  flatbuffers::Offset<flatbuffers::Vector<flatbuffers::Offset<wire::Outcome>>> members;
  if (!first.ok()) {
    std::vector<flatbuffers::Offset<wire::Outcome>> offsets;
    offsets.reserve(req.outcomes.size());
    for (const Status& s : req.outcomes) offsets.push_back(wire::ToWire(fbb, s));
    members = fbb.CreateVector(offsets);
  }
  auto o = wire::ToWire(fbb, first);
  fbb.Finish(wire::CreateBatchReply(fbb, o, members, inline_get ? req.inline_vector : 0));
  if (inline_get) {
    QueueReply(static_cast<wire::Opcode>(req.opcode), req.id, req.opcode, req.arrival, -1,
               std::move(req.reply), std::move(req.lent));
  } else {
    QueueReply(static_cast<wire::Opcode>(req.opcode), req.id, req.opcode, req.arrival);
  }
}

void Connection::ReplyStatus(Request& req, wire::Opcode opcode, const Status& status) {
  fbb_.Clear();
  if (opcode == wire::Opcode::kPut || opcode == wire::Opcode::kGet ||
      opcode == wire::Opcode::kDelete || opcode == wire::Opcode::kGetToDevice) {
    auto o = wire::ToWire(fbb_, status);
    fbb_.Finish(wire::CreateBatchReply(fbb_, o));
  } else {
    auto o = wire::ToWire(fbb_, status);
    fbb_.Finish(wire::CreateStatusReply(fbb_, o));
  }
  QueueReply(opcode, req.id, req.opcode, req.arrival);
}

void Connection::SendError(uint64_t request_id, uint16_t opcode, const Status& status,
                           Clock::time_point t0) {
  fbb_.Clear();
  auto o = wire::ToWire(fbb_, status);
  fbb_.Finish(wire::CreateStatusReply(fbb_, o));
  QueueReply(wire::Opcode::kError, request_id, opcode, t0);
}

std::unique_ptr<flatbuffers::FlatBufferBuilder> Connection::TakeBuilder() {
  if (free_builders_.empty()) return std::make_unique<flatbuffers::FlatBufferBuilder>(1024);
  std::unique_ptr<flatbuffers::FlatBufferBuilder> b = std::move(free_builders_.back());
  free_builders_.pop_back();
  b->Clear();
  return b;
}

void Connection::GiveBuilder(std::unique_ptr<flatbuffers::FlatBufferBuilder> builder) {
  // A few, and none that grew past a few blocks: more would only hold memory.
  if (builder != nullptr && free_builders_.size() < 8 && builder->GetSize() <= (4u << 20)) {
    free_builders_.push_back(std::move(builder));
  }
}

void Connection::QueueReply(wire::Opcode opcode, uint64_t request_id, uint16_t latency_opcode,
                            Clock::time_point t0, int fd,
                            std::unique_ptr<flatbuffers::FlatBufferBuilder> body,
                            std::unique_ptr<LentReply> lent) {
  const flatbuffers::FlatBufferBuilder& fbb = body != nullptr ? *body : fbb_;
  if (closed_) return;
  server_.counters.RecordLatency(latency_opcode, Nanos(Clock::now() - t0));
  OutFrame frame;
  if (!free_buffers_.empty()) {
    frame.bytes = std::move(free_buffers_.back());
    free_buffers_.pop_back();
  }
  // Bodies are padded to 8 bytes (zeros after the FlatBuffer, which its verifier
  // allows), so that a client reading the stream into an 8-aligned buffer finds every
  // body 8-aligned, as FlatBuffers' 8-byte fields want.
  const size_t body_bytes = fbb.GetSize();
  const size_t padded_bytes = (body_bytes + 7) / 8 * 8;
  // `bytes`: the header, then the body (or, when the frame owns its builder, the
  // padding only: the body goes from the builder), then the padding. Not zero-filled
  // (FrameBytes): every byte is written below.
  const size_t copied = body != nullptr ? 0 : body_bytes;
  frame.bytes.resize(wire::kHeaderBytes + copied + padded_bytes - body_bytes);
  std::memset(frame.bytes.data() + wire::kHeaderBytes + copied, 0, padded_bytes - body_bytes);
  wire::FrameHeader h;
  h.opcode = static_cast<uint16_t>(opcode);
  h.flags = wire::kFlagReply;
  h.body_bytes = static_cast<uint32_t>(padded_bytes);
  h.request_id = request_id;
  wire::EncodeHeader(
      h, std::span<uint8_t, wire::kHeaderBytes>(frame.bytes.data(), wire::kHeaderBytes));
  if (body != nullptr) {
    frame.body = std::move(body);
    frame.lent = std::move(lent);
  } else {
    std::memcpy(frame.bytes.data() + wire::kHeaderBytes, fbb_.GetBufferPointer(), body_bytes);
  }
  frame.fd = fd;
  queued_bytes_ += frame.size();
  out_.push_back(std::move(frame));
  if (queued_bytes_ > server_.options.max_buffered_reply_bytes) {
    server_.counters.slow_readers_cut++;
    Log().warn("kvtierd: connection {} ({}): {} bytes of replies unread; disconnecting", id_,
               peer_name_, queued_bytes_);
    Close();
    return;
  }
  if (!write_waiting_) WriteMore();
}

void Connection::WriteMore() {
  while (!closed_ && !out_.empty()) {
    struct iovec iov[kMaxIov];
    int iovs = 0;
    msghdr msg{};
    FdControl control;
    OutFrame& head = out_.front();
    const bool with_fd = head.fd >= 0 && head.offset == 0;
    if (with_fd) {
      // The descriptor travels with the frame's first byte; this frame goes alone.
      bool whole = true;
      iovs = head.AppendIov(iov, kMaxIov, &whole);
      AttachFd(&msg, &control, head.fd);
    } else {
      bool whole = true;
      for (auto it = out_.begin(); it != out_.end() && whole && iovs < kMaxIov; ++it) {
        if (it != out_.begin() && it->fd >= 0) break;
        iovs += it->AppendIov(iov + iovs, kMaxIov - iovs, &whole);
      }
    }
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(iovs);
    const ssize_t sent = ::sendmsg(socket_.native_handle(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        write_waiting_ = true;
        socket_.async_wait(Socket::wait_write,
                           [self = shared_from_this()](const boost::system::error_code& ec) {
                             self->write_waiting_ = false;
                             if (ec) return;
                             self->WriteMore();
                           });
        return;
      }
      Log().debug("kvtierd: connection {}: send: {}", id_, std::strerror(errno));
      Close();
      return;
    }
    if (with_fd && staging_ != nullptr) staging_->CloseFd();  // the client has its copy
    size_t left = static_cast<size_t>(sent);
    queued_bytes_ -= left;
    while (left > 0) {
      OutFrame& f = out_.front();
      f.fd = -1;
      const size_t rest = f.size() - f.offset;
      if (left < rest) {
        f.offset += left;
        break;
      }
      left -= rest;
      if (free_buffers_.size() < 16 && f.bytes.capacity() <= (1u << 20)) {
        f.bytes.clear();
        free_buffers_.push_back(std::move(f.bytes));
      }
      GiveBuilder(std::move(f.body));
      out_.pop_front();
    }
  }
  if (draining_) MaybeFinishDraining();
}

size_t Connection::OutFrame::size() const {
  return bytes.size() + (body != nullptr ? body->GetSize() : 0);
}

int Connection::OutFrame::AppendIov(iovec* iov, int room, bool* whole) const {
  // The segments: all of `bytes`; or its header, the builder's body (with a lent data
  // vector in place of the builder's bytes there), its padding.
  int used = 0;
  size_t skip = offset;  // bytes already sent
  // Appends the segment's unsent part; false when out of room.
  auto add = [&](const uint8_t* data, size_t size) {
    if (skip >= size) {
      skip -= size;
      return true;
    }
    if (used == room) return false;
    iov[used++] = {const_cast<uint8_t*>(data + skip), size - skip};
    skip = 0;
    return true;
  };
  bool ok = true;
  if (body == nullptr) {
    ok = add(bytes.data(), bytes.size());
  } else {
    const uint8_t* b = body->GetBufferPointer();
    const size_t size = body->GetSize();
    ok = add(bytes.data(), wire::kHeaderBytes);
    if (lent == nullptr) {
      ok = ok && add(b, size);
    } else {
      const size_t at = size - lent->from_end;
      ok = ok && add(b, at);
      for (size_t i = 0; ok && i < lent->spans.size(); ++i) {
        ok = add(lent->spans[i].data(), lent->spans[i].size());
      }
      ok = ok && add(b + at + lent->bytes, size - at - lent->bytes);
    }
    ok = ok && add(bytes.data() + wire::kHeaderBytes, bytes.size() - wire::kHeaderBytes);
  }
  *whole = ok;
  return used;
}

void Connection::StartDraining() {
  if (draining_ || closed_) return;
  draining_ = true;
  drain_timer_.expires_after(kDrainTimeout);
  drain_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec) self->Close();
  });
  MaybeFinishDraining();
}

void Connection::MaybeFinishDraining() {
  if (!closed_ && draining_ && in_flight_ == 0 && out_.empty()) Close();
}

}  // namespace kvtier::server
