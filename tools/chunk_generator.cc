#include "tools/chunk_generator.h"

#include <chrono>

namespace kvtier::tools {

ChunkGenerator::ChunkGenerator(const bench::Workload& workload, uint32_t threads, uint32_t depth)
    : workload_(workload),
      chunks_(workload.num_blocks()),
      block_bytes_(workload.layout().BytesPerBlock()),
      chunk_bytes_(block_bytes_ * workload.layout().num_layers),
      depth_(std::max(depth, threads + 1)),
      buffers_(depth_),
      ready_(depth_, -1) {
  for (auto& b : buffers_) b.resize(chunk_bytes_);
  for (uint32_t t = 0; t < std::max(threads, 1u); ++t) workers_.emplace_back([this] { Work(); });
}

ChunkGenerator::~ChunkGenerator() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ChunkGenerator::Work() {
  const uint32_t layers = workload_.layout().num_layers;
  std::unique_lock lock(mu_);
  while (true) {
    // A chunk to fill whose buffer the consumer has given back.
    cv_.wait(lock, [&] {
      return stop_ || !error_.ok() || next_ >= chunks_ || next_ < consumed_ + depth_;
    });
    if (stop_ || !error_.ok() || next_ >= chunks_) return;
    const uint64_t chunk = next_++;
    std::byte* dst = buffers_[chunk % depth_].data();
    lock.unlock();
    Status s;
    for (uint32_t l = 0; l < layers && s.ok(); ++l) {
      s = workload_.FillBlock(l, chunk, dst + l * block_bytes_);
    }
    lock.lock();
    if (!s.ok()) {
      error_ = s.WithContext("generating chunk " + std::to_string(chunk));
    } else {
      ready_[chunk % depth_] = static_cast<int64_t>(chunk);
    }
    cv_.notify_all();
  }
}

Result<const std::byte*> ChunkGenerator::Wait(uint64_t chunk) {
  const auto start = std::chrono::steady_clock::now();
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return !error_.ok() || ready_[chunk % depth_] == int64_t(chunk); });
  wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!error_.ok()) return error_;
  return buffers_[chunk % depth_].data();
}

void ChunkGenerator::Done(uint64_t chunk) {
  {
    std::lock_guard lock(mu_);
    ready_[chunk % depth_] = -1;
    consumed_ = chunk + 1;
  }
  cv_.notify_all();
}

}  // namespace kvtier::tools
