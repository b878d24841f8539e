// `kvtier export DIR --sequence S [--namespace N] [--layers A:B] --keys K.npy --values V.npy`:
// a sequence's keys and values as .npy [layers, tokens, kv_heads, head_dim], the shapes
// `kvtier eval` reads and `kvtier import` writes back.
//
// Dtype: the stored one when numpy has it (f16 -> '<f2', f32 -> '<f4'), so the bytes are
// the store's exactly; bf16 and fp8-e4m3 have no numpy dtype and are written as float32,
// converted exactly (every bf16 and fp8 value is a float32), and the output says so.
// tokens = the layer's blocks x block_tokens (the store keeps whole blocks: the padding
// of a last partial block comes out as stored). Every layer of the range must hold the
// same blocks 0..n-1; a missing block, a corrupt one or a quarantined one is an error
// naming it, and no file is written. Memory: the keys and values of the range, whole.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/workload/npy.h"
#include "kernels/dtype_convert.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/progress.h"
#include "tools/store_reader.h"

namespace kvtier::tools {
namespace {

struct ExportConfig {
  std::string dir;
  std::string sequence;
  uint32_t namespace_id = 0;
  std::string layers;  // "A:B", "A" or empty (all)
  std::string keys_path;
  std::string values_path;
  bool json = false;
};

// "A:B" (B exclusive, either side may be empty), or "A": one layer.
Status ParseLayers(const std::string& text, uint32_t num_layers, uint32_t* begin, uint32_t* end) {
  *begin = 0;
  *end = num_layers;
  if (text.empty()) return Status::OK();
  auto number = [&](const std::string& part, uint32_t* out) -> Status {
    if (part.empty() || part.size() > 9 ||
        part.find_first_not_of("0123456789") != std::string::npos) {
      return Status::InvalidArgument("--layers '" + text + "': expected A:B or A (layer numbers)");
    }
    *out = static_cast<uint32_t>(std::stoul(part));
    return Status::OK();
  };
  const size_t colon = text.find(':');
  if (colon == std::string::npos) {
    KVTIER_RETURN_IF_ERROR(number(text, begin));
    *end = *begin + 1;
  } else {
    if (colon > 0) KVTIER_RETURN_IF_ERROR(number(text.substr(0, colon), begin));
    if (colon + 1 < text.size()) KVTIER_RETURN_IF_ERROR(number(text.substr(colon + 1), end));
  }
  if (*begin >= *end || *end > num_layers) {
    return Status::InvalidArgument("--layers '" + text + "': an empty range, or past the store's " +
                                   std::to_string(num_layers) + " layers");
  }
  return Status::OK();
}

int RunExport(const ExportConfig& config) {
  Result<SequenceId> sequence = ParseSequenceArg(config.sequence);
  if (!sequence.ok()) return ReportInspectError("export", sequence.status(), config.json);
  Result<std::unique_ptr<StoreReader>> opened = StoreReader::Open(config.dir);
  if (!opened.ok()) return ReportInspectError("export", opened.status(), config.json);
  StoreReader& reader = **opened;
  const ModelLayout& l = reader.layout();
  uint32_t begin = 0, end = 0;
  if (Status s = ParseLayers(config.layers, l.num_layers, &begin, &end); !s.ok()) {
    return ReportInspectError("export", s, config.json);
  }
  const bool native = l.dtype == DType::kF16 || l.dtype == DType::kF32;
  const bench::NpyDType npy_dtype =
      l.dtype == DType::kF16 ? bench::NpyDType::kFloat16 : bench::NpyDType::kFloat32;
  const uint64_t out_elem = bench::NpyDTypeBytes(npy_dtype);
  const uint64_t row_elems = uint64_t{l.num_kv_heads} * l.head_dim;  // per token

  const auto start = std::chrono::steady_clock::now();
  std::vector<uint8_t> keys, values;
  uint64_t tokens = 0;
  std::vector<std::byte> layer_keys, layer_values;
  Progress progress("export", end - begin, !config.json, /*bytes=*/false);
  for (uint32_t layer = begin; layer < end; ++layer) {
    uint64_t layer_tokens = 0;
    Status s = reader.ReadLayer(config.namespace_id, *sequence, layer, &layer_keys, &layer_values,
                                &layer_tokens);
    if (!s.ok()) return ReportInspectError("export", s, config.json);
    if (layer == begin) {
      tokens = layer_tokens;
      const uint64_t bytes = uint64_t{end - begin} * tokens * row_elems * out_elem;
      keys.resize(bytes);
      values.resize(bytes);
    } else if (layer_tokens != tokens) {
      return ReportInspectError(
          "export",
          Status::InvalidArgument("layer " + std::to_string(layer) + " of the sequence holds " +
                                  std::to_string(layer_tokens) + " tokens, layer " +
                                  std::to_string(begin) + " holds " + std::to_string(tokens) +
                                  ": the layers cannot form one array"),
          config.json);
    }
    const uint64_t elems = tokens * row_elems;
    const uint64_t at = uint64_t{layer - begin} * elems * out_elem;
    if (native) {
      std::memcpy(keys.data() + at, layer_keys.data(), elems * out_elem);
      std::memcpy(values.data() + at, layer_values.data(), elems * out_elem);
    } else {
      auto* k = reinterpret_cast<float*>(keys.data() + at);
      auto* v = reinterpret_cast<float*>(values.data() + at);
      for (uint64_t i = 0; i < elems; ++i) {
        k[i] = LoadAsFloat(layer_keys.data(), i, l.dtype);
        v[i] = LoadAsFloat(layer_values.data(), i, l.dtype);
      }
    }
    progress.Add(1);
  }
  progress.Finish();
  const std::vector<uint64_t> shape = {end - begin, tokens, l.num_kv_heads, l.head_dim};
  if (Status s = bench::WriteNpy(config.keys_path, npy_dtype, shape, keys); !s.ok()) {
    return ReportInspectError("export", s.WithContext("--keys"), config.json);
  }
  if (Status s = bench::WriteNpy(config.values_path, npy_dtype, shape, values); !s.ok()) {
    return ReportInspectError("export", s.WithContext("--values"), config.json);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  if (config.json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(true);
    w.Key("dir"), w.String(config.dir);
    w.Key("locked"), w.Bool(reader.locked());
    w.Key("namespace"), w.Uint(config.namespace_id);
    w.Key("sequence"), w.String(sequence->ToHex());
    w.Key("layer_begin"), w.Uint(begin);
    w.Key("layer_end"), w.Uint(end);
    w.Key("shape"), w.NumberArray(shape);
    w.Key("stored_dtype"), w.String(DTypeName(l.dtype));
    w.Key("npy_dtype"), w.String(bench::NpyDTypeDescr(npy_dtype));
    w.Key("converted"), w.Bool(!native);
    w.Key("keys"), w.String(config.keys_path);
    w.Key("values"), w.String(config.values_path);
    w.Key("bytes"), w.Uint(keys.size() + values.size());
    w.Key("seconds"), w.Number(seconds);
    w.EndObject();
    std::printf("%s\n", w.str().c_str());
  } else {
    std::printf(
        "exported sequence %u/%s, layers [%u, %u): [%u, %" PRIu64
        ", %u, %u] %s%s to %s and %s (%.1f MiB in %.2f s)\n",
        config.namespace_id, sequence->ToHex().c_str(), begin, end, end - begin, tokens,
        l.num_kv_heads, l.head_dim, std::string(bench::NpyDTypeDescr(npy_dtype)).c_str(),
        native ? "" : (" (converted exactly from " + std::string(DTypeName(l.dtype)) + ")").c_str(),
        config.keys_path.c_str(), config.values_path.c_str(),
        static_cast<double>(keys.size() + values.size()) / (1 << 20), seconds);
  }
  return 0;
}

}  // namespace

void AddExportCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<ExportConfig>();
  CLI::App* cmd = app.add_subcommand(
      "export", "Write a sequence's keys and values as .npy [layers, tokens, kv_heads, head_dim]");
  cmd->footer(
      "Stored dtype when numpy has it (f16, f32); bf16 and fp8 as float32 (exact). Every block "
      "is checked; a missing or corrupt block is an error naming it.\nExit status: 0 written, 1 "
      "a corrupt block or damaged catalog, 2 usage or I/O error (no such sequence or block).\n"
      "Example: kvtier export /nvme/kvtier --sequence 42 --layers 0:4 --keys K.npy --values "
      "V.npy\n");
  cmd->add_option("DIR", config->dir, "Store directory")->required();
  cmd->add_option("--sequence", config->sequence, "Sequence (decimal, or 32 hex digits)")
      ->required();
  cmd->add_option("--namespace", config->namespace_id, "Namespace")->capture_default_str();
  cmd->add_option("--layers", config->layers, "Layers A:B (B exclusive) or A; default all");
  cmd->add_option("--keys", config->keys_path, "Output .npy for the keys")->required();
  cmd->add_option("--values", config->values_path, "Output .npy for the values")->required();
  cmd->add_flag("--json", config->json, "Print one JSON object");
  cmd->callback([config, exit_code] { *exit_code = RunExport(*config); });
}

}  // namespace kvtier::tools
