// `kvtier import`, `explain`, `replay` and `plot` end to end, and `kvtier demo
// --trace-out`: each runs the kvtier binary on stores and files the test makes, and
// checks the exit status and the JSON (parsed here, field by field): import's blocks
// against the arrays (read back with Store::Get), import -> export byte-exact,
// explain's selection against Store::Select and its true shares against the oracle,
// replay's LRU hit counts against ones worked out by hand, plot's PNG files; and the
// refusals: a store open elsewhere, a damaged store, malformed inputs.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "bench/workload/npy.h"
#include "bench/workload/oracle.h"
#include "bench/workload/workload.h"
#include "kvtier/store.h"
#include "tests/json_reader.h"

#ifndef KVTIER_TOOL
#error "KVTIER_TOOL must name the kvtier binary"
#endif

namespace kvtier {
namespace {

using bench::NpyDType;

using testing::Json;
using testing::JsonParser;

// --- The fixture: arrays from the synthetic workload, the tool run as a process ---------

constexpr uint32_t kLayers = 2, kKvHeads = 2, kQueryHeads = 8, kHeadDim = 64, kBlockTokens = 16;
constexpr uint64_t kTokens = 2048;       // 128 blocks per layer
constexpr uint64_t kShortTokens = 1000;  // 63 blocks, the last with 8 tokens
constexpr uint32_t kSteps = 4;
constexpr uint32_t kTopK = 8, kNInit = 64, kNLocal = 256;

struct RunResult {
  int exit_code = -1;
  std::string out, err;
  Json json;
  bool json_ok = false;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class ToolsTensorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/var/tmp/kvtier-tools-tensor-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = new std::string(tmpl);
    bench::WorkloadOptions wo;
    wo.layout = {kLayers, kKvHeads, kQueryHeads, kHeadDim, DType::kF32, kBlockTokens};
    wo.tokens = kTokens;
    wo.steps = kSteps;
    wo.seed = 23;
    wo.needles = 4;
    auto created = bench::Workload::Create(wo);
    ASSERT_TRUE(created.ok()) << created.status().ToString();
    std::unique_ptr<bench::Workload> wl = std::move(created).value();
    const uint64_t kv = kTokens * kKvHeads * kHeadDim, qf = uint64_t{kQueryHeads} * kHeadDim;
    keys_ = new std::vector<float>(kLayers * kv);
    values_ = new std::vector<float>(kLayers * kv);
    queries_ = new std::vector<float>(uint64_t{kLayers} * kSteps * qf);
    for (uint32_t l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(
          wl->KeysAndValues(l, 0, kTokens, {&(*keys_)[l * kv], kv}, {&(*values_)[l * kv], kv})
              .ok());
      for (uint32_t s = 0; s < kSteps; ++s) {
        ASSERT_TRUE(wl->Query(l, s, {&(*queries_)[(uint64_t{l} * kSteps + s) * qf], qf}).ok());
      }
    }
    const std::vector<uint64_t> shape{kLayers, kTokens, kKvHeads, kHeadDim};
    ASSERT_TRUE(bench::WriteNpyFromFloat(Path("K.npy"), NpyDType::kFloat32, shape, *keys_).ok());
    ASSERT_TRUE(bench::WriteNpyFromFloat(Path("V.npy"), NpyDType::kFloat32, shape, *values_).ok());
    ASSERT_TRUE(bench::WriteNpyFromFloat(Path("K16.npy"), NpyDType::kFloat16, shape, *keys_).ok());
    ASSERT_TRUE(
        bench::WriteNpyFromFloat(Path("V16.npy"), NpyDType::kFloat16, shape, *values_).ok());
    // The first kShortTokens tokens of each layer: a partial last block.
    std::vector<float> ks, vs;
    for (uint32_t l = 0; l < kLayers; ++l) {
      const uint64_t n = kShortTokens * kKvHeads * kHeadDim;
      ks.insert(ks.end(), keys_->begin() + l * kv, keys_->begin() + l * kv + n);
      vs.insert(vs.end(), values_->begin() + l * kv, values_->begin() + l * kv + n);
    }
    const std::vector<uint64_t> short_shape{kLayers, kShortTokens, kKvHeads, kHeadDim};
    ASSERT_TRUE(
        bench::WriteNpyFromFloat(Path("Kshort.npy"), NpyDType::kFloat32, short_shape, ks).ok());
    ASSERT_TRUE(
        bench::WriteNpyFromFloat(Path("Vshort.npy"), NpyDType::kFloat32, short_shape, vs).ok());
    const std::vector<uint64_t> q_shape{kLayers, kSteps, kQueryHeads, kHeadDim};
    ASSERT_TRUE(
        bench::WriteNpyFromFloat(Path("Q.npy"), NpyDType::kFloat32, q_shape, *queries_).ok());
    // The store most tests read: both layers of sequence 7, f32.
    RunResult r = Run("import " + Path("store") + " --sequence 7 --keys " + Path("K.npy") +
                      " --values " + Path("V.npy") + " --block-tokens 16 --query-heads 8 --json");
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    delete keys_;
    delete values_;
    delete queries_;
  }

  static std::string Path(const std::string& name) { return *dir_ + "/" + name; }

  // Runs `kvtier ARGS`, capturing stdout and stderr, and parses stdout as JSON.
  static RunResult Run(const std::string& args) {
    const std::string out = *dir_ + "/stdout", err = *dir_ + "/stderr";
    const std::string cmd = std::string(KVTIER_TOOL) + " " + args + " >" + out + " 2>" + err;
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = ReadFile(out);
    r.err = ReadFile(err);
    r.json_ok = JsonParser(r.out).Parse(&r.json);
    return r;
  }

  static std::string ExplainArgs(const std::string& store, uint32_t layer, uint32_t step) {
    return "explain " + store + " --sequence 7 --layer " + std::to_string(layer) + " --queries " +
           Path("Q.npy") + " --step " + std::to_string(step) + " --topk " + std::to_string(kTopK) +
           " --n-init " + std::to_string(kNInit) + " --n-local " + std::to_string(kNLocal);
  }

  static std::string* dir_;
  static std::vector<float>*keys_, *values_, *queries_;
};

std::string* ToolsTensorTest::dir_ = nullptr;
std::vector<float>* ToolsTensorTest::keys_ = nullptr;
std::vector<float>* ToolsTensorTest::values_ = nullptr;
std::vector<float>* ToolsTensorTest::queries_ = nullptr;

StoreOptions ReopenOptions(const std::string& dir) {
  StoreOptions o;
  o.directory = dir;
  o.host_capacity_bytes = uint64_t{64} << 20;
  o.host_memory = HostMemoryKind::kPlain;
  o.retrieval.enabled = true;
  o.retrieval.top_k = kTopK;
  o.retrieval.n_init = kNInit;
  o.retrieval.n_local = kNLocal;
  return o;
}

const ModelLayout kLayout{kLayers, kKvHeads, kQueryHeads, kHeadDim, DType::kF32, kBlockTokens};

// --- import -----------------------------------------------------------------------------

TEST_F(ToolsTensorTest, ImportCreatesTheStoreAndEveryBlockHoldsTheArrays) {
  const std::string store = Path("import-check");
  RunResult r = Run("import " + store + " --sequence 0x7 --keys " + Path("K.npy") + " --values " +
                    Path("V.npy") + " --block-tokens 16 --query-heads 8 --json");
  // "0x7" is no sequence id: usage error, nothing created.
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_FALSE(std::filesystem::exists(store + "/catalog"));

  r = Run("import " + store + " --sequence 7 --keys " + Path("K.npy") + " --values " +
          Path("V.npy") + " --block-tokens 16 --query-heads 8 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  const Json& j = r.json;
  EXPECT_EQ(j.keys(),
            (std::vector<std::string>{"ok", "dir", "created", "namespace", "sequence", "layout",
                                      "layer_begin", "layer_end", "tokens", "blocks", "bytes",
                                      "input_dtype", "dtype", "summary", "wall_s"}));
  EXPECT_TRUE(j["ok"].boolean);
  EXPECT_EQ(j["dir"].string, store);
  EXPECT_TRUE(j["created"].boolean);
  EXPECT_EQ(j["namespace"].number, 0);
  EXPECT_EQ(j["sequence"].string, SequenceId::FromU64(7).ToHex());
  EXPECT_EQ(j["layout"].string, kLayout.ToString());
  EXPECT_EQ(j["layer_begin"].number, 0);
  EXPECT_EQ(j["layer_end"].number, kLayers);
  EXPECT_EQ(j["tokens"].number, double(kTokens));
  EXPECT_EQ(j["blocks"].number, double(kLayers * kTokens / kBlockTokens));
  EXPECT_EQ(j["bytes"].number, double(kLayers * kTokens / kBlockTokens * kLayout.BytesPerBlock()));
  EXPECT_EQ(j["input_dtype"].string, "f32");
  EXPECT_EQ(j["dtype"].string, "f32");
  EXPECT_EQ(j["summary"].string, "clusters");
  EXPECT_GE(j["wall_s"].number, 0.0);

  // Every block, read back through the store, is the arrays' tokens in kvtier's layout.
  auto opened = Store::Open(ReopenOptions(store), kLayout);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  Store& s = **opened;
  std::vector<float> block(kLayout.BytesPerBlock() / sizeof(float));
  const uint64_t row = kHeadDim, per_token = uint64_t{kKvHeads} * kHeadDim;
  const uint64_t half = block.size() / 2;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (uint32_t b = 0; b < kTokens / kBlockTokens; ++b) {
      ASSERT_TRUE(
          s.Get({0, SequenceId::FromU64(7), l, b}, block.data(), kLayout.BytesPerBlock()).ok());
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        for (uint32_t t = 0; t < kBlockTokens; ++t) {
          const uint64_t src =
              (uint64_t{l} * kTokens + uint64_t{b} * kBlockTokens + t) * per_token +
              uint64_t{h} * row;
          const uint64_t dst = (uint64_t{h} * kBlockTokens + t) * row;
          ASSERT_EQ(std::memcmp(&block[dst], &(*keys_)[src], row * 4), 0) << l << " " << b;
          ASSERT_EQ(std::memcmp(&block[half + dst], &(*values_)[src], row * 4), 0);
        }
      }
    }
  }
  EXPECT_FALSE(s.Contains({0, SequenceId::FromU64(7), 0, kTokens / kBlockTokens}));
}

TEST_F(ToolsTensorTest, ImportRefusesWhatItMustNotOverwrite) {
  const std::string store = Path("import-refuse");
  const std::string arrays = " --keys " + Path("K.npy") + " --values " + Path("V.npy");
  ASSERT_EQ(Run("import " + store + " --sequence 1" + arrays + " --block-tokens 16").exit_code, 0);
  // The sequence is there already.
  RunResult r = Run("import " + store + " --sequence 1" + arrays + " --json");
  EXPECT_EQ(r.exit_code, 2);
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_FALSE(r.json["ok"].boolean);
  EXPECT_NE(r.json["error"]["message"].string.find("--replace"), std::string::npos) << r.out;
  r = Run("import " + store + " --sequence 1" + arrays + " --replace --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(r.json["created"].boolean);
  // Another sequence, f16 arrays into the f32 store: converted.
  r = Run("import " + store + " --sequence 2 --keys " + Path("K16.npy") + " --values " +
          Path("V16.npy") + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json["input_dtype"].string, "f16");
  EXPECT_EQ(r.json["dtype"].string, "f32");
  // Another block size than the store's.
  r = Run("import " + store + " --sequence 3" + arrays + " --block-tokens 32");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("block-tokens 32 differs"), std::string::npos) << r.err;
  // Keys and values of different shapes.
  r = Run("import " + store + " --sequence 4 --keys " + Path("K.npy") + " --values " +
          Path("Vshort.npy"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("one shape and dtype"), std::string::npos) << r.err;
  // A directory that is not a store and not empty.
  const std::string other = Path("not-a-store");
  std::filesystem::create_directories(other);
  std::ofstream(other + "/file") << "x";
  r = Run("import " + other + " --sequence 1" + arrays);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("not a kvtier store and not empty"), std::string::npos) << r.err;
  // A missing array.
  r = Run("import " + store + " --sequence 5 --keys " + Path("absent.npy") + " --values " +
          Path("V.npy"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("absent.npy"), std::string::npos) << r.err;
}

TEST_F(ToolsTensorTest, ImportRefusesAStoreOpenElsewhereAndExplainStillReads) {
  const std::string store = Path("store");
  auto opened = Store::Open(ReopenOptions(store), kLayout);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  RunResult r = Run("import " + store + " --sequence 9 --keys " + Path("K.npy") + " --values " +
                    Path("V.npy") + " --json");
  EXPECT_EQ(r.exit_code, 2);
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_NE(r.json["error"]["message"].string.find("open in another process"), std::string::npos)
      << r.out;
  EXPECT_FALSE((*opened)->Contains({0, SequenceId::FromU64(9), 0, 0}));
  r = Run(ExplainArgs(store, 1, 2) + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_TRUE(r.json["store_locked"].boolean);
}

// A store created with one summary kind keeps it: a later import summarises as the store
// does, so explain can read every block's summary.
TEST_F(ToolsTensorTest, ImportKeepsTheStoresSummaryKind) {
  const std::string store = Path("import-mean");
  const std::string arrays = " --keys " + Path("K.npy") + " --values " + Path("V.npy");
  RunResult r = Run("import " + store + " --sequence 7" + arrays +
                    " --block-tokens 16 --query-heads 8 --summary mean --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json["summary"].string, "mean");
  r = Run("import " + store + " --sequence 8" + arrays + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json["summary"].string, "mean");
  r = Run("explain " + store + " --sequence 8 --layer 1 --queries " + Path("Q.npy") + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json["summary"].string, "mean");
  EXPECT_EQ(r.json["summary_rows"].number, 1);
}

// import -> export gives back the very bytes of the arrays (np.save's form on both sides).
TEST_F(ToolsTensorTest, ImportThenExportIsByteExact) {
  RunResult r = Run("export " + Path("store") + " --sequence 7 --keys " + Path("K-out.npy") +
                    " --values " + Path("V-out.npy"));
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_EQ(ReadFile(Path("K-out.npy")), ReadFile(Path("K.npy")));
  EXPECT_EQ(ReadFile(Path("V-out.npy")), ReadFile(Path("V.npy")));
}

// --- explain ----------------------------------------------------------------------------

TEST_F(ToolsTensorTest, ExplainSelectsWhatSelectSelectsAndMeasuresTheTruth) {
  const std::string store = Path("store");
  const uint64_t blocks = kTokens / kBlockTokens;
  const uint64_t sinks = kNInit / kBlockTokens, local_begin = (kTokens - kNLocal) / kBlockTokens;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    for (uint32_t step : {0u, 3u}) {
      SCOPED_TRACE("layer " + std::to_string(layer) + " step " + std::to_string(step));
      RunResult r = Run(ExplainArgs(store, layer, step) + " --json");
      ASSERT_EQ(r.exit_code, 0) << r.err;
      ASSERT_TRUE(r.json_ok) << r.out;
      const Json& j = r.json;
      EXPECT_TRUE(j["ok"].boolean);
      EXPECT_FALSE(j["store_locked"].boolean);
      EXPECT_EQ(j["layout"].string, kLayout.ToString());
      EXPECT_EQ(j["sequence"].string, "7");
      EXPECT_EQ(j["layer"].number, layer);
      EXPECT_EQ(j["step"].number, step);
      EXPECT_EQ(j["blocks"].number, double(blocks));
      EXPECT_EQ(j["tokens"].number, double(kTokens));
      EXPECT_EQ(j["context_tokens"].number, double(kTokens));
      EXPECT_EQ(j["summary"].string, "clusters");
      EXPECT_EQ(j["summary_rows"].number, 12);
      EXPECT_EQ(j["backend"].string, "auto");
      EXPECT_EQ(j["scope"].string, "layer");
      EXPECT_EQ(j["top_k"].number, kTopK);
      EXPECT_EQ(j["sink_blocks"].number, double(sinks));
      EXPECT_EQ(j["local_begin"].number, double(local_begin));
      EXPECT_EQ(j["local_end"].number, double(blocks));

      // The selection equals Store::Select's on the same store and queries.
      std::vector<int64_t> want(kTopK);
      {
        auto opened = Store::Open(ReopenOptions(store), kLayout);
        ASSERT_TRUE(opened.ok()) << opened.status().ToString();
        const uint64_t qf = uint64_t{kQueryHeads} * kHeadDim;
        std::span<const float> q(&(*queries_)[(uint64_t{layer} * kSteps + step) * qf], qf);
        auto info = (*opened)->Select(0, SequenceId::FromU64(7), layer, q, kTokens, want);
        ASSERT_TRUE(info.ok()) << info.status().ToString();
        EXPECT_EQ(info->selected, kTopK);
      }
      ASSERT_EQ(j["selected"].size(), size_t{kTopK});
      for (uint32_t i = 0; i < kTopK; ++i) EXPECT_EQ(j["selected"][i].number, double(want[i]));

      // The true shares: the oracle's masses from the arrays, per block, / query heads.
      const uint64_t kv = kTokens * kKvHeads * kHeadDim, qf = uint64_t{kQueryHeads} * kHeadDim;
      auto oracle = bench::AttentionOracle::Create(
          {.num_query_heads = kQueryHeads,
           .num_kv_heads = kKvHeads,
           .head_dim = kHeadDim,
           .block_tokens = kBlockTokens,
           .keep_outputs = false},
          std::span<const float>(&(*queries_)[(uint64_t{layer} * kSteps + step) * qf], qf));
      ASSERT_TRUE(oracle.ok());
      ASSERT_TRUE(
          (*oracle)
              ->AddTokens({&(*keys_)[layer * kv], kv}, {&(*values_)[layer * kv], kv}, kTokens)
              .ok());
      const std::vector<double> mass = (*oracle)->BlockMasses();
      const Json& rows = j["per_block"];
      ASSERT_EQ(rows.size(), blocks);
      double share_sum = 0;
      std::vector<int64_t> est_ranks, true_ranks;
      std::vector<uint64_t> oracle_topk;
      for (uint64_t b = 0; b < blocks; ++b) {
        const Json& row = rows[b];
        EXPECT_EQ(row["block"].number, double(b));
        EXPECT_EQ(row["role"].string, b < sinks          ? "sink"
                                      : b >= local_begin ? "window"
                                                         : "candidate");
        EXPECT_TRUE(row["indexed"].boolean);
        EXPECT_NEAR(row["true_share"].number, mass[b] / kQueryHeads, 1e-6 * mass[b] + 1e-12);
        share_sum += row["true_share"].number;
        const double est = row["est_share"].number;
        EXPECT_TRUE(std::isfinite(est) && est >= 0 && est <= 1.0 + 1e-3) << est;
        est_ranks.push_back(int64_t(row["est_rank"].number));
        true_ranks.push_back(int64_t(row["true_rank"].number));
        const auto at = std::find(want.begin(), want.end(), int64_t(b));
        EXPECT_EQ(row["selected"].boolean, at != want.end());
        EXPECT_EQ(row["selected_at"].number, at != want.end() ? double(at - want.begin()) : -1.0);
        if (row["oracle_topk"].boolean) oracle_topk.push_back(b);
      }
      EXPECT_NEAR(share_sum, 1.0, 1e-5);
      // Both ranks are permutations of 1..blocks.
      std::sort(est_ranks.begin(), est_ranks.end());
      std::sort(true_ranks.begin(), true_ranks.end());
      for (uint64_t i = 0; i < blocks; ++i) {
        EXPECT_EQ(est_ranks[i], int64_t(i) + 1);
        EXPECT_EQ(true_ranks[i], int64_t(i) + 1);
      }
      const std::vector<uint64_t> want_topk = (*oracle)->OracleTopK({kNInit, kNLocal, kTopK});
      std::vector<uint64_t> sorted_topk = want_topk;
      std::sort(sorted_topk.begin(), sorted_topk.end());
      EXPECT_EQ(oracle_topk, sorted_topk);
      ASSERT_EQ(j["oracle_topk"].size(), want_topk.size());
      std::vector<uint64_t> attended;
      for (int64_t b : want) {
        if (b >= 0) attended.push_back(uint64_t(b));
      }
      auto m = (*oracle)->Evaluate({kNInit, kNLocal, kTopK}, attended);
      ASSERT_TRUE(m.ok());
      EXPECT_NEAR(j["recall"].number, m->recall, 1e-6);
      EXPECT_NEAR(j["coverage"].number, m->coverage, 1e-5);
    }
  }
}

TEST_F(ToolsTensorTest, ExplainTextPartialBlockAndKvHeadScope) {
  const std::string store = Path("store-short");
  ASSERT_EQ(Run("import " + store + " --sequence 7 --keys " + Path("Kshort.npy") + " --values " +
                Path("Vshort.npy") + " --block-tokens 16 --query-heads 8")
                .exit_code,
            0);
  RunResult r = Run(ExplainArgs(store, 1, 1) + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok);
  EXPECT_EQ(r.json["blocks"].number, 63);
  EXPECT_EQ(r.json["tokens"].number, double(kShortTokens));  // the last block's 8 tokens
  EXPECT_EQ(r.json["local_end"].number, 63);
  r = Run(ExplainArgs(store, 1, 1) + " --scope kv-head --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.json["selected"].size(), size_t{kTopK * kKvHeads});
  r = Run(ExplainArgs(store, 0, 2));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("kvtier explain:"), std::string::npos);
  EXPECT_NE(r.out.find("recall@8"), std::string::npos) << r.out;
}

TEST_F(ToolsTensorTest, ExplainReportsBadInputsAndADamagedStore) {
  RunResult r = Run(ExplainArgs(Path("absent"), 0, 0) + " --json");
  EXPECT_EQ(r.exit_code, 2);
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_FALSE(r.json["ok"].boolean);
  r = Run(ExplainArgs(Path("store"), 5, 0));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--layer 5"), std::string::npos) << r.err;
  r = Run(ExplainArgs(Path("store"), 0, 9));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--step 9"), std::string::npos) << r.err;
  r = Run("explain " + Path("store") + " --sequence 8 --layer 0 --queries " + Path("Q.npy"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no block"), std::string::npos) << r.err;
  r = Run("explain " + Path("store") + " --sequence 7 --layer 0 --queries " + Path("K.npy"));
  EXPECT_EQ(r.exit_code, 2);  // keys are no queries: wrong shape

  // Damage every block on disk: explain reports it (exit 1), never crashes.
  const std::string store = Path("store-damaged");
  ASSERT_EQ(Run("import " + store + " --sequence 7 --keys " + Path("K.npy") + " --values " +
                Path("V.npy") + " --block-tokens 16 --query-heads 8")
                .exit_code,
            0);
  for (const auto& entry : std::filesystem::directory_iterator(store)) {
    if (entry.path().extension() != ".kvt") continue;
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    std::mt19937_64 rng(5);
    std::vector<char> junk(1 << 20);
    for (char& c : junk) c = static_cast<char>(rng());
    const uint64_t size = std::filesystem::file_size(entry.path());
    for (uint64_t at = 0; at < size; at += junk.size()) {
      f.seekp(static_cast<std::streamoff>(at));
      f.write(junk.data(),
              static_cast<std::streamsize>(std::min<uint64_t>(junk.size(), size - at)));
    }
  }
  r = Run(ExplainArgs(store, 0, 0) + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_EQ(r.json["error"]["code"].string, "Corruption") << r.out;
}

// --- replay -----------------------------------------------------------------------------

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

const Json* FindRun(const Json& j, const std::string& policy, bool prefetch, double gpu_blocks) {
  for (size_t i = 0; i < j["runs"].size(); ++i) {
    const Json& r = j["runs"][i];
    if (r["policy"].string == policy && r["prefetch"].boolean == prefetch &&
        r["gpu_blocks"].number == gpu_blocks) {
      return &r;
    }
  }
  return nullptr;
}

TEST_F(ToolsTensorTest, ReplayGivesHandComputedLruHits) {
  // One layer, two GPU blocks, one block per step: 1 2 1 3 2 1 3 3.
  //   LRU: 1 m, 2 m, 1 h, 3 m (evicts 2), 2 m (evicts 1), 1 m (evicts 3), 3 m (evicts 2),
  //   3 h: 2 hits of 8, 6 fetches, 4 evictions. With three blocks: 1 m, 2 m, 1 h, 3 m,
  //   2 h, 1 h, 3 h, 3 h: 5 hits.
  const std::string one = Path("one-layer.trace");
  WriteText(one,
            "kvtier-trace 1\nlayers 1\nblock_bytes 1000000\n# hand-written\n"
            "0 0 1\n1 0 2\n2 0 1\n3 0 3\n4 0 2\n5 0 1\n6 0 3\n7 0 3 scores=0.5\n");
  RunResult r =
      Run("replay " + one + " --policy lru --prefetch off --gpu-blocks 2,3 --compute-us 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  const Json& j = r.json;
  EXPECT_EQ(j["layers"].number, 1);
  EXPECT_EQ(j["steps"].number, 8);
  EXPECT_EQ(j["records"].number, 8);
  EXPECT_EQ(j["blocks"].number, 4);
  EXPECT_EQ(j["block_bytes"].number, 1e6);
  EXPECT_EQ(j["max_record_blocks"].number, 1);
  ASSERT_EQ(j["runs"].size(), 2u);
  const Json* two = FindRun(j, "lru", false, 2);
  ASSERT_NE(two, nullptr);
  EXPECT_EQ((*two)["acquired_blocks"].number, 8);
  EXPECT_EQ((*two)["hits"].number, 2);
  EXPECT_EQ((*two)["misses"].number, 6);
  EXPECT_EQ((*two)["hit_rate"].number, 0.25);
  EXPECT_EQ((*two)["evictions"].number, 4);
  EXPECT_EQ((*two)["bytes_moved"].number, 6e6);
  EXPECT_EQ((*two)["prefetches"].number, 0);
  EXPECT_EQ((*two)["per_layer_blocks"].number, 0);
  EXPECT_EQ((*two)["stall_us_steps"].size(), 8u);
  EXPECT_GE((*two)["stall_us_per_step"].number, 0);
  const Json* three = FindRun(j, "lru", false, 3);
  ASSERT_NE(three, nullptr);
  EXPECT_EQ((*three)["hits"].number, 5);
  EXPECT_EQ((*three)["misses"].number, 3);
  // The heat map: per step, the acquires of each block.
  ASSERT_EQ(j["heatmap"]["counts"].size(), 8u);
  EXPECT_EQ(j["heatmap"]["counts"][3][3].number, 1);
  EXPECT_EQ(j["heatmap"]["counts"][3][1].number, 0);
}

TEST_F(ToolsTensorTest, ReplayPerLayerAgainstSharedLru) {
  // Two layers, two records per step, four GPU blocks.
  //   step 0: L0 {1, 2}, L1 {1, 2}; step 1: L0 {3}, L1 {1}; step 2: L0 {1}, L1 {2}
  //   per layer (2 blocks each): L0 1 m, 2 m | 3 m (evicts 1, touched before 2) | 1 m
  //     (evicts 2): no hit; L1 1 m, 2 m | 1 h | 2 h: 2 hits. Total 2 of 8.
  //   shared (4 blocks): step 0 fills 4 slots; (0,3) m evicts (0,1); (1,1) h; (0,1) m
  //     evicts (0,2); (1,2) h: 2 hits.
  const std::string two = Path("two-layer.trace");
  WriteText(two,
            "kvtier-trace 1\nlayers 2\nblock_bytes 4096\n"
            "0 0 1,2\n0 1 1,2\n1 0 3\n1 1 1\n2 0 1\n2 1 2\n");
  RunResult r = Run("replay " + two +
                    " --policy lru,lru-per-layer,score-decay,score-decay-per-layer --prefetch "
                    "off,on --gpu-blocks 4 --compute-us 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  ASSERT_EQ(r.json["runs"].size(), 8u);
  const Json* per_layer = FindRun(r.json, "lru-per-layer", false, 4);
  ASSERT_NE(per_layer, nullptr);
  EXPECT_EQ((*per_layer)["per_layer_blocks"].number, 2);
  EXPECT_EQ((*per_layer)["hits"].number, 2);
  EXPECT_EQ((*per_layer)["acquired_blocks"].number, 8);
  const Json* shared = FindRun(r.json, "lru", false, 4);
  ASSERT_NE(shared, nullptr);
  EXPECT_EQ((*shared)["hits"].number, 2);
  for (size_t i = 0; i < r.json["runs"].size(); ++i) {
    const Json& run = r.json["runs"][i];
    EXPECT_EQ(run["hits"].number + run["misses"].number, 8) << run["policy"].string;
    EXPECT_GE(run["hit_rate"].number, 0);
    EXPECT_LE(run["hit_rate"].number, 1);
    if (!run["prefetch"].boolean) {
      EXPECT_EQ(run["prefetches"].number, 0);
    }
  }
  // A tier too small for one record, per layer: a usage error.
  r = Run("replay " + two + " --policy lru-per-layer --gpu-blocks 2 --compute-us 0");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("acquires 2 blocks at once"), std::string::npos) << r.err;
  // The table.
  r = Run("replay " + two + " --policy lru --prefetch off --gpu-blocks 4 --compute-us 0");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("hit_rate"), std::string::npos) << r.out;
}

TEST_F(ToolsTensorTest, ReplayRejectsMalformedTraces) {
  const std::vector<std::pair<std::string, std::string>> bad{
      {"not a trace\n", "line 1"},
      {"kvtier-trace 2\n", "version 2"},
      {"kvtier-trace 1\n0 0 1\n", "before the \"layers\""},
      {"kvtier-trace 1\nlayers 2\nblock_bytes 10\n0 2 1\n", "line 4: layer"},
      {"kvtier-trace 1\nlayers 2\nblock_bytes 10\n1 0 1\n0 0 1\n", "steps must not go back"},
      {"kvtier-trace 1\nlayers 2\nblock_bytes 10\n0 0 1,x\n", "bad block list"},
      {"kvtier-trace 1\nlayers 2\nblock_bytes 10\n0 0 1,2 0.5\n", "1 scores for 2 blocks"},
      {"kvtier-trace 1\nlayers 2\nblock_bytes 10\n", "no records"},
  };
  for (const auto& [text, message] : bad) {
    const std::string path = Path("bad.trace");
    WriteText(path, text);
    RunResult r = Run("replay " + path + " --compute-us 0");
    EXPECT_EQ(r.exit_code, 2) << text;
    EXPECT_NE(r.err.find(message), std::string::npos) << text << " -> " << r.err;
  }
  RunResult r = Run("replay " + Path("absent.trace") + " --json");
  EXPECT_EQ(r.exit_code, 2);
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_FALSE(r.json["ok"].boolean);
}

// The demo records a trace, replay runs it with the default policies and sizes.
TEST_F(ToolsTensorTest, DemoRecordsATraceThatReplays) {
  const std::string trace = Path("demo.trace");
  RunResult r =
      Run("demo --tokens 4096 --layers 2 --kv-heads 2 --query-heads 8 --head-dim 64 "
          "--block-tokens 64 --n-local 512 --topk 4 --steps 3 --needles 2 --eval-layers 1 "
          "--host-gib 0.0625 --device-gib 0.0625 --json --trace-out " +
          trace);
  // 0, or 1 when a needle was missed: it ran either way.
  ASSERT_NE(r.exit_code, 2) << r.err << r.out;
  ASSERT_NE(r.exit_code, -1);
  const std::string text = ReadFile(trace);
  EXPECT_EQ(text.rfind("kvtier-trace 1\nlayers 2\nblock_bytes 32768\nblock_tokens 64\n", 0), 0u)
      << text.substr(0, 200);
  r = Run("replay " + trace + " --compute-us 10 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_EQ(r.json["steps"].number, 3);
  EXPECT_EQ(r.json["records"].number, 6);
  EXPECT_EQ(r.json["layers"].number, 2);
  // Default: 3 policies x prefetch off/on x 5 sizes.
  EXPECT_EQ(r.json["runs"].size(), 30u);
  EXPECT_EQ(r.json["gpu_blocks"].size(), 5u);
  std::ofstream(Path("replay.json")) << r.out;
}

// --- plot -------------------------------------------------------------------------------

bool HaveMatplotlib() {
  return std::system("python3 -c 'import matplotlib' >/dev/null 2>&1") == 0 ||
         std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") == 0;
}

bool IsPng(const std::string& path) {
  const std::string bytes = ReadFile(path);
  return bytes.size() > 1000 && bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0;
}

TEST_F(ToolsTensorTest, PlotWritesPngFilesFromEachKindOfJson) {
  if (!HaveMatplotlib()) GTEST_SKIP() << "python3 with matplotlib is not installed";
  const std::string out = Path("plots");
  // replay: from a hand-written trace.
  WriteText(Path("plot.trace"),
            "kvtier-trace 1\nlayers 2\nblock_bytes 4096\n0 0 1,2\n0 1 1,2\n1 0 3\n1 1 1\n");
  RunResult r = Run("replay " + Path("plot.trace") + " --compute-us 0 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteText(Path("replay.json"), r.out);
  // eval, explain and a bench: samples.
  WriteText(Path("eval.json"),
            "{\"tokens\":4096,\"layers\":2,\"summary\":\"clusters\",\"backend\":\"scan\","
            "\"top_k\":16,\"recall\":0.8,\"coverage\":0.95,\"per_layer\":[{\"layer\":0,"
            "\"recall\":0.75,\"coverage\":0.94},{\"layer\":1,\"recall\":0.85,\"coverage\":0.96}]}");
  r = Run(ExplainArgs(Path("store"), 0, 1) + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  WriteText(Path("explain.json"), r.out);
  WriteText(Path("bench.json"),
            "kvtier-bench host: a table first\n{\"bench\":\"host\",\"put_gbps\":22.1,"
            "\"memcpy_put_gbps\":22.5,\"get_gbps\":22.5,\"memcpy_get_gbps\":22.9,"
            "\"put_op_us\":0.21,\"memcpy_put_op_us\":0.05}\n");
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases{
      {"replay.json", {"replay_hit_rate.png", "replay_stall.png", "replay_heatmap.png"}},
      {"eval.json", {"eval_per_layer.png"}},
      {"explain.json", {"explain_blocks.png"}},
      {"bench.json", {"bench_host.png"}}};
  for (const auto& [input, files] : cases) {
    r = Run("plot " + Path(input) + " --out " + out + " --json");
    ASSERT_EQ(r.exit_code, 0) << input << ": " << r.err;
    ASSERT_TRUE(r.json_ok) << r.out;
    EXPECT_TRUE(r.json["ok"].boolean);
    ASSERT_EQ(r.json["files"].size(), files.size()) << r.out;
    for (size_t i = 0; i < files.size(); ++i) {
      EXPECT_EQ(r.json["files"][i]["path"].string, out + "/" + files[i]);
      EXPECT_TRUE(IsPng(out + "/" + files[i])) << files[i];
      EXPECT_EQ(r.json["files"][i]["bytes"].number,
                double(std::filesystem::file_size(out + "/" + files[i])));
    }
  }
  // The text form names the files.
  r = Run("plot " + Path("eval.json") + " --out " + out);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("eval_per_layer.png"), std::string::npos);
}

TEST_F(ToolsTensorTest, PlotRejectsWhatItCannotDraw) {
  if (!HaveMatplotlib()) GTEST_SKIP() << "python3 with matplotlib is not installed";
  RunResult r = Run("plot " + Path("absent.json") + " --out " + Path("p2"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no such file"), std::string::npos) << r.err;
  WriteText(Path("other.json"), "{\"something\":1}\n");
  r = Run("plot " + Path("other.json") + " --out " + Path("p2") + " --json");
  EXPECT_EQ(r.exit_code, 2);
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_FALSE(r.json["ok"].boolean);
  WriteText(Path("broken.json"), "{\"bench\":\"host\",\"put_gbps\":");
  r = Run("plot " + Path("broken.json") + " --out " + Path("p2"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("holds no JSON"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace kvtier
