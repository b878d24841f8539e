// `kvtier import DIR --sequence S --keys K.npy --values V.npy`: the reverse of `kvtier
// export`. K and V are float16 or float32 [layers, tokens, kv_heads, head_dim] (the shape
// `kvtier eval` reads and `kvtier export` writes); layer i of the arrays becomes layer
// A + i of the store (--layers A:B, default 0:layers). Blocks are cut every
// block_tokens tokens, transposed to kvtier's [kv_head][token][head_dim] keys-then-values
// block, converted to the store's dtype when it differs (round to nearest even), and
// Put through the public Store API with retrieval on, so each block is summarised and
// its summary committed with it (`kvtier explain` reads them). A last, partial block is
// zero-padded and summarised over its valid tokens only (Store::IndexBlock).
//
// DIR missing (or an empty directory): a store is created with the arrays' layout
// (layers, KV heads, head dim, dtype: the .npy's unless --dtype; --query-heads, default
// the KV heads; --block-tokens) and a disk tier of --disk-gib (default: 1.25x the
// import plus 64 MiB, preallocated). DIR a store: its layout must match the arrays (KV
// heads, head dim; --block-tokens, when given, must equal the store's). The store is
// opened with Store::Open, which takes its lock: a store open in another process is
// refused with a message saying so, before anything is written. A sequence that already
// has blocks in the target layers is refused unless --replace (which drops the whole
// sequence first).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench/workload/npy.h"
#include "kernels/dtype_convert.h"
#include "kvtier/store.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/npy_input.h"
#include "tools/progress.h"
#include "tools/store_reader.h"
#include "tools/tensor_commands.h"
#include "tools/tool_util.h"

namespace kvtier::tools {
namespace {

using bench::NpyDType;
using bench::NpyReader;

struct ImportConfig {
  std::string dir;
  std::string sequence_text;
  uint32_t namespace_id = 0;
  std::string keys_path, values_path;
  std::string layers_text;  // "A:B"
  uint32_t block_tokens = 128;
  bool block_tokens_given = false;
  uint32_t query_heads = 0;  // 0: the KV heads
  std::string dtype;         // empty: the arrays'
  double disk_gib = 0;       // 0: sized from the import
  RetrievalOptions retrieval;
  bool summary_given = false;  // --summary or --clusters: else an existing store's kind
  bool replace = false;
  bool json = false;
};

constexpr char kKvAxes[] = "[layers, tokens, kv_heads, head_dim]";

// "A:B" -> [A, B); empty -> [0, rows).
Status ParseLayers(const std::string& text, uint64_t rows, uint32_t* first, uint32_t* end) {
  if (text.empty()) {
    *first = 0;
    *end = static_cast<uint32_t>(rows);
    return Status::OK();
  }
  unsigned long long a = 0, b = 0;
  char tail = 0;
  if (std::sscanf(text.c_str(), "%llu:%llu%c", &a, &b, &tail) != 2 || b <= a ||
      b > (uint64_t{1} << 16)) {
    return Status::InvalidArgument("--layers " + text + ": expected A:B with A < B");
  }
  if (b - a != rows) {
    return Status::InvalidArgument("--layers " + text + " names " + std::to_string(b - a) +
                                   " layers but the arrays hold " + std::to_string(rows));
  }
  *first = static_cast<uint32_t>(a);
  *end = static_cast<uint32_t>(b);
  return Status::OK();
}

struct Plan {
  ModelLayout layout;
  bool create = false;
  uint32_t first_layer = 0, end_layer = 0;
  uint64_t tokens = 0;
  DType input_dtype = DType::kF32;
  uint32_t namespace_id = 0;
  SequenceId sequence;
  RetrievalOptions retrieval;  // the summaries: --summary, or the store's
};

// Works out the layout (from the store, or from the arrays for a new one) and checks the
// arrays against it.
Result<Plan> MakePlan(const ImportConfig& c, const NpyReader& keys, const NpyReader& values) {
  const bench::NpyHeader& k = keys.header();
  const bench::NpyHeader& v = values.header();
  if (k.shape != v.shape || k.dtype != v.dtype) {
    return Status::InvalidArgument(
        "--keys " + ShapeString(k.shape) + " " + std::string(bench::NpyDTypeDescr(k.dtype)) +
        " and --values " + ShapeString(v.shape) + " " + std::string(bench::NpyDTypeDescr(v.dtype)) +
        " must have one shape and dtype");
  }
  Plan p;
  p.namespace_id = c.namespace_id;
  p.retrieval = c.retrieval;
  KVTIER_ASSIGN_OR_RETURN(p.sequence, ParseSequenceArg(c.sequence_text));
  KVTIER_RETURN_IF_ERROR(ParseLayers(c.layers_text, k.shape[0], &p.first_layer, &p.end_layer));
  p.tokens = k.shape[1];
  p.input_dtype = k.dtype == NpyDType::kFloat16 ? DType::kF16 : DType::kF32;
  const uint32_t kv_heads = static_cast<uint32_t>(k.shape[2]);
  const uint32_t head_dim = static_cast<uint32_t>(k.shape[3]);

  std::error_code ec;
  const bool exists = std::filesystem::exists(c.dir, ec);
  const bool is_store = exists && std::filesystem::exists(c.dir + "/catalog", ec);
  if (exists && !is_store) {
    if (!std::filesystem::is_directory(c.dir, ec)) {
      return Status::InvalidArgument(c.dir + " exists and is not a directory");
    }
    if (!std::filesystem::is_empty(c.dir, ec)) {
      return Status::InvalidArgument(c.dir +
                                     " is a directory that is not a kvtier store and not empty; "
                                     "import creates a store only in a new or empty directory");
    }
  }
  if (is_store) {
    KVTIER_ASSIGN_OR_RETURN(bool held, StoreLockHeld(c.dir));
    if (held) {
      return Status::FailedPrecondition(
          "store " + c.dir +
          " is open in another process (kvtierd or an embedded Store holds its LOCK); import "
          "writes, so it needs the store to itself: stop that process, or import into another "
          "directory");
    }
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<StoreReader> reader, StoreReader::Open(c.dir));
    p.layout = reader->layout();
    // New blocks are summarised as the store's are, unless --summary says otherwise.
    if (!c.summary_given) {
      Status peeked;
      KVTIER_RETURN_IF_ERROR(
          reader->ForEachRepresentatives([&](const BlockKey&, std::span<const std::byte> bytes) {
            uint32_t rows = 0;
            peeked = PeekStoredSummary(bytes, &p.retrieval.summary, &rows);
            p.retrieval.clusters = p.retrieval.top_r = rows;
            return false;
          }));
      KVTIER_RETURN_IF_ERROR(peeked.WithContext("store " + c.dir));
    }
    const ModelLayout& l = p.layout;
    if (l.num_kv_heads != kv_heads || l.head_dim != head_dim) {
      return Status::InvalidArgument("--keys " + ShapeString(k.shape) +
                                     " [layers, tokens, kv_heads, head_dim] does not fit store " +
                                     c.dir + " (" + l.ToString() + ")");
    }
    if (p.end_layer > l.num_layers) {
      return Status::InvalidArgument("layers [" + std::to_string(p.first_layer) + ", " +
                                     std::to_string(p.end_layer) + ") outside store " + c.dir +
                                     "'s " + std::to_string(l.num_layers) + " layers");
    }
    if (c.block_tokens_given && c.block_tokens != l.block_tokens) {
      return Status::InvalidArgument("--block-tokens " + std::to_string(c.block_tokens) +
                                     " differs from store " + c.dir + "'s " +
                                     std::to_string(l.block_tokens));
    }
    if (c.query_heads != 0 && c.query_heads != l.num_query_heads) {
      return Status::InvalidArgument("--query-heads " + std::to_string(c.query_heads) +
                                     " differs from store " + c.dir + "'s " +
                                     std::to_string(l.num_query_heads));
    }
    if (l.dtype == DType::kFP8E4M3) {
      return Status::NotSupported("store " + c.dir +
                                  " keeps fp8-e4m3 blocks; import writes f16, "
                                  "bf16 or f32 stores");
    }
    return p;
  }
  p.create = true;
  p.layout = ModelLayout{p.end_layer, kv_heads,      c.query_heads ? c.query_heads : kv_heads,
                         head_dim,    p.input_dtype, c.block_tokens};
  if (!c.dtype.empty()) {
    KVTIER_ASSIGN_OR_RETURN(p.layout.dtype, ParseDType(c.dtype));
    if (p.layout.dtype == DType::kFP8E4M3) {
      return Status::NotSupported("--dtype fp8-e4m3: import writes f16, bf16 or f32 stores");
    }
  }
  KVTIER_RETURN_IF_ERROR(p.layout.Validate().WithContext("the arrays' layout"));
  return p;
}

// Cuts one layer (rows [tokens][kv_heads][head_dim] of `in`) into blocks and puts them.
class LayerWriter {
 public:
  LayerWriter(Store& store, const Plan& plan) : store_(store), plan_(plan) {
    const ModelLayout& l = plan.layout;
    block_.resize(store.block_bytes());
    batch_ = std::max<uint64_t>(1, std::min<uint64_t>(32, (uint64_t{64} << 20) / block_.size()));
    blocks_.resize(batch_ * block_.size());
    in_row_ = uint64_t{l.head_dim} * DTypeBytes(plan.input_dtype);
    out_row_ = uint64_t{l.head_dim} * DTypeBytes(l.dtype);
  }

  Status Write(uint32_t layer, const std::vector<uint8_t>& k, const std::vector<uint8_t>& v,
               Progress& progress) {
    const ModelLayout& l = plan_.layout;
    const uint32_t bt = l.block_tokens;
    const uint64_t n = (plan_.tokens + bt - 1) / bt;
    for (uint64_t first = 0; first < n; first += batch_) {
      const uint64_t count = std::min(batch_, n - first);
      std::vector<BlockWrite> writes(count);
      for (uint64_t i = 0; i < count; ++i) {
        uint8_t* block = blocks_.data() + i * block_.size();
        Fill(first + i, k, v, block);
        writes[i] = BlockWrite{Key(layer, first + i), block, block_.size()};
      }
      std::vector<Status> statuses(count);
      KVTIER_RETURN_IF_ERROR(store_.PutBatch(writes, statuses).WithContext("Put"));
      progress.Add(count * block_.size());
    }
    const uint32_t valid = static_cast<uint32_t>(plan_.tokens - (n - 1) * bt);
    if (valid < bt) {  // summarise the padded block over its valid tokens only
      Fill(n - 1, k, v, block_.data());
      KVTIER_RETURN_IF_ERROR(
          store_.IndexBlock(Key(layer, n - 1), block_.data(), block_.size(), valid, {})
              .WithContext("IndexBlock"));
    }
    return Status::OK();
  }

 private:
  BlockKey Key(uint32_t layer, uint64_t b) const {
    return BlockKey{.namespace_id = plan_.namespace_id,
                    .sequence = plan_.sequence,
                    .layer = layer,
                    .block = static_cast<uint32_t>(b)};
  }

  void Fill(uint64_t b, const std::vector<uint8_t>& k, const std::vector<uint8_t>& v,
            uint8_t* block) const {
    const ModelLayout& l = plan_.layout;
    const uint32_t bt = l.block_tokens, hkv = l.num_kv_heads;
    const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(bt, plan_.tokens - b * bt));
    if (valid < bt) std::memset(block, 0, block_.size());
    uint8_t* values = block + l.KeyBytesPerBlock();
    const bool same = plan_.input_dtype == l.dtype;
    for (uint32_t h = 0; h < hkv; ++h) {
      for (uint32_t t = 0; t < valid; ++t) {
        const uint64_t src = ((b * bt + t) * hkv + h) * in_row_;
        const uint64_t dst = (uint64_t{h} * bt + t) * out_row_;
        if (same) {
          std::memcpy(block + dst, k.data() + src, in_row_);
          std::memcpy(values + dst, v.data() + src, in_row_);
          continue;
        }
        const uint64_t si = src / DTypeBytes(plan_.input_dtype);
        const uint64_t di = dst / DTypeBytes(l.dtype);
        for (uint32_t d = 0; d < l.head_dim; ++d) {
          StoreFromFloat(block, di + d, l.dtype, LoadAsFloat(k.data(), si + d, plan_.input_dtype));
          StoreFromFloat(values, di + d, l.dtype, LoadAsFloat(v.data(), si + d, plan_.input_dtype));
        }
      }
    }
  }

  Store& store_;
  const Plan& plan_;
  std::vector<uint8_t> block_, blocks_;
  uint64_t batch_ = 1, in_row_ = 0, out_row_ = 0;
};

Status Import(const ImportConfig& c, Plan* plan_out, uint64_t* blocks_out, double* wall_s) {
  const auto start = std::chrono::steady_clock::now();
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<NpyReader> keys,
                          OpenFloatArray4("--keys", c.keys_path, kKvAxes));
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<NpyReader> values,
                          OpenFloatArray4("--values", c.values_path, kKvAxes));
  KVTIER_ASSIGN_OR_RETURN(Plan plan, MakePlan(c, *keys, *values));
  const ModelLayout& l = plan.layout;
  const uint64_t blocks_per_layer = (plan.tokens + l.block_tokens - 1) / l.block_tokens;
  const uint64_t layers = plan.end_layer - plan.first_layer;
  const uint64_t slot = (l.BytesPerBlock() + 4095) / 4096 * 4096;

  StoreOptions o;
  o.directory = c.dir;
  o.host_memory = HostMemoryKind::kPlain;
  o.host_capacity_bytes = std::min<uint64_t>(blocks_per_layer * layers + 64, 1024) * slot;
  const uint64_t import_bytes = blocks_per_layer * layers * slot;
  o.disk_capacity_bytes = c.disk_gib > 0 ? static_cast<uint64_t>(c.disk_gib * double(1 << 30))
                                         : import_bytes + import_bytes / 4 + (uint64_t{64} << 20);
  o.retrieval = plan.retrieval;
  o.retrieval.enabled = true;
  Result<std::unique_ptr<Store>> opened = Store::Open(o, l);
  if (!opened.ok()) {
    if (opened.status().message().find("is locked") != std::string::npos) {
      return Status::FailedPrecondition("store " + c.dir +
                                        " is open in another process; import needs it to itself (" +
                                        opened.status().message() + ")");
    }
    return opened.status().WithContext(plan.create ? "creating the store" : "opening the store");
  }
  Store& store = **opened;
  bool present = false;
  for (uint32_t layer = plan.first_layer; layer < plan.end_layer && !present; ++layer) {
    present = store.Contains(BlockKey{c.namespace_id, plan.sequence, layer, 0});
  }
  if (present && !c.replace) {
    return Status::AlreadyExists("sequence " + c.sequence_text + " already has blocks in layers [" +
                                 std::to_string(plan.first_layer) + ", " +
                                 std::to_string(plan.end_layer) + ") of " + c.dir +
                                 "; --replace drops the sequence (every layer) first");
  }
  if (present) KVTIER_RETURN_IF_ERROR(store.DropSequence(c.namespace_id, plan.sequence).status());

  Progress progress("import", blocks_per_layer * layers * store.block_bytes(), !c.json);
  LayerWriter writer(store, plan);
  std::vector<uint8_t> k(keys->row_bytes()), v(values->row_bytes());
  for (uint32_t i = 0; i < layers; ++i) {
    KVTIER_RETURN_IF_ERROR(keys->ReadRows(i, 1, k).WithContext("--keys"));
    KVTIER_RETURN_IF_ERROR(values->ReadRows(i, 1, v).WithContext("--values"));
    KVTIER_RETURN_IF_ERROR(writer.Write(plan.first_layer + i, k, v, progress)
                               .WithContext("layer " + std::to_string(plan.first_layer + i)));
  }
  KVTIER_RETURN_IF_ERROR(store.Flush().WithContext("Flush"));
  progress.Finish();
  *plan_out = plan;
  *blocks_out = blocks_per_layer * layers;
  *wall_s = SecondsSince(start);
  return Status::OK();
}

int RunImport(const ImportConfig& c) {
  Plan plan;
  uint64_t blocks = 0;
  double wall_s = 0;
  if (Status s = Import(c, &plan, &blocks, &wall_s); !s.ok()) {
    return ReportInspectError("import", s, c.json);
  }
  const ModelLayout& l = plan.layout;
  const uint64_t bytes = blocks * l.BytesPerBlock();
  if (c.json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(true);
    w.Key("dir"), w.String(c.dir);
    w.Key("created"), w.Bool(plan.create);
    w.Key("namespace"), w.Uint(c.namespace_id);
    w.Key("sequence"), w.String(plan.sequence.ToHex());
    w.Key("layout"), w.String(l.ToString());
    w.Key("layer_begin"), w.Uint(plan.first_layer);
    w.Key("layer_end"), w.Uint(plan.end_layer);
    w.Key("tokens"), w.Uint(plan.tokens);
    w.Key("blocks"), w.Uint(blocks);
    w.Key("bytes"), w.Uint(bytes);
    w.Key("input_dtype"), w.String(DTypeName(plan.input_dtype));
    w.Key("dtype"), w.String(DTypeName(l.dtype));
    w.Key("summary"), w.String(SummaryKindName(plan.retrieval.summary));
    w.Key("wall_s"), w.Number(wall_s);
    w.EndObject();
    std::printf("%s\n", w.str().c_str());
    return 0;
  }
  std::printf("kvtier import: %s store %s (%s)\n", plan.create ? "created" : "into", c.dir.c_str(),
              l.ToString().c_str());
  std::printf(
      "  sequence %s (namespace %u): layers [%u, %u), %llu tokens, %llu blocks, %.1f MB of %s "
      "(from %s .npy)\n",
      plan.sequence.ToHex().c_str(), c.namespace_id, plan.first_layer, plan.end_layer,
      static_cast<unsigned long long>(plan.tokens), static_cast<unsigned long long>(blocks),
      double(bytes) / 1e6, std::string(DTypeName(l.dtype)).c_str(),
      std::string(DTypeName(plan.input_dtype)).c_str());
  std::printf("  every block summarised (%s) and durable; %.2f s\n",
              std::string(SummaryKindName(plan.retrieval.summary)).c_str(), wall_s);
  return 0;
}

}  // namespace

void AddImportCommand(CLI::App& app, int* exit_code) {
  auto c = std::make_shared<ImportConfig>();
  CLI::App* cmd = app.add_subcommand(
      "import", "Bring a sequence's keys and values (.npy) into a store, creating it if needed");
  cmd->footer(
      "K and V: float16/float32 [layers, tokens, kv_heads, head_dim], as `kvtier export` writes "
      "and `kvtier eval` reads.\nA missing DIR is created with the arrays' layout; an existing "
      "store must match it. A store open in\nanother process is refused. Exit status: 0 "
      "imported, 1 damaged store, 2 usage or I/O error.\nExample: kvtier import /nvme/kv "
      "--sequence 7 --keys K.npy --values V.npy --query-heads 32 --block-tokens 128\n");
  cmd->add_option("dir", c->dir, "Store directory (created when missing)")->required();
  cmd->add_option("--sequence", c->sequence_text, "Sequence id: decimal, or 32 hex digits")
      ->required();
  cmd->add_option("--namespace", c->namespace_id, "Namespace")->capture_default_str();
  cmd->add_option("--keys", c->keys_path, "Keys .npy [layers, tokens, kv_heads, head_dim]")
      ->required();
  cmd->add_option("--values", c->values_path, "Values .npy, the shape of the keys")->required();
  cmd->add_option("--layers", c->layers_text,
                  "A:B: the store layers the arrays' layers go to (default 0:layers)");
  cmd->add_option_function<uint32_t>(
         "--block-tokens",
         [c](uint32_t v) {
           c->block_tokens = v;
           c->block_tokens_given = true;
         },
         "Tokens per block of a new store (an existing one keeps its own)")
      ->check(CLI::Range(1u, 4096u))
      ->option_text("UINT=128");
  cmd->add_option("--query-heads", c->query_heads,
                  "Query heads of a new store's layout (default: the KV heads)");
  cmd->add_option("--dtype", c->dtype,
                  "dtype of a new store: f16, bf16 or f32 (default: the arrays')");
  cmd->add_option("--disk-gib", c->disk_gib,
                  "Disk tier of a new store, GiB (default: 1.25x the import + 64 MiB)")
      ->check(CLI::PositiveNumber);
  AddNamedOption(cmd, "--summary", "Block summary (default: an existing store's)",
                 SummaryKindNames(), "clusters", &c->retrieval.summary);
  cmd->add_option("--clusters", c->retrieval.clusters, "Centroids per KV head (--summary clusters)")
      ->capture_default_str();
  cmd->add_flag("--replace", c->replace, "Drop the sequence first when it already has blocks");
  cmd->add_flag("--json", c->json, "Print one JSON object");
  cmd->callback([c, cmd, exit_code] {
    c->summary_given = cmd->count("--summary") + cmd->count("--clusters") > 0;
    *exit_code = RunImport(*c);
  });
}

}  // namespace kvtier::tools
