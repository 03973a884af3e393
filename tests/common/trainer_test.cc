#include "fedslice/common/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"

namespace fedslice {
namespace {

using ::testing::HasSubstr;

// A learnable toy problem in MNIST's shape: class c has a bright 7x7 block at a
// class-specific position, plus noise.
data::Dataset Blocks(int n, uint32_t seed) {
  data::Dataset d;
  d.sample_shape = {1, 28, 28};
  d.num_classes = 10;
  d.features.assign(static_cast<size_t>(n) * 784, 0.0f);
  d.labels.resize(n);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> noise(0.0f, 0.3f);
  for (int i = 0; i < n; ++i) {
    const int c = static_cast<int>(rng() % 10);
    d.labels[i] = c;
    float* x = d.features.data() + static_cast<size_t>(i) * 784;
    for (int p = 0; p < 784; ++p) x[p] = noise(rng);
    const int r0 = (c / 4) * 7 + 3, c0 = (c % 4) * 7;
    for (int r = r0; r < r0 + 7; ++r)
      for (int k = c0; k < c0 + 7; ++k) x[r * 28 + k] = 1.0f;
  }
  return d;
}

TEST(TrainerTest, TrainingLearnsAToyProblemAndReportsStats) {
  Model model = *Model::Create(MlpSpec());
  const data::Dataset train = Blocks(300, 1), test = Blocks(200, 2);
  const EvalStats before = *Evaluate(model, test);
  std::vector<EpochStats> epochs;
  Result<TrainStats> stats =
      Train(model, train, {.epochs = 3, .batch_size = 16, .lr = 0.05f, .momentum = 0.5f}, {},
            [&](const EpochStats& e) { epochs.push_back(e); });
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->num_samples, 300);
  EXPECT_EQ(stats->samples_processed, 900);
  EXPECT_EQ(stats->steps, 3 * 19);  // 18 full batches + one of 12
  ASSERT_EQ(epochs.size(), 3u);
  EXPECT_EQ(epochs[2].epoch, 3);
  EXPECT_LT(epochs[2].mean_loss, epochs[0].mean_loss);
  EXPECT_EQ(stats->mean_loss, epochs[2].mean_loss);
  const EvalStats after = *Evaluate(model, test, 64);
  EXPECT_EQ(after.count, 200);
  EXPECT_LT(after.loss, before.loss);
  EXPECT_GT(after.accuracy, 0.9);
  Result<Tensor> logits = Predict(model, test, 7);
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(logits->shape(), (std::vector<int64_t>{200, 10}));
}

TEST(TrainerTest, SameSeedGivesBitIdenticalWeights) {
  const data::Dataset train = Blocks(120, 3);
  const TrainConfig config{.epochs = 2, .batch_size = 10, .lr = 0.05f, .momentum = 0.9f,
                           .weight_decay = 1e-4f, .seed = 42};
  for (const proto::ModelSpec& spec : {MlpSpec(), CnnSpec()}) {
    Model a = *Model::Create(spec), b = *Model::Create(spec), c = *Model::Create(spec);
    ASSERT_TRUE(Train(a, train, config).ok());
    ASSERT_TRUE(Train(b, train, config).ok());
    TrainConfig other = config;
    other.seed = 43;
    ASSERT_TRUE(Train(c, train, other).ok());
    EXPECT_TRUE(std::equal(a.params().begin(), a.params().end(), b.params().begin()))
        << spec.name();
    EXPECT_FALSE(std::equal(a.params().begin(), a.params().end(), c.params().begin()))
        << spec.name();
  }
}

TEST(TrainerTest, FedProxNeedsAnAnchorAndPullsTowardsIt) {
  const data::Dataset train = Blocks(100, 4);
  const Model global = *Model::Create(MlpSpec());
  TrainConfig config{.epochs = 2, .batch_size = 10, .lr = 0.05f, .prox_mu = 1.0f};
  Model m = global;
  EXPECT_THAT(Train(m, train, config).status().message(), HasSubstr("FedProx needs"));
  Model prox = global, plain = global;
  ASSERT_TRUE(Train(prox, train, config, global.params()).ok());
  config.prox_mu = 0;
  ASSERT_TRUE(Train(plain, train, config).ok());
  auto dist = [&](const Model& x) {
    double d = 0;
    for (size_t i = 0; i < global.params().size(); ++i) {
      d += std::pow(double{x.params()[i]} - global.params()[i], 2);
    }
    return d;
  };
  EXPECT_LT(dist(prox), dist(plain));
}

TEST(TrainerTest, RejectsBadDataAndConfigWithoutTouchingTheModel) {
  Model model = *Model::Create(MlpSpec());
  const std::vector<float> before(model.params().begin(), model.params().end());
  const data::Dataset good = Blocks(20, 5);
  auto err = [&](const data::Dataset& d, const TrainConfig& c) {
    Result<TrainStats> r = Train(model, d, c);
    EXPECT_FALSE(r.ok());
    return r.status().message();
  };
  const TrainConfig ok_config{.epochs = 1, .batch_size = 10, .lr = 0.1f};
  data::Dataset d = good;
  d.sample_shape = {784};
  EXPECT_THAT(err(d, ok_config), HasSubstr("shape [784] but model 'mlp' takes [1, 28, 28]"));
  d = good;
  d.labels[3] = 10;
  EXPECT_THAT(err(d, ok_config), HasSubstr("label 10 of sample 3"));
  d = good;
  d.features[784 * 2 + 5] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(err(d, ok_config), HasSubstr("feature 5 of sample 2 is not finite"));
  d = good;
  d.features.pop_back();
  EXPECT_THAT(err(d, ok_config), HasSubstr("feature values"));
  d = good;
  d.labels.clear();
  d.features.clear();
  EXPECT_THAT(err(d, ok_config), HasSubstr("empty"));
  TrainConfig c = ok_config;
  c.batch_size = 0;
  EXPECT_THAT(err(good, c), HasSubstr("batch size"));
  c = ok_config;
  c.lr = -1;
  EXPECT_THAT(err(good, c), HasSubstr("learning rate"));
  c = ok_config;
  c.epochs = -1;
  EXPECT_THAT(err(good, c), HasSubstr("epochs"));
  EXPECT_FALSE(Evaluate(model, good, 0).ok());
  EXPECT_TRUE(std::equal(before.begin(), before.end(), model.params().begin()));
}

TEST(TrainerTest, DivergenceRestoresTheWeights) {
  Model model = *Model::Create(MlpSpec());
  const std::vector<float> before(model.params().begin(), model.params().end());
  Result<TrainStats> r =
      Train(model, Blocks(200, 6), {.epochs = 5, .batch_size = 10, .lr = 1e6f, .momentum = 0.9f});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kAborted);
  EXPECT_THAT(r.status().message(), HasSubstr("diverged"));
  EXPECT_TRUE(std::equal(before.begin(), before.end(), model.params().begin()));
}

TEST(TrainerTest, AfterStepSeesEveryStepAndMayChangeWeightsAndLearningRate) {
  Model model = *Model::Create(MlpSpec());
  Sgd optimizer({.lr = 0.05f});
  std::vector<int64_t> seen;
  // The hook pins weight 0 and, from step 3 on, stops learning (lr 1e-30 is valid).
  Result<TrainStats> stats = Train(model, Blocks(50, 3), {.epochs = 2, .batch_size = 10}, optimizer,
                                   {}, {}, [&](int64_t steps_done) {
                                     seen.push_back(steps_done);
                                     model.params()[0] = 0.25f;
                                     if (steps_done == 3) optimizer.set_lr(1e-30f);
                                     return Status::Ok();
                                   });
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(seen, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(model.params()[0], 0.25f);
  EXPECT_EQ(optimizer.options().lr, 1e-30f);
}

TEST(TrainerTest, AnAfterStepErrorRestoresWeightsAndLearningRate) {
  Model model = *Model::Create(MlpSpec());
  const std::vector<float> before(model.params().begin(), model.params().end());
  Sgd optimizer({.lr = 0.05f});
  Result<TrainStats> r =
      Train(model, Blocks(50, 3), {.epochs = 2, .batch_size = 10}, optimizer, {}, {},
            [&](int64_t steps_done) {
              optimizer.set_lr(0.5f);
              return steps_done == 4 ? Status::InvalidArgument("hook says no") : Status::Ok();
            });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "hook says no");
  EXPECT_TRUE(std::equal(before.begin(), before.end(), model.params().begin()));
  EXPECT_EQ(optimizer.options().lr, 0.05f);
}

TEST(ThreadingTest, SetNumThreadsIsObservable) {
  const int original = NumThreads();
  EXPECT_GE(original, 1);
  SetNumThreads(1);
  EXPECT_EQ(NumThreads(), 1);
  SetNumThreads(0);
  EXPECT_EQ(NumThreads(), original);
}

}  // namespace
}  // namespace fedslice
