// `kvtier eval` end to end: writes a small synthetic KV cache with needles
// (bench/workload) as .npy files, runs the tool, and checks what it prints and writes:
// metrics in range and equal to an oracle recomputed here from the selection file, every
// needle attended, selections of valid candidate blocks only; and bad inputs rejected
// with exit status 2 and a message.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/workload/npy.h"
#include "bench/workload/oracle.h"
#include "bench/workload/workload.h"

#ifndef KVTIER_TOOL
#error "KVTIER_TOOL must name the kvtier binary"
#endif

namespace kvtier::bench {
namespace {

// The test's shapes: small enough for seconds under ASan, with GQA (4 query heads per KV
// head), 16-token blocks and needles.
constexpr uint32_t kLayers = 2, kKvHeads = 2, kQueryHeads = 8, kHeadDim = 64, kBlockTokens = 16;
constexpr uint64_t kTokens = 4096;
constexpr uint32_t kSteps = 8, kTopK = 16, kNInit = 128, kNLocal = 512;
constexpr uint64_t kSinkBlocks = kNInit / kBlockTokens;               // 8
constexpr uint64_t kLocalBegin = (kTokens - kNLocal) / kBlockTokens;  // 224

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The number after "key": at its first occurrence (top-level fields come before
// per_layer); NaN when absent.
double JsonNumber(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\":");
  if (at == std::string::npos) return std::nan("");
  return std::strtod(json.c_str() + at + key.size() + 3, nullptr);
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

class EvalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/kvtier-eval-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = new std::string(tmpl);
    WorkloadOptions wo;
    wo.layout = {kLayers, kKvHeads, kQueryHeads, kHeadDim, DType::kF32, kBlockTokens};
    wo.tokens = kTokens;
    wo.steps = kSteps;
    wo.seed = 11;
    wo.needles = 6;
    auto created = Workload::Create(wo);
    ASSERT_TRUE(created.ok()) << created.status().ToString();
    workload_ = created->release();
    const uint64_t kv_floats = kTokens * kKvHeads * kHeadDim;
    const uint64_t q_floats = uint64_t{kQueryHeads} * kHeadDim;
    std::vector<float> keys(kLayers * kv_floats), values(kLayers * kv_floats);
    std::vector<float> queries(uint64_t{kLayers} * kSteps * q_floats);
    for (uint32_t l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(workload_
                      ->KeysAndValues(l, 0, kTokens, {&keys[l * kv_floats], kv_floats},
                                      {&values[l * kv_floats], kv_floats})
                      .ok());
      for (uint32_t s = 0; s < kSteps; ++s) {
        ASSERT_TRUE(
            workload_->Query(l, s, {&queries[(uint64_t{l} * kSteps + s) * q_floats], q_floats})
                .ok());
      }
    }
    const std::vector<uint64_t> kv_shape{kLayers, kTokens, kKvHeads, kHeadDim};
    const std::vector<uint64_t> q_shape{kLayers, kSteps, kQueryHeads, kHeadDim};
    for (NpyDType dt : {NpyDType::kFloat32, NpyDType::kFloat16}) {
      const std::string suffix = dt == NpyDType::kFloat32 ? "32" : "16";
      ASSERT_TRUE(WriteNpyFromFloat(Path("K" + suffix), dt, kv_shape, keys).ok());
      ASSERT_TRUE(WriteNpyFromFloat(Path("V" + suffix), dt, kv_shape, values).ok());
    }
    ASSERT_TRUE(WriteNpyFromFloat(Path("Q"), NpyDType::kFloat32, q_shape, queries).ok());
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    std::filesystem::remove_all(*dir_, ec);
    delete dir_;
    delete workload_;
  }

  static std::string Path(const std::string& name) { return *dir_ + "/" + name + ".npy"; }

  // Runs `kvtier eval` with `args`, capturing stdout and stderr.
  static RunResult Run(const std::string& args) {
    const std::string out = *dir_ + "/stdout", err = *dir_ + "/stderr";
    const std::string cmd = std::string(KVTIER_TOOL) + " eval " + args + " >" + out + " 2>" + err;
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = ReadFile(out);
    r.err = ReadFile(err);
    return r;
  }

  static std::string Inputs(const std::string& bits) {
    return "--keys " + Path("K" + bits) + " --values " + Path("V" + bits) + " --queries " +
           Path("Q") + " --block-tokens " + std::to_string(kBlockTokens) + " --topk " +
           std::to_string(kTopK) + " --n-init " + std::to_string(kNInit) + " --n-local " +
           std::to_string(kNLocal);
  }

  static std::string* dir_;
  static Workload* workload_;
};

std::string* EvalTest::dir_ = nullptr;
Workload* EvalTest::workload_ = nullptr;

// Entries of one (layer, step) row of a selection: -1 only as padding at the end, no
// repeats within `group` (a KV head's list), every block a candidate.
void ExpectValidRow(const int32_t* row, uint32_t groups, uint32_t k) {
  for (uint32_t g = 0; g < groups; ++g) {
    std::set<int32_t> seen;
    bool padding = false;
    for (uint32_t i = 0; i < k; ++i) {
      const int32_t b = row[g * k + i];
      if (b < 0) {
        EXPECT_EQ(b, -1);
        padding = true;
        continue;
      }
      EXPECT_FALSE(padding) << "a block after -1 padding";
      EXPECT_GE(b, int32_t(kSinkBlocks)) << "a sink block was selected";
      EXPECT_LT(b, int32_t(kLocalBegin)) << "a window block was selected";
      EXPECT_TRUE(seen.insert(b).second) << "block " << b << " selected twice";
    }
  }
}

TEST_F(EvalTest, LayerScopeMetricsMatchOracleAndNeedlesAreFound) {
  const std::string sel = *dir_ + "/S.npy";
  RunResult r = Run(Inputs("32") + " --json --selection-out " + sel);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.front(), '{');
  EXPECT_EQ(Count(r.out, "\n"), 1u) << "one JSON line";
  EXPECT_EQ(Count(r.out, "{"), Count(r.out, "}"));
  EXPECT_EQ(JsonNumber(r.out, "tokens"), double(kTokens));
  EXPECT_EQ(JsonNumber(r.out, "layers"), double(kLayers));
  EXPECT_EQ(JsonNumber(r.out, "steps"), double(kSteps));
  EXPECT_EQ(JsonNumber(r.out, "sink_blocks"), double(kSinkBlocks));
  EXPECT_EQ(JsonNumber(r.out, "local_begin"), double(kLocalBegin));
  EXPECT_NE(r.out.find("\"dtype\":\"f32\""), std::string::npos);
  EXPECT_EQ(Count(r.out, "\"layer\":"), size_t{kLayers});
  const double recall = JsonNumber(r.out, "recall");
  const double coverage = JsonNumber(r.out, "coverage");
  const double error = JsonNumber(r.out, "output_rel_l2");
  ASSERT_TRUE(std::isfinite(recall) && std::isfinite(coverage) && std::isfinite(error)) << r.out;
  EXPECT_GE(recall, 0.0);
  EXPECT_LE(recall, 1.0);
  EXPECT_GT(coverage, 0.0);
  EXPECT_LE(coverage, 1.0 + 1e-9);
  EXPECT_GE(error, 0.0);
  EXPECT_GT(JsonNumber(r.out, "select_us_median"), 0.0);

  // The selection file: int32 [layers, steps, topk] of candidate blocks.
  Result<NpyArray> s = ReadNpy(sel);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_EQ(s->dtype, NpyDType::kInt32);
  ASSERT_EQ(s->shape, (std::vector<uint64_t>{kLayers, kSteps, kTopK}));
  const int32_t* rows = reinterpret_cast<const int32_t*>(s->data.data());
  for (uint32_t i = 0; i < kLayers * kSteps; ++i) ExpectValidRow(rows + i * kTopK, 1, kTopK);

  // Every needle attended: in the sinks, the window, or its step's selection.
  ASSERT_FALSE(workload_->needles().empty());
  for (const Needle& n : workload_->needles()) {
    const int32_t* row = rows + (uint64_t{n.layer} * kSteps + n.step) * kTopK;
    const bool attended = n.block < kSinkBlocks || n.block >= kLocalBegin ||
                          std::find(row, row + kTopK, int32_t(n.block)) != row + kTopK;
    EXPECT_TRUE(attended) << "needle at token " << n.token << " (block " << n.block << ") of layer "
                          << n.layer << " step " << n.step;
  }

  // The metrics are the oracle's for the selection written (same f32 data).
  const SparsePolicy policy{kNInit, kNLocal, kTopK};
  double recall_sum = 0, coverage_sum = 0;
  std::vector<float> keys(kTokens * kKvHeads * kHeadDim), values(keys.size());
  std::vector<float> q(kQueryHeads * kHeadDim);
  for (uint32_t l = 0; l < kLayers; ++l) {
    ASSERT_TRUE(workload_->KeysAndValues(l, 0, kTokens, keys, values).ok());
    for (uint32_t st = 0; st < kSteps; ++st) {
      ASSERT_TRUE(workload_->Query(l, st, q).ok());
      auto oracle = AttentionOracle::Create({kQueryHeads, kKvHeads, kHeadDim, kBlockTokens}, q);
      ASSERT_TRUE(oracle.ok());
      ASSERT_TRUE((*oracle)->AddTokens(keys, values, kTokens).ok());
      std::vector<uint64_t> picked;
      const int32_t* row = rows + (uint64_t{l} * kSteps + st) * kTopK;
      for (uint32_t i = 0; i < kTopK; ++i) {
        if (row[i] >= 0) picked.push_back(uint64_t(row[i]));
      }
      auto m = (*oracle)->Evaluate(policy, picked);
      ASSERT_TRUE(m.ok());
      recall_sum += m->recall;
      coverage_sum += m->coverage;
    }
  }
  EXPECT_NEAR(recall, recall_sum / (kLayers * kSteps), 1e-5);
  EXPECT_NEAR(coverage, coverage_sum / (kLayers * kSteps), 1e-5);
  // Retrieval does real work here: far better than 16 random blocks of 216 (recall ~0.07).
  EXPECT_GT(recall, 0.5);
}

TEST_F(EvalTest, KvHeadScopeWithFloat16Inputs) {
  const std::string sel = *dir_ + "/S_kv.npy";
  RunResult r = Run(Inputs("16") + " --scope kv-head --summary mean --json --selection-out " + sel);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"dtype\":\"f16\""), std::string::npos);
  EXPECT_NE(r.out.find("\"scope\":\"kv-head\""), std::string::npos);
  EXPECT_NE(r.out.find("\"summary\":\"mean\""), std::string::npos);
  const double recall = JsonNumber(r.out, "recall");
  EXPECT_GE(recall, 0.0);
  EXPECT_LE(recall, 1.0);
  Result<NpyArray> s = ReadNpy(sel);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_EQ(s->shape, (std::vector<uint64_t>{kLayers, kSteps, kKvHeads, kTopK}));
  const int32_t* rows = reinterpret_cast<const int32_t*>(s->data.data());
  for (uint32_t i = 0; i < kLayers * kSteps; ++i) {
    ExpectValidRow(rows + i * kKvHeads * kTopK, kKvHeads, kTopK);
  }
}

TEST_F(EvalTest, TablePrintsEveryLayer) {
  RunResult r = Run(Inputs("32") + " --backend faiss-flat");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("backend faiss-flat"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n  all "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n  1 "), std::string::npos) << r.out;
}

TEST_F(EvalTest, MissingFileIsAnInputError) {
  RunResult r =
      Run("--keys " + *dir_ + "/absent.npy --values " + Path("V32") + " --queries " + Path("Q"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("no such file"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--keys"), std::string::npos) << r.err;
}

TEST_F(EvalTest, MismatchedShapesAreInputErrors) {
  // Values of another shape.
  const std::string v_short = Path("V_short");
  std::vector<float> v(uint64_t{kLayers} * 64 * kKvHeads * kHeadDim, 0.5f);
  ASSERT_TRUE(WriteNpyFromFloat(v_short, NpyDType::kFloat32,
                                std::vector<uint64_t>{kLayers, 64, kKvHeads, kHeadDim}, v)
                  .ok());
  RunResult r = Run("--keys " + Path("K32") + " --values " + v_short + " --queries " + Path("Q"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("differs from --keys"), std::string::npos) << r.err;

  // Keys and values of different dtypes.
  r = Run("--keys " + Path("K32") + " --values " + Path("V16") + " --queries " + Path("Q"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("one dtype"), std::string::npos) << r.err;

  // 3 query heads for 2 KV heads.
  const std::string q3 = Path("Q3");
  std::vector<float> q(uint64_t{kLayers} * kSteps * 3 * kHeadDim, 0.25f);
  ASSERT_TRUE(WriteNpyFromFloat(q3, NpyDType::kFloat32,
                                std::vector<uint64_t>{kLayers, kSteps, 3, kHeadDim}, q)
                  .ok());
  r = Run("--keys " + Path("K32") + " --values " + Path("V32") + " --queries " + q3);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("not a multiple"), std::string::npos) << r.err;

  // Queries of another head_dim.
  const std::string q32 = Path("Q_dim32");
  std::vector<float> qd(uint64_t{kLayers} * kSteps * kQueryHeads * 32, 0.25f);
  ASSERT_TRUE(WriteNpyFromFloat(q32, NpyDType::kFloat32,
                                std::vector<uint64_t>{kLayers, kSteps, kQueryHeads, 32}, qd)
                  .ok());
  r = Run("--keys " + Path("K32") + " --values " + Path("V32") + " --queries " + q32);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("head_dim"), std::string::npos) << r.err;

  // Three dimensions instead of four.
  const std::string k3 = Path("K_3d");
  std::vector<float> k(uint64_t{kTokens} * kKvHeads * kHeadDim, 0.5f);
  ASSERT_TRUE(WriteNpyFromFloat(k3, NpyDType::kFloat32,
                                std::vector<uint64_t>{kTokens, kKvHeads, kHeadDim}, k)
                  .ok());
  r = Run("--keys " + k3 + " --values " + Path("V32") + " --queries " + Path("Q"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("expected 4"), std::string::npos) << r.err;
}

TEST_F(EvalTest, IntegerKeysAreAnInputError) {
  const std::string ki = Path("K_int");
  std::vector<int32_t> data(uint64_t{kLayers} * 32 * kKvHeads * kHeadDim, 1);
  ASSERT_TRUE(WriteNpy(ki, NpyDType::kInt32, std::vector<uint64_t>{kLayers, 32, kKvHeads, kHeadDim},
                       {reinterpret_cast<const uint8_t*>(data.data()), data.size() * 4})
                  .ok());
  RunResult r = Run("--keys " + ki + " --values " + ki + " --queries " + Path("Q"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("expected float16 or float32"), std::string::npos) << r.err;
}

TEST_F(EvalTest, OptionsTheStoreRejectsAreUsageErrors) {
  // kMinMax cannot run on HNSW (index/layer_index.h).
  RunResult r = Run(Inputs("32") + " --summary minmax --backend faiss-hnsw");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_FALSE(r.err.empty());
  r = Run(Inputs("32") + " --summary nonsense");
  EXPECT_EQ(r.exit_code, 2);
}

}  // namespace
}  // namespace kvtier::bench
