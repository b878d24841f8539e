// The .npy inputs of the tensor commands (`kvtier eval`, `kvtier import`): float16 or
// float32 arrays of four non-empty dimensions, each below 2^32.
#ifndef KVTIER_TOOLS_NPY_INPUT_H_
#define KVTIER_TOOLS_NPY_INPUT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench/workload/npy.h"
#include "kvtier/status.h"

namespace kvtier::tools {

// "[2, 1024, 8, 128]".
std::string ShapeString(const std::vector<uint64_t>& shape);

// Opens `path` (given by option `flag`, which every error names with the path) and checks
// the dtype and the rank; `axes` names the expected dimensions in the error, e.g.
// "[layers, tokens, kv_heads, head_dim]".
Result<std::unique_ptr<bench::NpyReader>> OpenFloatArray4(const char* flag, const std::string& path,
                                                          const char* axes);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_NPY_INPUT_H_
