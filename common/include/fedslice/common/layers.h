// Layers of the sequential model engine (MiniDNN style): each has Forward and Backward over
// batch-first tensors, and its parameters live in views into the model's flat buffers.
//
// Parameter layout (what the flat buffer of a Model holds, layer by layer):
//   Dense:  weights [out_features, in_features] row-major, then bias [out_features].
//   Conv2D: weights [out_channels, in_channels, kernel, kernel], then bias [out_channels].
// This is PyTorch's layout, so weights can be exchanged with it by a plain copy.
//
// Ownership: a layer does not own its parameters; BindParams() points it at the caller's
// buffers, which must outlive the layer (Model owns both). Thread-safety: none. A layer keeps
// per-batch state (the activations Backward needs, scratch buffers), so one layer object must
// not be used by two threads at once, even for Forward alone.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"
#include "fedslice/model.pb.h"

namespace fedslice {

class Layer {
 public:
  virtual ~Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  // "dense", "conv2d", "maxpool2d", "relu", "flatten".
  virtual std::string_view kind() const = 0;

  // Sample shapes (batch excluded), fixed when the layer is created.
  const std::vector<int64_t>& input_shape() const { return input_shape_; }
  const std::vector<int64_t>& output_shape() const { return output_shape_; }

  // Number of floats this layer reads from / writes to the flat buffers (0 if none).
  virtual int64_t param_count() const { return 0; }
  // Points the layer at param_count() floats of parameters and of gradients. No copy.
  virtual void BindParams(float* /*params*/, float* /*grads*/) {}
  // Fills the bound parameters: weights uniform in +-sqrt(6 / fan_in) (He) when `he`, else
  // +-sqrt(6 / (fan_in + fan_out)) (Glorot); biases zero. Deterministic given `rng`'s state.
  virtual void InitParams(std::mt19937_64& /*rng*/, bool /*he*/) {}

  // in: [batch] + input_shape(); out is resized to [batch] + output_shape(). `in` and `out`
  // must be distinct. With training = true the layer also keeps what Backward needs.
  virtual void Forward(const Tensor& in, Tensor* out, bool training) = 0;
  // Needs the previous call to have been Forward(training = true). grad_out: dLoss/dOut with
  // the shape of that Forward's output. Overwrites (does not accumulate) the bound
  // gradients. grad_in, when not null, receives dLoss/dIn (resized to the input's shape);
  // nullptr skips that work, which is what the first layer of a model wants.
  virtual void Backward(const Tensor& grad_out, Tensor* grad_in) = 0;

 protected:
  Layer(std::vector<int64_t> input_shape, std::vector<int64_t> output_shape)
      : input_shape_(std::move(input_shape)), output_shape_(std::move(output_shape)) {}

  // [batch] + shape.
  static std::vector<int64_t> Batched(int64_t batch, const std::vector<int64_t>& shape);

 private:
  std::vector<int64_t> input_shape_;
  std::vector<int64_t> output_shape_;
};

// The shape of a conv2d: input {c, h, w}, a k x k kernel at `stride` with `pad` zeros around,
// output {oc, out_h, out_w}.
struct ConvGeometry {
  int64_t c = 0, h = 0, w = 0, k = 0, stride = 1, pad = 0, out_h = 0, out_w = 0;
};

// A conv2d's im2col columns for output positions [p0, p1) (row-major over out_h x out_w) of one
// sample `in` ({c, h, w}): cols[r · ld + (p - p0)] for row r = (ch · k + ki) · k + kj holds
// in[ch][oh · stride - pad + ki][ow · stride - pad + kj] with p = oh · out_w + ow, and 0 where
// that falls in the zero padding. `padded` is scratch (resized as needed; keep it from call
// to call). Shared by Conv2DLayer and the bands a pipeline cuts a conv2d into
// (slicing/chain.cc), so that both gather exactly the same columns.
//
// Why a padded copy of each input plane: the gather is then a plain copy of a row segment per
// (ki, kj), with no bounds checks. Checking the padding per segment instead (and a memmove
// call per 14-float segment) made the gather ~40% of the cnn's conv2 time and a per-band
// fixed cost (bench/stage_bench).
void Im2ColPositions(const float* in, const ConvGeometry& g, int64_t p0, int64_t p1, float* cols,
                     int64_t ld, std::vector<float>* padded);

// Builds the layer `spec` describes for inputs of sample shape `input_shape`, after checking
// that the two fit (channels, feature counts, kernel vs image size, ...) and that sizes are
// positive and bounded. The error names the layer by `index` and spec.name().
Result<std::unique_ptr<Layer>> CreateLayer(const proto::LayerSpec& spec,
                                           const std::vector<int64_t>& input_shape, int index);

// Fully connected: out = in * W^T + b. Input sample shape {in_features}.
class DenseLayer final : public Layer {
 public:
  DenseLayer(int64_t in_features, int64_t out_features);
  std::string_view kind() const override { return "dense"; }
  int64_t param_count() const override { return out_ * in_ + out_; }
  void BindParams(float* params, float* grads) override;
  void InitParams(std::mt19937_64& rng, bool he) override;
  void Forward(const Tensor& in, Tensor* out, bool training) override;
  void Backward(const Tensor& grad_out, Tensor* grad_in) override;

 private:
  int64_t in_, out_;
  float* w_ = nullptr;  // [out_, in_]
  float* b_ = nullptr;  // [out_]
  float* dw_ = nullptr;
  float* db_ = nullptr;
  Tensor input_;  // copy of the last training input, for dW
};

// 2-D convolution over NCHW with square kernels, stride and zero padding: per sample, im2col
// and one GEMM, samples spread over the worker threads.
class Conv2DLayer final : public Layer {
 public:
  // input_shape = {in_channels, height, width}.
  Conv2DLayer(const std::vector<int64_t>& input_shape, int64_t out_channels, int64_t kernel,
              int64_t stride, int64_t padding);
  std::string_view kind() const override { return "conv2d"; }
  int64_t param_count() const override { return oc_ * ckk_ + oc_; }
  void BindParams(float* params, float* grads) override;
  void InitParams(std::mt19937_64& rng, bool he) override;
  void Forward(const Tensor& in, Tensor* out, bool training) override;
  void Backward(const Tensor& grad_out, Tensor* grad_in) override;
  // Inference on `count` samples: in [count, c, h, w] -> out [count, oc, out_h, out_w], both
  // raw buffers the caller owns (no training copy). Forward's computation sample for sample,
  // so the results are bit-identical to Forward's for the same samples: what lets a pipeline
  // stage compute some of a micro-batch's samples straight into the layer's whole output
  // (slicing/chain.h, cuts by sample).
  void ForwardSamples(const float* in, int64_t count, float* out);

 private:
  struct Scratch {
    Tensor cols;                 // [ckk_, p_]: one sample's im2col columns
    Tensor dcols;                // [ckk_, p_]: their gradient
    std::vector<float> partial;  // a worker's share of dW and db
    std::vector<float> padded;   // Im2ColPositions' scratch
  };
  // One sample {c_, h_, w_} <-> its columns [ckk_, p_] (col2im overwrites `in`).
  void Im2Col(const float* in, Scratch* s) const;
  void Col2Im(const float* cols, float* in) const;
  // Number of workers for a batch; sizes scratch_ for them.
  int PrepareWorkers(int64_t batch);

  int64_t c_, h_, w_, oc_, k_, stride_, pad_, oh_, ow_;
  int64_t ckk_;             // c_ * k_ * k_: rows of a patch column
  int64_t p_;               // oh_ * ow_: output positions per sample
  float* w_ptr_ = nullptr;  // [oc_, ckk_]
  float* b_ptr_ = nullptr;  // [oc_]
  float* dw_ptr_ = nullptr;
  float* db_ptr_ = nullptr;
  Tensor input_;                  // copy of the last training input
  std::vector<Scratch> scratch_;  // one per worker thread
};

// Max pooling over NCHW, square window, no padding (a window that would hang over the edge is
// dropped, as in PyTorch's default floor mode).
class MaxPool2DLayer final : public Layer {
 public:
  MaxPool2DLayer(const std::vector<int64_t>& input_shape, int64_t kernel, int64_t stride);
  std::string_view kind() const override { return "maxpool2d"; }
  void Forward(const Tensor& in, Tensor* out, bool training) override;
  void Backward(const Tensor& grad_out, Tensor* grad_in) override;

 private:
  int64_t c_, h_, w_, k_, stride_, oh_, ow_;
  std::vector<int32_t> argmax_;  // per output element: index of the max within its input plane
};

// max(x, 0), elementwise, any shape.
class ReluLayer final : public Layer {
 public:
  explicit ReluLayer(const std::vector<int64_t>& input_shape);
  std::string_view kind() const override { return "relu"; }
  void Forward(const Tensor& in, Tensor* out, bool training) override;
  void Backward(const Tensor& grad_out, Tensor* grad_in) override;

 private:
  std::vector<uint8_t> mask_;  // last training input > 0: where the gradient passes
};

// Reshapes [batch, ...] to [batch, prod(...)].
class FlattenLayer final : public Layer {
 public:
  explicit FlattenLayer(const std::vector<int64_t>& input_shape);
  std::string_view kind() const override { return "flatten"; }
  void Forward(const Tensor& in, Tensor* out, bool training) override;
  void Backward(const Tensor& grad_out, Tensor* grad_in) override;

 private:
  int64_t batch_ = 0;
};

}  // namespace fedslice
