// Progress: a one-line progress bar on stderr for the long offline commands (`kvtier
// verify`, `export`), drawn only when stderr is a terminal and the command does not
// print JSON, so pipes, logs and --json output never see it.
//
//   Progress progress("verify", total_bytes, /*enabled=*/!json);
//   for (...) progress.Add(block_bytes);
//   progress.Finish();   // erases the line
//
// Redraws at most 10 times a second. Thread safety: one thread's object.
#ifndef KVTIER_TOOLS_PROGRESS_H_
#define KVTIER_TOOLS_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>

namespace kvtier::tools {

class Progress {
 public:
  // Draws nothing unless `enabled` and stderr is a terminal. `total` is in the units
  // Add counts (bytes: the bar shows MB/s too); 0 means unknown.
  Progress(std::string label, uint64_t total, bool enabled, bool bytes = true);
  ~Progress() { Finish(); }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  bool active() const { return active_; }
  void Add(uint64_t done);
  // Erases the bar (once; later calls do nothing).
  void Finish();

 private:
  void Draw();

  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0;
  bool active_;
  bool bytes_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_PROGRESS_H_
