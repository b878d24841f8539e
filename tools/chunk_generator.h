// ChunkGenerator: the prefill side of `kvtier demo`. Fills the blocks of consecutive
// chunks (chunk c = block c of every layer, in kvtier's block format, by
// Workload::FillBlock) on worker threads, ahead of the one consumer that puts them into
// the store, in a ring of `depth` chunk buffers: generation overlaps ingestion, and at
// most `depth` chunks are in memory.
//
//   ChunkGenerator gen(workload, threads, depth);
//   for (uint64_t c = 0; c < gen.chunks(); ++c) {
//     Result<const std::byte*> blocks = gen.Wait(c);   // layer l at l * block_bytes
//     ... store.PutBatch(...) ...
//     gen.Done(c);
//   }
//
// Thread safety: Wait and Done are called by one consumer thread, for chunks in order.
// The destructor stops the workers (chunks not consumed are dropped).
#ifndef KVTIER_TOOLS_CHUNK_GENERATOR_H_
#define KVTIER_TOOLS_CHUNK_GENERATOR_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "bench/workload/workload.h"
#include "kvtier/status.h"

namespace kvtier::tools {

class ChunkGenerator {
 public:
  // `workload` must outlive the generator. threads >= 1, depth >= threads + 1 (a worker
  // per buffer not being consumed).
  ChunkGenerator(const bench::Workload& workload, uint32_t threads, uint32_t depth);
  ~ChunkGenerator();
  ChunkGenerator(const ChunkGenerator&) = delete;
  ChunkGenerator& operator=(const ChunkGenerator&) = delete;

  uint64_t chunks() const { return chunks_; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  // Waits until chunk `chunk` (the next one not yet Done) is filled; returns its blocks,
  // valid until Done(chunk), or FillBlock's error.
  Result<const std::byte*> Wait(uint64_t chunk);
  // The consumer is finished with `chunk`: its buffer goes back to the workers.
  void Done(uint64_t chunk);
  // Seconds the consumer spent blocked in Wait (generation not keeping up).
  double wait_seconds() const { return wait_seconds_; }

 private:
  void Work();

  const bench::Workload& workload_;
  const uint64_t chunks_;
  const uint64_t block_bytes_;
  const uint64_t chunk_bytes_;
  const uint32_t depth_;
  std::vector<std::vector<std::byte>> buffers_;  // [depth]

  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_ = 0;           // next chunk a worker takes
  uint64_t consumed_ = 0;       // chunks [0, consumed_) are Done
  std::vector<int64_t> ready_;  // per buffer: the chunk it holds, filled; -1: none
  Status error_;
  bool stop_ = false;
  double wait_seconds_ = 0;
  std::vector<std::thread> workers_;
};

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_CHUNK_GENERATOR_H_
