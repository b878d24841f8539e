#include "kvtier/options.h"

namespace kvtier {

std::string_view HostMemoryKindName(HostMemoryKind kind) {
  switch (kind) {
    case HostMemoryKind::kAuto:
      return "auto";
    case HostMemoryKind::kCudaPinned:
      return "cuda-pinned";
    case HostMemoryKind::kLocked:
      return "locked";
    case HostMemoryKind::kPlain:
      return "plain";
  }
  return "unknown";
}

}  // namespace kvtier
