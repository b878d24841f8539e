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
// kGpu: index/gpu_index.cc. The config is valid. The index keeps its summaries in the
// memory of the CUDA device current at creation when one is present (cuda::HasDevice()),
// and runs Select there (kernels/cluster_scoring.h, then TopKBlocks); otherwise, or with
// `force_emulated`, it runs the same steps through the kernels' CPU references over host
// arrays (GpuIndexOnDevice says which). InvalidArgument for kMinMax summaries (Quest's
// bound is not on the GPU) and shapes the kernel refuses; the driver's error when device
// memory or a stream cannot be had.
Result<std::unique_ptr<LayerIndex>> CreateGpuIndex(const IndexConfig& config,
                                                   bool force_emulated = false);
// Whether `index` is a kGpu index on a CUDA device (false: emulated, or another backend).
bool GpuIndexOnDevice(const LayerIndex& index);

}  // namespace kvtier

#endif  // KVTIER_INDEX_BACKENDS_H_
