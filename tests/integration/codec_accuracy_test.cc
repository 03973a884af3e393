// Lossy update codecs against fp32 in McMahan's non-IID set-up (100 clients, 2 label shards
// each, C = 0.1, E = 5, B = 10, lr 0.05, mlp, 100 rounds on MNIST-10k), compared on the mean
// test accuracy over rounds 91-100. Same seeds for every run, so the codec is the only
// difference.
#include <gtest/gtest.h>

#include <map>
#include <optional>

#include "fedslice/common/idx.h"
#include "fedslice/coordinator/simulation.h"
#include "paper_setup.h"
#include "testing/test_util.h"

namespace fedslice::coordinator {
namespace {

struct Outcome {
  double tail_accuracy = 0;
  double bytes_up_per_round = 0;
};

class CodecAccuracyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto dir = testing::MnistDir();
    ASSERT_TRUE(dir.has_value()) << "MNIST-10k not found: run scripts/fetch_mnist.sh";
    auto train = data::LoadMnist(*dir, data::Split::kTrain);
    auto test = data::LoadMnist(*dir, data::Split::kTest);
    ASSERT_TRUE(train.ok() && test.ok());
    train_ = new data::Dataset(std::move(train).value());
    test_ = new data::Dataset(std::move(test).value());
  }
  static void TearDownTestSuite() {
    delete train_;
    delete test_;
  }

  // sparse_refit: unset = the codec's default (on for topk).
  static Outcome Run(const std::string& codec, std::optional<float> sparse_refit = {}) {
    SimulationConfig config = testing::PaperShardsSimulation();
    config.federation.codec.set_name(codec);
    if (sparse_refit) config.federation.codec.set_sparse_refit(*sparse_refit);
    auto metrics = RunSimulation(config, *train_, *test_);
    EXPECT_TRUE(metrics.ok()) << codec << ": " << metrics.status().ToString();
    Outcome out;
    if (!metrics.ok() || metrics->size() != 100) return out;
    for (const auto& m : *metrics) {
      if (m.round() > 90) out.tail_accuracy += m.accuracy() / 10;
      out.bytes_up_per_round += static_cast<double>(m.bytes_up()) / 100;
      EXPECT_EQ(m.codec(), codec);
    }
    std::printf("%-10s%s mean accuracy rounds 91-100: %.2f%%, upload %.0f bytes/round\n",
                codec.c_str(), sparse_refit ? " (refit set)" : "", 100 * out.tail_accuracy,
                out.bytes_up_per_round);
    return out;
  }

  static data::Dataset* train_;
  static data::Dataset* test_;
};

data::Dataset* CodecAccuracyTest::train_ = nullptr;
data::Dataset* CodecAccuracyTest::test_ = nullptr;

TEST_F(CodecAccuracyTest, LossyCodecsStayCloseToFp32) {
  const Outcome fp32 = Run("fp32");
  const Outcome int8 = Run("int8");
  const Outcome sign = Run("sign");
  const Outcome topk = Run("topk:0.01");
  const Outcome topk_no_refit = Run("topk:0.01", 0.0f);
  ASSERT_GT(fp32.tail_accuracy, 0.875);

  // int8: within 0.5 points, at about a quarter of the bytes.
  EXPECT_GE(int8.tail_accuracy, fp32.tail_accuracy - 0.005);
  EXPECT_LE(int8.bytes_up_per_round, 0.26 * fp32.bytes_up_per_round);
  // sign with error feedback (its default): within 2 points at 1 bit per value.
  EXPECT_GE(sign.tail_accuracy, fp32.tail_accuracy - 0.02);
  EXPECT_LE(sign.bytes_up_per_round, 0.04 * fp32.bytes_up_per_round);
  // topk:0.01 with error feedback and its default sparse refit (the last 60% of the local
  // steps train only the values top-k picked, at 4x the learning rate): within 1.5 points.
  // Gaps to fp32 on run seeds 1/2/3: 1.12 / 1.43 / 1.02 (89.24 / 89.03 / 89.38% against
  // 90.36 / 90.46 / 90.40%). docs/codecs/topk_error_feedback.md has the measurements.
  EXPECT_GE(topk.tail_accuracy, fp32.tail_accuracy - 0.015);
  EXPECT_LE(topk.bytes_up_per_round, 0.025 * fp32.bytes_up_per_round);
  // Without the refit (top-k cut from the dense update) it misses that bar: gaps 1.65 / 2.05
  // / 1.60 on seeds 1-3. The 2-point bound guards this path against regressions (0.35 points
  // of margin on this seed); it is not the bar.
  EXPECT_GE(topk_no_refit.tail_accuracy, fp32.tail_accuracy - 0.02);
  EXPECT_LE(topk_no_refit.bytes_up_per_round, 0.025 * fp32.bytes_up_per_round);
  EXPECT_GT(topk.tail_accuracy, topk_no_refit.tail_accuracy);
}

}  // namespace
}  // namespace fedslice::coordinator
