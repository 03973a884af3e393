#include "fedslice/common/model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"

namespace fedslice {
namespace {

using ::testing::HasSubstr;

Tensor RandomInput(int64_t batch, const std::vector<int64_t>& sample_shape, uint32_t seed) {
  std::vector<int64_t> shape = {batch};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  Tensor t(shape);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(0.0f, 1.0f);
  for (float& v : t.span()) v = d(rng);
  return t;
}

Model MustCreate(const proto::ModelSpec& spec) {
  Result<Model> m = Model::Create(spec);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return std::move(m).value();
}

TEST(ModelZooTest, ParameterCountsMatchThePaper) {
  Model mlp = MustCreate(MlpSpec());
  EXPECT_EQ(mlp.param_count(), 199210);
  EXPECT_EQ(mlp.grads().size(), 199210u);
  EXPECT_EQ(mlp.num_layers(), 6);
  Model cnn = MustCreate(CnnSpec());
  EXPECT_EQ(cnn.param_count(), 1663370);
  EXPECT_EQ(cnn.num_layers(), 10);
  EXPECT_EQ(cnn.InputShape(0), (std::vector<int64_t>{1, 28, 28}));
  EXPECT_EQ(cnn.InputShape(6), (std::vector<int64_t>{64, 7, 7}));
  EXPECT_EQ(*cnn.OutputShape(0, 10), std::vector<int64_t>{10});
}

TEST(ModelZooTest, BuiltinSpecByName) {
  EXPECT_EQ(BuiltinSpec("mlp")->name(), "mlp");
  EXPECT_EQ(BuiltinSpec("cnn", 9)->init_seed(), 9u);
  Result<proto::ModelSpec> bad = BuiltinSpec("resnet");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("unknown model 'resnet'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("mlp, cnn"));
}

TEST(ModelTest, ParamRangesAreContiguousPerLayer) {
  Model cnn = MustCreate(CnnSpec());
  EXPECT_EQ(cnn.ParamRange(0, 1)->offset, 0);
  EXPECT_EQ(cnn.ParamRange(0, 1)->count, 32 * 25 + 32);
  EXPECT_EQ(cnn.ParamRange(1, 3)->count, 0);  // relu + pool
  EXPECT_EQ(cnn.ParamRange(3, 4)->offset, 832);
  EXPECT_EQ(cnn.ParamRange(3, 4)->count, 64 * 32 * 25 + 64);
  EXPECT_EQ(cnn.ParamRange(0, 10)->count, cnn.param_count());
  EXPECT_EQ(cnn.ParamRange(7, 10)->offset + cnn.ParamRange(7, 10)->count, cnn.param_count());
  EXPECT_FALSE(cnn.ParamRange(3, 3).ok());
  EXPECT_FALSE(cnn.ParamRange(-1, 2).ok());
  EXPECT_FALSE(cnn.ParamRange(0, 11).ok());
}

// He-uniform for layers followed by ReLU, Glorot-uniform otherwise, biases zero.
TEST(ModelTest, InitialisationFollowsHeAndGlorotBounds) {
  Model mlp = MustCreate(MlpSpec());
  auto weights = [&](int layer, int64_t count) {
    return mlp.params().subspan(mlp.ParamRange(layer, layer + 1)->offset, count);
  };
  auto check = [](std::span<const float> w, double bound) {
    double sum = 0, max_abs = 0;
    for (float v : w) {
      sum += v;
      max_abs = std::max(max_abs, double{std::abs(v)});
    }
    EXPECT_LE(max_abs, bound);
    EXPECT_GT(max_abs, 0.95 * bound);
    EXPECT_NEAR(sum / w.size(), 0.0, 0.02 * bound);
  };
  check(weights(1, 784 * 200), std::sqrt(6.0 / 784));           // fc1: He
  check(weights(3, 200 * 200), std::sqrt(6.0 / 200));           // fc2: He
  check(weights(5, 200 * 10), std::sqrt(6.0 / (200 + 10)));     // fc3: Glorot
  const auto fc1 = *mlp.ParamRange(1, 2);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(mlp.params()[fc1.offset + 784 * 200 + i], 0.0f);
}

TEST(ModelTest, InitialisationIsDeterministicBySeed) {
  Model a = MustCreate(MlpSpec(7));
  Model b = MustCreate(MlpSpec(7));
  Model c = MustCreate(MlpSpec(8));
  EXPECT_TRUE(std::equal(a.params().begin(), a.params().end(), b.params().begin()));
  EXPECT_FALSE(std::equal(a.params().begin(), a.params().end(), c.params().begin()));
  // Pinned: mt19937_64 plus our own uniform transform must give these weights on every
  // platform; a change here breaks federations of mixed machines.
  EXPECT_EQ(WeightsCrc32(MustCreate(MlpSpec(1)).params()), 1332966453u);
  EXPECT_EQ(WeightsCrc32(MustCreate(CnnSpec(1)).params()), 3988434603u);
}

proto::ModelSpec SmallSpec() {
  proto::ModelSpec s;
  s.set_name("small");
  s.add_input_shape(6);
  s.set_num_classes(3);
  auto* d = s.add_layers()->mutable_dense();
  d->set_in_features(6);
  d->set_out_features(3);
  return s;
}

TEST(ModelTest, RejectsBadSpecsWithClearErrors) {
  auto err = [](const proto::ModelSpec& s) {
    Result<Model> m = Model::Create(s);
    EXPECT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), Status::Code::kInvalidArgument);
    return m.status().message();
  };
  proto::ModelSpec s = SmallSpec();
  s.clear_layers();
  EXPECT_THAT(err(s), HasSubstr("no layers"));
  s = SmallSpec();
  s.clear_input_shape();
  EXPECT_THAT(err(s), HasSubstr("input_shape is empty"));
  s = SmallSpec();
  s.set_input_shape(0, -6);
  EXPECT_THAT(err(s), HasSubstr("input_shape [-6]"));
  s = SmallSpec();
  s.set_num_classes(4);
  EXPECT_THAT(err(s), HasSubstr("outputs [3] but num_classes is 4"));
  s = SmallSpec();
  s.set_num_classes(0);
  EXPECT_THAT(err(s), HasSubstr("num_classes is 0"));
  s = SmallSpec();
  s.mutable_layers(0)->mutable_dense()->set_in_features(5);
  EXPECT_THAT(err(s), HasSubstr("layer 0"));
  s = CnnSpec();
  s.mutable_layers(3)->mutable_conv2d()->set_in_channels(16);
  EXPECT_THAT(err(s), HasSubstr("layer 3 ('conv2')"));
  EXPECT_THAT(err(s), HasSubstr("model spec 'cnn'"));
  s = CnnSpec();
  s.mutable_layers(7)->mutable_dense()->set_out_features(1 << 20);  // 3136 x 2^20 weights
  EXPECT_THAT(err(s), HasSubstr("too many parameters"));
  s = SmallSpec();
  s.set_input_shape(0, int64_t{1} << 40);
  EXPECT_THAT(err(s), HasSubstr("outside"));
}

TEST(ModelTest, SlicedForwardEqualsFullForwardExactly) {
  for (const proto::ModelSpec& spec : {MlpSpec(), CnnSpec()}) {
    Model model = MustCreate(spec);
    const Tensor x = RandomInput(3, model.InputShape(0), 21);
    Tensor full;
    ASSERT_TRUE(model.Forward(x, &full).ok());
    ASSERT_EQ(full.shape(), (std::vector<int64_t>{3, 10}));
    for (int k = 1; k < model.num_layers(); ++k) {
      Tensor mid, out;
      ASSERT_TRUE(model.Forward(0, k, x, &mid).ok());
      EXPECT_EQ(std::vector<int64_t>(mid.shape().begin() + 1, mid.shape().end()),
                model.InputShape(k));
      ASSERT_TRUE(model.Forward(k, model.num_layers(), mid, &out).ok());
      ASSERT_EQ(out.shape(), full.shape());
      for (int64_t i = 0; i < full.size(); ++i) {
        EXPECT_EQ(out.data()[i], full.data()[i]) << spec.name() << " split at " << k;
      }
    }
  }
}

TEST(ModelTest, ForwardRejectsBadInputsAndRanges) {
  Model mlp = MustCreate(MlpSpec());
  Tensor out;
  Status s = mlp.Forward(Tensor({2, 784}), &out);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("input to layer 0 has shape [2, 784], expected [batch, 1, 28, 28]"));
  EXPECT_FALSE(mlp.Forward(Tensor({0, 1, 28, 28}), &out).ok());
  EXPECT_FALSE(mlp.Forward(Tensor(), &out).ok());
  EXPECT_TRUE(mlp.Forward(1, 6, Tensor({2, 784}), &out).ok());
  EXPECT_THAT(mlp.Forward(4, 2, Tensor({2, 200}), &out).message(), HasSubstr("[4, 2)"));
  EXPECT_FALSE(mlp.Forward(0, 7, Tensor({2, 1, 28, 28}), &out).ok());
  // In-place: out may be the input.
  Tensor x = RandomInput(2, {1, 28, 28}, 3);
  Tensor want;
  ASSERT_TRUE(mlp.Forward(x, &want).ok());
  ASSERT_TRUE(mlp.Forward(x, &x).ok());
  EXPECT_EQ(x.shape(), want.shape());
  EXPECT_TRUE(std::equal(want.span().begin(), want.span().end(), x.span().begin()));
}

TEST(ModelTest, BackwardNeedsAMatchingTrainForward) {
  Model mlp = MustCreate(MlpSpec());
  Tensor x = RandomInput(4, {1, 28, 28}, 5);
  Tensor out, grad_in;
  Tensor g({4, 10});
  EXPECT_EQ(mlp.Backward(0, 6, g, nullptr).code(), Status::Code::kFailedPrecondition);
  ASSERT_TRUE(mlp.TrainForward(0, 6, x, &out).ok());
  EXPECT_EQ(mlp.Backward(0, 6, Tensor({3, 10}), nullptr).code(),
            Status::Code::kFailedPrecondition);
  EXPECT_EQ(mlp.Backward(0, 6, Tensor({4, 11}), nullptr).code(),
            Status::Code::kInvalidArgument);
  ASSERT_TRUE(mlp.Forward(x, &out).ok());  // inference invalidates the training state
  EXPECT_EQ(mlp.Backward(0, 6, g, nullptr).code(), Status::Code::kFailedPrecondition);
}

// Split training: backward over [k, n) then [0, k) gives the same gradients as over [0, n).
TEST(ModelTest, SlicedBackwardEqualsFullBackward) {
  Model cnn = MustCreate(CnnSpec());
  Tensor x = RandomInput(2, cnn.InputShape(0), 8);
  const std::vector<int32_t> labels = {3, 7};
  ASSERT_TRUE(cnn.ComputeGradients(x, labels).ok());
  const std::vector<float> full(cnn.grads().begin(), cnn.grads().end());
  EXPECT_GT(std::count_if(full.begin(), full.end(), [](float v) { return v != 0; }), 100000);

  Model sliced = cnn;
  const int k = 4;
  Tensor mid, logits, grad_mid, unused;
  ASSERT_TRUE(sliced.TrainForward(0, k, x, &mid).ok());
  ASSERT_TRUE(sliced.TrainForward(k, 10, mid, &logits).ok());
  Tensor grad_logits({2, 10});
  // d(mean CE)/dlogits, computed the way ComputeGradients does.
  Model reference = cnn;
  Tensor ref_logits;
  ASSERT_TRUE(reference.Forward(x, &ref_logits).ok());
  EXPECT_TRUE(std::equal(ref_logits.span().begin(), ref_logits.span().end(),
                         logits.span().begin()));
  for (int n = 0; n < 2; ++n) {
    double sum = 0, mx = -1e30;
    for (int c = 0; c < 10; ++c) mx = std::max(mx, double{logits.data()[n * 10 + c]});
    for (int c = 0; c < 10; ++c) sum += std::exp(logits.data()[n * 10 + c] - mx);
    for (int c = 0; c < 10; ++c) {
      grad_logits.data()[n * 10 + c] =
          static_cast<float>(std::exp(logits.data()[n * 10 + c] - mx - std::log(sum))) / 2.0f;
    }
    grad_logits.data()[n * 10 + labels[n]] -= 0.5f;
  }
  ASSERT_TRUE(sliced.Backward(k, 10, grad_logits, &grad_mid).ok());
  EXPECT_EQ(grad_mid.shape(), mid.shape());
  ASSERT_TRUE(sliced.Backward(0, k, grad_mid, nullptr).ok());
  for (size_t i = 0; i < full.size(); ++i) {
    ASSERT_NEAR(sliced.grads()[i], full[i], 1e-5 + 1e-4 * std::abs(full[i])) << i;
  }
}

TEST(ModelTest, CopiesAreDeepAndMovesKeepBuffers) {
  Model a = MustCreate(MlpSpec());
  Model b = a;
  b.params()[0] += 1.0f;
  EXPECT_NE(a.params()[0], b.params()[0]);
  Tensor x = RandomInput(2, {1, 28, 28}, 4);
  Tensor ya, yb;
  ASSERT_TRUE(a.Forward(x, &ya).ok());
  b.params()[0] -= 1.0f;
  ASSERT_TRUE(b.Forward(x, &yb).ok());
  EXPECT_TRUE(std::equal(ya.span().begin(), ya.span().end(), yb.span().begin()));

  const float* data = a.params().data();
  Model moved = std::move(a);
  EXPECT_EQ(moved.params().data(), data);
  Tensor ym;
  ASSERT_TRUE(moved.Forward(x, &ym).ok());
  EXPECT_TRUE(std::equal(ya.span().begin(), ya.span().end(), ym.span().begin()));
  // Changing the flat buffer changes what the layers compute: they are views, not copies.
  moved.params()[moved.ParamRange(5, 6)->offset + 2000] += 5.0f;  // fc3 bias of class 0
  ASSERT_TRUE(moved.Forward(x, &ym).ok());
  EXPECT_FLOAT_EQ(ym.data()[0], ya.data()[0] + 5.0f);

  std::vector<float> wrong(10);
  EXPECT_FALSE(moved.SetParams(wrong).ok());
}

// TrainStep fuses the gradient reduction and the SGD update; it must match the unfused
// ComputeGradients + Sgd::Step bit for bit.
TEST(ModelTest, TrainStepEqualsComputeGradientsThenStep) {
  for (const proto::ModelSpec& spec : {MlpSpec(), CnnSpec()}) {
    for (int batch : {1, 10, 64}) {
      Model fused = MustCreate(spec);
      Model unfused = fused;
      const Tensor x = RandomInput(batch, fused.InputShape(0), 30 + batch);
      std::vector<int32_t> labels(batch);
      for (int i = 0; i < batch; ++i) labels[i] = (i * 7) % 10;
      const SgdOptions options{.lr = 0.05f, .momentum = 0.9f, .weight_decay = 1e-3f};
      Sgd a(options), b(options);
      for (int step = 0; step < 2; ++step) {
        Result<float> fused_loss = fused.TrainStep(x, labels, a);
        Result<float> loss = unfused.ComputeGradients(x, labels);
        ASSERT_TRUE(fused_loss.ok() && loss.ok());
        EXPECT_EQ(*fused_loss, *loss);
        ASSERT_TRUE(b.Step(unfused.params(), unfused.grads()).ok());
        ASSERT_TRUE(std::equal(fused.params().begin(), fused.params().end(),
                               unfused.params().begin()))
            << spec.name() << " batch " << batch << " step " << step;
        EXPECT_TRUE(std::equal(fused.grads().begin(), fused.grads().end(),
                               unfused.grads().begin()));
      }
    }
  }
}

TEST(ModelTest, TrainStepRejectsBadLabelsAndAnchorsWithoutChangingWeights) {
  Model mlp = MustCreate(MlpSpec());
  const std::vector<float> before(mlp.params().begin(), mlp.params().end());
  const Tensor x = RandomInput(2, mlp.InputShape(0), 1);
  Sgd sgd({.lr = 0.1f});
  EXPECT_THAT(mlp.TrainStep(x, std::vector<int32_t>{1, 10}, sgd).status().message(),
              HasSubstr("label 10 of sample 1"));
  EXPECT_THAT(mlp.TrainStep(x, std::vector<int32_t>{1}, sgd).status().message(),
              HasSubstr("1 labels for a batch of 2"));
  Sgd prox({.lr = 0.1f, .prox_mu = 0.1f});
  EXPECT_THAT(mlp.TrainStep(x, std::vector<int32_t>{1, 2}, prox).status().message(),
              HasSubstr("FedProx needs an anchor"));
  EXPECT_TRUE(std::equal(before.begin(), before.end(), mlp.params().begin()));
}

// Inference splits a batch across worker threads; per sample, the arithmetic is the same as
// on one thread.
TEST(ModelTest, ForwardDoesNotDependOnTheThreadCount) {
  for (const proto::ModelSpec& spec : {MlpSpec(), CnnSpec()}) {
    Model model = MustCreate(spec);
    const Tensor x = RandomInput(5, model.InputShape(0), 40);
    Tensor one, two;
    SetNumThreads(1);
    ASSERT_TRUE(model.Forward(x, &one).ok());
    SetNumThreads(2);
    ASSERT_TRUE(model.Forward(x, &two).ok());
    SetNumThreads(0);
    EXPECT_TRUE(std::equal(one.span().begin(), one.span().end(), two.span().begin()))
        << spec.name();
  }
}

}  // namespace
}  // namespace fedslice
