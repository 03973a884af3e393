// Model: a sequential stack of layers built from a proto::ModelSpec, with every parameter in
// one flat float buffer.
//
// Flat buffers: params() holds all parameters in layer order (per layer: weights, then bias;
// layouts in layers.h); grads() has the same size and layout. Aggregation, codecs, checkpoints
// and slicing work on these spans directly; ParamRange(begin, end) gives the contiguous part
// that belongs to layers [begin, end).
//
// Ranges: every layer-range call takes [begin, end) with 0 <= begin < end <= num_layers(),
// so a model can be run in slices: Forward(0, k) then Forward(k, n) gives exactly the output
// of Forward(0, n).
//
// Ownership and lifetime: a Model owns its layers and buffers. Moving is cheap and keeps
// the spans' data pointers valid (they now belong to the moved-to model); copying is deep.
//
// Threads: Forward, ComputeGradients and TrainStep split a batch across the engine's worker
// threads (threading.h); the range calls TrainForward/Backward parallelise inside layers.
// For a given thread count every call is deterministic. Forward's results do not depend on
// the thread count for batches of NumThreads()..64 samples (smaller batches may run one
// product on several threads, which rounds differently).
//
// Thread-safety: none. Even the const Forward() uses per-model scratch buffers, so one Model
// must not be used from two threads at once; give each thread its own copy. Distinct Model
// objects are independent.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "fedslice/common/layers.h"
#include "fedslice/common/optimizer.h"
#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"
#include "fedslice/model.pb.h"

namespace fedslice {

class Model {
 public:
  // Contiguous part of the flat buffers: [offset, offset + count).
  struct ParamSlice {
    int64_t offset = 0;
    int64_t count = 0;
  };

  // Validates `spec` (at least one layer, every layer's hyperparameters fit the shape coming
  // out of the previous one, sizes positive and bounded, last output = {num_classes}) and
  // builds the model with parameters initialised from spec.init_seed (identical on every
  // machine). InvalidArgument names the offending layer.
  static Result<Model> Create(const proto::ModelSpec& spec);

  Model(const Model& other);
  Model& operator=(const Model& other);
  Model(Model&& other) noexcept;
  Model& operator=(Model&& other) noexcept;
  ~Model();

  const proto::ModelSpec& spec() const { return spec_; }
  int num_layers() const { return shapes_.empty() ? 0 : static_cast<int>(shapes_.size()) - 1; }
  const Layer& layer(int i) const { return *workers_[0].layers[static_cast<size_t>(i)]; }
  int num_classes() const { return spec_.num_classes(); }
  // Sample shape (batch excluded) that layer i takes; i == num_layers() gives the model's
  // output shape, {num_classes}.
  const std::vector<int64_t>& InputShape(int i) const { return shapes_[static_cast<size_t>(i)]; }
  // Sample shape produced by running layers [begin, end).
  Result<std::vector<int64_t>> OutputShape(int begin, int end) const;

  int64_t param_count() const { return static_cast<int64_t>(params_.size()); }
  // The parameter count of each layer that has parameters, in order: the segments of
  // params() that belong to one layer (they add up to param_count()).
  std::vector<uint64_t> ParamSegments() const;
  std::span<float> params() { return params_; }
  std::span<const float> params() const { return params_; }
  std::span<float> grads() { return grads_; }
  std::span<const float> grads() const { return grads_; }
  // The part of params()/grads() owned by layers [begin, end).
  Result<ParamSlice> ParamRange(int begin, int end) const;
  // Replaces every parameter; fails (model unchanged) unless values.size() == param_count().
  Status SetParams(std::span<const float> values);

  // Inference over layers [begin, end). in: [batch] + InputShape(begin), batch >= 1;
  // out is resized to [batch] + OutputShape(begin, end). `out` may be `&in`. Fails with
  // InvalidArgument (nothing run) on a bad range or input shape.
  Status Forward(int begin, int end, const Tensor& in, Tensor* out) const;
  Status Forward(const Tensor& in, Tensor* out) const {
    return Forward(0, num_layers(), in, out);
  }

  // Training forward pass over [begin, end): like Forward, but the layers keep what
  // Backward needs.
  Status TrainForward(int begin, int end, const Tensor& in, Tensor* out);
  // Back-propagates dLoss/dOut of the last TrainForward over the same layers [begin, end),
  // overwriting their part of grads(). grad_in (may be nullptr: skipped, which saves the
  // first layer's input gradient) receives dLoss/dIn. FailedPrecondition when layers in the
  // range have not just run TrainForward with this batch size (an inference Forward in
  // between also invalidates it).
  Status Backward(int begin, int end, const Tensor& grad_out, Tensor* grad_in);

  // One full training pass: forward over all layers, softmax cross-entropy against
  // `labels`, backward into grads() (no input gradient). Returns the batch's mean loss.
  // The batch is split across the worker threads (threading.h): each runs the whole network
  // on its rows, and their gradients are summed in worker order, so the result is
  // deterministic for a given thread count. Afterwards Backward() needs a new TrainForward.
  Result<float> ComputeGradients(const Tensor& in, std::span<const int32_t> labels);

  // ComputeGradients followed by optimizer.Step(params(), grads(), prox_anchor), with the
  // gradient reduction and the update fused into one pass over the parameters. On error
  // (bad input, labels or anchor) the parameters are unchanged.
  Result<float> TrainStep(const Tensor& in, std::span<const int32_t> labels, Sgd& optimizer,
                          std::span<const float> prox_anchor = {});

 private:
  using FloatBuffer = std::vector<float, Eigen::aligned_allocator<float>>;
  // One set of layers with its own activations and scratch. Worker 0's layers are the
  // model's layers (layer(), the range calls) and write grads_; the others exist only while
  // a batch is split across threads and write their own gradient buffers.
  struct Worker {
    std::vector<std::unique_ptr<Layer>> layers;
    FloatBuffer grads;  // workers >= 1 only
    std::vector<Tensor> acts;
    Tensor input, grad_logits, grad_a, grad_b;
    double loss_sum = 0.0;
  };

  Model() = default;
  // Builds worker 0 / shapes_ / offsets_ from spec_ and binds it to params_/grads_.
  Status Build();
  Status CheckRange(int begin, int end) const;
  Status CheckInput(int layer, const Tensor& in, std::string_view what) const;
  // Makes sure workers [0, n) exist (creating layer replicas bound to params_).
  void EnsureWorkers(int n) const;
  void Rebind();
  // Layers [begin, end) of worker w over `in` (training or not); returns the last output.
  const Tensor& RunForward(Worker& w, int begin, int end, const Tensor& in, bool training) const;
  // Backward over worker w's layers from the loss down to the first layer with parameters.
  void RunBackward(Worker& w, const Tensor& grad_logits) const;
  // The shared body of ComputeGradients and TrainStep (optimizer may be null).
  Result<float> RunTrainStep(const Tensor& in, std::span<const int32_t> labels, Sgd* optimizer,
                             std::span<const float> prox_anchor);
  std::vector<std::unique_ptr<Layer>>& layers() const { return workers_[0].layers; }

  proto::ModelSpec spec_;
  std::vector<std::vector<int64_t>> shapes_;  // num_layers() + 1 sample shapes
  std::vector<int64_t> offsets_;              // num_layers() + 1 offsets into params_
  int first_param_layer_ = 0;                 // first layer with parameters (or num_layers())
  double forward_flops_ = 0;                  // per sample, approximately
  // 64-byte aligned, so that every layer's weights have the same alignment in every Model
  // instance: some Eigen kernels pick code paths (and so rounding) by address.
  FloatBuffer params_;
  FloatBuffer grads_;
  // Layers and scratch. Mutable because inference is const for callers but reuses these
  // buffers (hence no thread-safety, see above).
  mutable std::vector<Worker> workers_;
  // Per layer: the batch size of its last TrainForward, 0 after an inference Forward.
  mutable std::vector<int64_t> train_batch_;
  Tensor logits_;
};

}  // namespace fedslice
