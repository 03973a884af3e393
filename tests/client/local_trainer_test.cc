// LocalTrainer: the client's side of a round, without a network.
#include "fedslice/client/local_trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "fedslice/common/codec.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/trainer.h"

namespace fedslice::client {
namespace {

proto::ModelSpec TinySpec() {
  proto::ModelSpec spec;
  spec.set_name("tiny");
  spec.add_input_shape(1);
  spec.add_input_shape(2);
  spec.add_input_shape(2);
  spec.set_num_classes(2);
  spec.add_layers()->mutable_flatten();
  auto* dense = spec.add_layers()->mutable_dense();
  dense->set_in_features(4);
  dense->set_out_features(2);
  return spec;
}

data::Dataset TinyData() {
  data::Dataset d;
  d.sample_shape = {1, 2, 2};
  d.num_classes = 2;
  std::mt19937 rng(5);
  for (int i = 0; i < 40; ++i) {
    const int label = i % 2;
    for (int k = 0; k < 4; ++k) {
      d.features.push_back(static_cast<float>(rng() % 100) / 200.0f + (k == label ? 0.5f : 0));
    }
    d.labels.push_back(label);
  }
  return d;
}

proto::FitTask Task(const Model& model, const std::string& codec, uint64_t task_id) {
  proto::FitTask task;
  task.set_round(task_id);
  task.set_task_id(task_id);
  EXPECT_TRUE(net::EncodeFp32(model.params(), task.mutable_global_weights()).ok());
  task.set_local_epochs(1);
  task.set_batch_size(8);
  task.set_learning_rate(0.1f);
  task.mutable_codec()->set_name(codec);
  task.set_seed(task_id);
  return task;
}

TEST(LocalTrainerTest, UpdateIsLocalMinusGlobalInTheTasksCodec) {
  auto model = Model::Create(TinySpec());
  ASSERT_TRUE(model.ok());
  LocalTrainer trainer(TinyData(), std::nullopt);
  ASSERT_TRUE(trainer.SetModel(TinySpec(), "run-a").ok());
  auto result = trainer.Fit(Task(*model, "int8", 1));
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_EQ(result->update().codec(), "int8");
  EXPECT_EQ(result->num_samples(), 40u);
  std::vector<float> delta(static_cast<size_t>(model->param_count()));
  ASSERT_TRUE(codec::Decode(result->update(), delta).ok());
  double norm = 0;
  for (float v : delta) norm += std::abs(v);
  EXPECT_GT(norm, 0.0);
  EXPECT_TRUE(trainer.residual().empty());  // int8 has no error feedback by default
}

TEST(LocalTrainerTest, ErrorFeedbackResidualSurvivesReconnectsOfTheSameRunOnly) {
  auto model = Model::Create(TinySpec());
  ASSERT_TRUE(model.ok());
  LocalTrainer trainer(TinyData(), std::nullopt);
  ASSERT_TRUE(trainer.SetModel(TinySpec(), "run-a").ok());
  ASSERT_TRUE(trainer.Fit(Task(*model, "sign", 1)).ok());
  const std::vector<float> residual(trainer.residual().begin(), trainer.residual().end());
  ASSERT_EQ(residual.size(), static_cast<size_t>(model->param_count()));
  double norm = 0;
  for (float v : residual) norm += std::abs(v);
  EXPECT_GT(norm, 0.0);

  // A reconnect re-announces the same run: the residual stays.
  ASSERT_TRUE(trainer.SetModel(TinySpec(), "run-a").ok());
  EXPECT_TRUE(std::equal(residual.begin(), residual.end(), trainer.residual().begin()));
  // A new run starts afresh.
  ASSERT_TRUE(trainer.SetModel(TinySpec(), "run-b").ok());
  EXPECT_TRUE(trainer.residual().empty());
}

TEST(LocalTrainerTest, RefusesBadTasksAndKeepsItsModel) {
  auto model = Model::Create(TinySpec());
  ASSERT_TRUE(model.ok());
  LocalTrainer trainer(TinyData(), std::nullopt);
  EXPECT_EQ(trainer.Fit(Task(*model, "fp32", 1)).status().code(),
            Status::Code::kFailedPrecondition);  // no Welcome yet
  ASSERT_TRUE(trainer.SetModel(TinySpec()).ok());
  EXPECT_FALSE(trainer.Fit(Task(*model, "carrier-pigeon", 1)).ok());
  proto::FitTask nan_task = Task(*model, "fp32", 2);
  const float nan = std::nanf("");
  std::memcpy(nan_task.mutable_global_weights()->mutable_payload()->data(), &nan, 4);
  auto refused = trainer.Fit(nan_task);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Status::Code::kInvalidArgument);
  // Data that does not fit another model is refused and the old model stays usable.
  proto::ModelSpec wider = TinySpec();
  wider.set_input_shape(1, 3);
  wider.mutable_layers(1)->mutable_dense()->set_in_features(6);
  EXPECT_FALSE(trainer.SetModel(wider).ok());
  EXPECT_TRUE(trainer.Fit(Task(*model, "fp32", 3)).ok());
}

// flatten -> dense 4x16 -> relu -> dense 16x2: 130 weights, so that topk:0.1 keeps 13.
proto::ModelSpec HiddenSpec() {
  proto::ModelSpec spec = TinySpec();
  spec.set_name("hidden");
  spec.mutable_layers(1)->mutable_dense()->set_out_features(16);
  spec.add_layers()->mutable_relu();
  auto* out = spec.add_layers()->mutable_dense();
  out->set_in_features(16);
  out->set_out_features(2);
  return spec;
}

struct Fitted {
  std::vector<float> update;    // decoded
  std::vector<float> residual;  // after the fit
  int64_t fallbacks = 0;
  uint64_t steps = 0;
};

// TinyData with labels that the features do not predict: a loss no step size can push far
// below ln 2, so that large steps overshoot.
data::Dataset NoiseData() {
  data::Dataset d = TinyData();
  std::mt19937 rng(11);
  for (int32_t& label : d.labels) label = static_cast<int32_t>(rng() % 2);
  return d;
}

// One fit of a fresh trainer (empty residual): 40 samples, batches of 8, so 5 steps per
// epoch.
Fitted FitOnce(const Model& model, const proto::FitTask& task, data::Dataset data = TinyData()) {
  LocalTrainer trainer(std::move(data), std::nullopt);
  EXPECT_TRUE(trainer.SetModel(HiddenSpec(), "run").ok());
  auto result = trainer.Fit(task);
  EXPECT_TRUE(result.ok()) << result.status().ToString();
  Fitted out;
  out.update.resize(static_cast<size_t>(model.param_count()));
  if (!result.ok()) return out;
  EXPECT_TRUE(codec::Decode(result->update(), out.update).ok());
  out.residual.assign(trainer.residual().begin(), trainer.residual().end());
  out.fallbacks = trainer.sparse_refit_fallbacks();
  out.steps = result->num_steps();
  return out;
}

double LocalLoss(const Model& global, const std::vector<float>& update) {
  Model model = *Model::Create(HiddenSpec());
  std::vector<float> params(global.params().begin(), global.params().end());
  for (size_t i = 0; i < params.size(); ++i) params[i] += update[i];
  EXPECT_TRUE(model.SetParams(params).ok());
  return fedslice::Evaluate(model, TinyData())->loss;
}

std::vector<uint32_t> Support(const std::vector<float>& v) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] != 0.0f) out.push_back(static_cast<uint32_t>(i));
  }
  return out;
}

// topk with 5 epochs = 25 steps: the default share 0.6 refits the last 15, so the top-k
// choice is made after 2 epochs. A plain topk fit of 2 epochs is what it starts from.
TEST(LocalTrainerTest, SparseRefitFitsTheSentValuesToTheLocalData) {
  auto model = Model::Create(HiddenSpec());
  ASSERT_TRUE(model.ok());
  proto::FitTask refit_task = Task(*model, "topk:0.1", 1);
  refit_task.set_local_epochs(5);
  proto::FitTask dense_task = Task(*model, "topk:0.1", 1);
  dense_task.set_local_epochs(2);
  dense_task.mutable_codec()->set_sparse_refit(0);
  const Fitted refit = FitOnce(*model, refit_task);
  const Fitted dense = FitOnce(*model, dense_task);
  EXPECT_EQ(refit.fallbacks, 0);
  EXPECT_EQ(refit.steps, 25u);
  EXPECT_EQ(dense.steps, 10u);

  // The same 13 weights are sent, with other values ...
  // (A kept weight of a unit that never activated can be 0: it is kept, and decodes as 0.)
  const std::vector<uint32_t> sent = Support(dense.update);
  ASSERT_GE(sent.size(), 10u);
  EXPECT_EQ(Support(refit.update), sent);
  int changed = 0;
  for (const uint32_t i : sent) changed += refit.update[i] != dense.update[i];
  EXPECT_GE(changed, 10);
  // ... that fit the local data better than the truncated update does ...
  EXPECT_LT(LocalLoss(*model, refit.update), LocalLoss(*model, dense.update));
  // ... while what stays owed is exactly the dense steps' update off the sent weights.
  EXPECT_EQ(refit.residual, dense.residual);
  for (const uint32_t i : sent) EXPECT_EQ(refit.residual[i], 0.0f);
}

TEST(LocalTrainerTest, ARefitThatFailsSendsTheDenseStepsUpdateInstead) {
  auto model = Model::Create(HiddenSpec());
  ASSERT_TRUE(model.ok());
  proto::FitTask wild = Task(*model, "topk:0.1", 1);
  wild.set_local_epochs(5);
  wild.mutable_codec()->set_sparse_refit_lr_scale(64);  // refit steps at lr 6.4
  proto::FitTask dense_task = wild;
  dense_task.set_local_epochs(2);
  dense_task.mutable_codec()->set_sparse_refit(0);
  const Fitted fell_back = FitOnce(*model, wild, NoiseData());
  const Fitted dense = FitOnce(*model, dense_task, NoiseData());
  EXPECT_EQ(fell_back.fallbacks, 1);
  EXPECT_EQ(fell_back.update, dense.update);
  EXPECT_EQ(fell_back.residual, dense.residual);
  EXPECT_EQ(fell_back.steps, 25u);
}

TEST(LocalTrainerTest, RefusesBadSparseRefitSettingsAndKeepsItsResidual) {
  auto model = Model::Create(HiddenSpec());
  ASSERT_TRUE(model.ok());
  LocalTrainer trainer(TinyData(), std::nullopt);
  ASSERT_TRUE(trainer.SetModel(HiddenSpec(), "run").ok());
  ASSERT_TRUE(trainer.Fit(Task(*model, "topk:0.1", 1)).ok());
  const std::vector<float> residual(trainer.residual().begin(), trainer.residual().end());
  ASSERT_FALSE(residual.empty());
  struct Bad {
    std::string codec;
    float share;
    float scale;
    std::string says;
  };
  for (const Bad& bad : {Bad{"topk:0.1", 1.5f, 0, "share must be in [0, 1)"},
                         Bad{"topk:0.1", 0.5f, 100, "scale must be in [0, 64]"},
                         Bad{"int8", 0.5f, 0, "topk codecs only"}}) {
    proto::FitTask task = Task(*model, bad.codec, 2);
    task.mutable_codec()->set_sparse_refit(bad.share);
    task.mutable_codec()->set_sparse_refit_lr_scale(bad.scale);
    auto refused = trainer.Fit(task);
    ASSERT_FALSE(refused.ok()) << bad.says;
    EXPECT_EQ(refused.status().code(), Status::Code::kInvalidArgument);
    EXPECT_NE(refused.status().message().find(bad.says), std::string::npos)
        << refused.status().ToString();
    EXPECT_NE(refused.status().message().find("FitTask"), std::string::npos);
    EXPECT_EQ(std::vector<float>(trainer.residual().begin(), trainer.residual().end()), residual);
  }
}

}  // namespace
}  // namespace fedslice::client
