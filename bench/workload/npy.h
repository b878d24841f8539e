// NumPy .npy files: read and write the arrays `kvtier eval`, `kvtier export` and
// `kvtier import` exchange with Python (np.save / np.load).
//
// Format (numpy.lib.format): the magic "\x93NUMPY", a major and minor version byte, the
// header length (uint16 little-endian in version 1.0, uint32 in 2.0 and 3.0), then the
// header: a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// padded with spaces and ended by '\n' so that the data starts at a multiple of 64 bytes,
// then the elements. Versions 1.0, 2.0 and 3.0 are read (3.0 differs only by a UTF-8
// header). Writing produces exactly the bytes numpy >= 1.24's np.save writes for the same
// array (version 1.0, or 2.0 when the header would not fit in 65535 bytes).
//
// Supported: little-endian, C order (row-major), the element types of NpyDType. Rejected
// with a Status, never a crash: big-endian data, Fortran order, other dtypes
// (structured, object, complex, ...) are NotSupported; a bad magic, a malformed header,
// a shape whose byte size overflows, or a file shorter than its header says are
// Corruption. Bytes after the data are ignored, as np.load ignores them. bfloat16 has no
// numpy dtype: store it as float32 (or float16) and say so.
//
// Thread safety: the functions are pure apart from the file they read or write; an
// NpyReader is one thread's object.
#ifndef KVTIER_BENCH_WORKLOAD_NPY_H_
#define KVTIER_BENCH_WORKLOAD_NPY_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvtier/status.h"

namespace kvtier::bench {

// The element types an .npy file may hold here, by their numpy descr.
enum class NpyDType : uint8_t {
  kFloat16 = 0,  // '<f2'
  kFloat32 = 1,  // '<f4'
  kFloat64 = 2,  // '<f8'
  kInt32 = 3,    // '<i4'
  kInt64 = 4,    // '<i8'
};

// Bytes per element: 2, 4, 8, 4, 8 (0 outside the enum).
uint32_t NpyDTypeBytes(NpyDType dtype);
// The numpy descr: "<f2", "<f4", "<f8", "<i4", "<i8" ("" outside the enum).
std::string_view NpyDTypeDescr(NpyDType dtype);

// What an .npy header says: the element type, the shape and where the data starts.
struct NpyHeader {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<uint64_t> shape;  // empty: a 0-d array of one element
  uint64_t data_offset = 0;     // bytes from the start of the file to the first element
  uint32_t major_version = 1;

  // Product of the shape (1 for a 0-d array); the header parser checks that it and the
  // byte size below fit in 64 bits.
  uint64_t num_elements() const;
  uint64_t data_bytes() const { return num_elements() * NpyDTypeBytes(dtype); }
};

// A whole array in memory: the header and its data bytes, little-endian, C order.
struct NpyArray {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<uint64_t> shape;
  std::vector<uint8_t> data;  // num_elements() * NpyDTypeBytes(dtype) bytes

  uint64_t num_elements() const;
};

// Parses the header at the start of `bytes` (which may hold just the header or more).
// Corruption when `bytes` ends before the header does.
Result<NpyHeader> ParseNpyHeader(std::span<const uint8_t> bytes);
// Parses a whole .npy image: header and data (Corruption when the data is cut short).
Result<NpyArray> ParseNpy(std::span<const uint8_t> bytes);
// The bytes np.save writes for this array. InvalidArgument when data.size() is not the
// shape's element count times the element size, or the dtype is outside the enum.
Result<std::vector<uint8_t>> EncodeNpy(NpyDType dtype, std::span<const uint64_t> shape,
                                       std::span<const uint8_t> data);

// Reads a whole file. NotFound when it does not exist, IOError when it cannot be read,
// and the errors of ParseNpy.
Result<NpyArray> ReadNpy(const std::string& path);
// Writes (creates or truncates) `path` with EncodeNpy's bytes.
Status WriteNpy(const std::string& path, NpyDType dtype, std::span<const uint64_t> shape,
                std::span<const uint8_t> data);
// Writes float elements converted to `dtype` (a float type: f16 rounds to nearest even,
// f64 is exact; InvalidArgument for an integer dtype).
Status WriteNpyFromFloat(const std::string& path, NpyDType dtype, std::span<const uint64_t> shape,
                         std::span<const float> values);

// Element `index` of `data` (elements of `dtype`) as float (integers convert with float
// rounding). `data` must hold at least index + 1 elements.
float NpyElementAsFloat(const uint8_t* data, uint64_t index, NpyDType dtype);
// All elements of `array` as float.
std::vector<float> NpyToFloat(const NpyArray& array);

// Streams the rows (indices along the first axis) of an array too large to load whole,
// say the keys of a million-token context: Open reads and checks the header and the file
// size; ReadRows reads any row range, in any order.
class NpyReader {
 public:
  static Result<std::unique_ptr<NpyReader>> Open(const std::string& path);
  ~NpyReader();
  NpyReader(const NpyReader&) = delete;
  NpyReader& operator=(const NpyReader&) = delete;

  const NpyHeader& header() const { return header_; }
  // shape[0], or 1 for a 0-d array.
  uint64_t num_rows() const;
  // Bytes of one row: the product of shape[1:] times the element size.
  uint64_t row_bytes() const;
  // Copies rows [first_row, first_row + count) into `dst` (count * row_bytes() bytes).
  // InvalidArgument when the range passes num_rows() or dst is too small.
  Status ReadRows(uint64_t first_row, uint64_t count, std::span<uint8_t> dst);

 private:
  NpyReader(std::string path, int fd, NpyHeader header)
      : path_(std::move(path)), fd_(fd), header_(std::move(header)) {}

  std::string path_;
  int fd_;
  NpyHeader header_;
};

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_WORKLOAD_NPY_H_
