#include "tools/npy_input.h"

namespace kvtier::tools {

std::string ShapeString(const std::vector<uint64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Result<std::unique_ptr<bench::NpyReader>> OpenFloatArray4(const char* flag, const std::string& path,
                                                          const char* axes) {
  Result<std::unique_ptr<bench::NpyReader>> r = bench::NpyReader::Open(path);
  if (!r.ok()) return r.status().WithContext(flag);
  const bench::NpyHeader& h = (*r)->header();
  const std::string what = std::string(flag) + " " + path;
  if (h.dtype != bench::NpyDType::kFloat16 && h.dtype != bench::NpyDType::kFloat32) {
    return Status::InvalidArgument(what + ": dtype " + std::string(bench::NpyDTypeDescr(h.dtype)) +
                                   "; expected float16 or float32");
  }
  if (h.shape.size() != 4) {
    return Status::InvalidArgument(what + ": shape " + ShapeString(h.shape) + " has " +
                                   std::to_string(h.shape.size()) + " dimensions; expected 4, " +
                                   axes);
  }
  for (uint64_t d : h.shape) {
    if (d == 0 || d > (uint64_t{1} << 32)) {
      return Status::InvalidArgument(what + ": shape " + ShapeString(h.shape) +
                                     " has an empty or huge dimension");
    }
  }
  return r;
}

}  // namespace kvtier::tools
