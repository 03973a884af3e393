// LocalTrainer: the client's side of a round, without a network.
#include "fedslice/client/local_trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "fedslice/common/codec.h"
#include "fedslice/common/net/encoded_tensor.h"

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

}  // namespace
}  // namespace fedslice::client
