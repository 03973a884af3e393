#include "fedslice/common/optimizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <vector>

namespace fedslice {
namespace {

using ::testing::HasSubstr;

TEST(SgdTest, PlainStepIsWMinusLrG) {
  Sgd sgd({.lr = 0.5f});
  std::vector<float> w = {1.0f, -2.0f, 3.0f};
  const std::vector<float> g = {0.5f, 0.25f, -1.0f};
  ASSERT_TRUE(sgd.Step(w, g).ok());
  EXPECT_THAT(w, ::testing::ElementsAre(0.75f, -2.125f, 3.5f));
  EXPECT_TRUE(sgd.momentum_buffer().empty());
}

// Hand-computed, PyTorch semantics: d = g + wd*w; v = m*v + d; w -= lr*v.
TEST(SgdTest, MomentumAndWeightDecayMatchHandComputedSteps) {
  Sgd sgd({.lr = 0.1f, .momentum = 0.9f, .weight_decay = 0.01f});
  std::vector<float> w = {1.0f, -2.0f};
  const std::vector<float> g = {0.5f, -1.0f};
  ASSERT_TRUE(sgd.Step(w, g).ok());
  // d = {0.51, -1.02}; v = d; w = {1 - 0.051, -2 + 0.102}
  EXPECT_FLOAT_EQ(w[0], 0.949f);
  EXPECT_FLOAT_EQ(w[1], -1.898f);
  EXPECT_FLOAT_EQ(sgd.momentum_buffer()[0], 0.51f);
  ASSERT_TRUE(sgd.Step(w, g).ok());
  // d = {0.5 + 0.00949, -1 - 0.01898}; v = 0.9 * {0.51, -1.02} + d
  const float v0 = 0.9f * 0.51f + 0.50949f, v1 = 0.9f * -1.02f - 1.01898f;
  EXPECT_FLOAT_EQ(sgd.momentum_buffer()[0], v0);
  EXPECT_FLOAT_EQ(sgd.momentum_buffer()[1], v1);
  EXPECT_FLOAT_EQ(w[0], 0.949f - 0.1f * v0);
  EXPECT_FLOAT_EQ(w[1], -1.898f - 0.1f * v1);
}

TEST(SgdTest, ProximalTermPullsTowardsTheAnchor) {
  Sgd sgd({.lr = 0.1f, .prox_mu = 2.0f});
  std::vector<float> w = {1.0f, 1.0f};
  const std::vector<float> g = {0.0f, 0.0f};
  const std::vector<float> anchor = {0.0f, 3.0f};
  ASSERT_TRUE(sgd.Step(w, g, anchor).ok());
  EXPECT_FLOAT_EQ(w[0], 1.0f - 0.1f * 2.0f * 1.0f);
  EXPECT_FLOAT_EQ(w[1], 1.0f - 0.1f * 2.0f * -2.0f);
  EXPECT_THAT(sgd.Step(w, g).message(), HasSubstr("FedProx needs an anchor"));
}

TEST(SgdTest, MomentumStateCanBeSavedAndRestored) {
  const SgdOptions o{.lr = 0.1f, .momentum = 0.5f};
  Sgd a(o), b(o);
  std::vector<float> wa = {1, 2, 3}, wb;
  const std::vector<float> g = {1, -1, 0.5f};
  ASSERT_TRUE(a.Step(wa, g).ok());
  wb = wa;
  b.SetMomentumBuffer(a.momentum_buffer());
  ASSERT_TRUE(a.Step(wa, g).ok());
  ASSERT_TRUE(b.Step(wb, g).ok());
  EXPECT_EQ(wa, wb);
  std::vector<float> other_size = {1, 2};
  EXPECT_THAT(b.Step(other_size, std::vector<float>{0, 0}).message(),
              HasSubstr("momentum state holds 3"));
  b.Reset();
  EXPECT_TRUE(b.Step(other_size, std::vector<float>{0, 0}).ok());
}

TEST(SgdTest, RejectsBadOptionsAndSizes) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(Sgd::Validate({.lr = 0.0f}).ok());
  EXPECT_FALSE(Sgd::Validate({.lr = nan}).ok());
  EXPECT_FALSE(Sgd::Validate({.lr = 0.1f, .momentum = 1.0f}).ok());
  EXPECT_FALSE(Sgd::Validate({.lr = 0.1f, .weight_decay = -1.0f}).ok());
  EXPECT_FALSE(Sgd::Validate({.lr = 0.1f, .prox_mu = -1.0f}).ok());
  EXPECT_TRUE(Sgd::Validate({.lr = 0.1f, .momentum = 0.9f}).ok());
  Sgd sgd({.lr = 0.1f});
  std::vector<float> w = {1, 2};
  EXPECT_THAT(sgd.Step(w, std::vector<float>{1}).message(), HasSubstr("1 gradients for 2"));
  EXPECT_EQ(w, (std::vector<float>{1, 2}));
}

}  // namespace
}  // namespace fedslice
