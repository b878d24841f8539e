#include "tools/eval.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "bench/workload/npy.h"
#include "bench/workload/oracle.h"
#include "kvtier/store.h"
#include "tools/json_writer.h"
#include "tools/npy_input.h"
#include "tools/tool_util.h"

namespace kvtier::tools {
namespace {

using bench::AttentionOracle;
using bench::NpyDType;
using bench::NpyReader;

struct EvalConfig {
  std::string keys_path;
  std::string values_path;
  std::string queries_path;
  std::string selection_out;
  uint32_t block_tokens = 128;
  RetrievalOptions retrieval;
  bool json = false;
};

// The three inputs, opened and checked against each other; rows (layers) are read on
// demand.
struct Inputs {
  std::unique_ptr<NpyReader> keys, values, queries;
  uint32_t layers = 0, kv_heads = 0, query_heads = 0, head_dim = 0, steps = 0;
  uint64_t tokens = 0;
  DType dtype = DType::kF32;  // of the keys and values, and so of the store's blocks
};

constexpr char kKvAxes[] = "[layers, tokens, kv_heads, head_dim]";

Result<Inputs> OpenInputs(const EvalConfig& config) {
  Inputs in;
  KVTIER_ASSIGN_OR_RETURN(in.keys, OpenFloatArray4("--keys", config.keys_path, kKvAxes));
  KVTIER_ASSIGN_OR_RETURN(in.values, OpenFloatArray4("--values", config.values_path, kKvAxes));
  KVTIER_ASSIGN_OR_RETURN(in.queries, OpenFloatArray4("--queries", config.queries_path,
                                                      "[layers, steps, query_heads, head_dim]"));
  const bench::NpyHeader& k = in.keys->header();
  const bench::NpyHeader& v = in.values->header();
  const bench::NpyHeader& q = in.queries->header();
  if (v.shape != k.shape) {
    return Status::InvalidArgument("--values shape " + ShapeString(v.shape) +
                                   " differs from --keys shape " + ShapeString(k.shape) +
                                   " [layers, tokens, kv_heads, head_dim]");
  }
  if (v.dtype != k.dtype) {
    return Status::InvalidArgument(
        "--keys is " + std::string(bench::NpyDTypeDescr(k.dtype)) + " but --values is " +
        std::string(bench::NpyDTypeDescr(v.dtype)) + "; they must have one dtype");
  }
  if (q.shape[0] != k.shape[0] || q.shape[3] != k.shape[3]) {
    return Status::InvalidArgument(
        "--queries shape " + ShapeString(q.shape) +
        " [layers, steps, query_heads, head_dim] does not match --keys shape " +
        ShapeString(k.shape) + " [layers, tokens, kv_heads, head_dim] in layers or head_dim");
  }
  if (q.shape[2] % k.shape[2] != 0) {
    return Status::InvalidArgument("--queries has " + std::to_string(q.shape[2]) +
                                   " query heads, not a multiple of the " +
                                   std::to_string(k.shape[2]) + " KV heads of --keys");
  }
  in.layers = static_cast<uint32_t>(k.shape[0]);
  in.tokens = k.shape[1];
  in.kv_heads = static_cast<uint32_t>(k.shape[2]);
  in.head_dim = static_cast<uint32_t>(k.shape[3]);
  in.steps = static_cast<uint32_t>(q.shape[1]);
  in.query_heads = static_cast<uint32_t>(q.shape[2]);
  in.dtype = k.dtype == NpyDType::kFloat16 ? DType::kF16 : DType::kF32;
  return in;
}

// One (layer, step): the selection's metrics and Select's time.
struct StepResult {
  double recall = 0, coverage = 0, coverage_min_head = 0, output_rel_l2 = 0, select_us = 0;
};

struct LayerResult {
  std::vector<StepResult> steps;
  double Mean(double StepResult::*field) const {
    double sum = 0;
    for (const StepResult& s : steps) sum += s.*field;
    return steps.empty() ? 0.0 : sum / double(steps.size());
  }
  std::vector<double> Of(double StepResult::*field) const {
    std::vector<double> out;
    for (const StepResult& s : steps) out.push_back(s.*field);
    return out;
  }
};

// Elements [first, first + count) of `raw` (elements of `dtype`) as float.
void ToFloat(const std::vector<uint8_t>& raw, NpyDType dtype, uint64_t first, uint64_t count,
             float* out) {
  if (dtype == NpyDType::kFloat32) {
    std::memcpy(out, raw.data() + first * 4, count * 4);
    return;
  }
  for (uint64_t i = 0; i < count; ++i)
    out[i] = bench::NpyElementAsFloat(raw.data(), first + i, dtype);
}

// Evaluates one layer: ingests it into `store` under its own sequence, feeds the step
// oracles, selects and scores each step, drops the sequence. `selection` receives the
// layer's [steps][select_size] selections.
class LayerEvaluator {
 public:
  LayerEvaluator(const Inputs& in, Store& store)
      : in_(in), store_(store), layout_(store.layout()) {}

  // Time spent so far putting blocks and feeding the oracles.
  double ingest_seconds() const { return ingest_seconds_; }
  double oracle_seconds() const { return oracle_seconds_; }

  Status Run(uint32_t layer, LayerResult* result, std::span<int32_t> selection) {
    const uint64_t layer_bytes = in_.keys->row_bytes();
    k_raw_.resize(layer_bytes);
    v_raw_.resize(layer_bytes);
    KVTIER_RETURN_IF_ERROR(in_.keys->ReadRows(layer, 1, k_raw_).WithContext("--keys"));
    KVTIER_RETURN_IF_ERROR(in_.values->ReadRows(layer, 1, v_raw_).WithContext("--values"));
    queries_.resize(uint64_t{in_.steps} * in_.query_heads * in_.head_dim);
    {
      std::vector<uint8_t> q_raw(in_.queries->row_bytes());
      KVTIER_RETURN_IF_ERROR(in_.queries->ReadRows(layer, 1, q_raw).WithContext("--queries"));
      ToFloat(q_raw, in_.queries->header().dtype, 0, queries_.size(), queries_.data());
    }
    const SequenceId sequence = SequenceId::FromU64(uint64_t{layer} + 1);
    auto t0 = std::chrono::steady_clock::now();
    KVTIER_RETURN_IF_ERROR(Ingest(layer, sequence));
    ingest_seconds_ += SecondsSince(t0);
    t0 = std::chrono::steady_clock::now();
    std::vector<std::unique_ptr<AttentionOracle>> oracles;
    KVTIER_RETURN_IF_ERROR(FeedOracles(&oracles));
    oracle_seconds_ += SecondsSince(t0);

    const RetrievalOptions& r = store_.options().retrieval;
    const bench::SparsePolicy policy{r.n_init, r.n_local, r.top_k};
    const uint64_t select_size = selection.size() / in_.steps;
    std::vector<int64_t> selected(select_size);
    std::vector<uint64_t> attended;
    result->steps.assign(in_.steps, {});
    for (uint32_t s = 0; s < in_.steps; ++s) {
      const uint64_t qf = uint64_t{in_.query_heads} * in_.head_dim;
      std::span<const float> q(queries_.data() + s * qf, qf);
      t0 = std::chrono::steady_clock::now();
      Result<SelectInfo> info = store_.Select(0, sequence, layer, q, in_.tokens, selected);
      const double us = SecondsSince(t0) * 1e6;
      if (!info.ok()) return info.status().WithContext("Select");
      attended.clear();
      for (size_t i = 0; i < selected.size(); ++i) {
        selection[s * select_size + i] = static_cast<int32_t>(selected[i]);
        if (selected[i] >= 0) attended.push_back(static_cast<uint64_t>(selected[i]));
      }
      std::sort(attended.begin(), attended.end());  // kv-head scope: the union
      attended.erase(std::unique(attended.begin(), attended.end()), attended.end());
      KVTIER_ASSIGN_OR_RETURN(bench::SelectionMetrics m, oracles[s]->Evaluate(policy, attended));
      result->steps[s] = {m.recall, m.coverage, m.coverage_min_head, m.output_rel_l2, us};
    }
    KVTIER_RETURN_IF_ERROR(store_.DropSequence(0, sequence).status());
    return Status::OK();
  }

 private:
  // Puts the layer's blocks (transposed from [token][kv_head][dim] to kvtier's
  // [kv_head][token][dim], keys then values, the last one zero-padded).
  Status Ingest(uint32_t layer, const SequenceId& sequence) {
    const uint32_t bt = layout_.block_tokens, hkv = in_.kv_heads, d = in_.head_dim;
    const uint64_t elem = DTypeBytes(layout_.dtype);
    const uint64_t row = uint64_t{d} * elem;
    const uint64_t blocks = (in_.tokens + bt - 1) / bt;
    std::vector<uint8_t> block(store_.block_bytes());
    uint8_t* values = block.data() + layout_.KeyBytesPerBlock();
    for (uint64_t b = 0; b < blocks; ++b) {
      const uint32_t valid = static_cast<uint32_t>(std::min<uint64_t>(bt, in_.tokens - b * bt));
      if (valid < bt) std::fill(block.begin(), block.end(), uint8_t{0});
      for (uint32_t h = 0; h < hkv; ++h) {
        for (uint32_t t = 0; t < valid; ++t) {
          const uint64_t src = ((b * bt + t) * hkv + h) * row;
          const uint64_t dst = (uint64_t{h} * bt + t) * row;
          std::memcpy(block.data() + dst, k_raw_.data() + src, row);
          std::memcpy(values + dst, v_raw_.data() + src, row);
        }
      }
      const BlockKey key{.namespace_id = 0,
                         .sequence = sequence,
                         .layer = layer,
                         .block = static_cast<uint32_t>(b)};
      KVTIER_RETURN_IF_ERROR(store_.Put(key, block.data(), block.size()).WithContext("Put"));
      if (valid < bt) {
        KVTIER_RETURN_IF_ERROR(store_.IndexBlock(key, block.data(), block.size(), valid, {})
                                   .WithContext("IndexBlock"));
      }
    }
    return Status::OK();
  }

  // One oracle per step, fed the layer's tokens; the steps are spread over the cores.
  Status FeedOracles(std::vector<std::unique_ptr<AttentionOracle>>* oracles) {
    const uint32_t hkv = in_.kv_heads, d = in_.head_dim, steps = in_.steps;
    const bench::OracleConfig oc{.num_query_heads = in_.query_heads,
                                 .num_kv_heads = hkv,
                                 .head_dim = d,
                                 .block_tokens = layout_.block_tokens};
    const uint64_t qf = uint64_t{in_.query_heads} * d;
    for (uint32_t s = 0; s < steps; ++s) {
      KVTIER_ASSIGN_OR_RETURN(
          auto o,
          AttentionOracle::Create(oc, std::span<const float>(queries_.data() + s * qf, qf)));
      oracles->push_back(std::move(o));
    }
    const uint32_t threads =
        std::clamp<uint32_t>(std::thread::hardware_concurrency(), 1, std::max(1u, steps));
    const NpyDType dtype = in_.keys->header().dtype;
    std::vector<Status> statuses(threads);
    std::vector<std::thread> pool;
    for (uint32_t t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        constexpr uint64_t kChunkTokens = 1024;
        const uint64_t per_token = uint64_t{hkv} * d;
        std::vector<float> k(kChunkTokens * per_token), v(kChunkTokens * per_token);
        for (uint64_t first = 0; first < in_.tokens && statuses[t].ok(); first += kChunkTokens) {
          const uint64_t n = std::min(kChunkTokens, in_.tokens - first);
          ToFloat(k_raw_, dtype, first * per_token, n * per_token, k.data());
          ToFloat(v_raw_, dtype, first * per_token, n * per_token, v.data());
          for (uint32_t s = t; s < steps; s += threads) {
            statuses[t] =
                (*oracles)[s]->AddTokens({k.data(), n * per_token}, {v.data(), n * per_token}, n);
            if (!statuses[t].ok()) break;
          }
        }
      });
    }
    for (std::thread& th : pool) th.join();
    for (const Status& s : statuses) KVTIER_RETURN_IF_ERROR(s.WithContext("oracle"));
    return Status::OK();
  }

  const Inputs& in_;
  Store& store_;
  const ModelLayout layout_;
  std::vector<uint8_t> k_raw_, v_raw_;
  std::vector<float> queries_;  // [steps][query_heads][head_dim]
  double ingest_seconds_ = 0, oracle_seconds_ = 0;
};

void PrintJson(const EvalConfig& config, const Inputs& in, const ModelLayout& layout,
               const SelectInfo& budget, const std::vector<LayerResult>& layers, double ingest_s,
               double oracle_s, double wall_s) {
  const RetrievalOptions& r = config.retrieval;
  LayerResult all;
  for (const LayerResult& l : layers)
    all.steps.insert(all.steps.end(), l.steps.begin(), l.steps.end());
  const std::vector<double> min_heads = all.Of(&StepResult::coverage_min_head);
  JsonWriter w;
  w.BeginObject();
  w.Key("tokens"), w.Uint(in.tokens);
  w.Key("layers"), w.Uint(in.layers);
  w.Key("steps"), w.Uint(in.steps);
  w.Key("kv_heads"), w.Uint(in.kv_heads);
  w.Key("query_heads"), w.Uint(in.query_heads);
  w.Key("head_dim"), w.Uint(in.head_dim);
  w.Key("block_tokens"), w.Uint(layout.block_tokens);
  w.Key("blocks"), w.Uint((in.tokens + layout.block_tokens - 1) / layout.block_tokens);
  w.Key("dtype"), w.String(DTypeName(layout.dtype));
  w.Key("summary"), w.String(SummaryKindName(r.summary));
  w.Key("backend"), w.String(IndexBackendName(r.backend));
  w.Key("scope"), w.String(SelectionScopeName(r.scope));
  w.Key("top_k"), w.Uint(r.top_k);
  w.Key("n_init"), w.Uint(r.n_init);
  w.Key("n_local"), w.Uint(r.n_local);
  w.Key("sink_blocks"), w.Uint(budget.sink_blocks);
  w.Key("local_begin"), w.Uint(budget.local_begin);
  w.Key("recall"), w.Number(all.Mean(&StepResult::recall));
  w.Key("coverage"), w.Number(all.Mean(&StepResult::coverage));
  w.Key("coverage_min_head"),
      w.Number(min_heads.empty() ? 0.0 : *std::min_element(min_heads.begin(), min_heads.end()));
  w.Key("output_rel_l2"), w.Number(all.Mean(&StepResult::output_rel_l2));
  w.Key("select_us_median"), w.Number(Median(all.Of(&StepResult::select_us)));
  w.Key("select_us_mean"), w.Number(all.Mean(&StepResult::select_us));
  w.Key("ingest_s"), w.Number(ingest_s);
  w.Key("oracle_s"), w.Number(oracle_s);
  w.Key("wall_s"), w.Number(wall_s);
  w.Key("per_layer");
  w.BeginArray();
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerResult& lr = layers[l];
    w.BeginObject();
    w.Key("layer"), w.Uint(l);
    w.Key("recall"), w.Number(lr.Mean(&StepResult::recall));
    w.Key("coverage"), w.Number(lr.Mean(&StepResult::coverage));
    w.Key("output_rel_l2"), w.Number(lr.Mean(&StepResult::output_rel_l2));
    w.Key("select_us_median"), w.Number(Median(lr.Of(&StepResult::select_us)));
    w.Key("recall_steps"), w.NumberArray(lr.Of(&StepResult::recall));
    w.Key("coverage_steps"), w.NumberArray(lr.Of(&StepResult::coverage));
    w.Key("output_rel_l2_steps"), w.NumberArray(lr.Of(&StepResult::output_rel_l2));
    w.Key("select_us_steps"), w.NumberArray(lr.Of(&StepResult::select_us));
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  std::printf("%s\n", w.str().c_str());
}

void PrintTable(const EvalConfig& config, const Inputs& in, const ModelLayout& layout,
                const SelectInfo& budget, const std::vector<LayerResult>& layers, double ingest_s,
                double oracle_s, double wall_s) {
  const RetrievalOptions& r = config.retrieval;
  const uint64_t blocks = (in.tokens + layout.block_tokens - 1) / layout.block_tokens;
  std::printf("kvtier eval: %s, %llu tokens (%llu blocks), %u steps\n", layout.ToString().c_str(),
              (unsigned long long)in.tokens, (unsigned long long)blocks, in.steps);
  std::printf(
      "  retrieval: summary %s, backend %s, scope %s, top-%u of blocks [%llu, %llu) "
      "(sinks [0, %llu) and window [%llu, %llu) always attended)\n\n",
      std::string(SummaryKindName(r.summary)).c_str(),
      std::string(IndexBackendName(r.backend)).c_str(), SelectionScopeName(r.scope), r.top_k,
      (unsigned long long)budget.sink_blocks, (unsigned long long)budget.local_begin,
      (unsigned long long)budget.sink_blocks, (unsigned long long)budget.local_begin,
      (unsigned long long)budget.local_end);
  std::printf("  %-6s %8s %9s %12s %12s\n", "layer", "recall", "coverage", "out_rel_l2",
              "select_us");
  LayerResult all;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerResult& lr = layers[l];
    std::printf("  %-6zu %8.4f %9.4f %12.4g %12.1f\n", l, lr.Mean(&StepResult::recall),
                lr.Mean(&StepResult::coverage), lr.Mean(&StepResult::output_rel_l2),
                Median(lr.Of(&StepResult::select_us)));
    all.steps.insert(all.steps.end(), lr.steps.begin(), lr.steps.end());
  }
  std::printf("  %-6s %8.4f %9.4f %12.4g %12.1f\n", "all", all.Mean(&StepResult::recall),
              all.Mean(&StepResult::coverage), all.Mean(&StepResult::output_rel_l2),
              Median(all.Of(&StepResult::select_us)));
  std::printf(
      "\n  means over steps; select_us: median Store::Select time. recall@%u against the "
      "oracle's top-%u blocks\n  by attention mass; coverage: share of the attention the "
      "sparse step sees; out_rel_l2: its output's\n  relative L2 error against full "
      "attention (bench/workload/oracle.h).\n",
      r.top_k, r.top_k);
  std::printf("  time: ingest %.2f s, oracle %.2f s, total %.2f s\n", ingest_s, oracle_s, wall_s);
}

int RunEval(const EvalConfig& config) {
  const auto start = std::chrono::steady_clock::now();
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "kvtier eval: %s\n", s.ToString().c_str());
    return 2;
  };
  Result<Inputs> opened = OpenInputs(config);
  if (!opened.ok()) return fail(opened.status());
  const Inputs& in = *opened;

  ModelLayout layout{in.layers,   in.kv_heads, in.query_heads,
                     in.head_dim, in.dtype,    config.block_tokens};
  if (Status s = layout.Validate(); !s.ok()) return fail(s);
  // One layer at a time in a memory-only store: room for its blocks, and some.
  const uint64_t blocks = (in.tokens + layout.block_tokens - 1) / layout.block_tokens;
  const uint64_t slot_bytes = (layout.BytesPerBlock() + 4095) / 4096 * 4096;
  StoreOptions options;
  options.host_capacity_bytes = (blocks + 16) * slot_bytes;
  options.host_memory = HostMemoryKind::kPlain;
  options.retrieval = config.retrieval;
  options.retrieval.enabled = true;
  auto store = Store::Open(options, layout);
  if (!store.ok()) return fail(store.status().WithContext("opening the store"));

  const uint64_t select_size = config.retrieval.scope == SelectionScope::kPerKvHead
                                   ? uint64_t{in.kv_heads} * config.retrieval.top_k
                                   : config.retrieval.top_k;
  std::vector<int32_t> selection(uint64_t{in.layers} * in.steps * select_size, -1);
  std::vector<LayerResult> results(in.layers);
  LayerEvaluator evaluator(in, **store);
  for (uint32_t l = 0; l < in.layers; ++l) {
    std::span<int32_t> out(selection.data() + uint64_t{l} * in.steps * select_size,
                           uint64_t{in.steps} * select_size);
    if (Status s = evaluator.Run(l, &results[l], out); !s.ok()) {
      return fail(s.WithContext("layer " + std::to_string(l)));
    }
  }
  // The budget of every step (the context does not change): what Select reports for an
  // empty sequence.
  SelectInfo budget;
  {
    std::vector<float> q(uint64_t{in.query_heads} * in.head_dim, 0.0f);
    std::vector<int64_t> sel(select_size);
    Result<SelectInfo> info = (*store)->Select(0, SequenceId::FromU64(0), 0, q, in.tokens, sel);
    if (!info.ok()) return fail(info.status());
    budget = *info;
  }
  if (!config.selection_out.empty()) {
    std::vector<uint64_t> shape{in.layers, in.steps};
    if (config.retrieval.scope == SelectionScope::kPerKvHead) shape.push_back(in.kv_heads);
    shape.push_back(config.retrieval.top_k);
    Status s = bench::WriteNpy(
        config.selection_out, NpyDType::kInt32, shape,
        {reinterpret_cast<const uint8_t*>(selection.data()), selection.size() * sizeof(int32_t)});
    if (!s.ok()) return fail(s.WithContext("--selection-out"));
  }
  const double wall_s = SecondsSince(start);
  if (config.json) {
    PrintJson(config, in, layout, budget, results, evaluator.ingest_seconds(),
              evaluator.oracle_seconds(), wall_s);
  } else {
    PrintTable(config, in, layout, budget, results, evaluator.ingest_seconds(),
               evaluator.oracle_seconds(), wall_s);
  }
  return 0;
}

}  // namespace

void AddEvalCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<EvalConfig>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Judge the store's block retrieval on a KV cache and queries given as .npy files");
  cmd->footer(
      "Inputs: K and V float16/float32 [layers, tokens, kv_heads, head_dim] (post-rotary), "
      "Q [layers, steps, query_heads, head_dim].\nMetrics against exact attention: recall@k, "
      "coverage, output rel L2. The oracle costs about 2 ns per token x query head x head_dim "
      "x step.\nExample: kvtier eval --keys K.npy --values V.npy --queries Q.npy --n-local 1024 "
      "--json\n");
  cmd->add_option("--keys", config->keys_path, "Keys .npy [layers, tokens, kv_heads, head_dim]")
      ->required();
  cmd->add_option("--values", config->values_path, "Values .npy, the shape of the keys")
      ->required();
  cmd->add_option("--queries", config->queries_path,
                  "Queries .npy [layers, steps, query_heads, head_dim]")
      ->required();
  cmd->add_option("--block-tokens", config->block_tokens, "Tokens per block")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  AddRetrievalFlags(cmd, &config->retrieval);
  cmd->add_option("--selection-out", config->selection_out,
                  "Write the selections: int32 [layers, steps, topk] ([layers, steps, kv_heads, "
                  "topk] for --scope kv-head), -1 padded");
  cmd->add_flag("--json", config->json, "Print one JSON object instead of the table");
  cmd->callback([config, exit_code] { *exit_code = RunEval(*config); });
}

}  // namespace kvtier::tools
