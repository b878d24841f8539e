// FrameReader: frames split at every byte, many frames in one read, a frame larger than
// the initial buffer, and every framing error (bad magic, version, flags, oversize).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "src/server/frame_reader.h"

namespace kvtier::server {
namespace {

std::vector<uint8_t> Frame(uint16_t opcode, uint64_t id, const std::vector<uint8_t>& body,
                           uint32_t flags = 0, uint16_t version = wire::kProtocolVersion,
                           uint32_t magic = wire::kMagic) {
  std::vector<uint8_t> f(wire::kHeaderBytes + body.size());
  wire::FrameHeader h;
  h.magic = magic;
  h.version = version;
  h.opcode = opcode;
  h.flags = flags;
  h.body_bytes = static_cast<uint32_t>(body.size());
  h.request_id = id;
  wire::EncodeHeader(h, std::span<uint8_t, wire::kHeaderBytes>(f.data(), wire::kHeaderBytes));
  if (!body.empty()) std::memcpy(f.data() + wire::kHeaderBytes, body.data(), body.size());
  return f;
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng() | 1);  // never zero
  return v;
}

// Feeds `stream` in chunks of `chunk` bytes; returns the frames read (opcode, id, body).
struct Parsed {
  uint16_t opcode;
  uint64_t id;
  std::vector<uint8_t> body;
};
std::vector<Parsed> Feed(FrameReader& reader, const std::vector<uint8_t>& stream, size_t chunk,
                         FrameReader::Result* last = nullptr) {
  std::vector<Parsed> out;
  size_t pos = 0;
  FrameReader::Result r = FrameReader::kNeedMore;
  while (true) {
    FrameReader::Frame f;
    while ((r = reader.Next(&f)) == FrameReader::kFrame) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(f.body.data()) % 8, 0u) << "misaligned body";
      out.push_back({f.header.opcode, f.header.request_id,
                     std::vector<uint8_t>(f.body.begin(), f.body.end())});
      reader.Consume();
    }
    if (r == FrameReader::kError || pos == stream.size()) break;
    std::span<uint8_t> space = reader.WritableSpan();
    EXPECT_FALSE(space.empty());
    if (space.empty()) break;
    const size_t n = std::min({chunk, space.size(), stream.size() - pos});
    std::memcpy(space.data(), stream.data() + pos, n);
    reader.Commit(n);
    pos += n;
  }
  if (last != nullptr) *last = r;
  return out;
}

TEST(FrameReaderTest, FramesSplitAnywhereComeOutWhole) {
  std::vector<uint8_t> stream;
  std::vector<std::vector<uint8_t>> bodies;
  for (uint64_t i = 0; i < 20; ++i) {
    bodies.push_back(RandomBytes(i * 37 % 300, i + 1));
    const auto f = Frame(static_cast<uint16_t>(i % 11), 1000 + i, bodies.back());
    stream.insert(stream.end(), f.begin(), f.end());
  }
  for (size_t chunk : {size_t{1}, size_t{7}, size_t{24}, size_t{100}, stream.size()}) {
    FrameReader reader(1 << 20);
    const std::vector<Parsed> got = Feed(reader, stream, chunk);
    ASSERT_EQ(got.size(), bodies.size()) << "chunk " << chunk;
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].opcode, i % 11);
      EXPECT_EQ(got[i].id, 1000 + i);
      EXPECT_EQ(got[i].body, bodies[i]);
    }
    EXPECT_EQ(reader.buffered_bytes(), 0u);
  }
}

TEST(FrameReaderTest, FrameLargerThanTheInitialBufferGrowsItOnce) {
  const std::vector<uint8_t> big = RandomBytes(FrameReader::kInitialBufferBytes * 3 + 5, 9);
  std::vector<uint8_t> stream = Frame(2, 1, RandomBytes(10, 1));
  const auto f = Frame(2, 2, big);
  stream.insert(stream.end(), f.begin(), f.end());
  const auto g = Frame(3, 3, {});
  stream.insert(stream.end(), g.begin(), g.end());
  FrameReader reader(1 << 20);
  const std::vector<Parsed> got = Feed(reader, stream, 4096);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[1].body, big);
  EXPECT_TRUE(got[2].body.empty());
}

TEST(FrameReaderTest, AFrameExactlyAtTheLimitIsAccepted) {
  const uint32_t limit = 1000;
  FrameReader reader(limit);
  const auto f = Frame(4, 5, RandomBytes(limit - wire::kHeaderBytes, 3));
  FrameReader::Result last;
  const auto got = Feed(reader, f, 64, &last);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_NE(last, FrameReader::kError);
}

struct BadHeader {
  const char* what;
  std::vector<uint8_t> frame;
};

TEST(FrameReaderTest, BadHeadersAreFatalAndKeepTheRequestId) {
  const std::vector<BadHeader> cases = {
      {"magic", Frame(1, 42, {}, 0, wire::kProtocolVersion, 0x12345678)},
      {"version", Frame(1, 42, {}, 0, 2)},
      {"reply flag on a request", Frame(1, 42, {}, wire::kFlagReply)},
      {"unknown flag", Frame(1, 42, {}, 4)},
      {"oversize", Frame(1, 42, RandomBytes(2000, 5))},
  };
  for (const BadHeader& c : cases) {
    FrameReader reader(1024);
    // A good frame first: it comes out before the error.
    std::vector<uint8_t> stream = Frame(8, 7, RandomBytes(16, 2));
    stream.insert(stream.end(), c.frame.begin(), c.frame.end());
    FrameReader::Result last;
    const auto got = Feed(reader, stream, 5, &last);
    ASSERT_EQ(got.size(), 1u) << c.what;
    EXPECT_EQ(last, FrameReader::kError) << c.what;
    EXPECT_TRUE(reader.error().IsInvalidArgument()) << c.what << ": " << reader.error().ToString();
    EXPECT_EQ(reader.error_request_id(), 42u) << c.what;
    EXPECT_TRUE(reader.WritableSpan().empty()) << c.what;
    FrameReader::Frame f;
    EXPECT_EQ(reader.Next(&f), FrameReader::kError) << c.what;
  }
}

TEST(FrameReaderTest, TheOversizeErrorComesWithTheHeaderNotTheBody) {
  FrameReader reader(4096);
  std::vector<uint8_t> header = Frame(2, 9, {});
  const uint32_t huge = 1u << 30;
  std::memcpy(header.data() + 12, &huge, 4);  // little-endian hosts only (x86, arm64)
  FrameReader::Result last;
  Feed(reader, header, 24, &last);
  EXPECT_EQ(last, FrameReader::kError);
  EXPECT_EQ(reader.error_request_id(), 9u);
}

TEST(FrameReaderTest, RandomStreamsNeverCrash) {
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    FrameReader reader(512);
    std::vector<uint8_t> stream = RandomBytes(2000, seed);
    // Half the streams start with a valid header, so bodies of random bytes get parsed.
    if (seed % 2 == 0) {
      const auto f = Frame(static_cast<uint16_t>(seed), seed, RandomBytes(seed % 400, seed));
      stream.insert(stream.begin(), f.begin(), f.end());
    }
    FrameReader::Result last;
    Feed(reader, stream, 1 + seed % 97, &last);
    EXPECT_LE(reader.buffered_bytes(), 2000u + 424u);
  }
}

}  // namespace
}  // namespace kvtier::server
