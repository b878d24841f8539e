#include "tools/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <utility>

namespace kvtier::tools {

Progress::Progress(std::string label, uint64_t total, bool enabled, bool bytes)
    : label_(std::move(label)),
      total_(total),
      active_(enabled && isatty(STDERR_FILENO) == 1),
      bytes_(bytes),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

void Progress::Add(uint64_t done) {
  if (!active_) return;
  done_ += done;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  Draw();
}

void Progress::Draw() {
  constexpr int kWidth = 30;
  const double fraction =
      total_ == 0 ? 0.0 : std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_));
  const int filled = static_cast<int>(fraction * kWidth);
  char bar[kWidth + 1];
  for (int i = 0; i < kWidth; ++i) bar[i] = i < filled ? '#' : '.';
  bar[kWidth] = '\0';
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (bytes_) {
    const double rate = seconds > 0 ? static_cast<double>(done_) / seconds / 1e6 : 0.0;
    std::fprintf(stderr, "\r%s [%s] %5.1f%%  %.0f MB/s ", label_.c_str(), bar, 100 * fraction,
                 rate);
  } else {
    std::fprintf(stderr, "\r%s [%s] %5.1f%%  %llu ", label_.c_str(), bar, 100 * fraction,
                 static_cast<unsigned long long>(done_));
  }
  std::fflush(stderr);
}

void Progress::Finish() {
  if (!active_) return;
  active_ = false;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
}

}  // namespace kvtier::tools
