#include "bench/workload/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "kernels/dtype_convert.h"

namespace kvtier::bench {
namespace {

constexpr uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
constexpr uint64_t kMagicAndVersionBytes = 8;
constexpr uint64_t kAlignBytes = 64;  // numpy's ARRAY_ALIGN
// numpy >= 1.24 leaves room for the first axis to grow to 21 digits (GROWTH_AXIS_MAX_DIGITS).
constexpr size_t kGrowthAxisMaxDigits = 21;
// The largest array accepted: byte sizes stay far from overflow in every caller.
constexpr uint64_t kMaxDataBytes = uint64_t{1} << 62;

Status Corrupt(std::string_view what) {
  return Status::Corruption(std::string("npy: ") + std::string(what));
}

// A cursor over the header's dict literal. Every accessor checks bounds.
class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : text_(text) {}

  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return AtEnd() ? '\0' : text_[pos_]; }
  bool Consume(char c) {
    SkipSpace();
    if (Peek() != c) return false;
    ++pos_;
    return true;
  }
  bool ConsumeWord(std::string_view word) {
    SkipSpace();
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }
  // A Python string literal in single or double quotes, without escapes.
  Result<std::string> String() {
    SkipSpace();
    const char quote = Peek();
    if (quote != '\'' && quote != '"') return Corrupt("header: expected a string");
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) return Corrupt("header: unterminated string");
    std::string s(text_.substr(pos_ + 1, end - pos_ - 1));
    if (s.find('\\') != std::string::npos) return Corrupt("header: escaped string");
    pos_ = end + 1;
    return s;
  }
  // A non-negative decimal integer (Python 2 files may end it with 'L').
  Result<uint64_t> Integer() {
    SkipSpace();
    if (Peek() < '0' || Peek() > '9') return Corrupt("header: expected an integer");
    uint64_t v = 0;
    while (Peek() >= '0' && Peek() <= '9') {
      const uint64_t digit = uint64_t(Peek() - '0');
      if (v > (UINT64_MAX - digit) / 10) return Corrupt("header: integer overflow");
      v = v * 10 + digit;
      ++pos_;
    }
    if (Peek() == 'L') ++pos_;
    return v;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;
};

Result<NpyDType> ParseDescr(const std::string& descr) {
  if (descr == "<f2") return NpyDType::kFloat16;
  if (descr == "<f4") return NpyDType::kFloat32;
  if (descr == "<f8") return NpyDType::kFloat64;
  if (descr == "<i4") return NpyDType::kInt32;
  if (descr == "<i8") return NpyDType::kInt64;
  if (!descr.empty() && descr[0] == '>') {
    return Status::NotSupported("npy: big-endian data ('" + descr + "') is not supported");
  }
  return Status::NotSupported("npy: dtype '" + descr +
                              "' is not supported (f2, f4, f8, i4, i8 little-endian)");
}

Result<std::vector<uint64_t>> ParseShape(HeaderParser& p) {
  if (!p.Consume('(')) return Corrupt("header: shape is not a tuple");
  std::vector<uint64_t> shape;
  while (true) {
    if (p.Consume(')')) break;
    if (shape.size() >= 64) return Corrupt("header: too many dimensions");
    KVTIER_ASSIGN_OR_RETURN(const uint64_t dim, p.Integer());
    shape.push_back(dim);
    if (p.Consume(',')) continue;
    if (p.Consume(')')) break;
    return Corrupt("header: malformed shape");
  }
  return shape;
}

// Element count and byte size, checked for overflow.
Status CheckSize(const std::vector<uint64_t>& shape, uint32_t element_bytes) {
  uint64_t bytes = element_bytes;
  bool zero = false;
  for (const uint64_t d : shape) {
    if (d == 0) zero = true;
  }
  if (zero) return Status::OK();
  for (const uint64_t d : shape) {
    if (bytes > kMaxDataBytes / d) return Corrupt("header: array size overflows");
    bytes *= d;
  }
  return Status::OK();
}

Result<NpyHeader> ParseDict(std::string_view text, uint64_t data_offset, uint32_t major) {
  HeaderParser p(text);
  if (!p.Consume('{')) return Corrupt("header: not a dict");
  bool have_descr = false, have_order = false, have_shape = false, fortran = false;
  std::string descr;
  NpyHeader header;
  header.data_offset = data_offset;
  header.major_version = major;
  while (!p.Consume('}')) {
    KVTIER_ASSIGN_OR_RETURN(const std::string key, p.String());
    if (!p.Consume(':')) return Corrupt("header: expected ':'");
    if (key == "descr" && !have_descr) {
      p.SkipSpace();
      if (p.Peek() == '[') return Status::NotSupported("npy: structured dtypes are not supported");
      KVTIER_ASSIGN_OR_RETURN(descr, p.String());
      have_descr = true;
    } else if (key == "fortran_order" && !have_order) {
      if (p.ConsumeWord("True")) {
        fortran = true;
      } else if (!p.ConsumeWord("False")) {
        return Corrupt("header: fortran_order is not True or False");
      }
      have_order = true;
    } else if (key == "shape" && !have_shape) {
      KVTIER_ASSIGN_OR_RETURN(header.shape, ParseShape(p));
      have_shape = true;
    } else {
      return Corrupt("header: unexpected or repeated key '" + key + "'");
    }
    if (!p.Consume(',')) {
      if (!p.Consume('}')) return Corrupt("header: expected ',' or '}'");
      break;
    }
  }
  p.SkipSpace();
  if (!p.AtEnd()) return Corrupt("header: text after the dict");
  if (!have_descr || !have_order || !have_shape) {
    return Corrupt("header: missing descr, fortran_order or shape");
  }
  KVTIER_ASSIGN_OR_RETURN(header.dtype, ParseDescr(descr));
  if (fortran && header.shape.size() > 1) {
    return Status::NotSupported("npy: Fortran-order arrays are not supported (save C order)");
  }
  KVTIER_RETURN_IF_ERROR(CheckSize(header.shape, NpyDTypeBytes(header.dtype)));
  return header;
}

uint64_t ShapeProduct(std::span<const uint64_t> shape) {
  uint64_t n = 1;
  for (const uint64_t d : shape) n *= d;
  return n;
}

std::string ShapeRepr(std::span<const uint64_t> shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

Status PreadAll(int fd, uint64_t offset, void* buf, uint64_t bytes, const std::string& path) {
  auto* p = static_cast<uint8_t*>(buf);
  while (bytes > 0) {
    const ssize_t n = pread(fd, p, bytes, off_t(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "npy: read " + path);
    }
    if (n == 0) return Corrupt("file is truncated: " + path);
    p += n;
    offset += uint64_t(n);
    bytes -= uint64_t(n);
  }
  return Status::OK();
}

// The length of the magic, version, header-length field and header: where data starts.
Result<uint64_t> HeaderEnd(std::span<const uint8_t> bytes) {
  if (bytes.size() < kMagicAndVersionBytes) return Corrupt("truncated before the header");
  if (memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return Corrupt("bad magic (not an .npy file)");
  }
  const uint8_t major = bytes[6], minor = bytes[7];
  if (major < 1 || major > 3 || minor != 0) {
    return Status::NotSupported("npy: format version " + std::to_string(major) + "." +
                                std::to_string(minor) + " is not supported (1.0, 2.0, 3.0)");
  }
  const uint64_t len_bytes = major == 1 ? 2 : 4;
  if (bytes.size() < kMagicAndVersionBytes + len_bytes) {
    return Corrupt("truncated before the header");
  }
  uint64_t header_len = 0;
  for (uint64_t i = 0; i < len_bytes; ++i) {
    header_len |= uint64_t(bytes[kMagicAndVersionBytes + i]) << (8 * i);
  }
  return kMagicAndVersionBytes + len_bytes + header_len;
}

// Reads and parses the header of an open file and checks the file holds all the data.
Result<NpyHeader> ReadHeader(int fd, const std::string& path) {
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::FromErrno(errno, "npy: stat " + path);
  const uint64_t size = uint64_t(st.st_size);
  std::vector<uint8_t> bytes(std::min<uint64_t>(size, 12));
  KVTIER_RETURN_IF_ERROR(PreadAll(fd, 0, bytes.data(), bytes.size(), path));
  KVTIER_ASSIGN_OR_RETURN(const uint64_t header_end, HeaderEnd(bytes));
  if (header_end > size) return Corrupt("file is truncated inside the header: " + path);
  bytes.resize(header_end);
  KVTIER_RETURN_IF_ERROR(PreadAll(fd, 0, bytes.data(), bytes.size(), path));
  KVTIER_ASSIGN_OR_RETURN(NpyHeader header, ParseNpyHeader(bytes));
  if (size - header.data_offset < header.data_bytes()) {
    return Corrupt("file is truncated: " + path + " holds " +
                   std::to_string(size - header.data_offset) + " data bytes of " +
                   std::to_string(header.data_bytes()));
  }
  return header;
}

}  // namespace

uint32_t NpyDTypeBytes(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::kFloat16:
      return 2;
    case NpyDType::kFloat32:
    case NpyDType::kInt32:
      return 4;
    case NpyDType::kFloat64:
    case NpyDType::kInt64:
      return 8;
  }
  return 0;
}

std::string_view NpyDTypeDescr(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::kFloat16:
      return "<f2";
    case NpyDType::kFloat32:
      return "<f4";
    case NpyDType::kFloat64:
      return "<f8";
    case NpyDType::kInt32:
      return "<i4";
    case NpyDType::kInt64:
      return "<i8";
  }
  return "";
}

uint64_t NpyHeader::num_elements() const { return ShapeProduct(shape); }
uint64_t NpyArray::num_elements() const { return ShapeProduct(shape); }

Result<NpyHeader> ParseNpyHeader(std::span<const uint8_t> bytes) {
  KVTIER_ASSIGN_OR_RETURN(const uint64_t header_end, HeaderEnd(bytes));
  if (bytes.size() < header_end) return Corrupt("truncated inside the header");
  const uint64_t start = bytes[6] == 1 ? 10 : 12;
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + start),
                              header_end - start);
  // Version 1.0 and 2.0 headers are latin-1, 3.0 UTF-8; a valid dict is plain ASCII.
  if (text.find('\0') != std::string_view::npos) return Corrupt("header: NUL byte");
  return ParseDict(text, header_end, bytes[6]);
}

Result<NpyArray> ParseNpy(std::span<const uint8_t> bytes) {
  KVTIER_ASSIGN_OR_RETURN(NpyHeader header, ParseNpyHeader(bytes));
  const uint64_t data_bytes = header.data_bytes();
  if (bytes.size() - header.data_offset < data_bytes) {
    return Corrupt("truncated data: " + std::to_string(bytes.size() - header.data_offset) +
                   " bytes of " + std::to_string(data_bytes));
  }
  NpyArray array;
  array.dtype = header.dtype;
  array.shape = std::move(header.shape);
  array.data.assign(bytes.begin() + header.data_offset,
                    bytes.begin() + header.data_offset + data_bytes);
  return array;
}

Result<std::vector<uint8_t>> EncodeNpy(NpyDType dtype, std::span<const uint64_t> shape,
                                       std::span<const uint8_t> data) {
  const uint32_t element_bytes = NpyDTypeBytes(dtype);
  if (element_bytes == 0) return Status::InvalidArgument("npy: unknown dtype");
  const std::vector<uint64_t> shape_vec(shape.begin(), shape.end());
  if (Status s = CheckSize(shape_vec, element_bytes); !s.ok()) {
    return Status::InvalidArgument("npy: array size overflows");
  }
  if (ShapeProduct(shape) * element_bytes != data.size()) {
    return Status::InvalidArgument("npy: " + std::to_string(data.size()) +
                                   " data bytes do not match shape " + ShapeRepr(shape));
  }
  // Exactly numpy.lib.format._write_array_header: sorted keys, repr values, room for the
  // first axis to grow, then spaces and '\n' up to a multiple of 64 bytes.
  std::string dict = "{'descr': '" + std::string(NpyDTypeDescr(dtype)) +
                     "', 'fortran_order': False, 'shape': " + ShapeRepr(shape) + ", }";
  if (!shape.empty()) {
    const size_t digits = std::to_string(shape[0]).size();
    if (digits < kGrowthAxisMaxDigits) dict.append(kGrowthAxisMaxDigits - digits, ' ');
  }
  uint32_t major = 1;
  uint64_t len_bytes = 2;
  uint64_t header_len = 0;
  for (;;) {
    const uint64_t hlen = dict.size() + 1;  // with the final '\n'
    const uint64_t pad = kAlignBytes - (kMagicAndVersionBytes + len_bytes + hlen) % kAlignBytes;
    header_len = hlen + pad;
    if (major == 1 && header_len > 0xFFFF) {
      major = 2;
      len_bytes = 4;
      continue;
    }
    if (header_len > 0xFFFFFFFFull) return Status::InvalidArgument("npy: header too long");
    break;
  }
  std::vector<uint8_t> out;
  out.reserve(kMagicAndVersionBytes + len_bytes + header_len + data.size());
  out.insert(out.end(), kMagic, kMagic + sizeof(kMagic));
  out.push_back(uint8_t(major));
  out.push_back(0);
  for (uint64_t i = 0; i < len_bytes; ++i) out.push_back(uint8_t(header_len >> (8 * i)));
  out.insert(out.end(), dict.begin(), dict.end());
  out.insert(out.end(), header_len - dict.size() - 1, uint8_t(' '));
  out.push_back('\n');
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Result<NpyArray> ReadNpy(const std::string& path) {
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<NpyReader> reader, NpyReader::Open(path));
  NpyArray array;
  array.dtype = reader->header().dtype;
  array.shape = reader->header().shape;
  array.data.resize(reader->header().data_bytes());
  if (!array.data.empty()) {
    KVTIER_RETURN_IF_ERROR(reader->ReadRows(0, reader->num_rows(), array.data));
  }
  return array;
}

Status WriteNpy(const std::string& path, NpyDType dtype, std::span<const uint64_t> shape,
                std::span<const uint8_t> data) {
  KVTIER_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, EncodeNpy(dtype, shape, data));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return Status::FromErrno(errno, "npy: create " + path);
  const size_t written = std::fwrite(bytes.data(), 1, bytes.size(), f);
  const int write_errno = errno;
  if (written != bytes.size()) {
    std::fclose(f);
    return Status::FromErrno(write_errno, "npy: write " + path);
  }
  if (std::fclose(f) != 0) return Status::FromErrno(errno, "npy: close " + path);
  return Status::OK();
}

Status WriteNpyFromFloat(const std::string& path, NpyDType dtype, std::span<const uint64_t> shape,
                         std::span<const float> values) {
  std::vector<uint8_t> data(values.size() * NpyDTypeBytes(dtype));
  switch (dtype) {
    case NpyDType::kFloat16:
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t h = FloatToHalfBits(values[i]);
        memcpy(&data[2 * i], &h, 2);
      }
      break;
    case NpyDType::kFloat32:
      if (!values.empty()) memcpy(data.data(), values.data(), data.size());
      break;
    case NpyDType::kFloat64:
      for (size_t i = 0; i < values.size(); ++i) {
        const double d = values[i];
        memcpy(&data[8 * i], &d, 8);
      }
      break;
    default:
      return Status::InvalidArgument("npy: WriteNpyFromFloat needs a float dtype");
  }
  return WriteNpy(path, dtype, shape, data);
}

float NpyElementAsFloat(const uint8_t* data, uint64_t index, NpyDType dtype) {
  switch (dtype) {
    case NpyDType::kFloat16: {
      uint16_t h;
      memcpy(&h, data + 2 * index, 2);
      return HalfBitsToFloat(h);
    }
    case NpyDType::kFloat32: {
      float f;
      memcpy(&f, data + 4 * index, 4);
      return f;
    }
    case NpyDType::kFloat64: {
      double d;
      memcpy(&d, data + 8 * index, 8);
      return float(d);
    }
    case NpyDType::kInt32: {
      int32_t i;
      memcpy(&i, data + 4 * index, 4);
      return float(i);
    }
    case NpyDType::kInt64: {
      int64_t i;
      memcpy(&i, data + 8 * index, 8);
      return float(i);
    }
  }
  return 0.0f;
}

std::vector<float> NpyToFloat(const NpyArray& array) {
  const uint64_t n =
      std::min<uint64_t>(array.num_elements(), array.data.size() / NpyDTypeBytes(array.dtype));
  std::vector<float> out(n);
  for (uint64_t i = 0; i < n; ++i) out[i] = NpyElementAsFloat(array.data.data(), i, array.dtype);
  return out;
}

Result<std::unique_ptr<NpyReader>> NpyReader::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::NotFound("npy: no such file: " + path);
    return Status::FromErrno(err, "npy: open " + path);
  }
  Result<NpyHeader> header = ReadHeader(fd, path);
  if (!header.ok()) {
    close(fd);
    return header.status();
  }
  return std::unique_ptr<NpyReader>(new NpyReader(path, fd, std::move(header).value()));
}

NpyReader::~NpyReader() { close(fd_); }

uint64_t NpyReader::num_rows() const { return header_.shape.empty() ? 1 : header_.shape[0]; }

uint64_t NpyReader::row_bytes() const {
  uint64_t n = NpyDTypeBytes(header_.dtype);
  for (size_t i = 1; i < header_.shape.size(); ++i) n *= header_.shape[i];
  return n;
}

Status NpyReader::ReadRows(uint64_t first_row, uint64_t count, std::span<uint8_t> dst) {
  if (first_row > num_rows() || count > num_rows() - first_row) {
    return Status::InvalidArgument("npy: rows [" + std::to_string(first_row) + ", +" +
                                   std::to_string(count) + ") pass the " +
                                   std::to_string(num_rows()) + " rows of " + path_);
  }
  const uint64_t bytes = count * row_bytes();
  if (dst.size() < bytes) return Status::InvalidArgument("npy: destination too small");
  return PreadAll(fd_, header_.data_offset + first_row * row_bytes(), dst.data(), bytes, path_);
}

}  // namespace kvtier::bench
