// .npy reading and writing: byte-exact against files numpy 1.24 wrote, round trips for
// every dtype and shape, and clear errors (never a crash) for what is not supported or
// not an .npy file at all.
#include "bench/workload/npy.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace kvtier::bench {
namespace {

std::vector<uint8_t> Bytes(std::string_view s) { return std::vector<uint8_t>(s.begin(), s.end()); }

std::vector<uint8_t> Hex(std::string_view hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(uint8_t(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

// The bytes numpy 1.24.2's np.save writes (version 1.0, header length 118): the prefix,
// the dict, `spaces` spaces, '\n', then the data (given in hex).
std::vector<uint8_t> NumpyFile(std::string_view dict, size_t spaces, std::string_view data_hex) {
  std::vector<uint8_t> out = Bytes(std::string_view("\x93NUMPY\x01\x00\x76\x00", 10));
  const std::vector<uint8_t> d = Bytes(dict);
  out.insert(out.end(), d.begin(), d.end());
  out.insert(out.end(), spaces, ' ');
  out.push_back('\n');
  const std::vector<uint8_t> data = Hex(data_hex);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

struct Reference {
  const char* name;
  NpyDType dtype;
  std::vector<uint64_t> shape;
  std::vector<uint8_t> file;
};

// Produced by: np.save(f, np.arange(6, dtype='<f4').reshape(2, 3)) and so on.
std::vector<Reference> NumpyReferences() {
  return {
      {"arange_f4_2x3",
       NpyDType::kFloat32,
       {2, 3},
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 58,
                 "000000000000803f0000004000004040000080400000a040")},
      {"f2_3",
       NpyDType::kFloat16,
       {3},
       NumpyFile("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }", 60, "003e00c00034")},
      {"i8_3",
       NpyDType::kInt64,
       {3},
       NumpyFile("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", 60,
                 "0100000000000000feffffffffffffff0300000000000000")},
      {"i4_scalar",
       NpyDType::kInt32,
       {},
       NumpyFile("{'descr': '<i4', 'fortran_order': False, 'shape': (), }", 62, "07000000")},
      {"f4_0x4",
       NpyDType::kFloat32,
       {0, 4},
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }", 58, "")},
      {"f8_2",
       NpyDType::kFloat64,
       {2},
       NumpyFile("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 60,
                 "9a9999999999b93f00000000000008c0")},
      {"f4_long_axis",
       NpyDType::kFloat32,
       {12345678901ull, 0},
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (12345678901, 0), }", 48, "")},
  };
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtier_npy_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    for (const std::string& f : files_) unlink(f.c_str());
    rmdir(path_.c_str());
  }
  std::string File(const std::string& name) {
    files_.push_back(path_ + "/" + name);
    return files_.back();
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

void WriteRaw(const std::string& path, const std::vector<uint8_t>& bytes) {
  FILE* f = fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
  fclose(f);
}

TEST(NpyTest, EncodeMatchesNumpyByteForByte) {
  for (const Reference& ref : NumpyReferences()) {
    SCOPED_TRACE(ref.name);
    const size_t header = 128;
    const std::vector<uint8_t> data(ref.file.begin() + header, ref.file.end());
    Result<std::vector<uint8_t>> encoded = EncodeNpy(ref.dtype, ref.shape, data);
    ASSERT_TRUE(encoded.ok()) << encoded.status().ToString();
    EXPECT_EQ(*encoded, ref.file);
  }
}

TEST(NpyTest, ParsesNumpyFiles) {
  for (const Reference& ref : NumpyReferences()) {
    SCOPED_TRACE(ref.name);
    Result<NpyArray> array = ParseNpy(ref.file);
    ASSERT_TRUE(array.ok()) << array.status().ToString();
    EXPECT_EQ(array->dtype, ref.dtype);
    EXPECT_EQ(array->shape, ref.shape);
    EXPECT_EQ(array->data, std::vector<uint8_t>(ref.file.begin() + 128, ref.file.end()));
  }
  Result<NpyArray> f4 = ParseNpy(NumpyReferences()[0].file);
  ASSERT_TRUE(f4.ok());
  EXPECT_EQ(NpyToFloat(*f4), (std::vector<float>{0, 1, 2, 3, 4, 5}));
  Result<NpyArray> f2 = ParseNpy(NumpyReferences()[1].file);
  ASSERT_TRUE(f2.ok());
  EXPECT_EQ(NpyToFloat(*f2), (std::vector<float>{1.5f, -2.0f, 0.25f}));
  Result<NpyArray> i8 = ParseNpy(NumpyReferences()[2].file);
  ASSERT_TRUE(i8.ok());
  EXPECT_EQ(NpyToFloat(*i8), (std::vector<float>{1, -2, 3}));
  Result<NpyArray> f8 = ParseNpy(NumpyReferences()[5].file);
  ASSERT_TRUE(f8.ok());
  EXPECT_EQ(NpyToFloat(*f8), (std::vector<float>{0.1f, -3.0f}));
}

TEST(NpyTest, ReadsVersion2And3Headers) {
  const std::string dict = "{'shape': (2,), 'fortran_order': False, 'descr': '<i4'}";
  for (const uint8_t major : {2, 3}) {
    std::vector<uint8_t> file = {0x93, 'N', 'U', 'M', 'P', 'Y', major, 0};
    const uint32_t len = uint32_t(dict.size() + 1);
    for (int i = 0; i < 4; ++i) file.push_back(uint8_t(len >> (8 * i)));
    file.insert(file.end(), dict.begin(), dict.end());
    file.push_back('\n');
    const std::vector<uint8_t> data = {5, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF};
    file.insert(file.end(), data.begin(), data.end());
    Result<NpyArray> array = ParseNpy(file);
    ASSERT_TRUE(array.ok()) << array.status().ToString();
    EXPECT_EQ(array->dtype, NpyDType::kInt32);
    EXPECT_EQ(array->shape, std::vector<uint64_t>{2});
    EXPECT_EQ(NpyToFloat(*array), (std::vector<float>{5, -1}));
  }
}

TEST(NpyTest, RoundTripsEveryDtypeAndShape) {
  TempDir dir;
  std::mt19937_64 rng(7);
  const std::vector<std::vector<uint64_t>> shapes = {
      {}, {0}, {1}, {5}, {2, 3}, {3, 0, 2}, {2, 3, 4}, {1, 1, 1, 1}, {4, 8, 128}};
  for (const NpyDType dtype : {NpyDType::kFloat16, NpyDType::kFloat32, NpyDType::kFloat64,
                               NpyDType::kInt32, NpyDType::kInt64}) {
    for (const std::vector<uint64_t>& shape : shapes) {
      uint64_t n = 1;
      for (const uint64_t d : shape) n *= d;
      std::vector<uint8_t> data(n * NpyDTypeBytes(dtype));
      for (uint8_t& b : data) b = uint8_t(rng());
      char name[64];
      snprintf(name, sizeof(name), "%d_%zu_%llu.npy", int(dtype), shape.size(),
               static_cast<unsigned long long>(n));
      const std::string path = dir.File(name);
      ASSERT_TRUE(WriteNpy(path, dtype, shape, data).ok());
      Result<NpyArray> back = ReadNpy(path);
      ASSERT_TRUE(back.ok()) << back.status().ToString();
      EXPECT_EQ(back->dtype, dtype);
      EXPECT_EQ(back->shape, shape);
      EXPECT_EQ(back->data, data);
      // The data starts on a 64-byte boundary and the header ends with a newline.
      Result<NpyHeader> header = ParseNpyHeader(EncodeNpy(dtype, shape, data).value());
      ASSERT_TRUE(header.ok());
      EXPECT_EQ(header->data_offset % 64, 0u);
      EXPECT_EQ(header->data_bytes(), data.size());
    }
  }
}

TEST(NpyTest, ReaderStreamsRows) {
  TempDir dir;
  const std::string path = dir.File("rows.npy");
  std::vector<float> values(10 * 3 * 4);
  for (size_t i = 0; i < values.size(); ++i) values[i] = float(i) * 0.5f - 7.0f;
  const std::vector<uint64_t> shape = {10, 3, 4};
  ASSERT_TRUE(WriteNpyFromFloat(path, NpyDType::kFloat32, shape, values).ok());
  Result<std::unique_ptr<NpyReader>> reader = NpyReader::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->num_rows(), 10u);
  EXPECT_EQ((*reader)->row_bytes(), 3u * 4 * 4);
  std::vector<uint8_t> rows(3 * (*reader)->row_bytes());
  ASSERT_TRUE((*reader)->ReadRows(6, 3, rows).ok());
  for (size_t i = 0; i < 3 * 12; ++i) {
    EXPECT_EQ(NpyElementAsFloat(rows.data(), i, NpyDType::kFloat32), values[6 * 12 + i]);
  }
  EXPECT_TRUE((*reader)->ReadRows(8, 3, rows).IsInvalidArgument());
  EXPECT_TRUE((*reader)->ReadRows(0, 3, std::span<uint8_t>(rows).first(10)).IsInvalidArgument());
  EXPECT_TRUE((*reader)->ReadRows(10, 0, rows).ok());
}

TEST(NpyTest, FloatConversionsRoundTrip) {
  TempDir dir;
  const std::vector<float> values = {0.0f, -1.0f, 0.5f, 65504.0f, 1e-3f, -2.75f};
  const std::vector<uint64_t> shape = {2, 3};
  for (const NpyDType dtype : {NpyDType::kFloat16, NpyDType::kFloat32, NpyDType::kFloat64}) {
    const std::string path = dir.File("f" + std::to_string(int(dtype)));
    ASSERT_TRUE(WriteNpyFromFloat(path, dtype, shape, values).ok());
    Result<NpyArray> back = ReadNpy(path);
    ASSERT_TRUE(back.ok());
    const std::vector<float> got = NpyToFloat(*back);
    ASSERT_EQ(got.size(), values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      // f16 keeps 11 significant bits.
      const float tol = dtype == NpyDType::kFloat16 ? std::fabs(values[i]) * 1e-3f : 0.0f;
      EXPECT_NEAR(got[i], values[i], tol) << i;
    }
  }
  EXPECT_TRUE(
      WriteNpyFromFloat(dir.File("i"), NpyDType::kInt32, shape, values).IsInvalidArgument());
}

TEST(NpyTest, RejectsUnsupportedArrays) {
  auto with_dict = [](std::string dict) {
    std::vector<uint8_t> file = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    dict += "\n";
    file.push_back(uint8_t(dict.size()));
    file.push_back(uint8_t(dict.size() >> 8));
    file.insert(file.end(), dict.begin(), dict.end());
    file.resize(file.size() + 64, 0);  // enough data for the small shapes below
    return file;
  };
  auto code = [&](const std::string& dict) { return ParseNpy(with_dict(dict)).status().code(); };
  EXPECT_EQ(code("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }"),
            StatusCode::kNotSupported);  // big-endian
  EXPECT_EQ(code("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }"),
            StatusCode::kNotSupported);  // Fortran order
  EXPECT_EQ(code("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }"),
            StatusCode::kNotSupported);  // complex
  EXPECT_EQ(code("{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }"),
            StatusCode::kNotSupported);
  EXPECT_EQ(code("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }"),
            StatusCode::kNotSupported);  // structured
  // Fortran order of a 1-D array is the same as C order.
  EXPECT_EQ(code("{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }"), StatusCode::kOk);
  // Python 2 long integers and double quotes are accepted.
  EXPECT_EQ(code("{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2L, 3L)}"),
            StatusCode::kOk);
  // Malformed headers.
  for (const char* dict : {"", "{", "[]", "{'descr': '<f4', 'fortran_order': False}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",
                           "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': ()}",
                           "{'descr': '<f4', 'fortran_order': false, 'shape': (2,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': (2,) } x",
                           "{'descr': '<f4 , 'fortran_order': False, 'shape': (2,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': "
                           "(99999999999999999999,)}",
                           "{'descr': '<f4', 'fortran_order': False, 'shape': "
                           "(4294967296, 4294967296)}"}) {
    EXPECT_EQ(code(dict), StatusCode::kCorruption) << dict;
  }
}

TEST(NpyTest, RejectsBadMagicAndVersions) {
  std::vector<uint8_t> file = NumpyReferences()[0].file;
  file[1] = 'X';
  EXPECT_EQ(ParseNpy(file).status().code(), StatusCode::kCorruption);
  file = NumpyReferences()[0].file;
  file[6] = 4;
  EXPECT_EQ(ParseNpy(file).status().code(), StatusCode::kNotSupported);
  file[6] = 1;
  file[7] = 1;
  EXPECT_EQ(ParseNpy(file).status().code(), StatusCode::kNotSupported);
}

TEST(NpyTest, EveryTruncationIsAnError) {
  TempDir dir;
  const std::vector<uint8_t> file = NumpyReferences()[0].file;
  for (size_t n = 0; n < file.size(); ++n) {
    const std::vector<uint8_t> cut(file.begin(), file.begin() + n);
    Result<NpyArray> parsed = ParseNpy(cut);
    EXPECT_FALSE(parsed.ok()) << n;
    EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption) << n;
  }
  const std::string path = dir.File("cut.npy");
  WriteRaw(path, std::vector<uint8_t>(file.begin(), file.end() - 1));
  EXPECT_EQ(ReadNpy(path).status().code(), StatusCode::kCorruption);
  EXPECT_EQ(NpyReader::Open(path).status().code(), StatusCode::kCorruption);
  WriteRaw(path, std::vector<uint8_t>(file.begin(), file.begin() + 40));
  EXPECT_EQ(ReadNpy(path).status().code(), StatusCode::kCorruption);
  // Bytes after the data are ignored, as np.load ignores them.
  std::vector<uint8_t> longer = file;
  longer.push_back(0);
  EXPECT_TRUE(ParseNpy(longer).ok());
}

TEST(NpyTest, GarbageNeverCrashes) {
  std::mt19937_64 rng(11);
  const std::vector<uint8_t> valid = NumpyReferences()[0].file;
  int ok = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> bytes;
    if (iter % 4 == 0) {  // pure noise, sometimes with the magic
      bytes.resize(rng() % 300);
      for (uint8_t& b : bytes) b = uint8_t(rng());
      if (bytes.size() >= 8 && iter % 8 == 0) memcpy(bytes.data(), "\x93NUMPY\x01\x00", 8);
    } else {  // a valid file with a few bytes changed
      bytes = valid;
      for (int k = 0; k < 1 + int(rng() % 4); ++k) bytes[rng() % bytes.size()] = uint8_t(rng());
      if (rng() % 3 == 0) bytes.resize(rng() % bytes.size());
    }
    Result<NpyArray> parsed = ParseNpy(bytes);
    if (parsed.ok()) {
      ++ok;
      EXPECT_EQ(parsed->data.size(), parsed->num_elements() * NpyDTypeBytes(parsed->dtype));
    }
  }
  // Changes inside the data or the padding leave a valid file.
  EXPECT_GT(ok, 0);
}

TEST(NpyTest, FileErrors) {
  TempDir dir;
  EXPECT_TRUE(ReadNpy(dir.File("missing.npy")).status().IsNotFound());
  const std::vector<uint64_t> shape = {2};
  const std::vector<uint8_t> data(8);
  EXPECT_FALSE(WriteNpy("/nonexistent-dir/x.npy", NpyDType::kInt32, shape, data).ok());
  // A data size that does not match the shape.
  EXPECT_TRUE(WriteNpy(dir.File("bad.npy"), NpyDType::kInt64, shape, data).IsInvalidArgument());
}

TEST(NpyTest, HugeHeaderUsesVersion2) {
  // Only absurd shapes need more than 65535 header bytes; the writer switches to 2.0.
  const std::vector<uint64_t> shape(25000, 1);
  const std::vector<uint8_t> data(4);
  Result<std::vector<uint8_t>> encoded = EncodeNpy(NpyDType::kFloat32, shape, data);
  ASSERT_TRUE(encoded.ok());
  EXPECT_EQ((*encoded)[6], 2);
  const uint64_t header_len = uint64_t((*encoded)[8]) | uint64_t((*encoded)[9]) << 8 |
                              uint64_t((*encoded)[10]) << 16 | uint64_t((*encoded)[11]) << 24;
  EXPECT_GT(header_len, 65535u);
  EXPECT_EQ((12 + header_len) % 64, 0u);
  EXPECT_EQ(encoded->size(), 12 + header_len + 4);
  // The reader accepts at most 64 dimensions (numpy's own limit is 32 or 64).
  EXPECT_EQ(ParseNpy(*encoded).status().code(), StatusCode::kCorruption);
}

}  // namespace
}  // namespace kvtier::bench
