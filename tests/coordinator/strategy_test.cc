#include "fedslice/coordinator/strategy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace fedslice::coordinator {
namespace {

using Kind = StrategyConfig::Kind;

std::unique_ptr<Strategy> Make(std::string_view text, size_t n) {
  Result<StrategyConfig> config = StrategyConfig::Parse(text);
  EXPECT_TRUE(config.ok()) << config.status().ToString();
  Result<std::unique_ptr<Strategy>> s = MakeStrategy(*config, n);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return std::move(s).value();
}

struct Update {
  std::vector<float> delta;
  uint64_t samples;
};

std::vector<Update> RandomUpdates(size_t clients, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> value(0.0f, 0.05f);
  std::uniform_int_distribution<int> samples(1, 600);
  std::vector<Update> out(clients);
  for (Update& u : out) {
    u.delta.resize(n);
    for (float& v : u.delta) v = value(rng);
    u.samples = static_cast<uint64_t>(samples(rng));
  }
  return out;
}

// Runs one round and returns the new weights.
std::vector<float> Round(Strategy& s, std::vector<float> global, const std::vector<Update>& ups) {
  EXPECT_TRUE(s.BeginRound(global).ok());
  for (const Update& u : ups) EXPECT_TRUE(s.Accumulate(u.delta, u.samples).ok());
  Status st = s.FinishRound(global);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return global;
}

TEST(FedAvgTest, EqualsHandComputedWeightedMean) {
  auto s = Make("fedavg", 3);
  std::vector<float> global = {1.0f, 2.0f, 3.0f};
  ASSERT_TRUE(s->BeginRound(global).ok());
  ASSERT_TRUE(s->Accumulate(std::vector<float>{1.0f, 0.0f, -1.0f}, 1).ok());
  ASSERT_TRUE(s->Accumulate(std::vector<float>{0.5f, 2.0f, 1.0f}, 3).ok());
  EXPECT_EQ(s->num_accumulated(), 2u);
  EXPECT_EQ(s->total_samples(), 4u);
  ASSERT_TRUE(s->FinishRound(global).ok());
  // w + (1 * d1 + 3 * d2) / 4
  EXPECT_NEAR(global[0], 1.0 + (1.0 + 1.5) / 4, 1e-6);
  EXPECT_NEAR(global[1], 2.0 + (0.0 + 6.0) / 4, 1e-6);
  EXPECT_NEAR(global[2], 3.0 + (-1.0 + 3.0) / 4, 1e-6);
}

TEST(FedAvgTest, OrderIndependentAndMatchesDoubleReference) {
  const size_t n = 5000;
  std::vector<Update> ups = RandomUpdates(30, n, 7);
  std::vector<float> global(n);
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (float& w : global) w = g(rng);

  auto s = Make("fedavg", n);
  const std::vector<float> in_order = Round(*s, global, ups);
  std::vector<Update> shuffled = ups;
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  const std::vector<float> other_order = Round(*s, global, shuffled);

  double total = 0;
  for (const Update& u : ups) total += static_cast<double>(u.samples);
  double max_order_diff = 0;
  double max_ref_diff = 0;
  for (size_t i = 0; i < n; ++i) {
    double ref = 0;
    for (const Update& u : ups) ref += static_cast<double>(u.samples) * u.delta[i];
    ref = global[i] + ref / total;
    max_order_diff = std::max(max_order_diff, std::abs(double{in_order[i]} - other_order[i]));
    max_ref_diff = std::max(max_ref_diff, std::abs(double{in_order[i]} - ref));
  }
  EXPECT_LE(max_order_diff, 1e-6);
  EXPECT_LE(max_ref_diff, 1e-6);
  // The update actually moved the model.
  EXPECT_NE(in_order, global);
}

TEST(FedProxTest, AggregatesLikeFedAvgAndExposesMu) {
  auto prox = Make("fedprox:mu=0.25", 4);
  auto avg = Make("fedavg", 4);
  EXPECT_EQ(prox->name(), "fedprox");
  EXPECT_FLOAT_EQ(prox->proximal_mu(), 0.25f);
  EXPECT_EQ(avg->proximal_mu(), 0.0f);
  std::vector<Update> ups = RandomUpdates(5, 4, 11);
  std::vector<float> global = {0.1f, -0.2f, 0.3f, 0.0f};
  EXPECT_EQ(Round(*prox, global, ups), Round(*avg, global, ups));
}

TEST(FedAvgMTest, OneAndTwoStepsMatchHandComputation) {
  auto s = Make("fedavgm:lr=0.5,momentum=0.9", 2);
  const std::vector<float> w0 = {1.0f, -1.0f};
  // Round 1: mean delta = (2 * {0.2, 0.4} + 2 * {0.0, -0.2}) / 4 = {0.1, 0.1}
  const std::vector<float> w1 = Round(*s, w0, {{{0.2f, 0.4f}, 2}, {{0.0f, -0.2f}, 2}});
  // v1 = d1 = {0.1, 0.1}; w1 = w0 + 0.5 v1
  EXPECT_NEAR(w1[0], 1.0 + 0.5 * 0.1, 1e-6);
  EXPECT_NEAR(w1[1], -1.0 + 0.5 * 0.1, 1e-6);
  // Round 2: mean delta = {-0.3, 0.2}; v2 = 0.9 v1 + d2; w2 = w1 + 0.5 v2
  const std::vector<float> w2 = Round(*s, w1, {{{-0.3f, 0.2f}, 5}});
  const double v2[2] = {0.9 * 0.1 - 0.3, 0.9 * 0.1 + 0.2};
  EXPECT_NEAR(w2[0], 1.05 + 0.5 * v2[0], 1e-6);
  EXPECT_NEAR(w2[1], -0.95 + 0.5 * v2[1], 1e-6);
  proto::StrategyState state = s->SaveState();
  EXPECT_EQ(state.step(), 2u);
  ASSERT_EQ(state.first_moment_size(), 2);
  EXPECT_NEAR(state.first_moment(0), v2[0], 1e-7);
  EXPECT_NEAR(state.first_moment(1), v2[1], 1e-7);
}

TEST(FedAdamTest, OneAndTwoStepsMatchHandComputation) {
  const double lr = 0.01, b1 = 0.9, b2 = 0.99, tau = 1e-3;
  auto s = Make("fedadam", 2);
  EXPECT_EQ(s->config().ToString(), "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001");
  const std::vector<float> w0 = {0.5f, -0.25f};
  const double d1[2] = {0.02, -0.004};
  const std::vector<float> w1 = Round(*s, w0, {{{0.02f, -0.004f}, 10}});
  double m[2], v[2], w[2];
  for (int i = 0; i < 2; ++i) {
    m[i] = (1 - b1) * d1[i];
    v[i] = b2 * tau * tau + (1 - b2) * d1[i] * d1[i];  // v starts at tau^2
    w[i] = w0[i] + lr * m[i] / (std::sqrt(v[i]) + tau);
    EXPECT_NEAR(w1[i], w[i], 1e-6) << i;
  }
  // Second step, two clients: mean delta = (1 * {0.01, 0.03} + 3 * {-0.01, 0.01}) / 4
  const std::vector<float> w2 = Round(*s, w1, {{{0.01f, 0.03f}, 1}, {{-0.01f, 0.01f}, 3}});
  const double d2[2] = {(0.01 - 0.03) / 4, (0.03 + 0.03) / 4};
  for (int i = 0; i < 2; ++i) {
    m[i] = b1 * m[i] + (1 - b1) * d2[i];
    v[i] = b2 * v[i] + (1 - b2) * d2[i] * d2[i];
    w[i] = w[i] + lr * m[i] / (std::sqrt(v[i]) + tau);
    EXPECT_NEAR(w2[i], w[i], 1e-6) << i;
  }
  const proto::StrategyState state = s->SaveState();
  ASSERT_EQ(state.second_moment_size(), 2);
  EXPECT_NEAR(state.first_moment(1), m[1], 1e-8);
  EXPECT_NEAR(state.second_moment(1), v[1], 1e-10);
}

class AllStrategiesTest : public ::testing::TestWithParam<const char*> {};

TEST_P(AllStrategiesTest, BadUpdatesAreRejectedAndLeaveTheAggregateUnchanged) {
  const size_t n = 4;
  const std::vector<float> global = {1, 2, 3, 4};
  const std::vector<float> good1 = {0.1f, 0.2f, -0.1f, 0.0f};
  const std::vector<float> good2 = {-0.3f, 0.1f, 0.2f, 0.5f};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();

  auto clean = Make(GetParam(), n);
  const std::vector<float> expected = Round(*clean, global, {{good1, 3}, {good2, 5}});

  auto s = Make(GetParam(), n);
  ASSERT_TRUE(s->BeginRound(global).ok());
  ASSERT_TRUE(s->Accumulate(good1, 3).ok());
  const struct {
    std::vector<float> delta;
    uint64_t samples;
    const char* what;
  } bad[] = {
      {{0.1f, 0.2f, 0.3f}, 3, "values"},
      {{0.1f, 0.2f, 0.3f, 0.4f, 0.5f}, 3, "values"},
      {{}, 3, "values"},
      {{0.1f, nan, 0.3f, 0.4f}, 3, "NaN"},
      {{0.1f, 0.2f, inf, 0.4f}, 3, "infinite"},
      {{-inf, 0.2f, 0.3f, 0.4f}, 3, "infinite"},
      {good2, 0, "0 training samples"},
      {good2, kMaxSamplesPerUpdate + 1, "more than the limit"},
  };
  for (const auto& b : bad) {
    Status st = s->Accumulate(b.delta, b.samples);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << b.what;
    EXPECT_NE(st.message().find(b.what), std::string::npos) << st.message();
  }
  EXPECT_EQ(s->num_accumulated(), 1u);
  EXPECT_EQ(s->total_samples(), 3u);
  ASSERT_TRUE(s->Accumulate(good2, 5).ok());
  std::vector<float> w = global;
  ASSERT_TRUE(s->FinishRound(w).ok());
  EXPECT_EQ(w, expected);  // bit for bit: the rejected updates left no trace
}

TEST_P(AllStrategiesTest, RoundLifecycleIsEnforced) {
  auto s = Make(GetParam(), 2);
  std::vector<float> w = {1, 2};
  const std::vector<float> d = {0.5f, 0.5f};
  EXPECT_EQ(s->Accumulate(d, 1).code(), Status::Code::kFailedPrecondition);
  EXPECT_EQ(s->FinishRound(w).code(), Status::Code::kFailedPrecondition);
  EXPECT_EQ(s->BeginRound(std::vector<float>{1, 2, 3}).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(s->Accumulate(d, 1).code(), Status::Code::kFailedPrecondition);

  ASSERT_TRUE(s->BeginRound(w).ok());
  EXPECT_EQ(s->FinishRound(w).code(), Status::Code::kFailedPrecondition);  // nothing in yet
  ASSERT_TRUE(s->Accumulate(d, 1).ok());
  std::vector<float> wrong_size = {1, 2, 3};
  EXPECT_EQ(s->FinishRound(wrong_size).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(s->num_accumulated(), 1u);  // the round is still open
  ASSERT_TRUE(s->FinishRound(w).ok());
  EXPECT_EQ(s->Accumulate(d, 1).code(), Status::Code::kFailedPrecondition);  // round closed

  // A retried round starts from scratch: only the update after the second BeginRound counts.
  auto fresh = Make(GetParam(), 2);
  std::vector<float> a = {1, 2};
  std::vector<float> b = {1, 2};
  ASSERT_TRUE(fresh->BeginRound(a).ok());
  ASSERT_TRUE(fresh->Accumulate(std::vector<float>{9.0f, 9.0f}, 100).ok());
  ASSERT_TRUE(fresh->BeginRound(a).ok());
  EXPECT_EQ(fresh->num_accumulated(), 0u);
  ASSERT_TRUE(fresh->Accumulate(d, 1).ok());
  ASSERT_TRUE(fresh->FinishRound(a).ok());
  auto reference = Make(GetParam(), 2);
  ASSERT_TRUE(reference->BeginRound(b).ok());
  ASSERT_TRUE(reference->Accumulate(d, 1).ok());
  ASSERT_TRUE(reference->FinishRound(b).ok());
  EXPECT_EQ(a, b);
}

TEST_P(AllStrategiesTest, OverflowingRoundLeavesModelAndStateUnchanged) {
  auto s = Make(GetParam(), 3);
  std::vector<float> w = {0.0f, 1.0f, 2.0f};
  (void)Round(*s, w, {{{0.1f, 0.1f, 0.1f}, 1}});
  const proto::StrategyState before = s->SaveState();
  const float big = std::numeric_limits<float>::max();
  std::vector<float> model = {big, big, 0.0f};
  ASSERT_TRUE(s->BeginRound(model).ok());
  // The delta is finite, but the step is not representable: FedAvg / FedProx / FedAvgM move
  // w past FLT_MAX, FedAdam's second moment (delta^2) overflows float32.
  ASSERT_TRUE(s->Accumulate(std::vector<float>{big, big, 0.0f}, 1).ok());
  const std::vector<float> model_before = model;
  Status st = s->FinishRound(model);
  EXPECT_EQ(st.code(), Status::Code::kOutOfRange) << st.ToString();
  EXPECT_NE(st.message().find("parameter 0"), std::string::npos) << st.message();
  EXPECT_EQ(model, model_before);
  EXPECT_EQ(s->SaveState().SerializeAsString(), before.SerializeAsString());
}

TEST_P(AllStrategiesTest, SaveLoadContinuesIdentically) {
  const size_t n = 257;
  std::vector<float> w(n, 0.25f);
  auto a = Make(GetParam(), n);
  for (uint32_t r = 0; r < 3; ++r) w = Round(*a, w, RandomUpdates(4, n, 100 + r));
  const proto::StrategyState state = a->SaveState();
  EXPECT_EQ(state.step(), 3u);
  EXPECT_EQ(state.num_params(), n);

  // Through the wire format, as a checkpoint would.
  proto::StrategyState reloaded;
  ASSERT_TRUE(reloaded.ParseFromString(state.SerializeAsString()));
  auto b = Make(GetParam(), n);
  ASSERT_TRUE(b->LoadState(reloaded).ok());
  EXPECT_EQ(b->SaveState().SerializeAsString(), state.SerializeAsString());
  for (uint32_t r = 3; r < 5; ++r) {
    const std::vector<Update> ups = RandomUpdates(4, n, 100 + r);
    const std::vector<float> wa = Round(*a, w, ups);
    const std::vector<float> wb = Round(*b, w, ups);
    ASSERT_EQ(wa, wb) << "round " << r;
    w = wa;
  }
}

TEST_P(AllStrategiesTest, LoadStateRejectsMismatchesAndKeepsState) {
  const size_t n = 8;
  auto s = Make(GetParam(), n);
  std::vector<float> w(n, 1.0f);
  w = Round(*s, w, RandomUpdates(2, n, 5));
  const std::string before = s->SaveState().SerializeAsString();
  const proto::StrategyState good = s->SaveState();

  std::vector<proto::StrategyState> bad;
  bad.push_back(good);
  bad.back().set_kind(s->name() == "fedavg" ? "fedadam" : "fedavg");
  bad.push_back(good);
  bad.back().set_config(good.config() + "x");
  bad.push_back(good);
  bad.back().set_num_params(n + 1);
  bad.push_back(good);
  bad.back().add_first_moment(0.5f);
  bad.push_back(good);
  bad.back().add_second_moment(0.5f);
  if (good.first_moment_size() > 0) {
    bad.push_back(good);
    bad.back().set_first_moment(2, std::numeric_limits<float>::quiet_NaN());
  }
  if (good.second_moment_size() > 0) {
    bad.push_back(good);
    bad.back().set_second_moment(3, -1.0f);
    bad.push_back(good);
    bad.back().mutable_second_moment()->RemoveLast();
  }
  for (size_t i = 0; i < bad.size(); ++i) {
    Status st = s->LoadState(bad[i]);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << i;
    EXPECT_NE(st.message().find("strategy state"), std::string::npos) << st.message();
    EXPECT_EQ(s->SaveState().SerializeAsString(), before) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Strategies, AllStrategiesTest,
                         ::testing::Values("fedavg", "fedprox:mu=0.1", "fedavgm:lr=1,momentum=0.9",
                                           "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001"));

TEST(StrategyConfigTest, ParsesGoodConfigs) {
  struct Case {
    const char* text;
    const char* canonical;
  } cases[] = {
      {"fedavg", "fedavg"},
      {"  fedavg  ", "fedavg"},
      {"fedprox", "fedprox:mu=0.01"},
      {"fedprox:mu=0", "fedprox:mu=0"},
      {"fedprox:mu=0.5", "fedprox:mu=0.5"},
      {"fedavgm", "fedavgm:lr=1,momentum=0.9"},
      {"fedavgm:lr=1,momentum=0.9", "fedavgm:lr=1,momentum=0.9"},
      {"fedavgm:momentum=0.7", "fedavgm:lr=1,momentum=0.7"},
      {"fedavgm: lr = 0.3 , momentum = 0", "fedavgm:lr=0.3,momentum=0"},
      {"fedadam", "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001"},
      {"fedadam:tau=1e-9,lr=3e-2", "fedadam:lr=0.03,beta1=0.9,beta2=0.99,tau=1e-09"},
  };
  for (const Case& c : cases) {
    Result<StrategyConfig> config = StrategyConfig::Parse(c.text);
    ASSERT_TRUE(config.ok()) << c.text << ": " << config.status().ToString();
    EXPECT_EQ(config->ToString(), c.canonical) << c.text;
    Result<StrategyConfig> again = StrategyConfig::Parse(config->ToString());
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, *config) << c.text;
  }
  Result<StrategyConfig> adam =
      StrategyConfig::Parse("fedadam:lr=0.1,beta1=0.5,beta2=0.9,tau=0.01");
  ASSERT_TRUE(adam.ok());
  EXPECT_EQ(adam->kind, Kind::kFedAdam);
  EXPECT_DOUBLE_EQ(adam->lr, 0.1);
  EXPECT_DOUBLE_EQ(adam->beta1, 0.5);
  EXPECT_DOUBLE_EQ(adam->beta2, 0.9);
  EXPECT_DOUBLE_EQ(adam->tau, 0.01);
}

TEST(StrategyConfigTest, RejectsBadConfigsWithClearMessages) {
  struct Case {
    const char* text;
    const char* message_part;
  } cases[] = {
      {"", "unknown strategy name ''"},
      {"fedsgd", "unknown strategy name 'fedsgd'; expected one of fedavg, fedprox"},
      {"FedAvg", "unknown strategy name"},
      {"fedavg:lr=1", "fedavg takes no options"},
      {"fedprox:", "expected key=value"},
      {"fedprox:mu", "expected key=value, got 'mu'"},
      {"fedprox:mu=0.1,", "expected key=value"},
      {"fedprox:mu=", "'' is not a number"},
      {"fedprox:mu=abc", "'abc' is not a number"},
      {"fedprox:mu=0.1x", "'0.1x' is not a number"},
      {"fedprox:mu=1e999", "is not a number"},
      {"fedprox:mu=nan", "mu must be >= 0"},
      {"fedprox:mu=-0.1", "mu must be >= 0, got -0.1"},
      {"fedprox:lr=1", "unknown option 'lr' for fedprox (options: mu)"},
      {"fedavgm:momentum=1", "momentum must be in [0, 1)"},
      {"fedavgm:lr=0", "lr must be > 0"},
      {"fedavgm:lr=inf", "lr must be > 0"},
      {"fedadam:beta2=1.5", "beta2 must be in [0, 1)"},
      {"fedadam:beta1=-0.1", "beta1 must be in [0, 1)"},
      {"fedadam:tau=0", "tau must be > 0"},
      {"fedadam:lr=0.1,lr=0.2", "option 'lr' given twice"},
      {"fedadam:beta=0.9", "unknown option 'beta' for fedadam (options: lr, beta1, beta2, tau)"},
  };
  for (const Case& c : cases) {
    Result<StrategyConfig> config = StrategyConfig::Parse(c.text);
    ASSERT_FALSE(config.ok()) << c.text;
    EXPECT_EQ(config.status().code(), Status::Code::kInvalidArgument) << c.text;
    EXPECT_NE(config.status().message().find(c.message_part), std::string::npos)
        << c.text << " -> " << config.status().message();
    EXPECT_NE(config.status().message().find("strategy '"), std::string::npos);
  }
}

TEST(StrategyConfigTest, MakeStrategyValidates) {
  StrategyConfig bad = StrategyConfig::Defaults(Kind::kFedAdam);
  bad.beta2 = 1.0;
  EXPECT_EQ(MakeStrategy(bad, 10).status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(MakeStrategy(StrategyConfig::Defaults(Kind::kFedAvg), 0).status().code(),
            Status::Code::kInvalidArgument);
  Result<std::unique_ptr<Strategy>> ok = MakeStrategy(StrategyConfig::Defaults(Kind::kFedAvgM), 10);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ((*ok)->name(), "fedavgm");
  EXPECT_EQ((*ok)->num_params(), 10u);
  EXPECT_DOUBLE_EQ(StrategyConfig::Defaults(Kind::kFedAdam).lr, 0.01);
}

}  // namespace
}  // namespace fedslice::coordinator
