// FillPattern on the GPU against its CPU reference. Skips without a device.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/pattern.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

TEST(PatternGpuTest, MatchesReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  std::mt19937_64 rng(std::random_device{}());
  for (uint64_t bytes : {1ull, 7ull, 8ull, 4096ull, 524288ull, 524293ull, 64ull << 20}) {
    for (uint64_t misalign : {0ull, 3ull}) {
      const uint64_t seed = rng();
      void* dev = nullptr;
      ASSERT_EQ(cudaMalloc(&dev, bytes + 8), cudaSuccess);
      ASSERT_EQ(cudaMemset(dev, 0x5A, bytes + 8), cudaSuccess);  // poison
      auto* dst = static_cast<unsigned char*>(dev) + misalign;
      ASSERT_TRUE(LaunchFillPattern(seed, dst, bytes, nullptr).ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<unsigned char> got(bytes + 8 - misalign), want(bytes);
      ASSERT_EQ(cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_TRUE(FillPatternRef(seed, want.data(), bytes, nullptr).ok());
      for (uint64_t i = 0; i < bytes; ++i) {
        ASSERT_EQ(got[i], want[i]) << "bytes=" << bytes << " misalign=" << misalign << " at " << i;
      }
      for (uint64_t i = bytes; i < got.size(); ++i) ASSERT_EQ(got[i], 0x5A) << "wrote past end";
      cudaFree(dev);
    }
  }
#endif
}

TEST(PatternGpuTest, ReportsNoDeviceAsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present";
  std::vector<unsigned char> host(64);
  Status s = LaunchFillPattern(1, host.data(), host.size(), nullptr);
  EXPECT_FALSE(s.ok());  // never a crash: NotSupported or the driver's error
}

}  // namespace
}  // namespace kvtier
