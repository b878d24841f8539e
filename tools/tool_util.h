// Small helpers the `kvtier` subcommands share: a temporary store directory, timing,
// medians, and the names of the retrieval options on the command line.
#ifndef KVTIER_TOOLS_TOOL_UTIL_H_
#define KVTIER_TOOLS_TOOL_UTIL_H_

#include <stdlib.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kvtier/retrieval.h"
#include "kvtier/status.h"

namespace kvtier::tools {

// A store directory under /var/tmp (on disk, unlike a tmpfs /tmp), removed with the
// object unless `keep`.
struct TempStoreDir {
  std::string path;
  bool keep = false;

  TempStoreDir() = default;
  TempStoreDir(const TempStoreDir&) = delete;
  TempStoreDir& operator=(const TempStoreDir&) = delete;
  ~TempStoreDir() {
    std::error_code ec;
    if (!path.empty() && !keep) std::filesystem::remove_all(path, ec);
  }
  Status Create() {
    char tmpl[] = "/var/tmp/kvtier-demo-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return Status::FromErrno(errno, "mkdtemp /var/tmp/kvtier-demo-*");
    path = tmpl;
    return Status::OK();
  }
};

inline double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
inline double SecondsSince(std::chrono::steady_clock::time_point start) {
  return Seconds(std::chrono::steady_clock::now() - start);
}

// The median (the mean of the two middle values for an even count); 0 when empty.
inline double Median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  const size_t mid = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + mid, values.end());
  double m = values[mid];
  if (values.size() % 2 == 0) m = (m + *std::max_element(values.begin(), values.begin() + mid)) / 2;
  return m;
}

// Command-line names of the retrieval options (kvtier/retrieval.h), for
// CLI::CheckedTransformer.
inline const std::map<std::string, SummaryKind>& SummaryKindNames() {
  static const std::map<std::string, SummaryKind> names{{"clusters", SummaryKind::kClusters},
                                                        {"mean", SummaryKind::kMean},
                                                        {"minmax", SummaryKind::kMinMax},
                                                        {"topr", SummaryKind::kTopR}};
  return names;
}
inline const std::map<std::string, IndexBackend>& IndexBackendNames() {
  static const std::map<std::string, IndexBackend> names{{"auto", IndexBackend::kAuto},
                                                         {"scan", IndexBackend::kScan},
                                                         {"faiss-flat", IndexBackend::kFaissFlat},
                                                         {"faiss-hnsw", IndexBackend::kFaissHnsw},
                                                         {"infllm", IndexBackend::kInfLLM},
                                                         {"gpu", IndexBackend::kGpu}};
  return names;
}
inline const std::map<std::string, SelectionScope>& SelectionScopeNames() {
  static const std::map<std::string, SelectionScope> names{{"layer", SelectionScope::kPerLayer},
                                                           {"kv-head", SelectionScope::kPerKvHead}};
  return names;
}
inline const char* SelectionScopeName(SelectionScope scope) {
  return scope == SelectionScope::kPerKvHead ? "kv-head" : "layer";
}

// Registers an option taking one of the names in `names` (its help lists them), stored
// as the named value in *out (which must outlive the parse).
template <typename T>
void AddNamedOption(CLI::App* cmd, const std::string& flag, const std::string& help,
                    const std::map<std::string, T>& names, const std::string& default_name,
                    T* out) {
  std::vector<std::string> keys;
  for (const auto& [name, value] : names) keys.push_back(name);
  std::string listed;
  for (const std::string& k : keys) listed += (listed.empty() ? "" : "|") + k;
  cmd->add_option_function<std::string>(
         flag, [&names, out](const std::string& v) { *out = names.at(v); }, help + ": " + listed)
      ->check(CLI::IsMember(keys))
      ->option_text("NAME=" + default_name);
}

// Registers the retrieval flags a subcommand shares (--topk, --n-init, --n-local,
// --summary, --clusters, --top-r, --backend, --scope), writing into *r (which must
// outlive the parse).
inline void AddRetrievalFlags(CLI::App* cmd, RetrievalOptions* r) {
  cmd->add_option("--topk", r->top_k, "Blocks selected per step (besides sinks and window)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  cmd->add_option("--n-init", r->n_init, "Sink tokens always attended (the first tokens)")
      ->capture_default_str();
  cmd->add_option("--n-local", r->n_local, "Local window tokens always attended (the last)")
      ->capture_default_str();
  AddNamedOption(cmd, "--summary", "Block summary", SummaryKindNames(), "clusters", &r->summary);
  cmd->add_option("--clusters", r->clusters, "Centroids per KV head (--summary clusters)")
      ->capture_default_str();
  cmd->add_option("--top-r", r->top_r, "Keys per KV head (--summary topr)")->capture_default_str();
  AddNamedOption(cmd, "--backend", "Retrieval index", IndexBackendNames(), "auto", &r->backend);
  AddNamedOption(cmd, "--scope", "One selection per layer, or one per KV head",
                 SelectionScopeNames(), "layer", &r->scope);
}

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_TOOL_UTIL_H_
