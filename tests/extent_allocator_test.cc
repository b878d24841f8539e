#include "storage/extent_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace kvtier {
namespace {

constexpr uint64_t kAlign = ExtentAllocator::kDefaultAlignment;
constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

// A fresh seed per run, printed with every failure; KVTIER_TEST_SEED replays one.
uint64_t TestSeed() {
  if (const char* env = std::getenv("KVTIER_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device device;
  return (uint64_t{device()} << 32) | device();
}

// (offset, length) pairs: gtest prints them readably.
using Spans = std::vector<std::pair<uint64_t, uint64_t>>;

Spans FreeSpans(const ExtentAllocator& a, uint32_t file) {
  Spans spans;
  for (const Extent& e : a.FreeExtents(file)) {
    EXPECT_EQ(e.file, file);
    spans.emplace_back(e.offset, e.length);
  }
  return spans;
}

// Everything the allocator shows: equal snapshots mean equal observable state.
struct Snapshot {
  std::vector<Spans> free;  // per file
  uint64_t free_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t free_extent_count = 0;
  uint64_t largest_free_extent = 0;
  friend bool operator==(const Snapshot&, const Snapshot&) = default;
  friend void PrintTo(const Snapshot& s, std::ostream* os) {
    *os << "{free " << s.free_bytes << " used " << s.used_bytes << " extents "
        << s.free_extent_count << " largest " << s.largest_free_extent << " map";
    for (size_t f = 0; f < s.free.size(); ++f) {
      *os << " file" << f << ":";
      for (const auto& [offset, length] : s.free[f]) *os << " [" << offset << "+" << length << ")";
    }
    *os << "}";
  }
};

Snapshot Take(const ExtentAllocator& a) {
  Snapshot s;
  for (uint32_t f = 0; f < a.file_count(); ++f) s.free.push_back(FreeSpans(a, f));
  s.free_bytes = a.free_bytes();
  s.used_bytes = a.used_bytes();
  s.free_extent_count = a.free_extent_count();
  s.largest_free_extent = a.largest_free_extent();
  return s;
}

// The free map is sorted, aligned, inside its file, fully coalesced (no two free extents
// touch), and agrees with the counters.
void ExpectConsistent(const ExtentAllocator& a) {
  uint64_t free = 0, count = 0, largest = 0, total = 0;
  for (uint32_t f = 0; f < a.file_count(); ++f) {
    total += a.file_bytes(f);
    EXPECT_EQ(a.file_bytes(f) % a.alignment(), 0u);
    uint64_t end_of_previous = 0;
    bool first = true;
    for (const auto& [offset, length] : FreeSpans(a, f)) {
      EXPECT_GT(length, 0u);
      EXPECT_EQ(offset % a.alignment(), 0u);
      EXPECT_EQ(length % a.alignment(), 0u);
      EXPECT_LE(length, a.file_bytes(f));
      EXPECT_LE(offset, a.file_bytes(f) - length);
      if (!first) {
        EXPECT_GT(offset, end_of_previous) << "free extents touch or overlap";
      }
      first = false;
      end_of_previous = offset + length;
      free += length;
      ++count;
      largest = std::max(largest, length);
    }
  }
  EXPECT_EQ(a.total_bytes(), total);
  EXPECT_EQ(a.free_bytes(), free);
  EXPECT_EQ(a.used_bytes(), total - free);
  EXPECT_EQ(a.free_extent_count(), count);
  EXPECT_EQ(a.largest_free_extent(), largest);
}

uint64_t RoundUp(uint64_t bytes, uint64_t align) { return (bytes + align - 1) / align * align; }

// ---------------------------------------------------------------------------------------

TEST(ExtentAllocatorTest, FilesAreRoundedDownAndStartFree) {
  ExtentAllocator a({10000, 4096, 100, 0, 3 * kAlign});
  EXPECT_EQ(a.alignment(), kAlign);
  ASSERT_EQ(a.file_count(), 5u);
  EXPECT_EQ(a.file_bytes(0), 2 * kAlign);
  EXPECT_EQ(a.file_bytes(1), kAlign);
  EXPECT_EQ(a.file_bytes(2), 0u);
  EXPECT_EQ(a.file_bytes(3), 0u);
  EXPECT_EQ(a.file_bytes(4), 3 * kAlign);
  EXPECT_EQ(a.total_bytes(), 6 * kAlign);
  EXPECT_EQ(a.free_bytes(), 6 * kAlign);
  EXPECT_EQ(a.used_bytes(), 0u);
  EXPECT_EQ(a.free_extent_count(), 3u);
  EXPECT_EQ(a.largest_free_extent(), 3 * kAlign);
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 2 * kAlign}}));
  EXPECT_EQ(FreeSpans(a, 2), Spans{});
  EXPECT_EQ(FreeSpans(a, 4), (Spans{{0, 3 * kAlign}}));
  EXPECT_TRUE(a.FreeExtents(5).empty());  // no such file
  ExpectConsistent(a);
}

TEST(ExtentAllocatorTest, NoFilesExhaustsImmediately) {
  ExtentAllocator a({});
  EXPECT_EQ(a.file_count(), 0u);
  EXPECT_EQ(a.total_bytes(), 0u);
  auto r = a.Allocate(1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(a.Free({.file = 0, .offset = 0, .length = kAlign}).IsInvalidArgument());
}

TEST(ExtentAllocatorTest, AllocateThenFreeRestoresEverything) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  ExtentAllocator a({64 * kAlign, 64 * kAlign});
  const Snapshot empty = Take(a);
  std::vector<Extent> live;
  uint64_t used = 0;
  for (int i = 0; i < 20; ++i) {
    const uint64_t bytes = 1 + rng() % (4 * kAlign);
    auto r = a.Allocate(bytes);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_GE(r->length, bytes);
    used += r->length;
    EXPECT_EQ(a.used_bytes(), used);
    live.push_back(*r);
    ExpectConsistent(a);
  }
  std::shuffle(live.begin(), live.end(), rng);
  for (const Extent& e : live) {
    ASSERT_TRUE(a.Free(e).ok());
    ExpectConsistent(a);
  }
  EXPECT_EQ(Take(a), empty);
}

TEST(ExtentAllocatorTest, AllocateRoundsUpToTheAlignment) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // Powers of two and one that is not: the allocator only needs multiples.
  for (uint64_t align : {uint64_t{512}, kAlign, uint64_t{65536}, uint64_t{3000}}) {
    SCOPED_TRACE("alignment " + std::to_string(align));
    ExtentAllocator a({1000 * align}, align);
    EXPECT_EQ(a.alignment(), align);
    // Edges: exactly one unit, one byte over, one byte under.
    for (uint64_t bytes : {uint64_t{1}, align - 1, align, align + 1, 2 * align - 1, 2 * align}) {
      auto r = a.Allocate(bytes);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->length, RoundUp(bytes, align)) << bytes;
      EXPECT_EQ(r->offset % align, 0u);
    }
    for (int i = 0; i < 50; ++i) {
      const uint64_t bytes = 1 + rng() % (8 * align);
      const uint64_t before = a.free_bytes();
      auto r = a.Allocate(bytes);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->length, RoundUp(bytes, align)) << bytes;
      EXPECT_EQ(r->offset % align, 0u);
      EXPECT_EQ(a.free_bytes(), before - r->length);
    }
    ExpectConsistent(a);
  }
}

TEST(ExtentAllocatorTest, ZeroBytesIsInvalidAndChangesNothing) {
  ExtentAllocator a({8 * kAlign, 8 * kAlign});
  ASSERT_TRUE(a.Allocate(kAlign).ok());  // file 0; the next goes to file 1
  const Snapshot before = Take(a);
  auto r = a.Allocate(0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Take(a), before);
  auto next = a.Allocate(kAlign);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->file, 1u);  // the failed call did not move the round-robin cursor
}

TEST(ExtentAllocatorTest, StripesRoundRobinAcrossFiles) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint32_t files = 2 + static_cast<uint32_t>(rng() % 6);
  ExtentAllocator a(std::vector<uint64_t>(files, 1024 * kAlign));
  for (uint32_t i = 0; i < 5 * files; ++i) {
    auto r = a.Allocate(1 + rng() % (8 * kAlign));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->file, i % files) << "allocation " << i;
  }
}

TEST(ExtentAllocatorTest, StripingSkipsFullFilesAndResumesAfterTheChosenOne) {
  // File 0 holds two units, files 1 and 2 hold eight.
  ExtentAllocator a({2 * kAlign, 8 * kAlign, 8 * kAlign});
  std::vector<uint32_t> got;
  for (int i = 0; i < 10; ++i) {
    auto r = a.Allocate(kAlign);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    got.push_back(r->file);
  }
  // 0 1 2 0 1 2, then file 0 is full: 1 2, then from 0 again (full): 1 2.
  EXPECT_EQ(got, (std::vector<uint32_t>{0, 1, 2, 0, 1, 2, 1, 2, 1, 2}));
  // Files 1 and 2 have four units left each; a request no file can hold fails.
  EXPECT_FALSE(a.Allocate(5 * kAlign).ok());
  auto r = a.Allocate(4 * kAlign);  // cursor at 0: file 0 is full, so file 1
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->file, 1u);
  r = a.Allocate(kAlign);  // after file 1: file 2
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->file, 2u);
}

TEST(ExtentAllocatorTest, FailedAllocationLeavesTheCursor) {
  ExtentAllocator a({8 * kAlign, 8 * kAlign, 8 * kAlign});
  auto r = a.Allocate(kAlign);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->file, 0u);
  auto too_big = a.Allocate(9 * kAlign);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted);
  r = a.Allocate(kAlign);  // still after file 0
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->file, 1u);
}

TEST(ExtentAllocatorTest, BestFitReusesAnExactHole) {
  ExtentAllocator a({64 * kAlign});
  auto x = a.Allocate(kAlign);
  auto hole3 = a.Allocate(3 * kAlign);
  auto y = a.Allocate(kAlign);
  auto hole2 = a.Allocate(2 * kAlign);
  auto z = a.Allocate(kAlign);
  for (auto* r : {&x, &hole3, &y, &hole2, &z}) ASSERT_TRUE(r->ok());
  ASSERT_TRUE(a.Free(*hole3).ok());
  ASSERT_TRUE(a.Free(*hole2).ok());
  // Free: [1,4) [5,7) and the tail [8,64) in units. Two units fit the 2-unit hole exactly,
  // though the 3-unit hole comes first and the tail is largest.
  auto r = a.Allocate(2 * kAlign);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, *hole2);
  r = a.Allocate(3 * kAlign - 100);  // rounds to three units: the 3-unit hole
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, *hole3);
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{8 * kAlign, 56 * kAlign}}));
}

TEST(ExtentAllocatorTest, BestFitTakesTheSmallestHoleThenTheLowestOffset) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 20; ++round) {
    ExtentAllocator a({4096 * kAlign});
    // Holes of random sizes (with repeats) separated by one-unit spacers that stay used.
    std::vector<Extent> holes;
    for (int i = 0; i < 24; ++i) {
      auto hole = a.Allocate((1 + rng() % 6) * kAlign);
      auto spacer = a.Allocate(kAlign);
      ASSERT_TRUE(hole.ok() && spacer.ok());
      holes.push_back(*hole);
    }
    ASSERT_TRUE(a.Allocate(a.free_bytes()).ok());  // the tail: only holes are free
    for (const Extent& h : holes) ASSERT_TRUE(a.Free(h).ok());
    while (!holes.empty()) {
      const uint64_t units = 1 + rng() % 6;
      const uint64_t bytes = units * kAlign - rng() % kAlign;
      // The model: smallest hole that fits, lowest offset among equals.
      auto best = holes.end();
      for (auto it = holes.begin(); it != holes.end(); ++it) {
        if (it->length < units * kAlign) continue;
        if (best == holes.end() || it->length < best->length ||
            (it->length == best->length && it->offset < best->offset)) {
          best = it;
        }
      }
      auto r = a.Allocate(bytes);
      if (best == holes.end()) {
        ASSERT_FALSE(r.ok());
        EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
        continue;
      }
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->offset, best->offset);
      EXPECT_EQ(r->length, units * kAlign);
      if (best->length == r->length) {
        holes.erase(best);
      } else {
        best->offset += r->length;  // the rest of the hole stays free
        best->length -= r->length;
      }
      ExpectConsistent(a);
    }
    EXPECT_EQ(a.free_bytes(), 0u);
  }
}

TEST(ExtentAllocatorTest, FreeCoalescesWithLeftNeighbour) {
  ExtentAllocator a({4 * kAlign});
  auto e0 = a.Allocate(kAlign), e1 = a.Allocate(kAlign), e2 = a.Allocate(2 * kAlign);
  ASSERT_TRUE(e0.ok() && e1.ok() && e2.ok());
  ASSERT_TRUE(a.Free(*e0).ok());
  ASSERT_TRUE(a.Free(*e1).ok());  // touches e0's free space on its left
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 2 * kAlign}}));
  EXPECT_EQ(a.free_extent_count(), 1u);
  EXPECT_EQ(a.largest_free_extent(), 2 * kAlign);
  ExpectConsistent(a);
}

TEST(ExtentAllocatorTest, FreeCoalescesWithRightNeighbour) {
  ExtentAllocator a({4 * kAlign});
  auto e0 = a.Allocate(kAlign), e1 = a.Allocate(kAlign);
  ASSERT_TRUE(e0.ok() && e1.ok());
  // Free: [2,4). Freeing [1,2) joins it on the right; [0,1) stays used.
  ASSERT_TRUE(a.Free(*e1).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{kAlign, 3 * kAlign}}));
  EXPECT_EQ(a.free_extent_count(), 1u);
  EXPECT_EQ(a.largest_free_extent(), 3 * kAlign);
  ExpectConsistent(a);
}

TEST(ExtentAllocatorTest, FreeCoalescesWithBothNeighbours) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 20; ++round) {
    const uint64_t l = 1 + rng() % 5, m = 1 + rng() % 5, r = 1 + rng() % 5;
    ExtentAllocator a({(1 + l + m + r + 1) * kAlign});
    auto head = a.Allocate(kAlign), left = a.Allocate(l * kAlign), mid = a.Allocate(m * kAlign),
         right = a.Allocate(r * kAlign), tail = a.Allocate(kAlign);
    for (auto* e : {&head, &left, &mid, &right, &tail}) ASSERT_TRUE(e->ok());
    ASSERT_EQ(a.free_bytes(), 0u);
    ASSERT_TRUE(a.Free(*left).ok());
    ASSERT_TRUE(a.Free(*right).ok());
    EXPECT_EQ(a.free_extent_count(), 2u);
    ASSERT_TRUE(a.Free(*mid).ok());
    EXPECT_EQ(FreeSpans(a, 0), (Spans{{kAlign, (l + m + r) * kAlign}}));
    EXPECT_EQ(a.free_extent_count(), 1u);
    EXPECT_EQ(a.largest_free_extent(), (l + m + r) * kAlign);
    ExpectConsistent(a);
  }
}

TEST(ExtentAllocatorTest, ExhaustionSaysHowMuchIsFree) {
  ExtentAllocator a({8 * kAlign, 4 * kAlign});
  std::vector<Extent> units;
  for (int i = 0; i < 12; ++i) {
    auto r = a.Allocate(kAlign);
    ASSERT_TRUE(r.ok());
    units.push_back(*r);
  }
  auto full = a.Allocate(1);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  // Free one lone unit and a run of three: 4 units free, the largest 3.
  std::sort(units.begin(), units.end(), [](const Extent& x, const Extent& y) {
    return std::pair(x.file, x.offset) < std::pair(y.file, y.offset);
  });
  ASSERT_TRUE(a.Free(units[1]).ok());                              // file 0, unit 1
  for (int i = 3; i < 6; ++i) ASSERT_TRUE(a.Free(units[i]).ok());  // file 0, units 3..5
  const Snapshot before = Take(a);
  auto r = a.Allocate(3 * kAlign + 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  const std::string& msg = r.status().message();
  EXPECT_NE(msg.find(std::to_string(3 * kAlign + 1)), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(4 * kAlign) + " bytes free"), std::string::npos) << msg;
  EXPECT_NE(msg.find("largest " + std::to_string(3 * kAlign)), std::string::npos) << msg;
  EXPECT_EQ(Take(a), before);
  auto fits = a.Allocate(3 * kAlign);
  ASSERT_TRUE(fits.ok());
  EXPECT_EQ(*fits, (Extent{.file = 0, .offset = 3 * kAlign, .length = 3 * kAlign}));
}

TEST(ExtentAllocatorTest, HugeRequestsDoNotWrap) {
  // One file as large as uint64 allows.
  ExtentAllocator a({kMax});
  const uint64_t size = kMax - kMax % kAlign;
  EXPECT_EQ(a.file_bytes(0), size);
  for (uint64_t bytes : {kMax, kMax - 1, size + 1}) {
    auto r = a.Allocate(bytes);  // rounding up would wrap past 2^64
    ASSERT_FALSE(r.ok()) << bytes;
    EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  }
  auto r = a.Allocate(size - kAlign);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(a.free_bytes(), kAlign);
  const Snapshot before = Take(a);
  // offset + length wraps to a small number; both must still be rejected.
  for (const Extent& e : {Extent{.file = 0, .offset = size, .length = size},
                          Extent{.file = 0, .offset = size - kAlign, .length = 2 * kAlign},
                          Extent{.file = 0, .offset = kAlign, .length = size}}) {
    EXPECT_TRUE(a.Free(e).IsInvalidArgument());
    EXPECT_TRUE(a.MarkUsed(e).IsInvalidArgument());
    EXPECT_EQ(Take(a), before);
  }
  ASSERT_TRUE(a.Free(*r).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, size}}));
}

// Three files of 16 units. File 0: units [0,4) used, [4,8) free, [8,12) used, [12,16) free.
ExtentAllocator Fragmented() {
  ExtentAllocator a({16 * kAlign, 16 * kAlign, 16 * kAlign});
  for (const uint64_t unit : {0, 8}) {
    EXPECT_TRUE(a.MarkUsed({.file = 0, .offset = unit * kAlign, .length = 4 * kAlign}).ok());
  }
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{4 * kAlign, 4 * kAlign}, {12 * kAlign, 4 * kAlign}}));
  return a;
}

// Extents every check rejects, whatever the state.
std::vector<Extent> MalformedExtents() {
  return {
      {.file = 3, .offset = 0, .length = kAlign},                     // no such file
      {.file = 0xffffffff, .offset = 0, .length = kAlign},            // no such file
      {.file = 0, .offset = 0, .length = 0},                          // empty
      {.file = 0, .offset = 8 * kAlign, .length = 0},                 // empty, used place
      {.file = 0, .offset = 1, .length = kAlign},                     // misaligned offset
      {.file = 0, .offset = kAlign / 2, .length = kAlign},            // misaligned offset
      {.file = 0, .offset = 0, .length = kAlign + 512},               // misaligned length
      {.file = 0, .offset = 8 * kAlign, .length = 1},                 // misaligned length
      {.file = 0, .offset = 16 * kAlign, .length = kAlign},           // past the end
      {.file = 0, .offset = 12 * kAlign, .length = 8 * kAlign},       // runs past the end
      {.file = 0, .offset = 0, .length = 17 * kAlign},                // longer than the file
      {.file = 0, .offset = kMax - kMax % kAlign, .length = kAlign},  // far past the end
      {.file = 0, .offset = 8 * kAlign, .length = kMax - kMax % kAlign - 4 * kAlign},  // wraps
  };
}

TEST(ExtentAllocatorTest, FreeRejectsBadExtentsAndChangesNothing) {
  ExtentAllocator a = Fragmented();
  const Snapshot before = Take(a);
  std::vector<Extent> bad = MalformedExtents();
  // Well formed, but overlapping free space: double frees, whole or partial.
  const std::vector<Extent> double_frees = {
      {.file = 0, .offset = 4 * kAlign, .length = 4 * kAlign},   // exactly a free extent
      {.file = 0, .offset = 5 * kAlign, .length = kAlign},       // inside one
      {.file = 0, .offset = 2 * kAlign, .length = 4 * kAlign},   // used, then free
      {.file = 0, .offset = 6 * kAlign, .length = 4 * kAlign},   // free, then used
      {.file = 0, .offset = 0, .length = 16 * kAlign},           // everything
      {.file = 0, .offset = 2 * kAlign, .length = 8 * kAlign},   // spans a whole free extent
      {.file = 0, .offset = 11 * kAlign, .length = 2 * kAlign},  // into the last free extent
      {.file = 0, .offset = 15 * kAlign, .length = kAlign},      // the last unit
      {.file = 1, .offset = 0, .length = kAlign},                // a file that is all free
  };
  bad.insert(bad.end(), double_frees.begin(), double_frees.end());
  for (const Extent& e : bad) {
    SCOPED_TRACE("file " + std::to_string(e.file) + " offset " + std::to_string(e.offset) +
                 " length " + std::to_string(e.length));
    Status s = a.Free(e);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_FALSE(s.message().empty());
    EXPECT_EQ(Take(a), before);
  }
  // The used ranges themselves free fine, in pieces too.
  EXPECT_TRUE(a.Free({.file = 0, .offset = 0, .length = 2 * kAlign}).ok());
  EXPECT_TRUE(a.Free({.file = 0, .offset = 2 * kAlign, .length = 2 * kAlign}).ok());
  EXPECT_TRUE(a.Free({.file = 0, .offset = 8 * kAlign, .length = 4 * kAlign}).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 16 * kAlign}}));
  // And a second free of the same extent is now a double free.
  EXPECT_TRUE(a.Free({.file = 0, .offset = 8 * kAlign, .length = 4 * kAlign}).IsInvalidArgument());
}

TEST(ExtentAllocatorTest, MarkUsedRejectsBadExtentsAndChangesNothing) {
  ExtentAllocator a = Fragmented();
  const Snapshot before = Take(a);
  std::vector<Extent> bad = MalformedExtents();
  const std::vector<Extent> overlapping_used = {
      {.file = 0, .offset = 0, .length = 4 * kAlign},           // exactly a used range
      {.file = 0, .offset = kAlign, .length = kAlign},          // inside one
      {.file = 0, .offset = 3 * kAlign, .length = 2 * kAlign},  // used, then free
      {.file = 0, .offset = 7 * kAlign, .length = 2 * kAlign},  // free, then used
      {.file = 0, .offset = 4 * kAlign, .length = 9 * kAlign},  // free, used, free
      {.file = 0, .offset = 0, .length = 16 * kAlign},          // everything
  };
  bad.insert(bad.end(), overlapping_used.begin(), overlapping_used.end());
  for (const Extent& e : bad) {
    SCOPED_TRACE("file " + std::to_string(e.file) + " offset " + std::to_string(e.offset) +
                 " length " + std::to_string(e.length));
    Status s = a.MarkUsed(e);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_FALSE(s.message().empty());
    EXPECT_EQ(Take(a), before);
  }
}

TEST(ExtentAllocatorTest, MarkUsedCarvesOutOfAFreeExtent) {
  ExtentAllocator a({16 * kAlign});
  // Middle: two pieces remain.
  ASSERT_TRUE(a.MarkUsed({.file = 0, .offset = 6 * kAlign, .length = 2 * kAlign}).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 6 * kAlign}, {8 * kAlign, 8 * kAlign}}));
  // At the start of a free extent.
  ASSERT_TRUE(a.MarkUsed({.file = 0, .offset = 8 * kAlign, .length = kAlign}).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 6 * kAlign}, {9 * kAlign, 7 * kAlign}}));
  // At its end.
  ASSERT_TRUE(a.MarkUsed({.file = 0, .offset = 15 * kAlign, .length = kAlign}).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{0, 6 * kAlign}, {9 * kAlign, 6 * kAlign}}));
  // A whole free extent.
  ASSERT_TRUE(a.MarkUsed({.file = 0, .offset = 0, .length = 6 * kAlign}).ok());
  EXPECT_EQ(FreeSpans(a, 0), (Spans{{9 * kAlign, 6 * kAlign}}));
  EXPECT_EQ(a.used_bytes(), 10 * kAlign);
  ExpectConsistent(a);
  // Allocation then skips the used ranges.
  auto r = a.Allocate(6 * kAlign);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (Extent{.file = 0, .offset = 9 * kAlign, .length = 6 * kAlign}));
}

TEST(ExtentAllocatorTest, MarkUsedRebuildsTheSameFreeMap) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 10; ++round) {
    std::vector<uint64_t> sizes;
    const int files = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < files; ++f) sizes.push_back((64 + rng() % 512) * kAlign + rng() % kAlign);
    ExtentAllocator a(sizes);
    std::vector<Extent> live;
    for (int op = 0; op < 600; ++op) {
      if (!live.empty() && rng() % 5 < 2) {
        const size_t i = rng() % live.size();
        ASSERT_TRUE(a.Free(live[i]).ok());
        live[i] = live.back();
        live.pop_back();
      } else if (auto r = a.Allocate(1 + rng() % (12 * kAlign)); r.ok()) {
        live.push_back(*r);
      }
    }
    // Rebuild from the "catalog", in an order unrelated to the allocation order.
    std::shuffle(live.begin(), live.end(), rng);
    ExtentAllocator b(sizes);
    for (const Extent& e : live) ASSERT_TRUE(b.MarkUsed(e).ok());
    EXPECT_EQ(Take(b), Take(a));
    ExpectConsistent(b);
    // Marking any live extent again is a conflict.
    if (!live.empty()) {
      EXPECT_TRUE(b.MarkUsed(live[rng() % live.size()]).IsInvalidArgument());
    }
    // The rebuilt map frees back to one extent per file.
    for (const Extent& e : live) ASSERT_TRUE(b.Free(e).ok());
    for (uint32_t f = 0; f < b.file_count(); ++f) {
      EXPECT_EQ(FreeSpans(b, f), (Spans{{0, b.file_bytes(f)}}));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The allocator against a model: one bit per alignment unit of every file.

class BitmapModel {
 public:
  BitmapModel(const std::vector<uint64_t>& file_bytes, uint64_t align) : align_(align) {
    for (uint64_t bytes : file_bytes) used_.emplace_back(bytes / align, false);
  }

  uint64_t units(uint32_t file) const { return used_[file].size(); }
  bool AnyUsed(const Extent& e) const { return Count(e, true) > 0; }
  bool AnyFree(const Extent& e) const { return Count(e, false) > 0; }

  void Set(const Extent& e, bool used) {
    for (uint64_t u = e.offset / align_; u < (e.offset + e.length) / align_; ++u) {
      used_[e.file][u] = used;
    }
  }

  // Maximal runs of free units, as the allocator should show them.
  Spans FreeRuns(uint32_t file) const {
    Spans runs;
    const auto& bits = used_[file];
    for (uint64_t u = 0; u < bits.size();) {
      if (bits[u]) {
        ++u;
        continue;
      }
      uint64_t end = u;
      while (end < bits.size() && !bits[end]) ++end;
      runs.emplace_back(u * align_, (end - u) * align_);
      u = end;
    }
    return runs;
  }

  Snapshot Expected() const {
    Snapshot s;
    for (uint32_t f = 0; f < used_.size(); ++f) {
      s.free.push_back(FreeRuns(f));
      for (const auto& [offset, length] : s.free.back()) {
        s.free_bytes += length;
        ++s.free_extent_count;
        s.largest_free_extent = std::max(s.largest_free_extent, length);
      }
      s.used_bytes += units(f) * align_;
    }
    s.used_bytes -= s.free_bytes;
    return s;
  }

  // Where Allocate must put `length` bytes when its cursor is at `next_file`: the first file
  // in round-robin order with a run that large; in it, the smallest such run, the lowest
  // offset among equals. Nothing when no run is large enough.
  std::optional<Extent> Place(uint64_t length, uint32_t next_file) const {
    const uint32_t n = static_cast<uint32_t>(used_.size());
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t f = (next_file + i) % n;
      std::optional<std::pair<uint64_t, uint64_t>> best;
      for (const auto& run : FreeRuns(f)) {
        if (run.second >= length && (!best || run.second < best->second)) best = run;
      }
      if (best) return Extent{.file = f, .offset = best->first, .length = length};
    }
    return std::nullopt;
  }

 private:
  uint64_t Count(const Extent& e, bool used) const {
    uint64_t n = 0;
    for (uint64_t u = e.offset / align_; u < (e.offset + e.length) / align_; ++u) {
      n += used_[e.file][u] == used;
    }
    return n;
  }

  uint64_t align_;
  std::vector<std::vector<bool>> used_;
};

// No two live extents overlap, and each lies aligned inside its file.
void ExpectDisjointAndInside(std::vector<Extent> live, const ExtentAllocator& a) {
  std::sort(live.begin(), live.end(), [](const Extent& x, const Extent& y) {
    return std::pair(x.file, x.offset) < std::pair(y.file, y.offset);
  });
  for (size_t i = 0; i < live.size(); ++i) {
    const Extent& e = live[i];
    ASSERT_LT(e.file, a.file_count());
    ASSERT_GT(e.length, 0u);
    ASSERT_EQ(e.offset % a.alignment(), 0u);
    ASSERT_EQ(e.length % a.alignment(), 0u);
    ASSERT_LE(e.length, a.file_bytes(e.file));
    ASSERT_LE(e.offset, a.file_bytes(e.file) - e.length);
    if (i > 0 && live[i - 1].file == e.file) {
      ASSERT_LE(live[i - 1].offset + live[i - 1].length, e.offset) << "live extents overlap";
    }
  }
}

TEST(ExtentAllocatorTest, RandomOperationsMatchABitmapModel) {
  const uint64_t seed = TestSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const uint64_t align = round % 2 == 0 ? kAlign : 512;
    std::vector<uint64_t> sizes;
    const int files = 1 + static_cast<int>(rng() % 5);
    for (int f = 0; f < files; ++f) {
      // Now and then (never the first) a file smaller than one unit; otherwise up to 400
      // units, plus a tail that rounds away.
      const uint64_t units = f > 0 && rng() % 10 == 0 ? 0 : 16 + rng() % 384;
      sizes.push_back(units * align + rng() % align);
    }
    ExtentAllocator a(sizes, align);
    BitmapModel model(sizes, align);
    ASSERT_EQ(Take(a), model.Expected());
    std::vector<Extent> live;
    uint32_t cursor = 0;  // the model's round-robin cursor
    int allocations = 0, exhaustions = 0, frees = 0, rejections = 0, marks = 0;

    for (int op = 0; op < 3000; ++op) {
      const uint64_t dice = rng() % 100;
      if (dice < 45) {
        // Mostly small requests, sometimes large ones that may not fit anywhere.
        const uint64_t units = rng() % 8 == 0 ? 1 + rng() % 200 : 1 + rng() % 8;
        const uint64_t bytes = units * align - rng() % align;
        const std::optional<Extent> want = model.Place(units * align, cursor);
        auto got = a.Allocate(bytes);
        if (!want) {
          ASSERT_FALSE(got.ok()) << "allocated " << got->offset << " where the model has no room";
          ASSERT_EQ(got.status().code(), StatusCode::kResourceExhausted);
          ++exhaustions;
        } else {
          ASSERT_TRUE(got.ok()) << got.status().ToString();
          ASSERT_EQ(*got, *want);
          ASSERT_FALSE(model.AnyUsed(*got)) << "allocated used space";
          model.Set(*got, true);
          live.push_back(*got);
          cursor = (got->file + 1) % static_cast<uint32_t>(files);
          ++allocations;
        }
      } else if (dice < 85) {
        if (live.empty()) continue;
        const size_t i = rng() % live.size();
        ASSERT_TRUE(a.Free(live[i]).ok());
        model.Set(live[i], false);
        live[i] = live.back();
        live.pop_back();
        ++frees;
      } else {
        // A random well-formed range: a Free that overlaps free space and a MarkUsed that
        // overlaps used space must fail without a trace; a MarkUsed of free space works.
        const uint32_t f = static_cast<uint32_t>(rng() % files);
        if (model.units(f) == 0) continue;
        const uint64_t start = rng() % model.units(f);
        const uint64_t len = 1 + rng() % std::min<uint64_t>(model.units(f) - start, 16);
        const Extent e{.file = f, .offset = start * align, .length = len * align};
        const Snapshot before = Take(a);
        if (dice < 93) {
          if (!model.AnyFree(e)) continue;  // all used: freeing it would be legal
          ASSERT_TRUE(a.Free(e).IsInvalidArgument());
          ASSERT_EQ(Take(a), before);
          ++rejections;
        } else if (model.AnyUsed(e)) {
          ASSERT_TRUE(a.MarkUsed(e).IsInvalidArgument());
          ASSERT_EQ(Take(a), before);
          ++rejections;
        } else {
          ASSERT_TRUE(a.MarkUsed(e).ok());
          model.Set(e, true);
          live.push_back(e);
          ++marks;
        }
      }
      ASSERT_EQ(Take(a), model.Expected()) << "after op " << op;
      if (op % 100 == 0) {
        ExpectDisjointAndInside(live, a);
        if (HasFatalFailure()) return;
      }
    }
    ExpectDisjointAndInside(live, a);
    ExpectConsistent(a);
    // The sequence did exercise every path.
    EXPECT_GT(allocations, 100);
    EXPECT_GT(frees, 100);
    EXPECT_GT(rejections, 10);

    std::shuffle(live.begin(), live.end(), rng);
    for (const Extent& e : live) ASSERT_TRUE(a.Free(e).ok());
    EXPECT_EQ(a.free_bytes(), a.total_bytes());
    EXPECT_EQ(a.used_bytes(), 0u);
    for (uint32_t f = 0; f < a.file_count(); ++f) {
      const Spans whole = a.file_bytes(f) == 0 ? Spans{} : Spans{{0, a.file_bytes(f)}};
      EXPECT_EQ(FreeSpans(a, f), whole) << "file " << f;
    }
    RecordProperty("allocations", allocations);
    RecordProperty("exhaustions", exhaustions);
    RecordProperty("marks", marks);
  }
}

}  // namespace
}  // namespace kvtier
