// CopyEngine: block copies between host memory and a DevicePool's device, on two
// dedicated streams (host->device and device->host) made once, so that copies overlap
// each other and the engine's compute (the streams never synchronize with the legacy
// default stream).
//
// Batching: one call submits many blocks (CopyOp: src, dst, bytes) in as few
// submissions as the runtime allows: cudaMemcpyBatchAsync (CUDA 12.8+), else one
// cudaMemcpyAsync per block on the same stream; one event after the batch.
//
// Pinned staging only where needed: the host side of a copy is DMA'd directly when it
// is pinned (cudaHostAlloc'd or registered: the host tier's region with a GPU; the
// engine asks the driver once per op, or AddPinnedRange says so up front). Pageable
// host memory goes through the engine's own pinned staging ring (CopyEngineOptions):
// host->device returns once the pageable sources have been read into staging (the DMA
// from staging still runs asynchronously); device->host returns once the pageable
// destinations have been written (the call waits for those copies).
//
// Completion: each call can record a CopyEvent after its copies. The caller waits on it
// (Wait), polls it (Query), or makes another stream wait for it on the GPU
// (MakeStreamWait: the attention kernel's stream waits for its blocks without the host
// blocking). That is the event the store's Acquire hands back.
//
// Slots pinned while a copy is in flight: a slot whose bytes a copy reads or writes must
// be neither evicted nor reused before the copy has run. The caller pins such slots
// once (SlotTable::Pin or Allocate, under the lock that guards the table) and hands them
// to the copy call as SlotPins; the engine remembers them with the batch, and
// ReleaseCompleted() (called under that same lock, e.g. at each store operation or by a
// background thread) unpins the slots of every batch whose copies have run, oldest
// first. So a pin is never dropped early, and no thread but the caller's ever touches
// the table. On a failed submission the pins are still released once whatever was
// submitted has run.
//
// Emulated device (the DevicePool is emulated): every copy is a memcpy on the calling
// thread, done when the call returns; events are complete at once; pins are released by
// the next ReleaseCompleted(), exactly as with a GPU.
//
// Thread safety: CopyToDevice, CopyToHost, Synchronize, AddPinnedRange and stats may be
// called from any thread (each direction has its own mutex; calls in one direction are
// submitted one after the other). ReleaseCompleted must be called with the lock that
// guards the SlotTables named in SlotPins. A CopyEvent is used by one thread at a time.
#ifndef KVTIER_STORAGE_COPY_ENGINE_H_
#define KVTIER_STORAGE_COPY_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/host_device.h"
#include "kvtier/status.h"
#include "src/util/mutex.h"
#include "storage/device_pool.h"
#include "storage/slot_table.h"

namespace kvtier {

// One block copy: `bytes` bytes from `src` to `dst`. For CopyToDevice, src is host
// memory and dst device memory (the pool's slots); for CopyToHost the reverse. Copies
// of one call must not overlap one another. An op of 0 bytes is skipped.
struct CopyOp {
  const void* src = nullptr;
  void* dst = nullptr;
  uint64_t bytes = 0;
};

// Slots of `table` that a batch holds pinned until its copies have run: each already
// pinned once, for the batch, by the caller.
struct SlotPins {
  SlotTable* table = nullptr;
  std::span<const SlotId> slots;
};

// The completion of one copy call (see the file comment). Default-constructed, and
// after an emulated copy, it is complete. Reusable: each call that records it replaces
// what it captured. Move-only.
class CopyEvent {
 public:
  CopyEvent() = default;
  CopyEvent(CopyEvent&&) = default;
  CopyEvent& operator=(CopyEvent&&) = default;

  // True once the copies have run; the driver's error when one of them failed.
  Result<bool> Query() const;
  // Blocks until the copies have run.
  Status Wait() const;
  // Makes `stream` (of the same device) wait on the GPU for the copies; the host does
  // not block. Nothing to do when complete or emulated.
  Status MakeStreamWait(StreamHandle stream) const;
  // The recorded cudaEvent_t, for callers that wait on it themselves; nullptr when
  // nothing is pending on a GPU.
  EventHandle handle() const { return recorded_ ? event_.get() : nullptr; }

 private:
  friend class CopyEngine;
  cuda::Event event_;  // made on first use, on device_
  int device_ = -1;
  bool recorded_ = false;
};

struct CopyEngineOptions {
  // Pinned host memory per direction for copies whose host side is pageable, used as
  // kStagingChunks chunks in turn (a pageable block larger than a chunk is split).
  // Default: 16 MiB.
  uint64_t staging_bytes = uint64_t{16} << 20;
};

class CopyEngine {
 public:
  static constexpr uint32_t kStagingChunks = 4;

  // An engine for `pool`'s device (emulated when the pool is). Errors: InvalidArgument
  // (staging below kStagingChunks * 4 KiB), and the driver's (streams, events, pinned
  // staging).
  static Result<std::unique_ptr<CopyEngine>> Create(const DevicePool& pool,
                                                    const CopyEngineOptions& options = {});

  // Waits for every copy submitted. Pins not yet released are dropped (not unpinned):
  // call ReleaseCompleted after Synchronize first if the tables live on.
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  bool emulated() const { return device_ < 0; }
  int device() const { return device_; }
  // The dedicated streams; nullptr when emulated.
  StreamHandle h2d_stream() const { return h2d_.stream.get(); }
  StreamHandle d2h_stream() const { return d2h_.stream.get(); }

  // Declares [base, base + bytes) pinned host memory (the host tier's region), so that
  // copies from or to it skip the per-op driver query.
  void AddPinnedRange(const void* base, uint64_t bytes);

  // Submits `ops` (host -> device / device -> host) on the direction's stream, then
  // records `done` (when not null) and remembers `pins` with the batch. Errors:
  // InvalidArgument (an op with a null pointer, a SlotPins without a table) before
  // anything is submitted; the driver's otherwise (some copies may have run; `done`
  // and the pins still complete).
  Status CopyToDevice(std::span<const CopyOp> ops, CopyEvent* done = nullptr,
                      std::span<const SlotPins> pins = {});
  Status CopyToHost(std::span<const CopyOp> ops, CopyEvent* done = nullptr,
                    std::span<const SlotPins> pins = {});

  // Unpins the slots of every batch whose copies have run (a failed copy counts as
  // run), oldest first in each direction; returns how many pins it released. Must be
  // called with the lock that guards the tables named in the batches' SlotPins.
  uint32_t ReleaseCompleted();
  // Blocks until every copy submitted so far, in both directions, has run. Does not
  // release pins.
  Status Synchronize();
  // Makes later copies in both directions wait, on the GPU (the host does not block),
  // for the work submitted to `stream` so far: the kernels that wrote blocks a
  // CopyToHost will read, or that still read slots a CopyToDevice will overwrite.
  // Copies are otherwise ordered only within their own direction. Emulated: nothing.
  Status WaitFor(StreamHandle stream);

  struct Stats {
    uint64_t calls = 0;                // CopyToDevice and CopyToHost calls with work
    uint64_t ops = 0;                  // block copies
    uint64_t bytes = 0;                // bytes copied
    uint64_t submissions = 0;          // driver submissions (one per call when emulated)
    uint64_t batched_submissions = 0;  // ... of which took cudaMemcpyBatchAsync
    uint64_t staged_bytes = 0;         // bytes that went through pinned staging
    uint64_t batches_in_flight = 0;    // batches whose pins are not yet released
  };
  Stats stats() const;

 private:
  // A batch's pins, released once `event` has completed (no event: complete).
  struct InFlight {
    cuda::Event event;
    bool recorded = false;
    std::vector<std::pair<SlotTable*, SlotId>> pins;
  };
  // A piece of a pageable copy staged through a chunk.
  struct Piece {
    const std::byte* src;
    std::byte* dst;
    uint64_t bytes;
  };
  struct Chunk {
    std::byte* data = nullptr;  // staging_bytes / kStagingChunks of pinned memory
    cuda::Event ready;          // the DMA of the chunk's pieces has run
    bool recorded = false;
    std::vector<Piece> drain;  // device->host: pieces to copy out once `ready`
  };
  // One direction's stream and the state of its submissions.
  struct Direction {
    bool to_device = true;
    mutable Mutex mu;
    cuda::Stream stream;
    std::deque<InFlight> in_flight KVTIER_GUARDED_BY(mu);
    std::vector<InFlight> spare KVTIER_GUARDED_BY(mu);  // reused events and pin vectors
    // Scratch of one submission, kept to avoid allocating per call.
    std::vector<void*> dsts KVTIER_GUARDED_BY(mu);
    std::vector<const void*> srcs KVTIER_GUARDED_BY(mu);
    std::vector<size_t> sizes KVTIER_GUARDED_BY(mu);
    std::vector<const CopyOp*> staged KVTIER_GUARDED_BY(mu);
    std::vector<Piece> pieces KVTIER_GUARDED_BY(mu);
    void* staging KVTIER_GUARDED_BY(mu) = nullptr;  // pinned, made on first use
    std::vector<Chunk> chunks KVTIER_GUARDED_BY(mu);
    uint32_t next_chunk KVTIER_GUARDED_BY(mu) = 0;
    Stats stats KVTIER_GUARDED_BY(mu);
  };

  CopyEngine(int device, uint64_t chunk_bytes);
  Status EnsureStaging(Direction& d) KVTIER_REQUIRES(d.mu);
  Status Copy(Direction& d, std::span<const CopyOp> ops, CopyEvent* done,
              std::span<const SlotPins> pins);
  Status Submit(Direction& d, std::span<const CopyOp> ops) KVTIER_REQUIRES(d.mu);
  Status SubmitBatch(Direction& d) KVTIER_REQUIRES(d.mu);
  Status CopyStaged(Direction& d) KVTIER_REQUIRES(d.mu);
  Status StagePieces(Direction& d) KVTIER_REQUIRES(d.mu);
  Status FlushChunk(Direction& d, Chunk& chunk) KVTIER_REQUIRES(d.mu);
  Status ReuseChunk(Chunk& chunk);
  void AbandonChunks(Direction& d) KVTIER_REQUIRES(d.mu);
  Status RecordDone(Direction& d, CopyEvent* done) KVTIER_REQUIRES(d.mu);
  void Hold(Direction& d, std::span<const SlotPins> pins) KVTIER_REQUIRES(d.mu);
  uint32_t Release(Direction& d);
  bool IsPinnedHost(const void* p) const;

  const int device_;  // -1: emulated
  const uint64_t chunk_bytes_;
  Direction h2d_;
  Direction d2h_;
  Mutex order_mu_;
  cuda::Event order_event_ KVTIER_GUARDED_BY(order_mu_);
  mutable Mutex ranges_mu_;
  std::vector<std::pair<uintptr_t, uintptr_t>> pinned_ranges_ KVTIER_GUARDED_BY(ranges_mu_);
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_COPY_ENGINE_H_
