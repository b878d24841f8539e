// `kvtier explain DIR --sequence S --layer L --queries Q.npy [--step I]`: why the
// retrieval picked what it picked, for one decoding step of one layer.
//
// Read-only (tools/store_reader.h): it works while kvtierd or an embedded Store has the
// store open, on the catalog as of the moment it opens. From the catalog it takes the
// layer's blocks and their stored summaries (the kind and rows are read from the
// summaries themselves, so --summary/--clusters do not apply), and rebuilds the index
// with the store's own code (RetrievalIndexes, as Store::Open does), so the selection is
// the one Store::Select returns for these queries and flags. Then:
//   - the estimate: every indexed block scored by the index's estimator over all blocks
//     (index/layer_index.h: F(b), an estimate of sum over query heads of the block's
//     attention mass; est_share = F / query heads), ranked;
//   - the truth: each block's attention mass computed from its stored keys, exactly
//     (bench/workload/oracle.h; true_share sums to 1 over the blocks), ranked, and the
//     oracle's top-k among the candidates;
//   - the step's budget: the sinks and the local window (attended whatever the scores),
//     recall@k and coverage of the selection.
// Q.npy: float16/float32 [layers, steps, query_heads, head_dim] (the queries `kvtier
// eval` reads: row [L][I] is used), [steps, query_heads, head_dim] or [query_heads,
// head_dim]. --context-tokens defaults to the stored tokens (the last block's valid
// tokens from its summary).
//
// Exit status: 0 explained; 1 the store is damaged (a block of the layer missing between
// others, a block failing its checksum, a summary that does not decode); 2 usage or I/O.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "bench/workload/npy.h"
#include "bench/workload/oracle.h"
#include "index/layer_index.h"
#include "index/summary.h"
#include "src/core/store_retrieval.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/store_reader.h"
#include "tools/tensor_commands.h"
#include "tools/tool_util.h"

namespace kvtier::tools {
namespace {

struct ExplainConfig {
  std::string dir;
  std::string sequence_text;
  uint32_t namespace_id = 0;
  uint32_t layer = 0;
  std::string queries_path;
  uint32_t step = 0;
  uint64_t context_tokens = 0;  // 0: the stored tokens
  RetrievalOptions retrieval;
  uint32_t rows = 24;
  bool json = false;
};

enum class Role { kSink, kWindow, kCandidate };
const char* RoleName(Role r) {
  return r == Role::kSink ? "sink" : r == Role::kWindow ? "window" : "candidate";
}

struct BlockRow {
  uint64_t block = 0;
  Role role = Role::kCandidate;
  bool indexed = false;
  double est_score = 0;            // F(b)
  int64_t est_rank = -1;           // 1-based among indexed blocks; -1 when not indexed
  double true_share = 0;           // mass(b) / query heads
  int64_t true_rank = 0;           // 1-based among all blocks
  int64_t selected_at = -1;        // position in the selection (0 = best), -1 when not selected
  std::vector<uint32_t> kv_heads;  // kPerKvHead: the KV heads that selected it
  float select_score = 0;          // the Select's own score (kPerLayer; best over heads)
  bool oracle_topk = false;
};

struct Explained {
  ModelLayout layout;
  bool locked = false;
  SummaryKind summary = SummaryKind::kClusters;
  uint32_t summary_rows = 0;
  uint64_t blocks = 0, tokens = 0, context_tokens = 0;
  SelectInfo budget;
  std::vector<int64_t> selected;  // as Select wrote it
  std::vector<BlockRow> rows;     // by block index
  std::vector<uint64_t> oracle_topk;
  double recall = 0, coverage = 0, coverage_min_head = 0;
};

// The query rows of the step, float [query_heads][head_dim].
Result<std::vector<float>> LoadQueries(const ExplainConfig& c, const ModelLayout& l) {
  Result<bench::NpyArray> read = bench::ReadNpy(c.queries_path);
  if (!read.ok()) return read.status().WithContext("--queries");
  const bench::NpyArray& q = *read;
  const std::vector<uint64_t>& s = q.shape;
  const uint64_t per_step = uint64_t{l.num_query_heads} * l.head_dim;
  auto shape = [&] {
    std::string t = "[";
    for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + "]";
  };
  if (q.dtype != bench::NpyDType::kFloat16 && q.dtype != bench::NpyDType::kFloat32) {
    return Status::InvalidArgument("--queries " + c.queries_path + ": expected float16 or float32");
  }
  if (s.size() < 2 || s.size() > 4 || s[s.size() - 1] != l.head_dim ||
      s[s.size() - 2] != l.num_query_heads) {
    return Status::InvalidArgument("--queries " + c.queries_path + ": shape " + shape() +
                                   " does not end in [" + std::to_string(l.num_query_heads) +
                                   " query heads, " + std::to_string(l.head_dim) +
                                   " head_dim] of the store's layout (" + l.ToString() + ")");
  }
  uint64_t row = 0;
  if (s.size() == 4) {
    if (c.layer >= s[0]) {
      return Status::InvalidArgument(
          "--queries " + shape() + " [layers, steps, ...] has no layer " + std::to_string(c.layer));
    }
    if (c.step >= s[1]) {
      return Status::InvalidArgument("--step " + std::to_string(c.step) + " outside the " +
                                     std::to_string(s[1]) + " steps of --queries");
    }
    row = uint64_t{c.layer} * s[1] + c.step;
  } else if (s.size() == 3) {
    if (c.step >= s[0]) {
      return Status::InvalidArgument("--step " + std::to_string(c.step) + " outside the " +
                                     std::to_string(s[0]) + " steps of --queries");
    }
    row = c.step;
  } else if (c.step != 0) {
    return Status::InvalidArgument("--queries holds one step; --step must be 0");
  }
  const std::vector<float> all = bench::NpyToFloat(q);
  std::vector<float> out(all.begin() + row * per_step, all.begin() + (row + 1) * per_step);
  for (float v : out) {
    if (!std::isfinite(v)) return Status::InvalidArgument("--queries holds NaN or infinity");
  }
  return out;
}

Status Explain(const ExplainConfig& c, Explained* e) {
  KVTIER_ASSIGN_OR_RETURN(SequenceId sequence, ParseSequenceArg(c.sequence_text));
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<StoreReader> reader, StoreReader::Open(c.dir));
  e->layout = reader->layout();
  e->locked = reader->locked();
  const ModelLayout& l = e->layout;
  if (c.layer >= l.num_layers) {
    return Status::InvalidArgument("--layer " + std::to_string(c.layer) + " outside the store's " +
                                   std::to_string(l.num_layers) + " layers");
  }
  KVTIER_ASSIGN_OR_RETURN(std::vector<float> queries, LoadQueries(c, l));

  // The layer's blocks, in order, without a gap.
  std::vector<BlockEntry> entries;
  KVTIER_RETURN_IF_ERROR(reader->ForEachBlockOfSequence(
      c.namespace_id, sequence, [&](const BlockKey& key, const DiskLocation& loc) {
        if (key.layer == c.layer) entries.push_back({key, loc});
        return true;
      }));
  if (entries.empty()) {
    return Status::NotFound("sequence " + c.sequence_text + " (namespace " +
                            std::to_string(c.namespace_id) + ") has no block in layer " +
                            std::to_string(c.layer) + " of " + c.dir);
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].key.block != i) {
      return Status::Corruption("block " + std::to_string(i) + " of layer " +
                                std::to_string(c.layer) + " is missing (block " +
                                std::to_string(entries[i].key.block) + " follows)");
    }
  }
  const uint64_t n = entries.size();
  e->blocks = n;

  // The stored summaries, decoded with the shape they were written with.
  std::vector<std::optional<std::vector<std::byte>>> stored(n);
  bool have_shape = false;
  RetrievalOptions r = c.retrieval;
  for (uint64_t b = 0; b < n; ++b) {
    KVTIER_ASSIGN_OR_RETURN(stored[b], reader->catalog().GetRepresentatives(entries[b].key));
    if (stored[b].has_value() && !have_shape) {
      uint32_t rows = 0;
      KVTIER_RETURN_IF_ERROR(
          PeekStoredSummary(*stored[b], &r.summary, &rows).WithContext(entries[b].key.ToString()));
      r.clusters = r.top_r = rows;
      have_shape = true;
    }
  }
  if (!have_shape) {
    return Status::FailedPrecondition("layer " + std::to_string(c.layer) +
                                      " has no block summary (stored without retrieval): "
                                      "nothing to explain");
  }
  e->summary = r.summary;
  r.enabled = true;
  r.device_capacity_bytes = 0;
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<RetrievalIndexes> indexes,
                          RetrievalIndexes::Create(l, r));
  const SummaryShape shape = indexes->shape();
  e->summary_rows = shape.rows;
  IndexConfig rank_config = indexes->config();
  if (rank_config.backend == IndexBackend::kFaissHnsw) rank_config.backend = IndexBackend::kScan;
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndex> ranking, CreateLayerIndex(rank_config));
  e->rows.resize(n);
  uint32_t last_valid = l.block_tokens;
  for (uint64_t b = 0; b < n; ++b) {
    e->rows[b].block = b;
    if (!stored[b].has_value()) continue;
    BlockSummary s;
    KVTIER_RETURN_IF_ERROR(DecodeSummary(shape, *stored[b], &s)
                               .WithContext("summary of " + entries[b].key.ToString()));
    if (b + 1 == n) last_valid = s.valid_tokens;
    KVTIER_RETURN_IF_ERROR(ranking->Add(b, s));
    indexes->QueueAdd(entries[b].key, std::move(s));
    e->rows[b].indexed = true;
  }
  e->tokens = (n - 1) * l.block_tokens + std::clamp<uint32_t>(last_valid, 1, l.block_tokens);
  e->context_tokens = c.context_tokens ? c.context_tokens : e->tokens;
  if (e->context_tokens > n * l.block_tokens) {
    return Status::InvalidArgument("--context-tokens " + std::to_string(c.context_tokens) +
                                   " passes the " + std::to_string(n * l.block_tokens) +
                                   " tokens of the stored blocks");
  }

  // The selection, as Store::Select makes it.
  const uint64_t select_size =
      r.scope == SelectionScope::kPerKvHead ? uint64_t{l.num_kv_heads} * r.top_k : r.top_k;
  e->selected.assign(select_size, -1);
  std::vector<float> select_scores(select_size);
  KVTIER_ASSIGN_OR_RETURN(
      e->budget, indexes->Select(c.namespace_id, sequence, c.layer, queries, e->context_tokens,
                                 e->selected, select_scores, {}));
  for (size_t i = 0; i < e->selected.size(); ++i) {
    const int64_t b = e->selected[i];
    if (b < 0 || uint64_t(b) >= n) continue;
    BlockRow& row = e->rows[b];
    const uint32_t kv = r.scope == SelectionScope::kPerKvHead ? uint32_t(i / r.top_k) : 0;
    const int64_t at = r.scope == SelectionScope::kPerKvHead ? int64_t(i % r.top_k) : int64_t(i);
    if (row.selected_at < 0 || at < row.selected_at) row.selected_at = at;
    row.select_score = std::max(row.select_score, select_scores[i]);
    if (r.scope == SelectionScope::kPerKvHead) row.kv_heads.push_back(kv);
  }

  // The estimator over every indexed block, ranked.
  const uint64_t indexed = ranking->size();
  std::vector<int64_t> order(indexed);
  std::vector<float> order_scores(indexed);
  const SelectParams all{.queries = queries,
                         .top_k = static_cast<uint32_t>(indexed),
                         .scope = SelectionScope::kPerLayer,
                         .candidates_begin = 0,
                         .candidates_end = UINT64_MAX};
  KVTIER_RETURN_IF_ERROR(ranking->Select(all, order, order_scores).WithContext("ranking"));
  for (uint64_t i = 0; i < indexed; ++i) {
    if (order[i] < 0) continue;
    e->rows[order[i]].est_rank = int64_t(i) + 1;
    e->rows[order[i]].est_score = order_scores[i];
  }

  // The truth, from the stored keys of the context's tokens.
  bench::OracleConfig oc{.num_query_heads = l.num_query_heads,
                         .num_kv_heads = l.num_kv_heads,
                         .head_dim = l.head_dim,
                         .block_tokens = l.block_tokens,
                         .keep_outputs = false};
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<bench::AttentionOracle> oracle,
                          bench::AttentionOracle::Create(oc, queries));
  std::vector<std::byte> block(reader->block_bytes());
  const uint64_t context_blocks = (e->context_tokens + l.block_tokens - 1) / l.block_tokens;
  for (uint64_t b = 0; b < context_blocks; ++b) {
    KVTIER_RETURN_IF_ERROR(reader->ReadBlock(entries[b].key, entries[b].location, block));
    const uint32_t valid = static_cast<uint32_t>(
        std::min<uint64_t>(l.block_tokens, e->context_tokens - b * l.block_tokens));
    KVTIER_RETURN_IF_ERROR(oracle->AddBlock(block.data(), l.dtype, valid));
  }
  const std::vector<double> mass = oracle->BlockMasses();
  std::vector<uint64_t> by_mass(mass.size());
  std::iota(by_mass.begin(), by_mass.end(), 0);
  std::stable_sort(by_mass.begin(), by_mass.end(),
                   [&](uint64_t a, uint64_t b) { return mass[a] > mass[b]; });
  for (uint64_t i = 0; i < by_mass.size(); ++i) {
    e->rows[by_mass[i]].true_rank = int64_t(i) + 1;
    e->rows[by_mass[i]].true_share = mass[by_mass[i]] / l.num_query_heads;
  }
  const bench::SparsePolicy policy{r.n_init, r.n_local, r.top_k};
  e->oracle_topk = oracle->OracleTopK(policy);
  for (uint64_t b : e->oracle_topk) e->rows[b].oracle_topk = true;
  std::vector<uint64_t> attended;
  for (int64_t b : e->selected) {
    if (b >= 0 && uint64_t(b) < context_blocks) attended.push_back(uint64_t(b));
  }
  std::sort(attended.begin(), attended.end());
  attended.erase(std::unique(attended.begin(), attended.end()), attended.end());
  KVTIER_ASSIGN_OR_RETURN(bench::SelectionMetrics m, oracle->Evaluate(policy, attended));
  e->recall = m.recall;
  e->coverage = m.coverage;
  e->coverage_min_head = m.coverage_min_head;
  for (BlockRow& row : e->rows) {
    row.role = row.block < e->budget.sink_blocks    ? Role::kSink
               : row.block >= e->budget.local_begin ? Role::kWindow
                                                    : Role::kCandidate;
  }
  // Blocks past the context (--context-tokens) take no part: no truth for them.
  e->rows.resize(context_blocks);
  return Status::OK();
}

void PrintJson(const ExplainConfig& c, const Explained& e) {
  const RetrievalOptions& r = c.retrieval;
  JsonWriter w;
  w.BeginObject();
  w.Key("ok"), w.Bool(true);
  w.Key("dir"), w.String(c.dir);
  w.Key("store_locked"), w.Bool(e.locked);
  w.Key("layout"), w.String(e.layout.ToString());
  w.Key("sequence"), w.String(c.sequence_text);
  w.Key("namespace"), w.Uint(c.namespace_id);
  w.Key("layer"), w.Uint(c.layer);
  w.Key("step"), w.Uint(c.step);
  w.Key("blocks"), w.Uint(e.blocks);
  w.Key("tokens"), w.Uint(e.tokens);
  w.Key("context_tokens"), w.Uint(e.context_tokens);
  w.Key("summary"), w.String(SummaryKindName(e.summary));
  w.Key("summary_rows"), w.Uint(e.summary_rows);
  w.Key("backend"), w.String(IndexBackendName(r.backend));
  w.Key("scope"), w.String(SelectionScopeName(r.scope));
  w.Key("top_k"), w.Uint(r.top_k);
  w.Key("n_init"), w.Uint(r.n_init);
  w.Key("n_local"), w.Uint(r.n_local);
  w.Key("sink_blocks"), w.Uint(e.budget.sink_blocks);
  w.Key("local_begin"), w.Uint(e.budget.local_begin);
  w.Key("local_end"), w.Uint(e.budget.local_end);
  w.Key("selected"), w.BeginArray();
  for (int64_t b : e.selected) w.Int(b);
  w.EndArray();
  w.Key("oracle_topk"), w.BeginArray();
  for (uint64_t b : e.oracle_topk) w.Uint(b);
  w.EndArray();
  w.Key("recall"), w.Number(e.recall);
  w.Key("coverage"), w.Number(e.coverage);
  w.Key("coverage_min_head"), w.Number(e.coverage_min_head);
  w.Key("per_block"), w.BeginArray();
  for (const BlockRow& row : e.rows) {
    w.BeginObject();
    w.Key("block"), w.Uint(row.block);
    w.Key("role"), w.String(RoleName(row.role));
    w.Key("indexed"), w.Bool(row.indexed);
    w.Key("est_score"), w.Number(row.est_score);
    w.Key("est_share"), w.Number(row.est_score / e.layout.num_query_heads);
    w.Key("est_rank"), w.Int(row.est_rank);
    w.Key("true_share"), w.Number(row.true_share);
    w.Key("true_rank"), w.Int(row.true_rank);
    w.Key("selected"), w.Bool(row.selected_at >= 0);
    w.Key("selected_at"), w.Int(row.selected_at);
    w.Key("select_score"), w.Number(row.select_score);
    w.Key("kv_heads"), w.NumberArray(row.kv_heads);
    w.Key("oracle_topk"), w.Bool(row.oracle_topk);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  std::printf("%s\n", w.str().c_str());
}

void PrintTable(const ExplainConfig& c, const Explained& e) {
  const RetrievalOptions& r = c.retrieval;
  const ModelLayout& l = e.layout;
  std::printf("kvtier explain: %s, sequence %s, layer %u, step %u%s\n", c.dir.c_str(),
              c.sequence_text.c_str(), c.layer, c.step,
              e.locked ? " (store open in another process: catalog as of now)" : "");
  std::printf("  %s; %llu blocks, context %llu tokens\n", l.ToString().c_str(),
              static_cast<unsigned long long>(e.blocks),
              static_cast<unsigned long long>(e.context_tokens));
  std::printf(
      "  index: summary %s (%u rows per KV head), backend %s, scope %s; budget: sinks [0, %llu), "
      "window [%llu, %llu), top-%u of the candidates between\n\n",
      std::string(SummaryKindName(e.summary)).c_str(), e.summary_rows,
      std::string(IndexBackendName(r.backend)).c_str(), SelectionScopeName(r.scope),
      static_cast<unsigned long long>(e.budget.sink_blocks),
      static_cast<unsigned long long>(e.budget.local_begin),
      static_cast<unsigned long long>(e.budget.local_end), r.top_k);
  std::vector<const BlockRow*> shown;
  for (const BlockRow& row : e.rows) {
    if (row.est_rank > 0 && row.est_rank <= int64_t(c.rows)) shown.push_back(&row);
  }
  for (const BlockRow& row : e.rows) {  // the oracle's picks and the selection, always
    if ((row.oracle_topk || row.selected_at >= 0) &&
        !(row.est_rank > 0 && row.est_rank <= int64_t(c.rows))) {
      shown.push_back(&row);
    }
  }
  std::stable_sort(shown.begin(), shown.end(), [](const BlockRow* a, const BlockRow* b) {
    const int64_t ra = a->est_rank < 0 ? INT64_MAX : a->est_rank;
    const int64_t rb = b->est_rank < 0 ? INT64_MAX : b->est_rank;
    return ra < rb;
  });
  std::printf("  %8s %7s %-9s %10s %10s %9s %9s  %s\n", "est_rank", "block", "role", "est_share",
              "true_share", "true_rank", "selected", "oracle_top_k");
  for (const BlockRow* row : shown) {
    char sel[32] = "-";
    if (row->selected_at >= 0)
      std::snprintf(sel, sizeof(sel), "#%lld", (long long)row->selected_at + 1);
    std::printf("  %8lld %7llu %-9s %10.4f %10.4f %9lld %9s  %s\n", (long long)row->est_rank,
                static_cast<unsigned long long>(row->block), RoleName(row->role),
                row->est_score / l.num_query_heads, row->true_share, (long long)row->true_rank, sel,
                row->oracle_topk ? "yes" : "");
  }
  double sink_share = 0, window_share = 0, selected_share = 0;
  uint64_t missed = 0;
  for (const BlockRow& row : e.rows) {
    if (row.role == Role::kSink) sink_share += row.true_share;
    if (row.role == Role::kWindow) window_share += row.true_share;
    if (row.role == Role::kCandidate && row.selected_at >= 0) selected_share += row.true_share;
    if (row.oracle_topk && row.selected_at < 0) ++missed;
  }
  std::printf(
      "\n  true attention: sinks %.4f, window %.4f, selected %.4f (coverage %.4f, lowest head "
      "%.4f)\n",
      sink_share, window_share, selected_share, e.coverage, e.coverage_min_head);
  std::printf("  recall@%u %.4f: %llu of the oracle's top-%zu not selected\n", r.top_k, e.recall,
              static_cast<unsigned long long>(missed), e.oracle_topk.size());
  std::printf(
      "  est_share: the index's estimate of the block's share of attention (summed over query "
      "heads / heads);\n  true_share: the same from the stored keys, exactly. Rows: the top %u by "
      "estimate, then any other\n  selected or oracle top-k block.\n",
      c.rows);
}

int RunExplain(const ExplainConfig& c) {
  Explained e;
  if (Status s = Explain(c, &e); !s.ok()) return ReportInspectError("explain", s, c.json);
  if (c.json) {
    PrintJson(c, e);
  } else {
    PrintTable(c, e);
  }
  return 0;
}

}  // namespace

Status PeekStoredSummary(std::span<const std::byte> bytes, SummaryKind* kind, uint32_t* rows) {
  if (bytes.size() < 4) return Status::Corruption("a stored summary is truncated");
  const uint8_t k = static_cast<uint8_t>(bytes[1]);
  uint16_t r = 0;
  std::memcpy(&r, bytes.data() + 2, 2);
  if (k > static_cast<uint8_t>(SummaryKind::kTopR) || r == 0 || r > kMaxSummaryRows) {
    return Status::Corruption("a stored summary has an unknown kind or row count");
  }
  *kind = static_cast<SummaryKind>(k);
  *rows = r;
  return Status::OK();
}

void AddExplainCommand(CLI::App& app, int* exit_code) {
  auto c = std::make_shared<ExplainConfig>();
  CLI::App* cmd = app.add_subcommand(
      "explain",
      "One decoding step of one layer: the index's ranking, the selection, and each block's "
      "true attention");
  cmd->footer(
      "Read-only: works while the store is open elsewhere. Q.npy: [layers, steps, query_heads, "
      "head_dim] (as\n`kvtier eval` reads), [steps, query_heads, head_dim] or [query_heads, "
      "head_dim]. The retrieval flags\nmust be those of the engine (the summary kind is read "
      "from the store). Exit status: 0 explained,\n1 damaged store, 2 usage or I/O error.\n"
      "Example: kvtier explain /nvme/kv --sequence 7 --layer 12 --queries Q.npy --step 3 "
      "--n-local 1024\n");
  cmd->add_option("dir", c->dir, "Store directory")->required();
  cmd->add_option("--sequence", c->sequence_text, "Sequence id: decimal, or 32 hex digits")
      ->required();
  cmd->add_option("--namespace", c->namespace_id, "Namespace")->capture_default_str();
  cmd->add_option("--layer", c->layer, "Layer")->required();
  cmd->add_option("--queries", c->queries_path, "Queries .npy")->required();
  cmd->add_option("--step", c->step, "Decoding step (row of --queries)")->capture_default_str();
  cmd->add_option("--context-tokens", c->context_tokens,
                  "Context length (default: the stored tokens)");
  cmd->add_option("--rows", c->rows, "Blocks listed by estimate (text output)")
      ->capture_default_str();
  AddRetrievalFlags(cmd, &c->retrieval);
  cmd->add_flag("--json", c->json, "Print one JSON object (every block)");
  cmd->callback([c, exit_code] { *exit_code = RunExplain(*c); });
}

}  // namespace kvtier::tools
