#include "tools/trace.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string_view>
#include <utility>

namespace kvtier::tools {
namespace {

constexpr std::string_view kMagic = "kvtier-trace";
constexpr int64_t kMaxBlock = (int64_t{1} << 32) - 1;
constexpr uint32_t kMaxStep = (1u << 24) - 1;

// Splits on spaces and tabs, skipping empty pieces.
std::vector<std::string_view> Fields(std::string_view line) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    size_t j = i;
    while (j < line.size() && line[j] != ' ' && line[j] != '\t') ++j;
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j;
  }
  return out;
}

template <typename T>
bool ParseInt(std::string_view s, T* out) {
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, *out);
  return ec == std::errc() && p == end;
}

bool ParseFloat(std::string_view s, float* out) {
  // std::from_chars for float is in libstdc++ 11+, but strtof accepts "nan"/"inf" too:
  // both are rejected below.
  std::string copy(s);
  char* end = nullptr;
  errno = 0;
  const float v = std::strtof(copy.c_str(), &end);
  if (copy.empty() || end != copy.c_str() + copy.size() || errno != 0 || !std::isfinite(v)) {
    return false;
  }
  *out = v;
  return true;
}

// "a,b,c" (or "-" for none) into block indices in [-1, 2^32).
bool ParseBlocks(std::string_view s, std::vector<int64_t>* out) {
  out->clear();
  if (s == "-") return true;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string_view::npos) j = s.size();
    int64_t b = 0;
    if (!ParseInt(s.substr(i, j - i), &b) || b < -1 || b > kMaxBlock) return false;
    out->push_back(b);
    i = j + 1;
  }
  return true;
}

bool ParseScores(std::string_view s, std::vector<float>* out) {
  out->clear();
  if (s == "-") return true;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string_view::npos) j = s.size();
    float v = 0;
    if (!ParseFloat(s.substr(i, j - i), &v)) return false;
    out->push_back(v);
    i = j + 1;
  }
  return true;
}

}  // namespace

uint64_t Trace::blocks() const {
  int64_t max_block = -1;
  for (const TraceRecord& r : records) {
    for (int64_t b : r.blocks) max_block = std::max(max_block, b);
  }
  return static_cast<uint64_t>(max_block + 1);
}

Result<Trace> ReadTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::FromErrno(errno, "trace " + path);
  Trace trace;
  std::string line;
  uint64_t line_no = 0;
  bool have_magic = false;
  auto bad = [&](const std::string& what) {
    return Status::InvalidArgument("trace " + path + " line " + std::to_string(line_no) + ": " +
                                   what);
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::vector<std::string_view> f = Fields(line);
    if (!have_magic) {
      uint32_t version = 0;
      if (f.size() != 2 || f[0] != kMagic || !ParseInt(f[1], &version)) {
        return bad("not a kvtier access trace (the first line must be \"kvtier-trace 1\")");
      }
      if (version != kTraceVersion) {
        return bad("trace version " + std::to_string(version) + "; this kvtier reads version " +
                   std::to_string(kTraceVersion));
      }
      have_magic = true;
      continue;
    }
    if (f.empty() || f[0][0] == '#') continue;
    const char c = f[0][0];
    if (c < '0' || c > '9') {  // a header line
      if (!trace.records.empty())
        return bad("header line \"" + std::string(f[0]) + "\" after a record");
      if (f.size() < 2) return bad("header \"" + std::string(f[0]) + "\" without a value");
      bool ok = true;
      if (f[0] == "layers") {
        ok = ParseInt(f[1], &trace.header.layers) && trace.header.layers > 0;
      } else if (f[0] == "block_bytes") {
        ok = ParseInt(f[1], &trace.header.block_bytes) && trace.header.block_bytes > 0;
      } else if (f[0] == "block_tokens") {
        ok = ParseInt(f[1], &trace.header.block_tokens);
      } else if (f[0] == "tokens") {
        ok = ParseInt(f[1], &trace.header.tokens);
      } else if (f[0] == "source") {
        const size_t at = line.find(f[1]);
        trace.header.source = line.substr(at);
      }
      if (!ok) return bad("bad value \"" + std::string(f[1]) + "\" for " + std::string(f[0]));
      continue;
    }
    if (trace.header.layers == 0 || trace.header.block_bytes == 0) {
      return bad("a record before the \"layers\" and \"block_bytes\" header lines");
    }
    if (f.size() < 3) return bad("a record needs a step, a layer and the blocks");
    TraceRecord r;
    if (!ParseInt(f[0], &r.step) || r.step > kMaxStep) {
      return bad("bad step \"" + std::string(f[0]) + "\" (at most " + std::to_string(kMaxStep) +
                 ")");
    }
    if (!ParseInt(f[1], &r.layer) || r.layer >= trace.header.layers) {
      return bad("layer \"" + std::string(f[1]) + "\" outside [0, " +
                 std::to_string(trace.header.layers) + ")");
    }
    if (!trace.records.empty() && r.step < trace.records.back().step) {
      return bad("step " + std::to_string(r.step) + " after step " +
                 std::to_string(trace.records.back().step) + " (steps must not go back)");
    }
    if (!ParseBlocks(f[2], &r.blocks)) {
      return bad("bad block list \"" + std::string(f[2]) +
                 "\" (comma-separated indices in [0, 2^32), or -)");
    }
    for (size_t i = 3; i < f.size(); ++i) {
      std::string_view v = f[i];
      if (v.starts_with("runners=")) {
        if (!ParseBlocks(v.substr(8), &r.runners)) return bad("bad runners-up list");
        continue;
      }
      if (v.starts_with("scores=")) {
        v.remove_prefix(7);
      } else if (v.find('=') != std::string_view::npos) {
        continue;  // a field of a later version
      }
      if (!ParseScores(v, &r.scores)) return bad("bad score list \"" + std::string(v) + "\"");
      if (r.scores.size() != r.blocks.size()) {
        return bad(std::to_string(r.scores.size()) + " scores for " +
                   std::to_string(r.blocks.size()) + " blocks");
      }
    }
    trace.records.push_back(std::move(r));
  }
  if (in.bad()) return Status::IOError("trace " + path + ": read error");
  if (!have_magic) return Status::InvalidArgument("trace " + path + ": empty file");
  if (trace.header.layers == 0 || trace.header.block_bytes == 0) {
    return Status::InvalidArgument("trace " + path +
                                   ": the \"layers\" and \"block_bytes\" header lines are missing");
  }
  return trace;
}

Result<std::unique_ptr<TraceWriter>> TraceWriter::Open(const std::string& path,
                                                       const TraceHeader& header) {
  if (header.layers == 0 || header.block_bytes == 0) {
    return Status::InvalidArgument("trace " + path + ": layers and block_bytes must be set");
  }
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return Status::FromErrno(errno, "create trace " + path);
  std::unique_ptr<TraceWriter> w(new TraceWriter(path, f, header.layers));
  std::string h = std::string(kMagic) + " " + std::to_string(kTraceVersion) + "\n";
  h += "layers " + std::to_string(header.layers) + "\n";
  h += "block_bytes " + std::to_string(header.block_bytes) + "\n";
  if (header.block_tokens) h += "block_tokens " + std::to_string(header.block_tokens) + "\n";
  if (header.tokens) h += "tokens " + std::to_string(header.tokens) + "\n";
  if (!header.source.empty()) {
    std::string source = header.source;
    for (char& c : source) {
      if (c == '\n' || c == '\r') c = ' ';
    }
    h += "source " + source + "\n";
  }
  h += "# step layer blocks scores\n";
  if (std::fwrite(h.data(), 1, h.size(), f) != h.size()) {
    return Status::FromErrno(errno, "write trace " + path);
  }
  return w;
}

TraceWriter::~TraceWriter() { (void)Close(); }

Status TraceWriter::Append(uint32_t step, uint32_t layer, std::span<const int64_t> blocks,
                           std::span<const float> scores) {
  if (!error_.ok()) return error_;
  if (file_ == nullptr) return Status::FailedPrecondition("trace " + path_ + " is closed");
  if (layer >= layers_) {
    return Status::InvalidArgument("trace: layer " + std::to_string(layer) + " outside [0, " +
                                   std::to_string(layers_) + ")");
  }
  if (step < last_step_) return Status::InvalidArgument("trace: steps must not go back");
  if (!scores.empty() && scores.size() != blocks.size()) {
    return Status::InvalidArgument("trace: scores must be empty or one per block");
  }
  last_step_ = step;
  line_.clear();
  line_ += std::to_string(step);
  line_ += ' ';
  line_ += std::to_string(layer);
  line_ += ' ';
  if (blocks.empty()) line_ += '-';
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (i) line_ += ',';
    line_ += std::to_string(blocks[i]);
  }
  if (!scores.empty()) {
    line_ += ' ';
    char buf[32];
    for (size_t i = 0; i < scores.size(); ++i) {
      const double v = std::isfinite(scores[i]) ? scores[i] : 0.0;
      std::snprintf(buf, sizeof(buf), "%s%.6g", i ? "," : "", v);
      line_ += buf;
    }
  }
  line_ += '\n';
  if (std::fwrite(line_.data(), 1, line_.size(), file_) != line_.size()) {
    error_ = Status::FromErrno(errno, "write trace " + path_);
  }
  return error_;
}

Status TraceWriter::Close() {
  if (file_ == nullptr) return error_;
  if (std::fclose(file_) != 0 && error_.ok())
    error_ = Status::FromErrno(errno, "close trace " + path_);
  file_ = nullptr;
  return error_;
}

}  // namespace kvtier::tools
