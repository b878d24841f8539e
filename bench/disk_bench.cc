#include "bench/disk_bench.h"

#include <fcntl.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/version.h>
#include <rocksdb/write_batch.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/pattern.h"
#include "kvtier/store.h"
#include "storage/host_region.h"

extern char** environ;

namespace kvtier::bench {
namespace {

namespace fs = std::filesystem;

// The targets of the issue that asked for this benchmark.
constexpr double kTargetFioRatio = 0.9;
constexpr double kTargetRocksDbRatio = 2.0;
constexpr double kNull = std::numeric_limits<double>::quiet_NaN();

struct DiskConfig {
  std::string dir = "/var/tmp/kvtier-bench-disk";
  double data_gib = 4.0;
  double host_mib = 256.0;
  double source_mib = 64.0;
  uint32_t io_depth = 64;
  uint32_t batch_blocks = 32;
  uint32_t read_batches = 2;
  uint32_t reps = 3;
  std::string fio = "fio";
  bool skip_fio = false;
  bool fio_hugepages = true;
  bool skip_rocksdb = false;
  uint64_t seed = 1;
  bool json = false;
};

// --- Running a program -------------------------------------------------------------

// Runs `args` (args[0] looked up in PATH) with stdout and stderr sent to the files
// given; returns its exit status (127 when it could not be started).
Result<int> RunProgram(const std::vector<std::string>& args, const std::string& stdout_path,
                       const std::string& stderr_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, stdout_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid;
  const int err = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) {
    if (err == ENOENT) return 127;
    return Status::FromErrno(err, "starting " + args[0]);
  }
  int wstatus = 0;
  while (waitpid(pid, &wstatus, 0) < 0) {
    if (errno != EINTR) return Status::FromErrno(errno, "waiting for " + args[0]);
  }
  if (WIFEXITED(wstatus)) return WEXITSTATUS(wstatus);
  return 128 + (WIFSIGNALED(wstatus) ? WTERMSIG(wstatus) : 0);
}

// The whole file, trailing white space dropped ("" when it cannot be read).
std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  std::string text = s.str();
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  return text;
}

// The number after `"name" :` at or after `from` in fio's JSON; npos-safe.
std::optional<double> JsonNumberAfter(const std::string& json, std::string_view name, size_t from) {
  const std::string quoted = "\"" + std::string(name) + "\"";
  size_t at = json.find(quoted, from);
  if (at == std::string::npos) return std::nullopt;
  at = json.find(':', at + quoted.size());
  if (at == std::string::npos) return std::nullopt;
  const char* begin = json.c_str() + at + 1;
  char* end = nullptr;
  const double value = std::strtod(begin, &end);
  if (end == begin) return std::nullopt;
  return value;
}

// Bytes and milliseconds of one direction ("read" or "write") of the first job in
// fio's JSON output. fio's runtime covers the job's I/O and, with end_fsync, its final
// fsync; not the file's creation before it.
struct FioPhase {
  double io_bytes = 0;
  double runtime_ms = 0;
  double gbps() const { return io_bytes / (runtime_ms / 1e3) / kBytesPerGB; }
};

Result<FioPhase> ParseFioJson(const std::string& json, std::string_view direction) {
  const size_t jobs = json.find("\"jobs\"");
  if (jobs == std::string::npos) return Status::Internal("fio output has no \"jobs\"");
  if (auto error = JsonNumberAfter(json, "error", jobs); error && *error != 0) {
    return Status::IOError("fio reported error " + std::to_string(int(*error)));
  }
  // The direction's object: `"write" : {` (the job options say "rw" : "write", a value).
  const std::string quoted = "\"" + std::string(direction) + "\"";
  size_t at = jobs;
  for (;;) {
    at = json.find(quoted, at);
    if (at == std::string::npos) {
      return Status::Internal("fio output has no \"" + std::string(direction) + "\" object");
    }
    at += quoted.size();
    const size_t next = json.find_first_not_of(" \t\r\n", at);
    if (next != std::string::npos && json[next] == ':') {
      const size_t brace = json.find_first_not_of(" \t\r\n", next + 1);
      if (brace != std::string::npos && json[brace] == '{') break;
    }
  }
  FioPhase phase;
  auto bytes = JsonNumberAfter(json, "io_bytes", at);
  auto runtime = JsonNumberAfter(json, "runtime", at);
  if (!bytes || !runtime || *runtime <= 0) {
    return Status::Internal("fio output lacks io_bytes/runtime for " + std::string(direction));
  }
  phase.io_bytes = *bytes;
  phase.runtime_ms = *runtime;
  return phase;
}

// Asks the kernel to drop the cached pages of every file under `dir` (they must be
// clean: written back). Works without root, unlike DropPageCache; best effort.
void EvictFromPageCache(const std::string& dir) {
  std::error_code ec;
  for (const auto& entry : fs::recursive_directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    const int fd = open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
  }
}

// --- Samples and report --------------------------------------------------------------

// GB/s per repetition, per side.
struct Samples {
  std::vector<double> write, read;
};

struct Summary {
  double write = kNull, read = kNull;
  double write_min = kNull, write_max = kNull, read_min = kNull, read_max = kNull;
};

Summary Summarize(const Samples& s) {
  Summary r;
  if (s.write.empty() || s.read.empty()) return r;
  r.write = Median(s.write);
  r.read = Median(s.read);
  r.write_min = *std::min_element(s.write.begin(), s.write.end());
  r.write_max = *std::max_element(s.write.begin(), s.write.end());
  r.read_min = *std::min_element(s.read.begin(), s.read.end());
  r.read_max = *std::max_element(s.read.begin(), s.read.end());
  return r;
}

// --- The benchmark ---------------------------------------------------------------------

// kFio is the fio baseline the ratios use: its buffers in huge pages when they could be
// reserved (the store's host tier is huge-page backed, and on a virtual disk a buffer
// of 4 KiB pages costs one descriptor per page), else fio's default buffers.
// kFioSmallPages is fio with its default buffers, run besides when kFio has huge pages.
enum class Side { kStore, kFio, kFioSmallPages, kRocksDb };
constexpr int kSides = 4;
const char* SideName(Side side) {
  switch (side) {
    case Side::kStore:
      return "kvtier";
    case Side::kFio:
      return "fio";
    case Side::kFioSmallPages:
      return "fio-4k";
    case Side::kRocksDb:
      return "rocksdb";
  }
  return "?";
}

// Removes a directory tree when it goes out of scope (errors ignored: best effort).
class ScopedTree {
 public:
  explicit ScopedTree(std::string path) : path_(std::move(path)) {}
  ~ScopedTree() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScopedTree(const ScopedTree&) = delete;
  ScopedTree& operator=(const ScopedTree&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Reads a number from a /proc file ("/proc/sys/vm/nr_hugepages"), or from the line
// starting with `prefix` in it ("Hugepagesize:" of /proc/meminfo).
std::optional<uint64_t> ReadProcNumber(const std::string& path, std::string_view prefix = "") {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.starts_with(prefix)) continue;
    return std::strtoull(line.c_str() + prefix.size(), nullptr, 10);
  }
  return std::nullopt;
}

// Whether io_uring may register `bytes` of buffers: they count against RLIMIT_MEMLOCK
// unless the process has CAP_IPC_LOCK. (The store falls back to unregistered buffers
// when it may not; fio fails instead, so it is not asked to.)
bool CanRegisterBuffers(uint64_t bytes) {
  constexpr int kCapIpcLock = 14;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (!line.starts_with("CapEff:")) continue;
    const uint64_t caps = std::strtoull(line.c_str() + 7, nullptr, 16);
    if (caps & (uint64_t{1} << kCapIpcLock)) return true;
  }
  struct rlimit memlock;
  return getrlimit(RLIMIT_MEMLOCK, &memlock) == 0 &&
         (memlock.rlim_cur == RLIM_INFINITY || memlock.rlim_cur >= bytes);
}

// Grows the kernel's pool of huge pages (hugetlb) by enough for `bytes` of fio's
// buffers for the life of the object, then gives the pool back its old size. Needs
// root; Reserve returns null (and says why) when the pages cannot be had.
class HugePageReservation {
 public:
  static std::unique_ptr<HugePageReservation> Reserve(uint64_t bytes, std::string* why_not) {
    const std::optional<uint64_t> page_kib = ReadProcNumber("/proc/meminfo", "Hugepagesize:");
    const std::optional<uint64_t> old_pages = ReadProcNumber(kPoolPath);
    if (!page_kib || *page_kib == 0 || !old_pages) {
      *why_not = "no hugetlb support";
      return nullptr;
    }
    // fio rounds its buffer up and aligns it: a few pages of slack.
    const uint64_t pages = (bytes + (*page_kib << 10) - 1) / (*page_kib << 10) + 4;
    auto reservation = std::unique_ptr<HugePageReservation>(new HugePageReservation(*old_pages));
    if (!WritePool(*old_pages + pages) || ReadProcNumber(kPoolPath) < *old_pages + pages) {
      *why_not = "could not reserve " + std::to_string(pages) + " huge pages (not root?)";
      return nullptr;  // the destructor restores the old size
    }
    return reservation;
  }
  ~HugePageReservation() { WritePool(old_pages_); }
  HugePageReservation(const HugePageReservation&) = delete;
  HugePageReservation& operator=(const HugePageReservation&) = delete;

 private:
  static constexpr const char* kPoolPath = "/proc/sys/vm/nr_hugepages";
  explicit HugePageReservation(uint64_t old_pages) : old_pages_(old_pages) {}
  static bool WritePool(uint64_t pages) {
    std::FILE* f = std::fopen(kPoolPath, "w");
    if (f == nullptr) return false;
    const bool written = std::fprintf(f, "%llu\n", static_cast<unsigned long long>(pages)) > 0;
    return std::fclose(f) == 0 && written;
  }
  uint64_t old_pages_;
};

class DiskBench {
 public:
  static Result<std::unique_ptr<DiskBench>> Create(const DiskConfig& config) {
    auto bench = std::unique_ptr<DiskBench>(new DiskBench(config));
    KVTIER_RETURN_IF_ERROR(bench->Init());
    return bench;
  }
  ~DiskBench() {
    std::error_code ec;
    for (const char* sub : {"store", "rocksdb", "fio.dat", "fio.json", "fio.err"}) {
      fs::remove_all(root_ + "/" + sub, ec);
    }
    if (created_root_) fs::remove(root_, ec);  // only when empty
  }

  // One repetition: every side writes then reads, in an order that rotates with `rep`.
  Status Rep(uint32_t rep) {
    std::vector<Side> order = {Side::kStore, Side::kFio, Side::kRocksDb};
    std::rotate(order.begin(), order.begin() + rep % order.size(), order.end());
    for (Side side : order) {
      switch (side) {
        case Side::kStore:
          KVTIER_RETURN_IF_ERROR(RunStore(rep).WithContext("kvtier side"));
          break;
        case Side::kFio:
          if (!fio_available_) break;
          // Both fio variants, in an order that alternates too.
          for (bool huge : {rep % 2 == 0, rep % 2 != 0}) {
            if (huge && hugepages_ == nullptr) continue;
            Status s = RunFio(huge);
            if (!s.ok() && huge) {
              FallBackToSmallPages(s);
              continue;
            }
            KVTIER_RETURN_IF_ERROR(s.WithContext("fio side"));
          }
          break;
        case Side::kFioSmallPages:
          break;  // run with kFio
        case Side::kRocksDb:
          if (!config_.skip_rocksdb) {
            KVTIER_RETURN_IF_ERROR(RunRocksDb(rep).WithContext("rocksdb side"));
          }
          break;
      }
    }
    return Status::OK();
  }

  const DiskConfig& config() const { return config_; }
  const ModelLayout& layout() const { return layout_; }
  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t blocks() const { return blocks_; }
  uint64_t data_bytes() const { return blocks_ * block_bytes_; }
  const FileSystemInfo& file_system() const { return fs_; }
  const std::string& root() const { return root_; }
  bool caches_dropped() const { return caches_dropped_; }
  bool fio_available() const { return fio_available_; }
  const std::string& fio_note() const { return fio_note_; }
  bool fio_hugepages() const { return hugepages_ != nullptr; }
  bool fio_fixedbufs() const { return fio_fixedbufs_; }
  const std::string& fio_buffers_note() const { return fio_buffers_note_; }
  const Samples& samples(Side side) const { return samples_[static_cast<int>(side)]; }
  uint64_t verified_blocks() const { return verified_blocks_; }
  uint64_t corrupt_blocks() const { return corrupt_blocks_; }
  const StoreStats& last_write_stats() const { return write_stats_; }
  const StoreStats& last_read_stats() const { return read_stats_; }
  double median_reopen_s() const { return Median(reopen_s_); }

 private:
  explicit DiskBench(const DiskConfig& config)
      : config_(config), layout_(ModelLayout::Llama3_8B()), block_bytes_(layout_.BytesPerBlock()) {}

  Status Init() {
    blocks_ = static_cast<uint64_t>(config_.data_gib * double(kGiB)) / block_bytes_;
    sources_ = static_cast<uint64_t>(config_.source_mib * double(kMiB)) / block_bytes_;
    if (blocks_ == 0 || sources_ == 0) {
      return Status::InvalidArgument("--gib and --source-mib must each hold at least one block");
    }
    if (block_bytes_ % 4096 != 0) {
      return Status::InvalidArgument("the block size must be a multiple of 4096 for O_DIRECT");
    }
    std::error_code ec;
    created_root_ = !fs::exists(config_.dir, ec);
    fs::create_directories(config_.dir, ec);
    if (ec) return Status::IOError("creating " + config_.dir + ": " + ec.message());
    root_ = fs::canonical(config_.dir, ec).string();
    fs_ = DescribeFileSystem(root_);
    // One side's files at a time; RocksDB's WAL and blob files hold the data twice.
    const uint64_t need = 2 * data_bytes() + data_bytes() / 4 + kGiB;
    if (fs_.free_bytes != 0 && fs_.free_bytes < need) {
      return Status::ResourceExhausted(root_ + " has " + std::to_string(fs_.free_bytes >> 20) +
                                       " MiB free; this run needs about " +
                                       std::to_string(need >> 20) + " MiB");
    }
    KVTIER_ASSIGN_OR_RETURN(sources_region_,
                            HostRegion::Allocate(sources_ * block_bytes_, HostMemoryKind::kPlain));
    for (uint64_t j = 0; j < sources_; ++j) {
      KVTIER_RETURN_IF_ERROR(FillPatternRef(SourceSeed(j), Source(j), block_bytes_, nullptr));
    }
    KVTIER_ASSIGN_OR_RETURN(dst_region_, HostRegion::Allocate(uint64_t{config_.read_batches} *
                                                                  config_.io_depth * block_bytes_,
                                                              HostMemoryKind::kPlain));
    if (!config_.skip_fio) ProbeFio();
    fio_fixedbufs_ = CanRegisterBuffers(uint64_t{config_.io_depth} * block_bytes_ + 4 * kMiB);
    fio_buffers_note_ = "fio's default buffers (4 KiB pages)";
    if (fio_available_ && config_.fio_hugepages) {
      std::string why_not;
      hugepages_ =
          HugePageReservation::Reserve(uint64_t{config_.io_depth} * block_bytes_, &why_not);
      if (hugepages_ != nullptr) {
        fio_buffers_note_ = "huge pages (--iomem=shmhuge); fio-4k: fio's default buffers";
      } else {
        fio_buffers_note_ += ", huge pages unavailable: " + why_not;
      }
    }
    return Status::OK();
  }

  void ProbeFio() {
    Result<int> rc =
        RunProgram({config_.fio, "--version"}, root_ + "/fio.json", root_ + "/fio.err");
    if (rc.ok() && *rc == 0) {
      fio_available_ = true;
      fio_note_ = ReadFile(root_ + "/fio.json");
    } else {
      fio_note_ =
          config_.fio + " not found or not runnable (install Debian's fio); fio side skipped";
    }
  }

  // Block i: layer-major within 128-token chunks, as an engine's prefill writes them;
  // its bytes are those of source buffer i % sources.
  BlockKey Key(uint64_t i) const {
    return BlockKey{.namespace_id = 0,
                    .sequence = SequenceId::FromU64(1),
                    .layer = static_cast<uint32_t>(i % layout_.num_layers),
                    .block = static_cast<uint32_t>(i / layout_.num_layers)};
  }
  uint64_t SourceSeed(uint64_t j) const { return PatternWord(config_.seed, j); }
  std::byte* Source(uint64_t j) const { return sources_region_->data() + j * block_bytes_; }
  std::byte* Dest(uint64_t j) const { return dst_region_->data() + j * block_bytes_; }

  // Every block once, in a random order that differs per repetition.
  std::vector<uint64_t> ReadOrder(uint32_t rep) const {
    std::vector<uint64_t> order(blocks_);
    std::iota(order.begin(), order.end(), uint64_t{0});
    std::mt19937_64 rng(config_.seed * 1000003 + rep);
    std::shuffle(order.begin(), order.end(), rng);
    return order;
  }

  // Block `block` as read back, against the source buffer it was written from (which
  // holds its pattern).
  void Verify(const char* side, uint64_t block, const void* data, uint64_t bytes) {
    if (bytes == block_bytes_ && std::memcmp(data, Source(block % sources_), bytes) == 0) {
      ++verified_blocks_;
      return;
    }
    const uint64_t at =
        bytes == block_bytes_ ? FindPatternMismatch(SourceSeed(block % sources_), data, bytes) : 0;
    ++corrupt_blocks_;
    std::fprintf(stderr, "kvtier-bench disk: %s: block %llu (%llu bytes) differs at byte %llu\n",
                 side, static_cast<unsigned long long>(block),
                 static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(at));
  }

  void DropCaches() { caches_dropped_ = DropPageCache() && caches_dropped_; }

  void Record(Side side, double write_s, double read_s) {
    Samples& s = samples_[static_cast<int>(side)];
    s.write.push_back(double(data_bytes()) / write_s / kBytesPerGB);
    s.read.push_back(double(data_bytes()) / read_s / kBytesPerGB);
  }

  // --- kvtier ---

  StoreOptions StoreOptionsFor(const std::string& dir) const {
    StoreOptions o;
    o.directory = dir;
    // Room for every block, plus slack; rounded to whole MiB.
    o.disk_capacity_bytes = (data_bytes() + data_bytes() / 16 + 64 * kMiB) / kMiB * kMiB;
    o.io_depth = config_.io_depth;
    o.sync = SyncPolicy::kBatchedFdatasync;
    o.write_through = true;
    o.host_capacity_bytes = static_cast<uint64_t>(config_.host_mib * double(kMiB));
    return o;
  }

  Status RunStore(uint32_t rep) {
    ScopedTree dir(root_ + "/store");
    const StoreOptions options = StoreOptionsFor(dir.path());
    double write_s = 0;
    {
      KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, Store::Open(options, layout_));
      const uint64_t batch = config_.batch_blocks;
      std::vector<BlockWrite> writes(batch);
      std::vector<Status> statuses(batch);
      Status failure;
      write_s = TimeSeconds([&] {
        for (uint64_t i = 0; i < blocks_ && failure.ok(); i += batch) {
          const uint64_t m = std::min(batch, blocks_ - i);
          for (uint64_t k = 0; k < m; ++k) {
            writes[k] = BlockWrite{Key(i + k), Source((i + k) % sources_), block_bytes_};
          }
          failure = store->PutBatch(std::span<const BlockWrite>(writes).first(m),
                                    std::span<Status>(statuses).first(m));
        }
        if (failure.ok()) failure = store->Flush();
      });
      KVTIER_RETURN_IF_ERROR(failure.WithContext("writing"));
      write_stats_ = store->Stats();
      if (write_stats_.disk_blocks != blocks_) {
        return Status::Internal("after Flush the store has " +
                                std::to_string(write_stats_.disk_blocks) + " of " +
                                std::to_string(blocks_) + " blocks on disk");
      }
    }  // closed: Flush left nothing to do
    DropCaches();
    double read_s = 0;
    {
      std::unique_ptr<Store> store;
      Status open;
      reopen_s_.push_back(TimeSeconds([&] {
        Result<std::unique_ptr<Store>> r = Store::Open(options, layout_);
        if (r.ok()) {
          store = std::move(*r);
        } else {
          open = r.status();
        }
      }));
      KVTIER_RETURN_IF_ERROR(open.WithContext("reopening"));
      KVTIER_ASSIGN_OR_RETURN(read_s, ReadStore(*store, ReadOrder(rep)));
      read_stats_ = store->Stats();
      if (read_stats_.disk_reads != blocks_) {
        return Status::Internal("the read phase promoted " +
                                std::to_string(read_stats_.disk_reads) + " of " +
                                std::to_string(blocks_) + " blocks from disk");
      }
    }
    Record(Side::kStore, write_s, read_s);
    return Status::OK();
  }

  // Reads every block once, in `order`, with GetBatch calls of io_depth blocks,
  // read_batches of them in flight; returns the seconds taken. With one in flight the
  // calls are synchronous and each batch is verified with the clock stopped (nothing is
  // in flight then); with more, they are GetBatchAsync calls and a batch is verified
  // while the others are in flight, inside the timing.
  Result<double> ReadStore(Store& store, const std::vector<uint64_t>& order) {
    const uint64_t depth = config_.io_depth;
    struct Batch {
      std::vector<BlockRead> reads;
      std::vector<Status> statuses;
      std::future<Status> done;
      uint64_t first = 0, count = 0;
    };
    std::vector<Batch> batches(config_.read_batches);
    for (uint64_t b = 0; b < batches.size(); ++b) {
      batches[b].reads.resize(depth);
      batches[b].statuses.resize(depth);
    }
    auto prepare = [&](uint64_t b, uint64_t first) {
      Batch& batch = batches[b];
      batch.first = first;
      batch.count = std::min(depth, blocks_ - first);
      for (uint64_t k = 0; k < batch.count; ++k) {
        batch.reads[k] = BlockRead{Key(order[first + k]), Dest(b * depth + k), block_bytes_};
      }
    };
    auto verify = [&](uint64_t b) {
      const Batch& batch = batches[b];
      for (uint64_t k = 0; k < batch.count; ++k) {
        Verify("kvtier", order[batch.first + k], Dest(b * depth + k), block_bytes_);
      }
    };
    if (batches.size() == 1) {
      double seconds = 0;
      for (uint64_t i = 0; i < blocks_; i += depth) {
        prepare(0, i);
        Batch& batch = batches[0];
        Status s;
        seconds += TimeSeconds([&] {
          s = store.GetBatch(std::span<const BlockRead>(batch.reads).first(batch.count),
                             std::span<Status>(batch.statuses).first(batch.count));
        });
        KVTIER_RETURN_IF_ERROR(s.WithContext("reading"));
        verify(0);
      }
      return seconds;
    }
    Status failure;
    const double seconds = TimeSeconds([&] {
      uint64_t next = 0, in_flight = 0;
      auto submit = [&](uint64_t b) {
        prepare(b, next);
        next += batches[b].count;
        ++in_flight;
        Batch& batch = batches[b];
        batch.done = store.GetBatchAsync(std::span<const BlockRead>(batch.reads).first(batch.count),
                                         std::span<Status>(batch.statuses).first(batch.count));
      };
      for (uint64_t b = 0; b < batches.size() && next < blocks_; ++b) submit(b);
      // Batches complete in submission order (round robin over the slots).
      for (uint64_t b = 0; in_flight > 0; b = (b + 1) % batches.size()) {
        Status s = batches[b].done.get();
        --in_flight;
        if (!s.ok() && failure.ok()) failure = s.WithContext("reading");
        if (s.ok()) verify(b);
        if (next < blocks_ && failure.ok()) submit(b);
      }
    });
    KVTIER_RETURN_IF_ERROR(failure);
    return seconds;
  }

  // --- fio ---

  // One fio job on `file`: "write" (sequential, ending with an fsync) or "randread".
  Result<FioPhase> RunFioJob(const std::string& rw, const std::string& file, bool huge) {
    std::vector<std::string> args = {
        config_.fio,
        "--name=kvtier-bench-" + rw,
        "--filename=" + file,
        "--size=" + std::to_string(data_bytes()),
        "--ioengine=io_uring",
        "--direct=1",
        "--bs=" + std::to_string(block_bytes_),
        "--iodepth=" + std::to_string(config_.io_depth),
        "--rw=" + rw,
        "--registerfiles=1",  // as the store's slab files are
        "--output-format=json",
        "--output=" + root_ + "/fio.json",
    };
    if (fio_fixedbufs_) args.push_back("--fixedbufs=1");  // as the store's host tier is
    if (rw == "write") args.push_back("--end_fsync=1");
    if (huge) args.push_back("--iomem=shmhuge");
    KVTIER_ASSIGN_OR_RETURN(int rc, RunProgram(args, "/dev/null", root_ + "/fio.err"));
    Result<FioPhase> phase =
        ParseFioJson(ReadFile(root_ + "/fio.json"), rw == "write" ? "write" : "read");
    if (rc != 0) {
      return Status::IOError("fio --rw=" + rw + " exited with " + std::to_string(rc) + ": " +
                             ReadFile(root_ + "/fio.err") +
                             (phase.ok() ? "" : " (" + phase.status().ToString() + ")"));
    }
    return phase;
  }

  // fio could not run with huge-page buffers: from now on fio runs with its default
  // buffers only, and they are the baseline.
  void FallBackToSmallPages(const Status& why) {
    std::fprintf(stderr,
                 "kvtier-bench disk: fio with huge pages failed (%s); using its default buffers\n",
                 why.ToString().c_str());
    hugepages_.reset();
    samples_[static_cast<int>(Side::kFio)] =
        std::move(samples_[static_cast<int>(Side::kFioSmallPages)]);
    samples_[static_cast<int>(Side::kFioSmallPages)] = Samples{};
    fio_buffers_note_ = "fio's default buffers (4 KiB pages); huge pages failed";
  }

  // A new file written (as the store's slab file, preallocated: fio fallocates it),
  // then read back in random order.
  Status RunFio(bool huge) {
    ScopedTree file(root_ + "/fio.dat");
    KVTIER_ASSIGN_OR_RETURN(FioPhase write, RunFioJob("write", file.path(), huge));
    DropCaches();
    KVTIER_ASSIGN_OR_RETURN(FioPhase read, RunFioJob("randread", file.path(), huge));
    if (write.io_bytes != double(data_bytes()) || read.io_bytes != double(data_bytes())) {
      return Status::Internal("fio moved " + std::to_string(write.io_bytes) + " / " +
                              std::to_string(read.io_bytes) + " bytes, not " +
                              std::to_string(data_bytes()));
    }
    const Side side = huge || hugepages_ == nullptr ? Side::kFio : Side::kFioSmallPages;
    Record(side, write.runtime_ms / 1e3, read.runtime_ms / 1e3);
    return Status::OK();
  }

  // --- RocksDB ---

  static Status FromRocks(const rocksdb::Status& s, const std::string& what) {
    if (s.ok()) return Status::OK();
    return Status::IOError("rocksdb " + what + ": " + s.ToString());
  }

  static std::string RocksKey(uint64_t i) {
    std::string key(8, '\0');
    for (int b = 0; b < 8; ++b) key[b] = static_cast<char>(i >> (56 - 8 * b));
    return key;
  }

  // RocksDB's defaults, plus blob files for the large values and no compression (KV
  // cache bytes do not compress, and the store does not compress either).
  rocksdb::Options RocksOptions() const {
    rocksdb::Options o;
    o.create_if_missing = true;
    o.max_background_jobs = 2;
    o.compression = rocksdb::kNoCompression;
    o.enable_blob_files = true;
    o.min_blob_size = 4096;
    o.blob_file_size = uint64_t{256} << 20;
    o.blob_compression_type = rocksdb::kNoCompression;
    o.enable_blob_garbage_collection = false;
    return o;
  }

  Status RunRocksDb(uint32_t rep) {
    ScopedTree dir(root_ + "/rocksdb");
    const rocksdb::Options options = RocksOptions();
    double write_s = 0;
    {
      rocksdb::DB* raw = nullptr;
      KVTIER_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(options, dir.path(), &raw), "open"));
      std::unique_ptr<rocksdb::DB> db(raw);
      const uint64_t batch_blocks = config_.batch_blocks;
      rocksdb::Status s;
      write_s = TimeSeconds([&] {
        rocksdb::WriteBatch batch;
        for (uint64_t i = 0; i < blocks_ && s.ok(); i += batch_blocks) {
          batch.Clear();
          const uint64_t m = std::min(batch_blocks, blocks_ - i);
          for (uint64_t k = 0; k < m && s.ok(); ++k) {
            s = batch.Put(RocksKey(i + k),
                          rocksdb::Slice(reinterpret_cast<const char*>(Source((i + k) % sources_)),
                                         block_bytes_));
          }
          if (s.ok()) s = db->Write(rocksdb::WriteOptions(), &batch);
        }
        // Durable: the memtables flushed (blob and table files synced, MANIFEST updated).
        if (s.ok()) s = db->Flush(rocksdb::FlushOptions());
      });
      KVTIER_RETURN_IF_ERROR(FromRocks(s, "write"));
      KVTIER_RETURN_IF_ERROR(FromRocks(db->Close(), "close"));
    }
    DropCaches();
    EvictFromPageCache(dir.path());  // in case the cache could not be dropped (not root)
    double read_s = 0;
    {
      rocksdb::DB* raw = nullptr;
      KVTIER_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(options, dir.path(), &raw), "reopen"));
      std::unique_ptr<rocksdb::DB> db(raw);
      const std::vector<uint64_t> order = ReadOrder(rep);
      const uint64_t depth = config_.io_depth;
      std::vector<std::string> key_bytes(depth);
      std::vector<rocksdb::Slice> keys(depth);
      std::vector<rocksdb::PinnableSlice> values(depth);
      std::vector<rocksdb::Status> statuses(depth);
      rocksdb::ReadOptions read_options;  // verify_checksums: true (the default)
      for (uint64_t i = 0; i < blocks_; i += depth) {
        const uint64_t m = std::min(depth, blocks_ - i);
        for (uint64_t k = 0; k < m; ++k) {
          key_bytes[k] = RocksKey(order[i + k]);
          keys[k] = key_bytes[k];
          values[k].Reset();
        }
        read_s += TimeSeconds([&] {
          db->MultiGet(read_options, db->DefaultColumnFamily(), m, keys.data(), values.data(),
                       statuses.data());
        });
        for (uint64_t k = 0; k < m; ++k) {
          KVTIER_RETURN_IF_ERROR(FromRocks(statuses[k], "MultiGet"));
          Verify("rocksdb", order[i + k], values[k].data(), values[k].size());
        }
      }
      for (auto& v : values) v.Reset();
      KVTIER_RETURN_IF_ERROR(FromRocks(db->Close(), "close"));
    }
    Record(Side::kRocksDb, write_s, read_s);
    return Status::OK();
  }

  const DiskConfig config_;
  const ModelLayout layout_;
  const uint64_t block_bytes_;
  uint64_t blocks_ = 0;
  uint64_t sources_ = 0;
  std::string root_;
  bool created_root_ = false;
  FileSystemInfo fs_;
  std::unique_ptr<HostRegion> sources_region_;
  std::unique_ptr<HostRegion> dst_region_;
  bool fio_available_ = false;
  std::string fio_note_;                            // fio's version, or why it is skipped
  std::unique_ptr<HugePageReservation> hugepages_;  // null: fio uses its default buffers
  std::string fio_buffers_note_;
  bool fio_fixedbufs_ = true;  // registered buffers (false when memlock is too small)
  bool caches_dropped_ = true;
  Samples samples_[kSides];
  std::vector<double> reopen_s_;
  StoreStats write_stats_;
  StoreStats read_stats_;
  uint64_t verified_blocks_ = 0;
  uint64_t corrupt_blocks_ = 0;
};

// --- Report ----------------------------------------------------------------------------

struct Report {
  Summary store, fio, fio_small_pages, rocksdb;
  double WriteRatioFio() const { return store.write / fio.write; }
  double ReadRatioFio() const { return store.read / fio.read; }
  double WriteRatioRocksDb() const { return store.write / rocksdb.write; }
  double ReadRatioRocksDb() const { return store.read / rocksdb.read; }
  // A skipped baseline (NaN ratio) does not count as a miss.
  static bool Met(double ratio, double target) { return std::isnan(ratio) || ratio >= target; }
  bool FioMet() const {
    return Met(WriteRatioFio(), kTargetFioRatio) && Met(ReadRatioFio(), kTargetFioRatio);
  }
  bool RocksDbMet() const {
    return Met(WriteRatioRocksDb(), kTargetRocksDbRatio) &&
           Met(ReadRatioRocksDb(), kTargetRocksDbRatio);
  }
};

std::string Gbps(double v) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

std::string Ratio(double v) {
  if (std::isnan(v)) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2fx", v);
  return buf;
}

void PrintTable(const DiskBench& b, const Report& r) {
  const DiskConfig& c = b.config();
  const StoreStats& ws = b.last_write_stats();
  std::printf("kvtier-bench disk: %s\n", b.layout().ToString().c_str());
  std::printf("  data set %.2f GiB: %llu blocks of %llu bytes (512 KiB), queue depth %u\n",
              double(b.data_bytes()) / double(kGiB), static_cast<unsigned long long>(b.blocks()),
              static_cast<unsigned long long>(b.block_bytes()), c.io_depth);
  std::printf("  directory %s: %s\n", b.root().c_str(), b.file_system().ToString().c_str());
  std::printf(
      "  page cache dropped before each read phase: %s\n",
      b.caches_dropped() ? "yes" : "NO (not root): RocksDB's files evicted with fadvise only");
  std::printf(
      "  kvtier: host tier %llu MiB (%s), write-through, batched fdatasync, XXH3\n"
      "          checksums; PutBatch of %u then Flush; reopen, GetBatch of %u, random,\n"
      "          %u batch(es) in flight\n",
      static_cast<unsigned long long>(ws.host_capacity_bytes >> 20),
      std::string(HostMemoryKindName(ws.host_memory)).c_str(), c.batch_blocks, c.io_depth,
      c.read_batches);
  std::printf("  fio: %s, io_uring, direct, registered files%s; buffers: %s\n",
              b.fio_note().c_str(), b.fio_fixedbufs() ? " and buffers" : "",
              b.fio_buffers_note().c_str());
  std::printf(
      "  rocksdb %d.%d.%d: blob files, no compression, WriteBatch of %u then Flush;\n"
      "          reopen, MultiGet of %u, random\n\n",
      ROCKSDB_MAJOR, ROCKSDB_MINOR, ROCKSDB_PATCH, c.batch_blocks, c.io_depth);

  std::printf("  %-8s %-28s %-28s\n", "GB/s", "write: median (min-max)", "read: median (min-max)");
  auto row = [](const char* name, const Summary& s) {
    const std::string w = Gbps(s.write) + " (" + Gbps(s.write_min) + "-" + Gbps(s.write_max) + ")";
    const std::string rd = Gbps(s.read) + " (" + Gbps(s.read_min) + "-" + Gbps(s.read_max) + ")";
    std::printf("  %-8s %-28s %-28s\n", name, w.c_str(), rd.c_str());
  };
  row("kvtier", r.store);
  row("fio", r.fio);
  if (b.fio_hugepages()) row("fio-4k", r.fio_small_pages);
  row("rocksdb", r.rocksdb);
  std::printf("\n  per repetition (GB/s, write / read):\n");
  for (Side side : {Side::kStore, Side::kFio, Side::kFioSmallPages, Side::kRocksDb}) {
    const Samples& s = b.samples(side);
    if (s.write.empty()) continue;
    std::printf("  %-8s", SideName(side));
    for (size_t i = 0; i < s.write.size(); ++i) {
      std::printf("  %.3f / %.3f", s.write[i], s.read[i]);
    }
    std::printf("\n");
  }
  std::printf("\n  kvtier vs fio:     write %s, read %s (target >= %.1fx)\n",
              Ratio(r.WriteRatioFio()).c_str(), Ratio(r.ReadRatioFio()).c_str(), kTargetFioRatio);
  std::printf("  kvtier vs rocksdb: write %s, read %s (target >= %.1fx)\n",
              Ratio(r.WriteRatioRocksDb()).c_str(), Ratio(r.ReadRatioRocksDb()).c_str(),
              kTargetRocksDbRatio);
  const StoreStats& rs = b.last_read_stats();
  std::printf(
      "  kvtier (last rep): %llu demotions, %llu catalog commits, %llu puts waited;\n"
      "                     %llu promotions; reopen took %.3f s (median)\n",
      static_cast<unsigned long long>(ws.disk_writes),
      static_cast<unsigned long long>(ws.catalog_commits),
      static_cast<unsigned long long>(ws.put_waits), static_cast<unsigned long long>(rs.disk_reads),
      b.median_reopen_s());
  std::printf("  verified byte-exact: %llu blocks read back, %llu corrupt\n",
              static_cast<unsigned long long>(b.verified_blocks()),
              static_cast<unsigned long long>(b.corrupt_blocks()));
  std::printf("  targets: >= %.1fx fio: %s; >= %.1fx rocksdb: %s\n", kTargetFioRatio,
              r.FioMet() ? "met" : "MISSED", kTargetRocksDbRatio,
              r.RocksDbMet() ? "met" : "MISSED");
}

void PrintJson(const DiskBench& b, const Report& r) {
  const DiskConfig& c = b.config();
  const StoreStats& ws = b.last_write_stats();
  const StoreStats& rs = b.last_read_stats();
  JsonLine j;
  j.Add("bench", "disk");
  j.Add("layout", b.layout().ToString());
  j.Add("block_bytes", b.block_bytes());
  j.Add("io_depth", c.io_depth);
  j.Add("blocks", b.blocks());
  j.Add("data_bytes", b.data_bytes());
  j.Add("batch_blocks", c.batch_blocks);
  j.Add("reps", c.reps);
  j.Add("dir", b.root());
  j.Add("fs_type", b.file_system().type);
  j.Add("fs_device", b.file_system().device);
  j.Add("caches_dropped", b.caches_dropped());
  j.Add("host_capacity_bytes", ws.host_capacity_bytes);
  j.Add("host_memory", HostMemoryKindName(ws.host_memory));
  j.Add("read_batches", c.read_batches);
  j.Add("fio", b.fio_available() ? b.fio_note() : std::string());
  j.Add("fio_hugepages", b.fio_hugepages());
  j.Add("fio_fixedbufs", b.fio_fixedbufs());
  j.Add("rocksdb_version", std::to_string(ROCKSDB_MAJOR) + "." + std::to_string(ROCKSDB_MINOR) +
                               "." + std::to_string(ROCKSDB_PATCH));
  j.Add("write_gbps", r.store.write);
  j.Add("read_gbps", r.store.read);
  j.Add("fio_write_gbps", r.fio.write);
  j.Add("fio_read_gbps", r.fio.read);
  j.Add("rocksdb_write_gbps", r.rocksdb.write);
  j.Add("rocksdb_read_gbps", r.rocksdb.read);
  j.Add("write_ratio_fio", r.WriteRatioFio());
  j.Add("read_ratio_fio", r.ReadRatioFio());
  j.Add("write_ratio_rocksdb", r.WriteRatioRocksDb());
  j.Add("read_ratio_rocksdb", r.ReadRatioRocksDb());
  j.Add("write_gbps_min", r.store.write_min);
  j.Add("write_gbps_max", r.store.write_max);
  j.Add("read_gbps_min", r.store.read_min);
  j.Add("read_gbps_max", r.store.read_max);
  j.Add("fio_write_gbps_min", r.fio.write_min);
  j.Add("fio_write_gbps_max", r.fio.write_max);
  j.Add("fio_read_gbps_min", r.fio.read_min);
  j.Add("fio_read_gbps_max", r.fio.read_max);
  j.Add("fio_4k_write_gbps", r.fio_small_pages.write);
  j.Add("fio_4k_read_gbps", r.fio_small_pages.read);
  j.Add("rocksdb_write_gbps_min", r.rocksdb.write_min);
  j.Add("rocksdb_write_gbps_max", r.rocksdb.write_max);
  j.Add("rocksdb_read_gbps_min", r.rocksdb.read_min);
  j.Add("rocksdb_read_gbps_max", r.rocksdb.read_max);
  j.Add("reopen_s", b.median_reopen_s());
  j.Add("disk_writes", ws.disk_writes);
  j.Add("catalog_commits", ws.catalog_commits);
  j.Add("put_waits", ws.put_waits);
  j.Add("disk_reads", rs.disk_reads);
  j.Add("verified_blocks", b.verified_blocks());
  j.Add("corrupt_blocks", b.corrupt_blocks());
  j.Add("targets_met", r.FioMet() && r.RocksDbMet());
  std::printf("%s\n", j.str().c_str());
}

int RunDisk(const DiskConfig& config) {
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "kvtier-bench disk: %s\n", s.ToString().c_str());
    return 2;
  };
  Result<std::unique_ptr<DiskBench>> bench = DiskBench::Create(config);
  if (!bench.ok()) return fail(bench.status());
  DiskBench& b = **bench;
  if (!b.fio_available() && !config.skip_fio) {
    std::fprintf(stderr, "kvtier-bench disk: %s\n", b.fio_note().c_str());
  }
  for (uint32_t rep = 0; rep < config.reps; ++rep) {
    if (Status s = b.Rep(rep); !s.ok()) return fail(s);
    if (!config.json) {
      std::fprintf(stderr, "kvtier-bench disk: repetition %u of %u done\n", rep + 1, config.reps);
    }
  }
  const Report report{.store = Summarize(b.samples(Side::kStore)),
                      .fio = Summarize(b.samples(Side::kFio)),
                      .fio_small_pages = Summarize(b.samples(Side::kFioSmallPages)),
                      .rocksdb = Summarize(b.samples(Side::kRocksDb))};
  if (config.json) {
    PrintJson(b, report);
  } else {
    PrintTable(b, report);
  }
  return b.corrupt_blocks() == 0 ? 0 : 1;
}

}  // namespace

void AddDiskCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<DiskConfig>();
  CLI::App* cmd = app.add_subcommand(
      "disk", "Disk tier write/read GB/s of 512 KiB blocks against fio and RocksDB");
  cmd->footer("Example: kvtier-bench disk --dir /var/tmp/kvtier-bench-disk --gib 4 --json");
  cmd->add_option("--dir", config->dir,
                  "Directory for the store, fio's file and RocksDB (created; emptied after)")
      ->capture_default_str();
  cmd->add_option("--gib", config->data_gib, "Data set, GiB (every side writes and reads it)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--host-mib", config->host_mib, "The store's host tier, MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--source-mib", config->source_mib,
                  "Distinct block contents written (block i gets source i mod n), MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--io-depth", config->io_depth,
                  "Queue depth: the store's io_depth, fio's iodepth, and the blocks per "
                  "GetBatch / MultiGet")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  cmd->add_option("--batch-blocks", config->batch_blocks, "Blocks per PutBatch / WriteBatch")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  cmd->add_option("--read-batches", config->read_batches,
                  "kvtier reads: GetBatch calls in flight (more than 1: GetBatchAsync)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 64u));
  cmd->add_option("--reps", config->reps, "Repetitions (sides alternate); medians")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  cmd->add_option("--fio", config->fio, "The fio program")->capture_default_str();
  cmd->add_flag("--no-fio", config->skip_fio, "Skip the fio side");
  cmd->add_flag("--no-rocksdb", config->skip_rocksdb, "Skip the RocksDB side");
  cmd->add_flag("!--no-fio-hugepages", config->fio_hugepages,
                "Run fio with its default buffers only (no huge pages reserved for it)");
  cmd->add_option("--seed", config->seed, "Seed of the data and of the read order")
      ->capture_default_str();
  cmd->add_flag("--json", config->json, "Print one JSON object (one line) instead of the table");
  cmd->callback([config, exit_code] { *exit_code = RunDisk(*config); });
}

}  // namespace kvtier::bench
