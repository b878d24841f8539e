// Access traces: which blocks a decode loop asked the GPU tier for, per decoding step
// and layer. `kvtier demo --trace-out FILE` records one; `kvtier replay FILE` runs it
// through the GPU tier's replacement and prefetch policies; `kvtier plot` draws it.
//
// ## Format (version 1): text, one item per line, '\n'-terminated
//   kvtier-trace 1                     the first line, always
//   layers 32                          header lines `name value`, before any record:
//   block_bytes 524288                   layers and block_bytes required; block_tokens,
//   block_tokens 128                     tokens (the context length) and source
//   tokens 131072                        (free text to the end of the line) optional;
//   source kvtier demo ...               unknown names are skipped (later versions)
//   # a comment                        anywhere; blank lines too
//   0 0 0,17,42,250 12,0.31,0.2,12     a record: step, layer, the blocks acquired in
//   0 1 0,18,250                         order (comma-separated block indices; `-` for
//   1 0 0,17,43,250 scores=...           none), then optional fields: the scores Acquire
//                                        was given (one per block: the selection's fused
//                                        score), bare or as `scores=`, and `runners=`:
//                                        the Select's runners-up (prefetch candidates)
// Records come in the order the loop made its Acquire calls: steps non-decreasing and
// below 2^24, layers in [0, layers). Block indices are in [0, 2^32); a block may repeat inside a
// record (the GPU tier gives it one slot). Numbers are decimal; scores are printed with
// %.6g. The format is stable: readers skip unknown header names and unknown `name=`
// fields, so fields can be added without a version change.
//
// Thread safety: a TraceWriter is one thread's object; ReadTrace is a pure function of
// its file.
#ifndef KVTIER_TOOLS_TRACE_H_
#define KVTIER_TOOLS_TRACE_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvtier/status.h"

namespace kvtier::tools {

inline constexpr uint32_t kTraceVersion = 1;

struct TraceHeader {
  uint32_t layers = 0;
  uint64_t block_bytes = 0;
  uint32_t block_tokens = 0;  // 0: not recorded
  uint64_t tokens = 0;        // 0: not recorded
  std::string source;         // empty: not recorded
};

// One Acquire: step, layer and the blocks it asked for.
struct TraceRecord {
  uint32_t step = 0;
  uint32_t layer = 0;
  std::vector<int64_t> blocks;
  std::vector<float> scores;     // empty, or one per block
  std::vector<int64_t> runners;  // Select's runners-up; empty when not recorded
};

struct Trace {
  TraceHeader header;
  std::vector<TraceRecord> records;

  // The number of steps: the last record's step + 1 (0 when empty).
  uint32_t steps() const { return records.empty() ? 0 : records.back().step + 1; }
  // One past the largest block index of any record (0 when none).
  uint64_t blocks() const;
};

// Reads and checks a trace. InvalidArgument naming the file and line for anything that
// is not version 1 as above (a missing first line, a record before `layers` and
// `block_bytes`, a layer out of range, a step going back, a bad number, scores of
// another count); NotFound / IOError when the file cannot be read.
Result<Trace> ReadTrace(const std::string& path);

// Writes a trace: the header at Open, then one line per Append. Close (or the
// destructor, which drops the Status) flushes and closes the file.
class TraceWriter {
 public:
  // Creates (truncates) `path` and writes the header. InvalidArgument when layers or
  // block_bytes is 0; the errno's Status when the file cannot be created.
  static Result<std::unique_ptr<TraceWriter>> Open(const std::string& path,
                                                   const TraceHeader& header);
  ~TraceWriter();
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  // One record; `scores` empty or one per block. InvalidArgument for a layer out of
  // range, a step before the previous one, or scores of another count; IOError when
  // the write fails (the first error sticks: later calls return it).
  Status Append(uint32_t step, uint32_t layer, std::span<const int64_t> blocks,
                std::span<const float> scores = {});
  // Flushes and closes; the first write error, if any.
  Status Close();

 private:
  TraceWriter(std::string path, std::FILE* file, uint32_t layers)
      : path_(std::move(path)), file_(file), layers_(layers) {}

  std::string path_;
  std::FILE* file_;
  uint32_t layers_;
  uint32_t last_step_ = 0;
  Status error_;
  std::string line_;  // scratch
};

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_TRACE_H_
