#include "storage/copy_engine.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace kvtier {
namespace {

// Copies per driver submission: bounds the scratch arrays the driver walks at once.
constexpr size_t kMaxBatchOps = 4096;
constexpr uint64_t kChunkAlignment = 4096;

}  // namespace

// --- CopyEvent -------------------------------------------------------------------------

Result<bool> CopyEvent::Query() const {
  if (!recorded_) return true;
  return event_.Query();
}

Status CopyEvent::Wait() const {
  if (!recorded_) return Status::OK();
  return event_.Synchronize();
}

Status CopyEvent::MakeStreamWait(StreamHandle stream) const {
  if (!recorded_) return Status::OK();
  return event_.MakeStreamWait(stream);
}

// --- CopyEngine ------------------------------------------------------------------------

Result<std::unique_ptr<CopyEngine>> CopyEngine::Create(const DevicePool& pool,
                                                       const CopyEngineOptions& options) {
  const uint64_t chunk_bytes =
      options.staging_bytes / kStagingChunks / kChunkAlignment * kChunkAlignment;
  if (chunk_bytes == 0) {
    return Status::InvalidArgument("copy engine: staging of " +
                                   std::to_string(options.staging_bytes) + " bytes is below " +
                                   std::to_string(kStagingChunks) + " chunks of 4 KiB");
  }
  auto engine = std::unique_ptr<CopyEngine>(new CopyEngine(pool.device(), chunk_bytes));
  engine->d2h_.to_device = false;
  if (pool.emulated()) return engine;

  cuda::ScopedDevice scope(engine->device_);
  KVTIER_RETURN_IF_ERROR(scope.status());
  for (Direction* d : {&engine->h2d_, &engine->d2h_}) {
    MutexLock lock(&d->mu);
    KVTIER_ASSIGN_OR_RETURN(d->stream, cuda::Stream::Create());
    d->chunks.resize(kStagingChunks);
    for (Chunk& chunk : d->chunks) {
      KVTIER_ASSIGN_OR_RETURN(chunk.ready, cuda::Event::Create());
    }
  }
  {
    MutexLock lock(&engine->order_mu_);
    KVTIER_ASSIGN_OR_RETURN(engine->order_event_, cuda::Event::Create());
  }
  return engine;
}

CopyEngine::CopyEngine(int device, uint64_t chunk_bytes)
    : device_(device), chunk_bytes_(chunk_bytes) {}

CopyEngine::~CopyEngine() {
  if (emulated()) return;
  cuda::ScopedDevice scope(device_);
  // Streams, events and staging go while their device is current.
  for (Direction* d : {&h2d_, &d2h_}) {
    MutexLock lock(&d->mu);
    if (d->stream.get() != nullptr) (void)d->stream.Synchronize();
    d->in_flight.clear();
    d->spare.clear();
    d->chunks.clear();
    if (d->staging != nullptr) (void)cuda::HostFree(d->staging);
    d->staging = nullptr;
    d->stream = cuda::Stream();
  }
  MutexLock lock(&order_mu_);
  order_event_ = cuda::Event();
}

void CopyEngine::AddPinnedRange(const void* base, uint64_t bytes) {
  const auto begin = reinterpret_cast<uintptr_t>(base);
  MutexLock lock(&ranges_mu_);
  pinned_ranges_.emplace_back(begin, begin + bytes);
}

bool CopyEngine::IsPinnedHost(const void* p) const {
  const auto at = reinterpret_cast<uintptr_t>(p);
  {
    MutexLock lock(&ranges_mu_);
    for (const auto& [begin, end] : pinned_ranges_) {
      if (at >= begin && at < end) return true;
    }
  }
  return cuda::IsDmaCapable(p);
}

Status CopyEngine::CopyToDevice(std::span<const CopyOp> ops, CopyEvent* done,
                                std::span<const SlotPins> pins) {
  return Copy(h2d_, ops, done, pins);
}

Status CopyEngine::CopyToHost(std::span<const CopyOp> ops, CopyEvent* done,
                              std::span<const SlotPins> pins) {
  return Copy(d2h_, ops, done, pins);
}

Status CopyEngine::Copy(Direction& d, std::span<const CopyOp> ops, CopyEvent* done,
                        std::span<const SlotPins> pins) {
  const char* what = d.to_device ? "copy to device" : "copy to host";
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i].bytes > 0 && (ops[i].src == nullptr || ops[i].dst == nullptr)) {
      return Status::InvalidArgument(std::string(what) + ": op " + std::to_string(i) +
                                     " has a null pointer");
    }
  }
  for (const SlotPins& p : pins) {
    if (p.table == nullptr && !p.slots.empty()) {
      return Status::InvalidArgument(std::string(what) + ": slot pins without a table");
    }
  }

  MutexLock lock(&d.mu);
  uint64_t bytes = 0, count = 0;
  for (const CopyOp& op : ops) {
    bytes += op.bytes;
    count += op.bytes > 0 ? 1 : 0;
  }
  if (count > 0) {
    ++d.stats.calls;
    d.stats.ops += count;
    d.stats.bytes += bytes;
  }

  if (emulated()) {
    for (const CopyOp& op : ops) {
      if (op.bytes > 0) std::memcpy(op.dst, op.src, op.bytes);
    }
    if (count > 0) ++d.stats.submissions;
    if (done != nullptr) done->recorded_ = false;
    Hold(d, pins);
    return Status::OK();
  }

  cuda::ScopedDevice scope(device_);
  Status status = scope.status();
  if (status.ok()) status = Submit(d, ops);
  // Whatever was submitted completes `done` and the pins, even after an error.
  Status recorded;
  if (scope.status().ok()) {
    recorded = RecordDone(d, done);
  } else if (done != nullptr) {
    done->recorded_ = false;
  }
  Hold(d, pins);
  return status.ok() ? recorded : status.WithContext(what);
}

Status CopyEngine::Submit(Direction& d, std::span<const CopyOp> ops) {
  d.dsts.clear();
  d.srcs.clear();
  d.sizes.clear();
  d.staged.clear();
  for (const CopyOp& op : ops) {
    if (op.bytes == 0) continue;
    if (IsPinnedHost(d.to_device ? op.src : op.dst)) {
      d.dsts.push_back(op.dst);
      d.srcs.push_back(op.src);
      d.sizes.push_back(op.bytes);
    } else {
      d.staged.push_back(&op);
    }
  }
  KVTIER_RETURN_IF_ERROR(SubmitBatch(d));
  // The pinned copies are on their way; the CPU stages the pageable ones meanwhile.
  if (!d.staged.empty()) KVTIER_RETURN_IF_ERROR(CopyStaged(d));
  return Status::OK();
}

Status CopyEngine::SubmitBatch(Direction& d) {
  for (size_t i = 0; i < d.dsts.size(); i += kMaxBatchOps) {
    const size_t n = std::min(kMaxBatchOps, d.dsts.size() - i);
    bool batched = false;
    KVTIER_RETURN_IF_ERROR(cuda::MemcpyBatchAsync(
        std::span<void* const>(d.dsts).subspan(i, n),
        std::span<const void* const>(d.srcs).subspan(i, n),
        std::span<const size_t>(d.sizes).subspan(i, n), d.stream.get(), &batched));
    ++d.stats.submissions;
    if (batched) ++d.stats.batched_submissions;
  }
  return Status::OK();
}

Status CopyEngine::EnsureStaging(Direction& d) {
  if (d.staging != nullptr) return Status::OK();
  KVTIER_RETURN_IF_ERROR(cuda::HostAlloc(chunk_bytes_ * kStagingChunks, &d.staging)
                             .WithContext("copy engine staging"));
  for (uint32_t i = 0; i < kStagingChunks; ++i) {
    d.chunks[i].data = static_cast<std::byte*>(d.staging) + i * chunk_bytes_;
  }
  return Status::OK();
}

// Host -> device: each pageable piece is copied into the current chunk, and the
// chunk's pieces go to the device in one submission when it is full. Device -> host:
// the pieces land in the chunk first, and are copied out to the pageable destinations
// when the chunk is reused or at the end of the call.
Status CopyEngine::CopyStaged(Direction& d) {
  KVTIER_RETURN_IF_ERROR(EnsureStaging(d));
  Status status = StagePieces(d);
  if (!status.ok()) AbandonChunks(d);
  return status;
}

Status CopyEngine::StagePieces(Direction& d) {
  Chunk* chunk = nullptr;
  uint64_t fill = chunk_bytes_;
  d.pieces.clear();
  for (const CopyOp* op : d.staged) {
    const auto* src = static_cast<const std::byte*>(op->src);
    auto* dst = static_cast<std::byte*>(op->dst);
    for (uint64_t off = 0; off < op->bytes;) {
      if (fill == chunk_bytes_) {
        if (chunk != nullptr) KVTIER_RETURN_IF_ERROR(FlushChunk(d, *chunk));
        chunk = &d.chunks[d.next_chunk++ % kStagingChunks];
        KVTIER_RETURN_IF_ERROR(ReuseChunk(*chunk));
        fill = 0;
      }
      const uint64_t piece = std::min(chunk_bytes_ - fill, op->bytes - off);
      std::byte* staged = chunk->data + fill;
      if (d.to_device) {
        std::memcpy(staged, src + off, piece);
        d.pieces.push_back(Piece{staged, dst + off, piece});
      } else {
        d.pieces.push_back(Piece{src + off, staged, piece});
        chunk->drain.push_back(Piece{staged, dst + off, piece});
      }
      d.stats.staged_bytes += piece;
      fill += piece;
      off += piece;
    }
  }
  if (chunk != nullptr) KVTIER_RETURN_IF_ERROR(FlushChunk(d, *chunk));
  if (!d.to_device) {
    // Oldest first: the chunk after the last one used is the least recently flushed.
    for (uint32_t i = 0; i < kStagingChunks; ++i) {
      KVTIER_RETURN_IF_ERROR(ReuseChunk(d.chunks[(d.next_chunk + i) % kStagingChunks]));
    }
  }
  return Status::OK();
}

Status CopyEngine::FlushChunk(Direction& d, Chunk& chunk) {
  d.dsts.clear();
  d.srcs.clear();
  d.sizes.clear();
  for (const Piece& p : d.pieces) {
    d.dsts.push_back(p.dst);
    d.srcs.push_back(p.src);
    d.sizes.push_back(p.bytes);
  }
  d.pieces.clear();
  KVTIER_RETURN_IF_ERROR(SubmitBatch(d));
  KVTIER_RETURN_IF_ERROR(chunk.ready.Record(d.stream.get()));
  chunk.recorded = true;
  return Status::OK();
}

Status CopyEngine::ReuseChunk(Chunk& chunk) {
  if (chunk.recorded) {
    KVTIER_RETURN_IF_ERROR(chunk.ready.Synchronize());
    chunk.recorded = false;
  }
  for (const Piece& p : chunk.drain) std::memcpy(p.dst, p.src, p.bytes);
  chunk.drain.clear();
  return Status::OK();
}

void CopyEngine::AbandonChunks(Direction& d) {
  // After a failure nothing pending may be copied out later (its destination may be
  // gone); wait for what was submitted so the chunks can be refilled.
  (void)d.stream.Synchronize();
  for (Chunk& chunk : d.chunks) {
    chunk.recorded = false;
    chunk.drain.clear();
  }
  d.pieces.clear();
}

Status CopyEngine::RecordDone(Direction& d, CopyEvent* done) {
  if (done == nullptr) return Status::OK();
  done->recorded_ = false;
  if (done->event_.get() == nullptr || done->device_ != device_) {
    Result<cuda::Event> event = cuda::Event::Create();
    if (!event.ok()) {
      (void)d.stream.Synchronize();  // so that the unrecorded event is truly complete
      return event.status();
    }
    done->event_ = std::move(event).value();
    done->device_ = device_;
  }
  Status s = done->event_.Record(d.stream.get());
  if (!s.ok()) {
    (void)d.stream.Synchronize();
    return s;
  }
  done->recorded_ = true;
  return Status::OK();
}

void CopyEngine::Hold(Direction& d, std::span<const SlotPins> pins) {
  size_t total = 0;
  for (const SlotPins& p : pins) total += p.slots.size();
  if (total == 0) return;
  InFlight batch;
  if (!d.spare.empty()) {
    batch = std::move(d.spare.back());
    d.spare.pop_back();
  }
  batch.pins.clear();
  for (const SlotPins& p : pins) {
    for (SlotId slot : p.slots) batch.pins.emplace_back(p.table, slot);
  }
  batch.recorded = false;
  if (!emulated()) {
    if (batch.event.get() == nullptr) {
      Result<cuda::Event> event = cuda::Event::Create();
      if (event.ok()) batch.event = std::move(event).value();
    }
    if (batch.event.get() != nullptr && batch.event.Record(d.stream.get()).ok()) {
      batch.recorded = true;
    } else {
      (void)d.stream.Synchronize();  // no event to wait on: wait now
    }
  }
  d.in_flight.push_back(std::move(batch));
}

uint32_t CopyEngine::Release(Direction& d) {
  MutexLock lock(&d.mu);
  uint32_t released = 0;
  while (!d.in_flight.empty()) {
    InFlight& batch = d.in_flight.front();
    if (batch.recorded) {
      Result<bool> done = batch.event.Query();
      if (done.ok() && !*done) break;  // a failed copy counts as run
    }
    for (const auto& [table, slot] : batch.pins) table->Unpin(slot);
    released += static_cast<uint32_t>(batch.pins.size());
    batch.pins.clear();
    batch.recorded = false;
    d.spare.push_back(std::move(batch));
    d.in_flight.pop_front();
  }
  return released;
}

uint32_t CopyEngine::ReleaseCompleted() { return Release(h2d_) + Release(d2h_); }

Status CopyEngine::Synchronize() {
  if (emulated()) return Status::OK();
  cuda::ScopedDevice scope(device_);
  KVTIER_RETURN_IF_ERROR(scope.status());
  Status h2d = h2d_.stream.Synchronize();
  Status d2h = d2h_.stream.Synchronize();
  return h2d.ok() ? d2h : h2d;
}

Status CopyEngine::WaitFor(StreamHandle stream) {
  if (emulated()) return Status::OK();
  cuda::ScopedDevice scope(device_);
  KVTIER_RETURN_IF_ERROR(scope.status());
  MutexLock lock(&order_mu_);
  KVTIER_RETURN_IF_ERROR(order_event_.Record(stream));
  KVTIER_RETURN_IF_ERROR(order_event_.MakeStreamWait(h2d_.stream.get()));
  return order_event_.MakeStreamWait(d2h_.stream.get());
}

CopyEngine::Stats CopyEngine::stats() const {
  Stats total;
  for (const Direction* d : {&h2d_, &d2h_}) {
    MutexLock lock(&d->mu);
    total.calls += d->stats.calls;
    total.ops += d->stats.ops;
    total.bytes += d->stats.bytes;
    total.submissions += d->stats.submissions;
    total.batched_submissions += d->stats.batched_submissions;
    total.staged_bytes += d->stats.staged_bytes;
    total.batches_in_flight += d->in_flight.size();
  }
  return total;
}

}  // namespace kvtier
