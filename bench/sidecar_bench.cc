// kvtier-bench sidecar. Every process is separate, as in deployment: kvtierd (the real
// binary, started with a config in a temporary directory), the ping-pong echo peer,
// redis-server, and the client processes of the throughput phases. Sides alternate,
// each `--reps` times; the medians are reported.
//
// Round trip: one client, one request at a time, blocking reads on both sides.
//   - ping-pong: 32 bytes each way over a pathname Unix socket (the floor).
//   - kvtierd, raw frames: a Contains request (the smallest real request), read back.
//   - kvtierd, through the client library: Store::Contains on a sidecar Store.
// Throughput: `--clients` processes, each with `--depth` requests in flight on its own
// connection, for `--seconds`: kvtierd Contains frames against redis GETs of a 5-byte
// value (RESP), the same clients and depth (skipped with --no-throughput).
// Data plane (skipped with --no-data-plane), a second kvtierd holding everything in its
// host tier (write-back, so no disk traffic), Llama-3-8B blocks of 512 KiB:
//   - shared memory: PutBatch and GetBatch of `--batch` blocks (a layer's worth, as an
//     engine moves them) through a sidecar client on the Unix socket, against the same
//     calls on an embedded store of the same options in this process;
//   - TCP (inline bytes): Get of one block per request over loopback, 1 and 4 clients
//     (threads, a connection each), against redis-server GETs of 512 KiB values over
//     loopback TCP with the same clients (skipped when redis-server is missing).
// GPU tier misses (skipped with --no-gpu-tier): Acquire of `--tier-batch` blocks none of
// which is resident (an emulated GPU tier of that many blocks; the sets rotate over 4x
// as many blocks, all in the host tier), per block: through a sidecar client (its own
// tier; misses copied in by the daemon, the direct path, and through the daemon's staging
// area) and through an embedded store in this process, against memcpy of the same bytes
// (the floor of an emulated copy).
#include "bench/sidecar_bench.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "kvtier/client.h"
#include "kvtier/store.h"
#include "src/server/protocol/codec.h"
#include "src/server/protocol/frame.h"

namespace kvtier::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct SidecarConfig {
  std::string kvtierd = KVTIER_KVTIERD_PATH;
  std::string redis = "redis-server";
  std::string dir = "/tmp";
  uint32_t round_trips = 20000;
  uint32_t clients = 8;
  uint32_t depth = 16;
  double seconds = 3;
  uint32_t reps = 3;
  bool throughput = true;  // false: the round trips only
  bool gpu_tier = true;    // false: no GPU-tier misses
  uint32_t tier_batch = 16;
  bool data_plane = true;  // false: no shared-memory / TCP block transfers
  uint32_t batch = 32;     // blocks per PutBatch / GetBatch (shared memory)
  bool json = false;
};

// --- Sockets ---------------------------------------------------------------------------

int ConnectUnix(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = write(fd, p, n);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool WaitForSocket(const std::string& path, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    const int fd = ConnectUnix(path);
    if (fd >= 0) {
      close(fd);
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out >= 0) {
      dup2(out, 1);
      dup2(out, 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

void Stop(pid_t pid) {
  if (pid <= 0) return;
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
}

// --- kvtierd frames ----------------------------------------------------------------------

// One connection speaking raw frames: Hello, then Contains requests.
class WireClient {
 public:
  static std::unique_ptr<WireClient> Connect(const std::string& socket, const ModelLayout& layout) {
    auto c = std::unique_ptr<WireClient>(new WireClient());
    c->fd_ = ConnectUnix(socket);
    if (c->fd_ < 0) return nullptr;
    flatbuffers::FlatBufferBuilder fbb;
    const auto text = fbb.CreateString(layout.ToString());
    const auto name = fbb.CreateString("kvtier-bench");
    wire::HelloRequestBuilder b(fbb);
    b.add_protocol_version(wire::kProtocolVersion);
    b.add_layout_fingerprint(layout.Fingerprint());
    b.add_layout(text);
    b.add_namespace_id(0);
    b.add_staging_blocks(0);
    b.add_client_name(name);
    fbb.Finish(b.Finish());
    const std::vector<uint8_t> frame = wire::MakeFrame(fbb, wire::Opcode::kHello, 0, false);
    if (!WriteAll(c->fd_, frame.data(), frame.size())) return nullptr;
    // The reply may carry a staging fd (none asked for); read it with recvmsg anyway.
    uint16_t opcode = 0;
    uint64_t id = 0;
    if (!c->ReadReply(&opcode, &id) || opcode != static_cast<uint16_t>(wire::Opcode::kHello)) {
      return nullptr;
    }
    const auto* reply = flatbuffers::GetRoot<wire::HelloReply>(c->body_.data());
    if (!wire::FromWire(reply->outcome()).ok()) return nullptr;
    // One Contains request, reused with a new id each time.
    flatbuffers::FlatBufferBuilder req;
    const wire::Key key = wire::ToWire(BlockKey{0, SequenceId{0, 42}, 0, 0});
    const auto keys = req.CreateVectorOfStructs(&key, 1);
    req.Finish(wire::CreateKeysRequest(req, keys));
    c->contains_ = wire::MakeFrame(req, wire::Opcode::kContains, 0, false);
    return c;
  }
  ~WireClient() {
    if (fd_ >= 0) close(fd_);
  }

  bool SendContains(uint64_t id) {
    std::memcpy(contains_.data() + 16, &id, sizeof(id));  // request_id, little-endian
    return WriteAll(fd_, contains_.data(), contains_.size());
  }
  // Reads one reply frame (header and body).
  bool ReadReply(uint16_t* opcode, uint64_t* id) {
    uint8_t header[wire::kHeaderBytes];
    if (!Fill(header, sizeof(header))) return false;
    auto h =
        wire::DecodeHeader(std::span<const uint8_t, wire::kHeaderBytes>(header, wire::kHeaderBytes),
                           wire::kDefaultMaxFrameBytes, true);
    if (!h.ok()) return false;
    body_.resize(h->body_bytes);
    if (!Fill(body_.data(), body_.size())) return false;
    *opcode = h->opcode;
    *id = h->request_id;
    return true;
  }

 private:
  WireClient() = default;
  // Buffered reads: many pipelined replies arrive in one read.
  bool Fill(uint8_t* out, size_t n) {
    while (n > 0) {
      if (pos_ == len_) {
        const ssize_t r = read(fd_, buffer_, sizeof(buffer_));
        if (r <= 0) return false;
        pos_ = 0;
        len_ = static_cast<size_t>(r);
      }
      const size_t take = std::min(n, len_ - pos_);
      std::memcpy(out, buffer_ + pos_, take);
      pos_ += take;
      out += take;
      n -= take;
    }
    return true;
  }

  int fd_ = -1;
  std::vector<uint8_t> contains_;
  std::vector<uint8_t> body_;
  uint8_t buffer_[65536];
  size_t pos_ = 0;
  size_t len_ = 0;
};

// --- Round trips ---------------------------------------------------------------------

struct Percentiles {
  double p50_us = 0;
  double p99_us = 0;
};

Percentiles Summarize(std::vector<double> us) {
  if (us.empty()) return {};
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

// The echo peer: a child process answering 32-byte messages on a Unix socket.
pid_t StartEcho(const std::string& path) {
  unlink(path.c_str());
  const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener, 16) != 0) {
    close(listener);
    return -1;
  }
  const pid_t pid = fork();
  if (pid == 0) {
    for (;;) {
      const int fd = accept(listener, nullptr, nullptr);
      if (fd < 0) _exit(0);
      char msg[32];
      while (ReadAll(fd, msg, sizeof(msg)) && WriteAll(fd, msg, sizeof(msg))) {
      }
      close(fd);
    }
  }
  close(listener);
  return pid;
}

Percentiles PingPong(const std::string& path, uint32_t n) {
  const int fd = ConnectUnix(path);
  if (fd < 0) return {};
  std::vector<double> us;
  us.reserve(n);
  char msg[32] = {1, 2, 3};
  for (uint32_t i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    if (!WriteAll(fd, msg, sizeof(msg)) || !ReadAll(fd, msg, sizeof(msg))) break;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  close(fd);
  return Summarize(std::move(us));
}

Percentiles WireRoundTrips(const std::string& socket, const ModelLayout& layout, uint32_t n) {
  auto c = WireClient::Connect(socket, layout);
  if (c == nullptr) return {};
  std::vector<double> us;
  us.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    uint16_t op = 0;
    uint64_t id = 0;
    const auto t0 = Clock::now();
    if (!c->SendContains(i + 1) || !c->ReadReply(&op, &id) || id != i + 1) break;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Summarize(std::move(us));
}

Percentiles LibraryRoundTrips(const std::string& socket, const ModelLayout& layout, uint32_t n) {
  StoreOptions options;
  options.sidecar.socket = socket;
  options.sidecar.staging_blocks = 1;
  auto store = Store::Open(options, layout);
  if (!store.ok()) {
    std::fprintf(stderr, "sidecar: client library: %s\n", store.status().ToString().c_str());
    return {};
  }
  std::vector<double> us;
  us.reserve(n);
  const BlockKey key{0, SequenceId{0, 42}, 0, 0};
  for (uint32_t i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    (void)(*store)->Contains(key);
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Summarize(std::move(us));
}

// --- GPU tier misses ---------------------------------------------------------------

// Puts 4 * batch blocks of layer 0, then times `rounds` Acquires of `batch` blocks that
// are not resident (the tier holds `batch`; the sets rotate). Median microseconds per block.
double AcquireMisses(Store& store, uint32_t batch, uint32_t rounds) {
  const uint64_t bb = store.block_bytes();
  const SequenceId sequence{0, 77};
  std::vector<uint8_t> block(bb);
  for (uint64_t i = 0; i < bb; ++i) block[i] = static_cast<uint8_t>(i * 131 + 7);
  for (uint32_t b = 0; b < 4 * batch; ++b) {
    block[0] = static_cast<uint8_t>(b);
    if (Status s = store.Put(BlockKey{0, sequence, 0, b}, block.data(), bb); !s.ok()) {
      std::fprintf(stderr, "sidecar: gpu tier: put: %s\n", s.ToString().c_str());
      return 0;
    }
  }
  std::vector<int64_t> ids(batch);
  std::vector<uint64_t> addresses(batch);
  std::vector<double> us;
  for (uint32_t r = 0; r < rounds; ++r) {
    for (uint32_t i = 0; i < batch; ++i) ids[i] = int64_t{r % 4} * batch + i;
    const auto t0 = Clock::now();
    Result<AcquireInfo> a = store.Acquire(0, sequence, 0, ids, nullptr, addresses);
    const auto t1 = Clock::now();
    if (!a.ok() || a->hits != 0 || !store.Release(a->lease).ok()) {
      std::fprintf(stderr, "sidecar: gpu tier: acquire: %s\n",
                   a.ok() ? "a hit or a failed release" : a.status().ToString().c_str());
      return 0;
    }
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / batch);
  }
  return Median(us);
}

StoreOptions TierOptions(const ModelLayout& layout, uint32_t batch) {
  StoreOptions o;
  o.retrieval.enabled = true;
  o.retrieval.prefetch = false;
  o.retrieval.force_emulated_device = true;
  o.retrieval.device_capacity_bytes = uint64_t{batch} * layout.BytesPerBlock();
  return o;
}

// `direct`: the daemon copies the misses into the client's tier (else: staging area).
double SidecarTierMisses(const std::string& socket, const ModelLayout& layout, uint32_t batch,
                         uint32_t rounds, bool direct) {
  StoreOptions o = TierOptions(layout, batch);
  o.sidecar.socket = socket;
  o.sidecar.staging_blocks = batch;
  o.sidecar.direct_device = direct;
  auto store = Store::Open(o, layout);
  if (!store.ok()) {
    std::fprintf(stderr, "sidecar: gpu tier: %s\n", store.status().ToString().c_str());
    return 0;
  }
  const double us = AcquireMisses(**store, batch, rounds);
  if (direct && (*store)->Stats().device_direct_blocks == 0) {
    std::fprintf(stderr, "sidecar: gpu tier: the direct path was not taken (%s)\n",
                 GetSidecarStatus(**store)->direct_device_error.c_str());
    return 0;
  }
  return us;
}

double EmbeddedTierMisses(const ModelLayout& layout, uint32_t batch, uint32_t rounds) {
  StoreOptions o = TierOptions(layout, batch);
  o.host_capacity_bytes = uint64_t{5} * batch * layout.BytesPerBlock();
  auto store = Store::Open(o, layout);
  if (!store.ok()) {
    std::fprintf(stderr, "sidecar: gpu tier: %s\n", store.status().ToString().c_str());
    return 0;
  }
  return AcquireMisses(**store, batch, rounds);
}

double MemcpyPerBlock(uint64_t block_bytes, uint32_t batch, uint32_t rounds) {
  std::vector<uint8_t> src(uint64_t{4} * batch * block_bytes, 1),
      dst(uint64_t{batch} * block_bytes);
  std::vector<double> us;
  for (uint32_t r = 0; r < rounds; ++r) {
    const uint8_t* from = src.data() + uint64_t{r % 4} * batch * block_bytes;
    const auto t0 = Clock::now();
    for (uint32_t i = 0; i < batch; ++i) {
      std::memcpy(dst.data() + i * block_bytes, from + i * block_bytes, block_bytes);
    }
    const auto t1 = Clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / batch);
  }
  return dst[block_bytes / 2] == 1 ? Median(us) : 0;
}

// --- The data plane: 512 KiB blocks -----------------------------------------------

struct Gbps {
  double put = 0;
  double get = 0;
};

// Fills blocks (distinct, never all zeros) for keys block 0..n-1 of `sequence`.
std::vector<std::vector<uint8_t>> MakeBlocks(uint64_t block_bytes, uint32_t n) {
  std::vector<std::vector<uint8_t>> blocks(n, std::vector<uint8_t>(block_bytes));
  for (uint32_t b = 0; b < n; ++b) {
    for (uint64_t i = 0; i < block_bytes; ++i) {
      blocks[b][i] = static_cast<uint8_t>(i * 131 + b * 7 + 1);
    }
  }
  return blocks;
}

// PutBatch then GetBatch of `batch` blocks at a time over a working set of 4 * batch
// blocks (namespace `ns`), `rounds` batches each way; GB/s of block bytes (0 on a
// failure or wrong bytes).
Gbps MoveBatches(Store& store, uint32_t ns, uint32_t batch, uint32_t rounds) {
  const uint64_t bb = store.block_bytes();
  const SequenceId sequence{0, 88};
  const uint32_t set = 4 * batch;
  const std::vector<std::vector<uint8_t>> blocks = MakeBlocks(bb, set);
  std::vector<std::vector<uint8_t>> out(batch, std::vector<uint8_t>(bb));
  std::vector<BlockWrite> writes(batch);
  std::vector<BlockRead> reads(batch);
  std::vector<Status> statuses(batch);
  auto run = [&](bool put, uint32_t r) {
    for (uint32_t i = 0; i < batch; ++i) {
      const uint32_t b = (r % 4) * batch + i;
      const BlockKey key{ns, sequence, 0, b};
      if (put) {
        writes[i] = BlockWrite{key, blocks[b].data(), bb};
      } else {
        reads[i] = BlockRead{key, out[i].data(), bb};
      }
    }
    return put ? store.PutBatch(writes, statuses) : store.GetBatch(reads, statuses);
  };
  for (uint32_t r = 0; r < 4; ++r) {
    if (Status s = run(true, r); !s.ok()) {
      std::fprintf(stderr, "sidecar: data plane: put: %s\n", s.ToString().c_str());
      return {};
    }
  }
  Gbps g;
  for (const bool put : {true, false}) {
    const auto t0 = Clock::now();
    for (uint32_t r = 0; r < rounds; ++r) {
      if (Status s = run(put, r); !s.ok()) {
        std::fprintf(stderr, "sidecar: data plane: %s: %s\n", put ? "put" : "get",
                     s.ToString().c_str());
        return {};
      }
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    (put ? g.put : g.get) = static_cast<double>(uint64_t{rounds} * batch * bb) / seconds / 1e9;
  }
  // The last round's bytes are the blocks that were put.
  for (uint32_t i = 0; i < batch; ++i) {
    if (out[i] != blocks[((rounds - 1) % 4) * batch + i]) {
      std::fprintf(stderr, "sidecar: data plane: wrong bytes\n");
      return {};
    }
  }
  return g;
}

// The loans (Store::Reserve then Commit, Store::Borrow) over the same working set as
// MoveBatches: GB/s of the store's own work, the time in Reserve and Commit (the caller's
// filling of the buffers between them, a memcpy here, is not counted: it is what an
// engine does anyway, into its own memory for PutBatch) and in Borrow and giving the
// blocks back (reading them, checked after each round, is not counted either).
Gbps MoveLent(Store& store, uint32_t ns, uint32_t batch, uint32_t rounds) {
  const uint64_t bb = store.block_bytes();
  const SequenceId sequence{0, 90};
  const uint32_t set = 4 * batch;
  const std::vector<std::vector<uint8_t>> blocks = MakeBlocks(bb, set);
  std::vector<BlockKey> keys(batch);
  std::vector<Status> statuses(batch);
  auto keys_of = [&](uint32_t r) {
    for (uint32_t i = 0; i < batch; ++i) keys[i] = BlockKey{ns, sequence, 0, (r % 4) * batch + i};
  };
  Gbps g;
  for (const bool put : {true, false}) {
    Clock::duration spent{};
    for (uint32_t r = 0; r < rounds + (put ? 4 : 0); ++r) {  // puts: the set first, untimed
      keys_of(r);
      const auto t0 = Clock::now();
      Status s;
      if (put) {
        auto buffers = store.Reserve(batch);
        const auto t1 = Clock::now();
        if (buffers.ok()) {
          for (uint32_t i = 0; i < batch; ++i) {
            std::memcpy((*buffers)->buffer(i).data(), blocks[keys[i].block].data(), bb);
          }
        }
        const auto t2 = Clock::now();
        s = buffers.ok() ? (*buffers)->Commit(keys, statuses) : buffers.status();
        buffers = Status::Cancelled("given back");
        if (r >= 4) spent += (Clock::now() - t2) + (t1 - t0);
      } else {
        std::unique_ptr<BorrowedBlocks> lent;
        s = store.Borrow(keys, statuses, &lent);
        const auto t1 = Clock::now();
        for (uint32_t i = 0; s.ok() && i < batch; ++i) {
          if (std::memcmp(lent->block(i).data(), blocks[keys[i].block].data(), bb) != 0) {
            s = Status::Corruption("wrong bytes");
          }
        }
        const auto t2 = Clock::now();
        lent.reset();
        spent += (Clock::now() - t2) + (t1 - t0);
      }
      if (!s.ok()) {
        std::fprintf(stderr, "sidecar: data plane: %s: %s\n", put ? "reserve" : "borrow",
                     s.ToString().c_str());
        return {};
      }
    }
    const double seconds = std::chrono::duration<double>(spent).count();
    (put ? g.put : g.get) = static_cast<double>(uint64_t{rounds} * batch * bb) / seconds / 1e9;
  }
  return g;
}

StoreOptions DataPlaneOptions(const fs::path& directory) {
  StoreOptions o;
  o.directory = directory.string();
  o.host_capacity_bytes = uint64_t{256} << 20;
  o.disk_capacity_bytes = uint64_t{256} << 20;
  o.write_through = false;  // the working set stays in the host tier: no disk traffic
  return o;
}

// Runs `clients` threads of `body() -> bytes`, released together; GB/s over all (0 when
// one failed).
template <typename Body>
double ThreadClients(uint32_t clients, Body body) {
  std::vector<uint64_t> bytes(clients, 0);
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (uint32_t i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      while (!go.load()) std::this_thread::yield();
      bytes[i] = body(i);
    });
  }
  const auto t0 = Clock::now();
  go = true;
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  uint64_t total = 0;
  for (uint64_t b : bytes) {
    if (b == 0) return 0;
    total += b;
  }
  return static_cast<double>(total) / seconds / 1e9;
}

// One client over TCP: `gets` Gets of one block each (of the `set` blocks put in
// namespace `ns`); the bytes moved, 0 on a failure or wrong bytes.
uint64_t TcpGets(const std::string& address, const std::string& token, uint32_t ns,
                 const ModelLayout& layout, const std::vector<std::vector<uint8_t>>& blocks,
                 uint32_t gets, uint32_t offset) {
  StoreOptions o;
  o.sidecar.tcp_address = address;
  o.sidecar.token = token;
  o.sidecar.namespace_id = ns;
  auto store = Store::Open(o, layout);
  if (!store.ok()) {
    std::fprintf(stderr, "sidecar: tcp: %s\n", store.status().ToString().c_str());
    return 0;
  }
  const uint64_t bb = layout.BytesPerBlock();
  std::vector<uint8_t> out(bb);
  for (uint32_t g = 0; g < gets; ++g) {
    const uint32_t b = (g + offset) % blocks.size();
    if (Status s = (*store)->Get(BlockKey{ns, SequenceId{0, 89}, 0, b}, out.data(), bb); !s.ok()) {
      std::fprintf(stderr, "sidecar: tcp: get: %s\n", s.ToString().c_str());
      return 0;
    }
  }
  return out == blocks[(gets - 1 + offset) % blocks.size()] ? uint64_t{gets} * bb : 0;
}

int ConnectTcp(uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// A loopback TCP port free now (bound to port 0, then released).
uint16_t FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  uint16_t port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

bool WaitForPort(uint16_t port, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    const int fd = ConnectTcp(port);
    if (fd >= 0) {
      close(fd);
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

// A RESP bulk string request of `args`.
std::string Resp(const std::vector<std::string_view>& args) {
  std::string r = "*" + std::to_string(args.size()) + "\r\n";
  for (std::string_view a : args) {
    r += "$" + std::to_string(a.size()) + "\r\n";
    r += a;
    r += "\r\n";
  }
  return r;
}

// Reads one RESP reply line ("+OK", "$524288", ...) without its CRLF.
bool ReadLine(int fd, std::string* line) {
  line->clear();
  char c;
  while (read(fd, &c, 1) == 1) {
    if (c == '\n') {
      if (!line->empty() && line->back() == '\r') line->pop_back();
      return true;
    }
    *line += c;
  }
  return false;
}

// SETs redis key "b<i>" to blocks[i] for every block.
bool RedisSetBlocks(uint16_t port, const std::vector<std::vector<uint8_t>>& blocks) {
  const int fd = ConnectTcp(port);
  if (fd < 0) return false;
  bool ok = true;
  std::string line;
  for (size_t i = 0; i < blocks.size() && ok; ++i) {
    const std::string key = "b" + std::to_string(i);
    const std::string req =
        Resp({"SET", key,
              std::string_view(reinterpret_cast<const char*>(blocks[i].data()), blocks[i].size())});
    ok = WriteAll(fd, req.data(), req.size()) && ReadLine(fd, &line) && line == "+OK";
  }
  close(fd);
  return ok;
}

// One redis client: `gets` GETs of one block each; the bytes moved, 0 on a failure or
// wrong bytes.
uint64_t RedisGets(uint16_t port, const std::vector<std::vector<uint8_t>>& blocks, uint32_t gets,
                   uint32_t offset) {
  const int fd = ConnectTcp(port);
  if (fd < 0) return 0;
  const uint64_t bb = blocks[0].size();
  std::vector<uint8_t> out(bb + 2);
  std::string line;
  for (uint32_t g = 0; g < gets; ++g) {
    const uint32_t b = (g + offset) % blocks.size();
    const std::string req = Resp({"GET", "b" + std::to_string(b)});
    if (!WriteAll(fd, req.data(), req.size()) || !ReadLine(fd, &line) ||
        line != "$" + std::to_string(bb) || !ReadAll(fd, out.data(), out.size())) {
      close(fd);
      return 0;
    }
  }
  close(fd);
  const auto& last = blocks[(gets - 1 + offset) % blocks.size()];
  return std::equal(last.begin(), last.end(), out.begin()) ? uint64_t{gets} * bb : 0;
}

// --- Throughput ----------------------------------------------------------------------

// Runs `clients` child processes of `body(deadline) -> replies`, released together;
// returns replies per second over all of them (0 when one failed).
template <typename Body>
double ForkClients(uint32_t clients, double seconds, Body body) {
  int go[2];
  if (pipe(go) != 0) return 0;
  std::vector<std::pair<pid_t, int>> children;
  for (uint32_t i = 0; i < clients; ++i) {
    int result[2];
    if (pipe(result) != 0) return 0;
    const pid_t pid = fork();
    if (pid == 0) {
      close(go[1]);
      close(result[0]);
      char c;
      if (read(go[0], &c, 1) != 1) _exit(1);
      const uint64_t replies = body(seconds);
      (void)!write(result[1], &replies, sizeof(replies));
      _exit(0);
    }
    close(result[1]);
    children.emplace_back(pid, result[0]);
  }
  close(go[0]);
  const std::string release(clients, 'g');
  const auto t0 = Clock::now();
  (void)!write(go[1], release.data(), release.size());
  close(go[1]);
  uint64_t total = 0;
  bool ok = true;
  for (auto& [pid, fd] : children) {
    uint64_t replies = 0;
    ok = ReadAll(fd, &replies, sizeof(replies)) && ok;
    total += replies;
    close(fd);
    int status = 0;
    waitpid(pid, &status, 0);
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  return ok && total > 0 ? static_cast<double>(total) / elapsed : 0;
}

uint64_t SidecarClient(const std::string& socket, const ModelLayout& layout, uint32_t depth,
                       double seconds) {
  auto c = WireClient::Connect(socket, layout);
  if (c == nullptr) return 0;
  uint64_t sent = 0;
  uint64_t replies = 0;
  for (; sent < depth; ++sent) {
    if (!c->SendContains(sent + 1)) return 0;
  }
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  uint16_t op = 0;
  uint64_t id = 0;
  while (Clock::now() < deadline) {
    if (!c->ReadReply(&op, &id)) return 0;
    ++replies;
    if (!c->SendContains(++sent)) return 0;
  }
  return replies;
}

uint64_t RedisClient(const std::string& socket, uint32_t depth, double seconds) {
  const int fd = ConnectUnix(socket);
  if (fd < 0) return 0;
  static constexpr char kGet[] = "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
  static constexpr size_t kReplyBytes = 11;  // "$5\r\nhello\r\n"
  for (uint32_t i = 0; i < depth; ++i) {
    if (!WriteAll(fd, kGet, sizeof(kGet) - 1)) return 0;
  }
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  uint64_t replies = 0;
  size_t partial = 0;  // bytes of an incomplete reply already read
  char buffer[65536];
  while (Clock::now() < deadline) {
    const ssize_t r = read(fd, buffer, sizeof(buffer));
    if (r <= 0) return 0;
    const size_t bytes = partial + static_cast<size_t>(r);
    const size_t complete = bytes / kReplyBytes;
    partial = bytes % kReplyBytes;
    replies += complete;
    for (size_t i = 0; i < complete; ++i) {
      if (!WriteAll(fd, kGet, sizeof(kGet) - 1)) return 0;
    }
  }
  close(fd);
  return replies;
}

bool RedisSet(const std::string& socket) {
  const int fd = ConnectUnix(socket);
  if (fd < 0) return false;
  static constexpr char kSet[] = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
  char reply[5];
  const bool ok = WriteAll(fd, kSet, sizeof(kSet) - 1) && ReadAll(fd, reply, sizeof(reply)) &&
                  std::memcmp(reply, "+OK\r\n", 5) == 0;
  close(fd);
  return ok;
}

bool Executable(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0;
  const char* path = std::getenv("PATH");
  std::string dirs = path != nullptr ? path : "/usr/bin:/bin";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    if (access((dirs.substr(start, end - start) + "/" + name).c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

int RunSidecarBench(const SidecarConfig& config) {
  signal(SIGPIPE, SIG_IGN);
  char pattern[] = "kvtier-sidecar-XXXXXX";
  const std::string dir_template = (fs::path(config.dir) / pattern).string();
  std::vector<char> buf(dir_template.begin(), dir_template.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    std::fprintf(stderr, "sidecar: cannot create a directory in %s\n", config.dir.c_str());
    return 1;
  }
  const fs::path dir(buf.data());
  const ModelLayout layout = ModelLayout::Llama3_8B();
  const std::string socket = (dir / "kvtierd.sock").string();
  {
    std::ofstream toml(dir / "kvtierd.toml");
    toml << "[store]\ndirectory = \"" << (dir / "store").string()
         << "\"\nhost_capacity = \"64MiB\"\ndisk_capacity = \"256MiB\"\n"
         << "[layout]\npreset = \"llama3-8b\"\n[server]\nsocket = \"" << socket
         << "\"\n[metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n";
  }
  const pid_t daemon = Spawn({config.kvtierd, "--config", (dir / "kvtierd.toml").string()},
                             (dir / "kvtierd.log").string());
  if (!WaitForSocket(socket, 30)) {
    std::fprintf(stderr, "sidecar: kvtierd (%s) did not come up; see %s\n", config.kvtierd.c_str(),
                 (dir / "kvtierd.log").c_str());
    Stop(daemon);
    return 1;
  }
  const std::string echo_socket = (dir / "echo.sock").string();
  const pid_t echo = StartEcho(echo_socket);

  // Round trips, sides alternating.
  std::vector<double> ping50, ping99, wire50, wire99, lib50, lib99;
  for (uint32_t rep = 0; rep < config.reps; ++rep) {
    const Percentiles p = PingPong(echo_socket, config.round_trips);
    const Percentiles w = WireRoundTrips(socket, layout, config.round_trips);
    const Percentiles l = LibraryRoundTrips(socket, layout, config.round_trips);
    ping50.push_back(p.p50_us);
    ping99.push_back(p.p99_us);
    wire50.push_back(w.p50_us);
    wire99.push_back(w.p99_us);
    lib50.push_back(l.p50_us);
    lib99.push_back(l.p99_us);
    std::printf(
        "rep %u round trip p50/p99 us: ping-pong %.1f/%.1f  kvtierd %.1f/%.1f  "
        "kvtierd via client library %.1f/%.1f\n",
        rep, p.p50_us, p.p99_us, w.p50_us, w.p99_us, l.p50_us, l.p99_us);
  }
  Stop(echo);

  // Throughput, sides alternating.
  const bool have_redis = config.throughput && Executable(config.redis);
  pid_t redis = -1;
  const std::string redis_socket = (dir / "redis.sock").string();
  if (have_redis) {
    redis = Spawn({config.redis, "--port", "0", "--unixsocket", redis_socket, "--unixsocketperm",
                   "700", "--save", "", "--appendonly", "no", "--dir", dir.string()},
                  (dir / "redis.log").string());
    if (!WaitForSocket(redis_socket, 10) || !RedisSet(redis_socket)) {
      std::fprintf(stderr, "sidecar: redis-server did not come up; see %s\n",
                   (dir / "redis.log").c_str());
      Stop(redis);
      redis = -1;
    }
  } else if (config.throughput) {
    std::printf("redis-server not found (%s): the throughput peer is skipped\n",
                config.redis.c_str());
  }
  std::vector<double> sidecar_rps, redis_rps;
  for (uint32_t rep = 0; config.throughput && rep < config.reps; ++rep) {
    sidecar_rps.push_back(ForkClients(config.clients, config.seconds, [&](double s) {
      return SidecarClient(socket, layout, config.depth, s);
    }));
    if (redis > 0) {
      redis_rps.push_back(ForkClients(config.clients, config.seconds, [&](double s) {
        return RedisClient(redis_socket, config.depth, s);
      }));
    }
    std::printf("rep %u pipelined (%u clients x %u in flight) requests/s: kvtierd %.0f  redis %s\n",
                rep, config.clients, config.depth, sidecar_rps.back(),
                redis > 0 ? std::to_string(static_cast<uint64_t>(redis_rps.back())).c_str() : "-");
  }
  Stop(redis);

  // The data plane, sides alternating, against a second daemon (everything in its host
  // tier, write-back: no disk traffic) and an embedded store of the same options.
  std::vector<double> shm_put, shm_get, emb_put, emb_get, tcp_1, tcp_4, redis_1, redis_4;
  std::vector<double> shm_reserve, shm_borrow, emb_reserve, emb_borrow;
  const uint32_t dp_rounds = 16, tcp_gets = 128, tcp_set = 64;
  if (config.data_plane) {
    const fs::path dp = dir / "data-plane";
    fs::create_directories(dp);
    const std::string dp_socket = (dp / "kvtierd.sock").string();
    const std::string token = "kvtier-bench-token-0123456789";
    const uint16_t kv_port = FreePort();
    {
      std::ofstream toml(dp / "kvtierd.toml");
      toml << "[store]\ndirectory = \"" << (dp / "store").string()
           << "\"\nhost_capacity = \"256MiB\"\ndisk_capacity = \"256MiB\"\n"
           << "write_through = false\n[layout]\npreset = \"llama3-8b\"\n[server]\nsocket = \""
           << dp_socket << "\"\ntcp_listen = \"127.0.0.1:" << kv_port
           << "\"\n[metrics]\nlisten = \"\"\n[log]\nlevel = \"warn\"\n"
           << "[[namespace]]\nid = 0\nname = \"bench\"\nuids = [" << geteuid() << "]\ntokens = [\""
           << token << "\"]\n";
    }
    const pid_t dp_daemon = Spawn({config.kvtierd, "--config", (dp / "kvtierd.toml").string()},
                                  (dp / "kvtierd.log").string());
    const bool up = WaitForSocket(dp_socket, 30) && WaitForPort(kv_port, 10);
    if (!up) {
      std::fprintf(stderr, "sidecar: the data-plane kvtierd did not come up; see %s\n",
                   (dp / "kvtierd.log").c_str());
    }
    const std::string kv_address = "127.0.0.1:" + std::to_string(kv_port);
    const uint16_t redis_port = FreePort();
    pid_t dp_redis = -1;
    const auto tcp_blocks = MakeBlocks(layout.BytesPerBlock(), tcp_set);
    if (up && Executable(config.redis)) {
      dp_redis = Spawn({config.redis, "--port", std::to_string(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", dp.string()},
                       (dp / "redis.log").string());
      if (!WaitForPort(redis_port, 10) || !RedisSetBlocks(redis_port, tcp_blocks)) {
        std::fprintf(stderr, "sidecar: redis-server (tcp) did not come up; see %s\n",
                     (dp / "redis.log").c_str());
        Stop(dp_redis);
        dp_redis = -1;
      }
    }
    // The TCP side's blocks, put once through the Unix socket.
    bool tcp_ready = false;
    if (up) {
      StoreOptions o;
      o.sidecar.socket = dp_socket;
      auto store = Store::Open(o, layout);
      tcp_ready = store.ok();
      for (uint32_t b = 0; tcp_ready && b < tcp_set; ++b) {
        tcp_ready = (*store)
                        ->Put(BlockKey{0, SequenceId{0, 89}, 0, b}, tcp_blocks[b].data(),
                              tcp_blocks[b].size())
                        .ok();
      }
    }
    auto embedded = Store::Open(DataPlaneOptions(dp / "embedded"), layout);
    if (!embedded.ok()) {
      std::fprintf(stderr, "sidecar: embedded store: %s\n", embedded.status().ToString().c_str());
    }
    for (uint32_t rep = 0; up && embedded.ok() && tcp_ready && rep < config.reps; ++rep) {
      StoreOptions o;
      o.sidecar.socket = dp_socket;
      o.sidecar.staging_blocks = 2 * config.batch;  // two chunks of a batch in flight
      auto client = Store::Open(o, layout);
      const Gbps shm = client.ok() ? MoveBatches(**client, 0, config.batch, dp_rounds) : Gbps{};
      const Gbps shm_lent = client.ok() ? MoveLent(**client, 0, config.batch, dp_rounds) : Gbps{};
      client = Status::Cancelled("closed");
      const Gbps emb = MoveBatches(**embedded, 0, config.batch, dp_rounds);
      const Gbps emb_lent = MoveLent(**embedded, 0, config.batch, dp_rounds);
      shm_put.push_back(shm.put);
      shm_get.push_back(shm.get);
      emb_put.push_back(emb.put);
      emb_get.push_back(emb.get);
      shm_reserve.push_back(shm_lent.put);
      shm_borrow.push_back(shm_lent.get);
      emb_reserve.push_back(emb_lent.put);
      emb_borrow.push_back(emb_lent.get);
      for (const uint32_t clients : {1u, 4u}) {
        const double kv = ThreadClients(clients, [&](uint32_t i) {
          return TcpGets(kv_address, token, 0, layout, tcp_blocks, tcp_gets, i * 16);
        });
        const double rd = dp_redis > 0 ? ThreadClients(clients,
                                                       [&](uint32_t i) {
                                                         return RedisGets(redis_port, tcp_blocks,
                                                                          tcp_gets, i * 16);
                                                       })
                                       : 0.0;
        (clients == 1 ? tcp_1 : tcp_4).push_back(kv);
        (clients == 1 ? redis_1 : redis_4).push_back(rd);
      }
      std::printf(
          "rep %u data plane GB/s, batches of %u x 512 KiB: shm put %.2f get %.2f, embedded put "
          "%.2f get %.2f; tcp get (1 block per request) 1 client %.2f (redis %.2f), 4 clients "
          "%.2f (redis %.2f)\n",
          rep, config.batch, shm.put, shm.get, emb.put, emb.get, tcp_1.back(), redis_1.back(),
          tcp_4.back(), redis_4.back());
      std::printf(
          "rep %u loans GB/s: shm reserve+commit %.2f borrow %.2f, embedded reserve+commit %.2f "
          "borrow %.2f\n",
          rep, shm_lent.put, shm_lent.get, emb_lent.put, emb_lent.get);
    }
    embedded = Status::Cancelled("closed");
    Stop(dp_redis);
    Stop(dp_daemon);
  }

  // GPU tier misses, sides alternating.
  std::vector<double> tier_sidecar, tier_staging, tier_embedded, tier_memcpy;
  const uint32_t tier_rounds = 40;
  for (uint32_t rep = 0; config.gpu_tier && rep < config.reps; ++rep) {
    tier_sidecar.push_back(SidecarTierMisses(socket, layout, config.tier_batch, tier_rounds, true));
    tier_staging.push_back(
        SidecarTierMisses(socket, layout, config.tier_batch, tier_rounds, false));
    tier_embedded.push_back(EmbeddedTierMisses(layout, config.tier_batch, tier_rounds));
    tier_memcpy.push_back(MemcpyPerBlock(layout.BytesPerBlock(), config.tier_batch, tier_rounds));
    std::printf(
        "rep %u GPU-tier miss (emulated), us per block of %llu KiB: sidecar client direct %.1f  "
        "staging %.1f  embedded %.1f  memcpy %.1f\n",
        rep, static_cast<unsigned long long>(layout.BytesPerBlock() >> 10), tier_sidecar.back(),
        tier_staging.back(), tier_embedded.back(), tier_memcpy.back());
  }
  Stop(daemon);

  const double p50 = Median(ping50), p99 = Median(ping99);
  const double w50 = Median(wire50), w99 = Median(wire99);
  const double l50 = Median(lib50), l99 = Median(lib99);
  const double s_rps = Median(sidecar_rps), r_rps = Median(redis_rps);
  std::printf("medians of %u reps:\n", config.reps);
  std::printf(
      "  round trip p50: kvtierd %.1f us, ping-pong %.1f us: %.2fx (target <= 1.5x); "
      "client library %.1f us: %.2fx\n",
      w50, p50, w50 / p50, l50, l50 / p50);
  std::printf(
      "  round trip p99: kvtierd %.1f us, ping-pong %.1f us: %.2fx (target <= 2x); "
      "client library %.1f us: %.2fx\n",
      w99, p99, w99 / p99, l99, l99 / p99);
  if (r_rps > 0) {
    std::printf("  pipelined: kvtierd %.0f/s, redis %.0f/s: %.2fx (target >= 0.5x)\n", s_rps, r_rps,
                s_rps / r_rps);
  }
  const double t_side = Median(tier_sidecar), t_emb = Median(tier_embedded);
  const double t_stage = Median(tier_staging), t_copy = Median(tier_memcpy);
  if (config.gpu_tier && t_copy > 0) {
    std::printf(
        "  GPU-tier miss per block: sidecar client direct %.1f us (%.2fx memcpy), staging "
        "%.1f us (%.2fx), embedded %.1f us (%.2fx), memcpy %.1f us\n",
        t_side, t_side / t_copy, t_stage, t_stage / t_copy, t_emb, t_emb / t_copy, t_copy);
  }
  const double sp = Median(shm_put), sg = Median(shm_get), ep = Median(emb_put),
               eg = Median(emb_get);
  const double t1 = Median(tcp_1), t4 = Median(tcp_4), r1 = Median(redis_1), r4 = Median(redis_4);
  if (config.data_plane && ep > 0 && eg > 0) {
    std::printf(
        "  shared-memory data plane, batches of %u: put %.2f GB/s vs embedded %.2f: %.2fx; get "
        "%.2f GB/s vs embedded %.2f: %.2fx (target >= 0.8x)\n",
        config.batch, sp, ep, sp / ep, sg, eg, sg / eg);
    std::printf(
        "  loans, batches of %u: reserve+commit %.2f GB/s vs embedded put %.2f: %.2fx; borrow "
        "%.2f GB/s vs embedded get %.2f: %.2fx (the issue's lease Get; target >= 0.8x); "
        "embedded: reserve+commit %.2f, borrow %.2f\n",
        config.batch, Median(shm_reserve), ep, Median(shm_reserve) / ep, Median(shm_borrow), eg,
        Median(shm_borrow) / eg, Median(emb_reserve), Median(emb_borrow));
    if (r1 > 0 && r4 > 0) {
      std::printf(
          "  tcp get of 512 KiB: 1 client %.2f GB/s vs redis %.2f: %.2fx; 4 clients %.2f vs "
          "%.2f: %.2fx (target >= 1x)\n",
          t1, r1, t1 / r1, t4, r4, t4 / r4);
    }
  }
  if (config.json) {
    JsonLine j;
    // The names first (contains: through the client library, what an engine
    // sees; raw_uds: the blocking ping-pong; tcp: 1 client, _4 for 4).
    j.Add("contains_p50_us", l50);
    j.Add("contains_p99_us", l99);
    j.Add("raw_uds_p50_us", p50);
    j.Add("raw_uds_p99_us", p99);
    j.Add("rtt_p50_ratio", p50 > 0 ? l50 / p50 : 0.0);
    j.Add("rtt_p99_ratio", p99 > 0 ? l99 / p99 : 0.0);
    j.Add("pipelined_ops_per_s", s_rps);
    j.Add("redis_pipelined_ops_per_s", r_rps);
    j.Add("pipelined_ratio_redis", r_rps > 0 ? s_rps / r_rps : 0.0);
    j.Add("shm_put_gbps", sp);
    j.Add("shm_get_gbps", sg);
    j.Add("embedded_put_gbps", ep);
    j.Add("embedded_get_gbps", eg);
    j.Add("shm_put_ratio", ep > 0 ? sp / ep : 0.0);
    j.Add("shm_get_ratio", eg > 0 ? sg / eg : 0.0);
    // The loans: the lease Get and Put (Borrow; Reserve then Commit), against the
    // embedded store's GetBatch and PutBatch.
    j.Add("shm_borrow_gbps", Median(shm_borrow));
    j.Add("shm_reserve_gbps", Median(shm_reserve));
    j.Add("shm_borrow_ratio", eg > 0 ? Median(shm_borrow) / eg : 0.0);
    j.Add("shm_reserve_ratio", ep > 0 ? Median(shm_reserve) / ep : 0.0);
    j.Add("embedded_borrow_gbps", Median(emb_borrow));
    j.Add("embedded_reserve_gbps", Median(emb_reserve));
    j.Add("tcp_get_gbps", t1);
    j.Add("redis_get_gbps", r1);
    j.Add("tcp_get_ratio_redis", r1 > 0 ? t1 / r1 : 0.0);
    j.Add("tcp_get_gbps_4", t4);
    j.Add("redis_get_gbps_4", r4);
    j.Add("tcp_get_ratio_redis_4", r4 > 0 ? t4 / r4 : 0.0);
    j.Add("bench", "sidecar");
    j.Add("reps", config.reps);
    j.Add("round_trips", config.round_trips);
    j.Add("pingpong_p50_us", p50);
    j.Add("pingpong_p99_us", p99);
    j.Add("kvtierd_p50_us", w50);
    j.Add("kvtierd_p99_us", w99);
    j.Add("kvtierd_p50_ratio", w50 / p50);
    j.Add("kvtierd_p99_ratio", w99 / p99);
    j.Add("client_p50_us", l50);
    j.Add("client_p99_us", l99);
    j.Add("client_p50_ratio", l50 / p50);
    j.Add("client_p99_ratio", l99 / p99);
    j.Add("clients", config.clients);
    j.Add("depth", config.depth);
    j.Add("kvtierd_requests_per_s", s_rps);
    j.Add("redis_requests_per_s", r_rps);
    j.Add("throughput_ratio", r_rps > 0 ? s_rps / r_rps : 0.0);
    j.Add("tier_batch", config.tier_batch);
    j.Add("tier_miss_sidecar_us_per_block", t_side);
    j.Add("tier_miss_sidecar_staging_us_per_block", t_stage);
    j.Add("tier_miss_embedded_us_per_block", t_emb);
    j.Add("tier_miss_memcpy_us_per_block", t_copy);
    std::printf("%s\n", j.str().c_str());
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  const bool ok = w50 > 0 && l50 > 0 && (s_rps > 0 || !config.throughput) &&
                  (!config.data_plane || (sp > 0 && sg > 0 && ep > 0 && eg > 0 && t1 > 0)) &&
                  (!config.gpu_tier || (t_side > 0 && t_stage > 0 && t_emb > 0 && t_copy > 0));
  return ok ? 0 : 1;
}

}  // namespace

void AddSidecarCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<SidecarConfig>();
  CLI::App* cmd =
      app.add_subcommand("sidecar",
                         "kvtierd's round trip against a raw socket ping-pong, its pipelined "
                         "throughput against redis-server");
  cmd->add_option("--kvtierd", config->kvtierd, "The kvtierd binary")->capture_default_str();
  cmd->add_option("--redis-server", config->redis, "The redis-server binary (skipped if absent)")
      ->capture_default_str();
  cmd->add_option("--dir", config->dir, "Where the temporary store and sockets go")
      ->capture_default_str();
  cmd->add_option("--round-trips", config->round_trips, "Round trips per side and rep")
      ->capture_default_str()
      ->check(CLI::Range(100u, 10000000u));
  cmd->add_option("--clients", config->clients, "Client processes (throughput)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 256u));
  cmd->add_option("--depth", config->depth, "Requests in flight per client")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1024u));
  cmd->add_option("--seconds", config->seconds, "Seconds per throughput phase")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 600.0));
  cmd->add_option("--reps", config->reps, "Repetitions (sides alternate)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  cmd->add_flag("!--no-throughput", config->throughput,
                "Measure the round trips only (ping-pong, raw frames, client library)");
  cmd->add_flag("!--no-gpu-tier", config->gpu_tier, "Skip the GPU-tier misses");
  cmd->add_flag("!--no-data-plane", config->data_plane,
                "Skip the 512 KiB transfers (shared memory, TCP)");
  cmd->add_option("--batch", config->batch, "Blocks per PutBatch / GetBatch (shared memory)")
      ->check(CLI::Range(1u, 128u))
      ->capture_default_str();
  cmd->add_option("--tier-batch", config->tier_batch, "Blocks per Acquire (GPU-tier misses)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 256u));
  cmd->add_flag("--json", config->json, "Print one JSON object last");
  cmd->callback([config, exit_code] { *exit_code = RunSidecarBench(*config); });
}

}  // namespace kvtier::bench
