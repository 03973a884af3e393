// Layer and loss correctness: forward passes against naive reference implementations, and
// every Backward against central finite differences of its Forward.
#include "fedslice/common/layers.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <random>

#include "fedslice/common/loss.h"

namespace fedslice {
namespace {

using ::testing::HasSubstr;

void FillRandom(std::mt19937& rng, std::span<float> v, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  for (float& x : v) x = d(rng);
}

// Layer plus its own parameter/gradient buffers.
struct Bound {
  std::unique_ptr<Layer> layer;
  std::vector<float> params, grads;
};

Bound Make(const proto::LayerSpec& spec, const std::vector<int64_t>& in_shape, uint32_t seed) {
  Result<std::unique_ptr<Layer>> layer = CreateLayer(spec, in_shape, 0);
  EXPECT_TRUE(layer.ok()) << layer.status().ToString();
  Bound b;
  b.layer = std::move(*layer);
  b.params.resize(b.layer->param_count());
  b.grads.resize(b.layer->param_count());
  b.layer->BindParams(b.params.data(), b.grads.data());
  std::mt19937 rng(seed);
  FillRandom(rng, b.params);
  return b;
}

proto::LayerSpec DenseSpec(int in, int out) {
  proto::LayerSpec s;
  s.mutable_dense()->set_in_features(in);
  s.mutable_dense()->set_out_features(out);
  return s;
}

proto::LayerSpec ConvSpec(int in, int out, int k, int stride, int pad) {
  proto::LayerSpec s;
  auto* c = s.mutable_conv2d();
  c->set_in_channels(in);
  c->set_out_channels(out);
  c->set_kernel(k);
  c->set_stride(stride);
  c->set_padding(pad);
  return s;
}

proto::LayerSpec PoolSpec(int k, int stride) {
  proto::LayerSpec s;
  s.mutable_maxpool2d()->set_kernel(k);
  s.mutable_maxpool2d()->set_stride(stride);
  return s;
}

proto::LayerSpec ReluSpec() {
  proto::LayerSpec s;
  s.mutable_relu();
  return s;
}

proto::LayerSpec FlattenSpec() {
  proto::LayerSpec s;
  s.mutable_flatten();
  return s;
}

// L(out) = sum(out * r) for a fixed random r, accumulated in double.
double Objective(const Tensor& out, const std::vector<float>& r) {
  double sum = 0;
  for (int64_t i = 0; i < out.size(); ++i) sum += double{out.data()[i]} * r[i];
  return sum;
}

// Checks Backward's input and parameter gradients against central differences of
// L = sum(Forward(x) * r). `eps` is the step; piecewise-linear layers need inputs at least
// eps away from their kinks, which the callers arrange.
void GradCheck(Bound& b, Tensor x, float eps, double tol) {
  Tensor out;
  b.layer->Forward(x, &out, true);
  std::mt19937 rng(7);
  std::vector<float> r(out.size());
  FillRandom(rng, r);
  Tensor grad_out(out.shape());
  std::copy(r.begin(), r.end(), grad_out.data());
  Tensor grad_in;
  std::fill(b.grads.begin(), b.grads.end(), 123.0f);  // Backward must overwrite, not add
  b.layer->Backward(grad_out, &grad_in);
  ASSERT_EQ(grad_in.shape(), x.shape());
  const std::vector<float> analytic_params = b.grads;

  auto numeric = [&](float* v) {
    const float saved = *v;
    Tensor o;
    *v = saved + eps;
    b.layer->Forward(x, &o, false);
    const double plus = Objective(o, r);
    *v = saved - eps;
    b.layer->Forward(x, &o, false);
    const double minus = Objective(o, r);
    *v = saved;
    return (plus - minus) / (2.0 * eps);
  };
  for (int64_t i = 0; i < x.size(); ++i) {
    const double n = numeric(x.data() + i);
    EXPECT_NEAR(grad_in.data()[i], n, tol * (1 + std::abs(n))) << b.layer->kind() << " input " << i;
  }
  for (size_t i = 0; i < b.params.size(); ++i) {
    const double n = numeric(b.params.data() + i);
    EXPECT_NEAR(analytic_params[i], n, tol * (1 + std::abs(n)))
        << b.layer->kind() << " param " << i;
  }
  // grad_in == nullptr skips the input gradient but still produces the same parameter grads.
  b.layer->Forward(x, &out, true);
  b.layer->Backward(grad_out, nullptr);
  EXPECT_EQ(b.grads, analytic_params);
}

Tensor RandomTensor(std::vector<int64_t> shape, uint32_t seed) {
  Tensor t(std::move(shape));
  std::mt19937 rng(seed);
  FillRandom(rng, t.span());
  return t;
}

// A moved-from tensor used to keep its capacity without its storage, so resizing it reused
// a null buffer.
TEST(TensorTest, MovedFromTensorIsEmptyAndUsable) {
  Tensor a({8, 8});
  Tensor b = std::move(a);
  EXPECT_EQ(b.size(), 64);
  EXPECT_EQ(a.size(), 0);  // NOLINT(bugprone-use-after-move): the state is specified
  EXPECT_TRUE(a.shape().empty());
  a.Resize({4, 4});
  ASSERT_NE(a.data(), nullptr);
  a.data()[15] = 1.0f;
  Tensor c;
  c = std::move(b);
  EXPECT_EQ(b.size(), 0);  // NOLINT(bugprone-use-after-move)
  b.Resize({2, 3});
  ASSERT_NE(b.data(), nullptr);
  b.data()[5] = 2.0f;
  EXPECT_EQ(c.size(), 64);
}

TEST(TensorTest, ResizeKeepsStorageWhenItFits) {
  Tensor t({4, 3, 2});
  EXPECT_EQ(t.batch(), 4);
  EXPECT_EQ(t.sample_size(), 6);
  EXPECT_EQ(t.size(), 24);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  EXPECT_TRUE(std::all_of(t.span().begin(), t.span().end(), [](float v) { return v == 0; }));
  const float* p = t.data();
  EXPECT_GE(t.capacity(), 24);
  t.Resize({2, 5});
  EXPECT_EQ(t.data(), p);
  EXPECT_EQ(t.matrix().rows(), 2);
  EXPECT_EQ(t.matrix().cols(), 5);
  // Growing back within the capacity keeps the values written before (a pipeline stage grows
  // a carry of the samples done into the whole layer's output this way).
  for (int i = 0; i < 10; ++i) t.data()[i] = static_cast<float>(i + 1);
  t.Resize({4, 6});
  EXPECT_EQ(t.data(), p);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(t.data()[i], static_cast<float>(i + 1));
  t.Resize({100, 100});
  EXPECT_GE(t.capacity(), 10000);
  EXPECT_EQ(t.size(), 10000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  Tensor copy = t;
  EXPECT_NE(copy.data(), t.data());
  EXPECT_EQ(copy.shape(), t.shape());
  EXPECT_EQ(Tensor::ShapeToString(t.shape()), "[100, 100]");
}

TEST(DenseTest, ForwardMatchesDefinition) {
  Bound b = Make(DenseSpec(4, 3), {4}, 1);
  Tensor x = RandomTensor({2, 4}, 2);
  Tensor y;
  b.layer->Forward(x, &y, false);
  ASSERT_EQ(y.shape(), (std::vector<int64_t>{2, 3}));
  for (int n = 0; n < 2; ++n) {
    for (int o = 0; o < 3; ++o) {
      double want = b.params[12 + o];  // bias after the [3, 4] weights
      for (int i = 0; i < 4; ++i) want += double{b.params[o * 4 + i]} * x.data()[n * 4 + i];
      EXPECT_NEAR(y.data()[n * 3 + o], want, 1e-5);
    }
  }
}

TEST(DenseTest, GradientsMatchFiniteDifferences) {
  Bound b = Make(DenseSpec(7, 5), {7}, 3);
  GradCheck(b, RandomTensor({3, 7}, 4), 1e-2f, 2e-3);
}

// Direct convolution, for comparison with the im2col path.
Tensor NaiveConv(const Tensor& x, const std::vector<float>& p, int oc, int k, int s, int pad) {
  const int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t oh = (h + 2 * pad - k) / s + 1, ow = (w + 2 * pad - k) / s + 1;
  Tensor y({n, oc, oh, ow});
  const float* bias = p.data() + oc * c * k * k;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t o = 0; o < oc; ++o)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          double acc = bias[o];
          for (int64_t ci = 0; ci < c; ++ci)
            for (int64_t ki = 0; ki < k; ++ki)
              for (int64_t kj = 0; kj < k; ++kj) {
                const int64_t ih = i * s - pad + ki, iw = j * s - pad + kj;
                if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;
                acc += double{p[((o * c + ci) * k + ki) * k + kj]} *
                       x.data()[((b * c + ci) * h + ih) * w + iw];
              }
          y.data()[((b * oc + o) * oh + i) * ow + j] = static_cast<float>(acc);
        }
  return y;
}

struct ConvCase {
  int c, h, w, oc, k, stride, pad;
};

class ConvTest : public ::testing::TestWithParam<ConvCase> {};

TEST_P(ConvTest, ForwardMatchesDirectConvolution) {
  const ConvCase cc = GetParam();
  Bound b = Make(ConvSpec(cc.c, cc.oc, cc.k, cc.stride, cc.pad), {cc.c, cc.h, cc.w}, 5);
  Tensor x = RandomTensor({3, cc.c, cc.h, cc.w}, 6);
  Tensor y;
  b.layer->Forward(x, &y, false);
  Tensor want = NaiveConv(x, b.params, cc.oc, cc.k, cc.stride, cc.pad);
  ASSERT_EQ(y.shape(), want.shape());
  EXPECT_EQ(y.shape(), Tensor({3, cc.oc, b.layer->output_shape()[1],
                               b.layer->output_shape()[2]}).shape());
  for (int64_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y.data()[i], want.data()[i], 1e-5) << i;
}

// Some samples of a batch, straight into their place in the batch's output: Forward's values
// bit for bit (what a pipeline stage holding part of a conv2d cut by sample relies on).
TEST_P(ConvTest, ForwardSamplesIsForwardOnThoseSamples) {
  const ConvCase cc = GetParam();
  Bound b = Make(ConvSpec(cc.c, cc.oc, cc.k, cc.stride, cc.pad), {cc.c, cc.h, cc.w}, 5);
  Tensor x = RandomTensor({5, cc.c, cc.h, cc.w}, 7);
  Tensor y;
  b.layer->Forward(x, &y, false);
  auto* conv = dynamic_cast<Conv2DLayer*>(b.layer.get());
  ASSERT_NE(conv, nullptr);
  const int64_t in_size = x.sample_size(), out_size = y.sample_size();
  Tensor z(y.shape());
  z.SetZero();
  conv->ForwardSamples(x.data() + 2 * in_size, 2, z.data() + 2 * out_size);  // samples 2-3
  conv->ForwardSamples(x.data(), 0, z.data());                               // none: no-op
  for (int64_t i = 0; i < z.size(); ++i) {
    const bool written = i >= 2 * out_size && i < 4 * out_size;
    ASSERT_EQ(z.data()[i], written ? y.data()[i] : 0.0f) << i;
  }
}

TEST_P(ConvTest, GradientsMatchFiniteDifferences) {
  const ConvCase cc = GetParam();
  Bound b = Make(ConvSpec(cc.c, cc.oc, cc.k, cc.stride, cc.pad), {cc.c, cc.h, cc.w}, 8);
  GradCheck(b, RandomTensor({2, cc.c, cc.h, cc.w}, 9), 1e-2f, 2e-3);
}

// The gather both Conv2DLayer and a pipeline's conv2d bands use: any range of output
// positions, whole rows or not, gives each column as the convolution defines it.
TEST_P(ConvTest, Im2ColOfAnyPositionRangeFollowsTheDefinition) {
  const ConvCase cc = GetParam();
  const Tensor x = RandomTensor({1, cc.c, cc.h, cc.w}, 10);
  ConvGeometry g;
  g.c = cc.c, g.h = cc.h, g.w = cc.w, g.k = cc.k, g.stride = cc.stride, g.pad = cc.pad;
  g.out_h = (cc.h + 2 * cc.pad - cc.k) / cc.stride + 1;
  g.out_w = (cc.w + 2 * cc.pad - cc.k) / cc.stride + 1;
  const int64_t positions = g.out_h * g.out_w, rows = cc.c * cc.k * cc.k;
  std::vector<float> padded;
  for (auto [p0, p1] : std::vector<std::pair<int64_t, int64_t>>{
           {0, positions},
           {0, 1},
           {1, positions - 1},
           {positions - 1, positions},
           {g.out_w / 2, std::min(positions, g.out_w / 2 + g.out_w + 1)}}) {
    if (p0 >= p1) continue;
    const int64_t ld = p1 - p0 + 3;  // columns of other samples would follow
    std::vector<float> cols(static_cast<size_t>(rows * ld), -7.0f);
    Im2ColPositions(x.data(), g, p0, p1, cols.data(), ld, &padded);
    for (int64_t ch = 0; ch < cc.c; ++ch)
      for (int64_t ki = 0; ki < cc.k; ++ki)
        for (int64_t kj = 0; kj < cc.k; ++kj)
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t ih = p / g.out_w * cc.stride - cc.pad + ki;
            const int64_t iw = p % g.out_w * cc.stride - cc.pad + kj;
            const bool inside = ih >= 0 && ih < cc.h && iw >= 0 && iw < cc.w;
            const float want = inside ? x.data()[(ch * cc.h + ih) * cc.w + iw] : 0.0f;
            const int64_t r = (ch * cc.k + ki) * cc.k + kj;
            ASSERT_EQ(cols[static_cast<size_t>(r * ld + p - p0)], want)
                << "positions [" << p0 << ", " << p1 << "), row " << r << ", position " << p;
          }
    // Nothing beyond the range is written.
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t col = p1 - p0; col < ld; ++col)
        ASSERT_EQ(cols[static_cast<size_t>(r * ld + col)], -7.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvTest,
                         ::testing::Values(ConvCase{1, 5, 5, 2, 3, 1, 1},   // same padding
                                           ConvCase{2, 5, 6, 3, 3, 1, 0},   // valid, non-square
                                           ConvCase{2, 7, 6, 2, 3, 2, 1},   // stride 2
                                           ConvCase{3, 6, 6, 2, 5, 1, 2},   // the CNN's 5x5 same
                                           ConvCase{1, 4, 4, 1, 4, 3, 1})); // window covers all

// Distinct values at least 0.1 apart, in random order, so that a step of 1e-2 never changes
// which element of a pooling window is the maximum, and none lies near ReLU's kink at 0.
Tensor SpacedTensor(std::vector<int64_t> shape, uint32_t seed) {
  Tensor t(std::move(shape));
  std::vector<int> order(t.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t i = 0; i < t.size(); ++i) {
    t.data()[i] = 0.1f * static_cast<float>(order[i] - t.size() / 2) + 0.05f;
  }
  return t;
}

TEST(MaxPoolTest, ForwardTakesWindowMaxima) {
  Bound b = Make(PoolSpec(2, 2), {1, 4, 5}, 0);
  EXPECT_EQ(b.layer->output_shape(), (std::vector<int64_t>{1, 2, 2}));  // last column dropped
  Tensor x({1, 1, 4, 5});
  std::iota(x.data(), x.data() + 20, 0.0f);
  x.data()[0] = 100;
  Tensor y;
  b.layer->Forward(x, &y, false);
  EXPECT_THAT(std::vector<float>(y.data(), y.data() + 4), ::testing::ElementsAre(100, 8, 16, 18));
}

TEST(MaxPoolTest, GradientsMatchFiniteDifferences) {
  Bound b = Make(PoolSpec(2, 2), {2, 4, 6}, 0);
  GradCheck(b, SpacedTensor({2, 2, 4, 6}, 10), 1e-2f, 2e-3);
  Bound overlapping = Make(PoolSpec(3, 1), {1, 5, 5}, 0);  // windows share inputs
  GradCheck(overlapping, SpacedTensor({2, 1, 5, 5}, 11), 1e-2f, 2e-3);
}

TEST(ReluTest, GradientsMatchFiniteDifferences) {
  Bound b = Make(ReluSpec(), {3, 2, 2}, 0);
  Tensor x = SpacedTensor({2, 3, 2, 2}, 12);
  Tensor y;
  b.layer->Forward(x, &y, false);
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y.data()[i], std::max(x.data()[i], 0.0f));
  GradCheck(b, x, 1e-2f, 2e-3);
}

TEST(FlattenTest, GradientsMatchFiniteDifferences) {
  Bound b = Make(FlattenSpec(), {2, 3, 4}, 0);
  EXPECT_EQ(b.layer->output_shape(), std::vector<int64_t>{24});
  GradCheck(b, RandomTensor({2, 2, 3, 4}, 13), 1e-2f, 2e-3);
}

TEST(LossTest, ValueMatchesDefinitionAndIsStable) {
  Tensor logits({2, 3});
  const float z[] = {1, 2, 3, 1000, -1000, 0};  // second row would overflow a naive softmax
  std::copy(std::begin(z), std::end(z), logits.data());
  const int32_t labels[] = {2, 0};
  Result<float> loss = SoftmaxCrossEntropy(logits, labels, nullptr);
  ASSERT_TRUE(loss.ok());
  const double row0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0;
  EXPECT_NEAR(*loss, row0 / 2.0, 1e-6);  // row 1 contributes ~0
}

TEST(LossTest, GradientMatchesFiniteDifferences) {
  Tensor logits = RandomTensor({4, 5}, 14);
  for (float& v : logits.span()) v *= 3.0f;
  const std::vector<int32_t> labels = {0, 4, 2, 2};
  Tensor grad;
  ASSERT_TRUE(SoftmaxCrossEntropy(logits, labels, &grad).ok());
  ASSERT_EQ(grad.shape(), logits.shape());
  const float eps = 1e-2f;
  for (int64_t i = 0; i < logits.size(); ++i) {
    const float saved = logits.data()[i];
    logits.data()[i] = saved + eps;
    const double plus = *SoftmaxCrossEntropy(logits, labels, nullptr);
    logits.data()[i] = saved - eps;
    const double minus = *SoftmaxCrossEntropy(logits, labels, nullptr);
    logits.data()[i] = saved;
    EXPECT_NEAR(grad.data()[i], (plus - minus) / (2 * eps), 1e-3) << i;
  }
}

TEST(LossTest, RejectsBadLabelsAndShapes) {
  Tensor logits({2, 3});
  const std::vector<int32_t> out_of_range = {0, 3};
  Result<float> r = SoftmaxCrossEntropy(logits, out_of_range, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("label 3 of sample 1"));
  const std::vector<int32_t> negative = {-1, 0};
  EXPECT_FALSE(SoftmaxCrossEntropy(logits, negative, nullptr).ok());
  const std::vector<int32_t> too_few = {0};
  EXPECT_THAT(SoftmaxCrossEntropy(logits, too_few, nullptr).status().message(),
              HasSubstr("1 labels for a batch of 2"));
  Tensor rank3({2, 3, 1});
  const std::vector<int32_t> two = {0, 1};
  EXPECT_FALSE(SoftmaxCrossEntropy(rank3, two, nullptr).ok());
}

TEST(CreateLayerTest, RejectsLayersThatDoNotFitTheirInput) {
  auto err = [](const proto::LayerSpec& s, std::vector<int64_t> in) {
    Result<std::unique_ptr<Layer>> r = CreateLayer(s, in, 3);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
    return r.status().message();
  };
  EXPECT_THAT(err(DenseSpec(10, 5), {1, 28, 28}), HasSubstr("put a flatten layer"));
  EXPECT_THAT(err(DenseSpec(10, 5), {11}), HasSubstr("in_features is 10"));
  EXPECT_THAT(err(DenseSpec(10, 0), {10}), HasSubstr("out_features is 0"));
  EXPECT_THAT(err(DenseSpec(10, 1 << 30), {10}), HasSubstr("out_features"));
  EXPECT_THAT(err(ConvSpec(3, 8, 3, 1, 1), {1, 28, 28}), HasSubstr("in_channels is 3"));
  EXPECT_THAT(err(ConvSpec(1, 8, 9, 1, 0), {1, 5, 5}), HasSubstr("larger than"));
  EXPECT_THAT(err(ConvSpec(1, 8, 3, -1, 0), {1, 5, 5}), HasSubstr("stride"));
  EXPECT_THAT(err(ConvSpec(1, 8, 3, 1, 3), {1, 5, 5}), HasSubstr("padding is 3"));
  EXPECT_THAT(err(ConvSpec(1, 8, 3, 1, 1), {28, 28}), HasSubstr("{C, H, W}"));
  EXPECT_THAT(err(PoolSpec(6, 2), {1, 5, 5}), HasSubstr("kernel is 6"));
  EXPECT_THAT(err(proto::LayerSpec(), {4}), HasSubstr("no layer kind"));
  EXPECT_THAT(err(ReluSpec(), {0, 4}), HasSubstr("layer 3"));
}

}  // namespace
}  // namespace fedslice
