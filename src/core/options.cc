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

namespace kvtier {

std::string_view SummaryKindName(SummaryKind kind) {
  switch (kind) {
    case SummaryKind::kClusters:
      return "clusters";
    case SummaryKind::kMean:
      return "mean";
    case SummaryKind::kMinMax:
      return "minmax";
    case SummaryKind::kTopR:
      return "topr";
  }
  return "unknown";
}

std::string_view IndexBackendName(IndexBackend backend) {
  switch (backend) {
    case IndexBackend::kAuto:
      return "auto";
    case IndexBackend::kScan:
      return "scan";
    case IndexBackend::kFaissFlat:
      return "faiss-flat";
    case IndexBackend::kFaissHnsw:
      return "faiss-hnsw";
    case IndexBackend::kInfLLM:
      return "infllm";
    case IndexBackend::kGpu:
      return "gpu";
  }
  return "unknown";
}

}  // namespace kvtier
