// The LayerIndex backends, created by CreateLayerIndex (index/layer_index.h).
#ifndef KVTIER_INDEX_BACKENDS_H_
#define KVTIER_INDEX_BACKENDS_H_

#include <memory>

#include "index/layer_index.h"

namespace kvtier {

// kScan: index/scan_index.cc. The config is valid.
std::unique_ptr<LayerIndex> CreateScanIndex(const IndexConfig& config);
// kFaissFlat, kFaissHnsw, kInfLLM: index/faiss_index.cc. The config is valid.
Result<std::unique_ptr<LayerIndex>> CreateFaissIndex(const IndexConfig& config);

}  // namespace kvtier

#endif  // KVTIER_INDEX_BACKENDS_H_
