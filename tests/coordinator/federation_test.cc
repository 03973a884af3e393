// Federation round logic and the in-process simulator, on a tiny model and synthetic data.
#include "fedslice/coordinator/federation.h"

#include <gtest/gtest.h>

#include <random>

#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/coordinator/simulation.h"
#include "testing/test_util.h"

namespace fedslice::coordinator {
namespace {

proto::ModelSpec TinySpec() {
  proto::ModelSpec spec;
  spec.set_name("tiny");
  spec.add_input_shape(1);
  spec.add_input_shape(4);
  spec.add_input_shape(4);
  spec.set_num_classes(4);
  spec.set_init_seed(3);
  spec.add_layers()->mutable_flatten();
  auto* d1 = spec.add_layers()->mutable_dense();
  d1->set_in_features(16);
  d1->set_out_features(12);
  spec.add_layers()->mutable_relu();
  auto* d2 = spec.add_layers()->mutable_dense();
  d2->set_in_features(12);
  d2->set_out_features(4);
  return spec;
}

// Learnable synthetic data: the label is the quadrant of the 4x4 image with the most ink.
data::Dataset SyntheticData(int n, uint64_t seed) {
  data::Dataset d;
  d.sample_shape = {1, 4, 4};
  d.num_classes = 4;
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const int label = static_cast<int>(rng() % 4);
    for (int y = 0; y < 4; ++y) {
      for (int x = 0; x < 4; ++x) {
        const int quadrant = (y / 2) * 2 + (x / 2);
        const float noise = static_cast<float>(rng() % 1000) / 4000.0f;
        d.features.push_back((quadrant == label ? 0.7f : 0.0f) + noise);
      }
    }
    d.labels.push_back(label);
  }
  return d;
}

SimulationConfig BaseConfig() {
  SimulationConfig config;
  config.num_clients = 6;
  config.federation.model = TinySpec();
  config.federation.rounds = 4;
  config.federation.fraction = 0.5;
  config.federation.min_fit = 2;
  config.federation.local_epochs = 2;
  config.federation.batch_size = 8;
  config.federation.learning_rate = 0.1f;
  config.federation.seed = 11;
  return config;
}

TEST(SimulationTest, LearnsAndIsIndependentOfParallelism) {
  const data::Dataset train = SyntheticData(600, 1);
  const data::Dataset test = SyntheticData(200, 2);
  SimulationConfig config = BaseConfig();
  std::vector<float> one_worker, two_workers;
  config.parallelism = 1;
  auto first = RunSimulation(config, train, test, {}, &one_worker);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_EQ(first->size(), 4u);
  EXPECT_GT(first->back().accuracy(), 0.8);
  EXPECT_EQ(first->front().clients_asked(), 3u);
  EXPECT_EQ(first->front().clients_answered(), 3u);
  config.parallelism = 2;
  auto second = RunSimulation(config, train, test, {}, &two_workers);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(one_worker, two_workers);  // bit-identical
}

TEST(SimulationTest, ResumedRunEqualsUninterruptedRun) {
  const data::Dataset train = SyntheticData(600, 1);
  const data::Dataset test = SyntheticData(200, 2);
  testing::TempDir dir;
  SimulationConfig config = BaseConfig();
  std::vector<float> uninterrupted, resumed;
  ASSERT_TRUE(RunSimulation(config, train, test, {}, &uninterrupted).ok());

  config.federation.out_dir = dir.path();
  config.federation.rounds = 2;
  ASSERT_TRUE(RunSimulation(config, train, test).ok());
  config.federation.rounds = 4;
  auto rest = RunSimulation(config, train, test, {}, &resumed);
  ASSERT_TRUE(rest.ok()) << rest.status().ToString();
  ASSERT_EQ(rest->size(), 2u);
  EXPECT_EQ(rest->front().round(), 3u);
  EXPECT_EQ(resumed, uninterrupted);

  // A resume with other settings is refused, naming what changed.
  config.federation.learning_rate = 0.2f;
  config.federation.rounds = 5;
  auto refused = RunSimulation(config, train, test);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("learning_rate"), std::string::npos)
      << refused.status().ToString();
}

// The run fingerprint holds the effective sparse refit, and only when it is on: runs without
// it keep the fingerprint they had before it existed.
TEST(FederationTest, FingerprintNamesTheSparseRefitWhenItIsOn) {
  FederationConfig config = BaseConfig().federation;
  config.codec.set_name("topk:0.1");
  const RunConfig by_default = config.Fingerprint();
  ASSERT_EQ(by_default.count("sparse_refit"), 1u);
  EXPECT_EQ(by_default.at("sparse_refit_lr_scale"), "4");
  config.codec.set_sparse_refit(0.6f);
  EXPECT_EQ(config.Fingerprint(), by_default);  // the default, spelt out
  config.codec.set_sparse_refit_lr_scale(8);
  EXPECT_EQ(config.Fingerprint().at("sparse_refit_lr_scale"), "8");
  config.codec.set_sparse_refit(0);
  EXPECT_EQ(config.Fingerprint().count("sparse_refit"), 0u);
  EXPECT_EQ(config.Fingerprint().count("sparse_refit_lr_scale"), 0u);
  config.codec.set_name("int8");
  config.codec.clear_sparse_refit();
  EXPECT_EQ(config.Fingerprint().count("sparse_refit"), 0u);
}

TEST(SimulationTest, AResumeThatWouldTurnTheRefitOnIsRefused) {
  const data::Dataset train = SyntheticData(600, 1);
  const data::Dataset test = SyntheticData(200, 2);
  testing::TempDir dir;
  SimulationConfig config = BaseConfig();
  config.federation.codec.set_name("topk:0.1");
  config.federation.codec.set_sparse_refit(0);
  config.federation.out_dir = dir.path();
  config.federation.rounds = 2;
  ASSERT_TRUE(RunSimulation(config, train, test).ok());
  config.federation.rounds = 4;
  config.federation.codec.clear_sparse_refit();
  auto refused = RunSimulation(config, train, test);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("sparse_refit: not set in the checkpoint"),
            std::string::npos)
      << refused.status().ToString();
  config.federation.codec.set_sparse_refit(0);
  auto resumed = RunSimulation(config, train, test);
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->size(), 2u);
}

TEST(FederationTest, RoundNeedsMinFitAndRetriesWithAnotherSample) {
  FederationConfig config = BaseConfig().federation;
  config.fraction = 0.4;
  auto fed = Federation::Create(config, std::nullopt);
  ASSERT_TRUE(fed.ok()) << fed.status().ToString();
  std::vector<std::string> ids = {"a", "b", "c", "d", "e"};
  auto plan = (*fed)->BeginRound(ids, 0);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_EQ(plan->assignments.size(), 2u);
  const auto before = std::vector<float>((*fed)->global_model().params().begin(),
                                         (*fed)->global_model().params().end());
  // One valid result, the other client drops: the round falls short and changes nothing.
  const Assignment& first = plan->assignments[0];
  proto::FitResult result;
  result.set_round(first.task.round());
  result.set_task_id(first.task.task_id());
  result.set_num_samples(5);
  std::vector<float> delta(before.size(), 0.01f);
  ASSERT_TRUE(net::EncodeFp32(delta, result.mutable_update()).ok());
  ASSERT_TRUE((*fed)->AcceptFitResult(first.client_id, result).ok());
  // Answering twice is refused.
  EXPECT_EQ((*fed)->AcceptFitResult(first.client_id, result).code(),
            Status::Code::kFailedPrecondition);
  // A client that was not asked is refused.
  std::string outsider;
  for (const auto& id : ids) {
    if (id != plan->assignments[0].client_id && id != plan->assignments[1].client_id) outsider = id;
  }
  EXPECT_EQ((*fed)->AcceptFitResult(outsider, result).code(), Status::Code::kFailedPrecondition);
  (*fed)->MarkDropped(plan->assignments[1].client_id);
  EXPECT_TRUE((*fed)->PendingClients().empty());
  auto short_round = (*fed)->FinishRound({});
  ASSERT_FALSE(short_round.ok());
  EXPECT_EQ(short_round.status().code(), Status::Code::kUnavailable);
  EXPECT_EQ((*fed)->completed_rounds(), 0u);
  EXPECT_TRUE(std::equal(before.begin(), before.end(), (*fed)->global_model().params().begin()));

  auto retry = (*fed)->BeginRound(ids, 1);
  ASSERT_TRUE(retry.ok());
  EXPECT_EQ(retry->round, 1u);
  EXPECT_NE(retry->assignments[0].task.task_id(), first.task.task_id());
}

TEST(FederationTest, RefusesBadConfiguration) {
  FederationConfig config = BaseConfig().federation;
  config.fraction = 1.5;
  auto fed = Federation::Create(config, std::nullopt);
  ASSERT_FALSE(fed.ok());
  EXPECT_NE(fed.status().message().find("fraction"), std::string::npos);
  config = BaseConfig().federation;
  config.learning_rate = std::nanf("");
  EXPECT_FALSE(Federation::Create(config, std::nullopt).ok());
}

}  // namespace
}  // namespace fedslice::coordinator
