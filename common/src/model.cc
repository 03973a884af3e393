#include "fedslice/common/model.h"

#include <omp.h>

#include <algorithm>
#include <random>
#include <string>

#include "fedslice/common/loss.h"
#include "fedslice/common/threading.h"
#include "loss_internal.h"

namespace fedslice {
namespace {

constexpr int kMaxLayers = 1024;
constexpr int64_t kMaxInputDim = int64_t{1} << 20;
constexpr int64_t kMaxInputSize = int64_t{1} << 26;
constexpr int64_t kMaxTotalParams = int64_t{1} << 29;  // 2 GiB of float32
constexpr int64_t kMaxClasses = int64_t{1} << 20;
constexpr double kMinFlopsPerParamToSplit = 64.0;

std::string ShapeStr(const std::vector<int64_t>& s) { return Tensor::ShapeToString(s); }

// Whether the layer's weights get He (ReLU after it) or Glorot initialisation.
bool UseHe(const proto::ModelSpec& spec, int i) {
  const proto::LayerSpec& l = spec.layers(i);
  proto::Init init = proto::INIT_DEFAULT;
  if (l.has_dense()) init = l.dense().init();
  if (l.has_conv2d()) init = l.conv2d().init();
  if (init == proto::INIT_HE) return true;
  if (init == proto::INIT_GLOROT) return false;
  return i + 1 < spec.layers_size() && spec.layers(i + 1).has_relu();
}

}  // namespace

Result<Model> Model::Create(const proto::ModelSpec& spec) {
  Model model;
  model.spec_ = spec;
  if (Status s = model.Build(); !s.ok()) {
    const std::string name = spec.name().empty() ? std::string("model spec")
                                                 : "model spec '" + spec.name() + "'";
    return s.WithContext(name);
  }
  std::mt19937_64 rng(spec.init_seed());
  for (int i = 0; i < model.num_layers(); ++i) {
    model.workers_[0].layers[static_cast<size_t>(i)]->InitParams(rng, UseHe(spec, i));
  }
  return model;
}

Status Model::Build() {
  const int n = spec_.layers_size();
  if (n == 0) return Status::InvalidArgument("has no layers");
  if (n > kMaxLayers) {
    return Status::InvalidArgument("has " + std::to_string(n) + " layers, more than " +
                                   std::to_string(kMaxLayers));
  }
  std::vector<int64_t> shape(spec_.input_shape().begin(), spec_.input_shape().end());
  if (shape.empty()) return Status::InvalidArgument("input_shape is empty");
  int64_t input_size = 1;
  for (int64_t d : shape) {
    if (d < 1 || d > kMaxInputDim) {
      return Status::InvalidArgument("input_shape " + ShapeStr(shape) +
                                     " has a dimension outside [1, " +
                                     std::to_string(kMaxInputDim) + "]");
    }
    input_size *= d;
    if (input_size > kMaxInputSize) {
      return Status::InvalidArgument("input_shape " + ShapeStr(shape) + " is too large");
    }
  }
  if (spec_.num_classes() < 1 || spec_.num_classes() > kMaxClasses) {
    return Status::InvalidArgument("num_classes is " + std::to_string(spec_.num_classes()) +
                                   ", must be in [1, " + std::to_string(kMaxClasses) + "]");
  }
  std::vector<std::unique_ptr<Layer>> layers;
  shapes_ = {shape};
  offsets_ = {0};
  for (int i = 0; i < n; ++i) {
    FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer,
                              CreateLayer(spec_.layers(i), shapes_.back(), i));
    shapes_.push_back(layer->output_shape());
    offsets_.push_back(offsets_.back() + layer->param_count());
    if (offsets_.back() > kMaxTotalParams) {
      return Status::InvalidArgument("more than " + std::to_string(kMaxTotalParams) +
                                     " parameters");
    }
    layers.push_back(std::move(layer));
  }
  if (shapes_.back() != std::vector<int64_t>{spec_.num_classes()}) {
    return Status::InvalidArgument("the last layer outputs " + ShapeStr(shapes_.back()) +
                                   " but num_classes is " + std::to_string(spec_.num_classes()));
  }
  forward_flops_ = 0;
  for (int i = 0; i < n; ++i) {
    // Multiply-adds per sample: a layer's weights are each used once per output position.
    const auto& l = spec_.layers(i);
    const int64_t positions = l.has_conv2d() ? shapes_[static_cast<size_t>(i) + 1][1] * shapes_[static_cast<size_t>(i) + 1][2] : 1;
    forward_flops_ += 2.0 * static_cast<double>(layers[static_cast<size_t>(i)]->param_count()) * static_cast<double>(positions);
  }
  first_param_layer_ = 0;
  while (first_param_layer_ < n && layers[static_cast<size_t>(first_param_layer_)]->param_count() == 0) {
    ++first_param_layer_;
  }
  params_.assign(static_cast<size_t>(offsets_.back()), 0.0f);
  grads_.assign(static_cast<size_t>(offsets_.back()), 0.0f);
  workers_.clear();
  workers_.emplace_back();
  workers_[0].layers = std::move(layers);
  workers_[0].acts.assign(static_cast<size_t>(n), Tensor());
  train_batch_.assign(static_cast<size_t>(n), 0);
  Rebind();
  return Status::Ok();
}

void Model::Rebind() {
  for (size_t w = 0; w < workers_.size(); ++w) {
    float* grads = w == 0 ? grads_.data() : workers_[w].grads.data();
    for (size_t i = 0; i < workers_[w].layers.size(); ++i) {
      workers_[w].layers[i]->BindParams(params_.data() + offsets_[i], grads + offsets_[i]);
    }
  }
}

void Model::EnsureWorkers(int n) const {
  // Replicas are built from the spec validated in Build(), so CreateLayer cannot fail.
  while (static_cast<int>(workers_.size()) < n) {
    Worker w;
    w.grads.assign(params_.size(), 0.0f);
    for (int i = 0; i < num_layers(); ++i) {
      auto layer = CreateLayer(spec_.layers(i), shapes_[static_cast<size_t>(i)], i);
      w.layers.push_back(std::move(*layer));
      // params_ is only read through the replicas; the const_cast is needed because
      // BindParams takes the pointer the training path writes through (worker 0 only).
      w.layers.back()->BindParams(const_cast<float*>(params_.data()) + offsets_[static_cast<size_t>(i)],
                                  w.grads.data() + offsets_[static_cast<size_t>(i)]);
    }
    w.acts.assign(static_cast<size_t>(num_layers()), Tensor());
    workers_.push_back(std::move(w));
  }
}

Model::Model(const Model& other) { *this = other; }

Model& Model::operator=(const Model& other) {
  if (this == &other) return *this;
  spec_ = other.spec_;
  // The spec was validated when `other` was built, so this cannot fail.
  Status s = Build();
  (void)s;
  params_ = other.params_;
  grads_ = other.grads_;
  Rebind();
  return *this;
}

// Moving a std::vector hands over its heap buffer, so the layers' views stay valid.
Model::Model(Model&& other) noexcept = default;
Model& Model::operator=(Model&& other) noexcept = default;
Model::~Model() = default;

Status Model::CheckRange(int begin, int end) const {
  if (begin < 0 || end > num_layers() || begin >= end) {
    return Status::InvalidArgument("layer range [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") is not a non-empty range within [0, " +
                                   std::to_string(num_layers()) + ")");
  }
  return Status::Ok();
}

Status Model::CheckInput(int layer, const Tensor& in, std::string_view what) const {
  const std::vector<int64_t>& want = shapes_[static_cast<size_t>(layer)];
  bool ok = in.rank() == static_cast<int>(want.size()) + 1 && in.batch() >= 1;
  for (size_t i = 0; ok && i < want.size(); ++i) ok = in.dim(i + 1) == want[i];
  if (!ok) {
    std::string expected = "[batch";
    for (int64_t d : want) expected += ", " + std::to_string(d);
    return Status::InvalidArgument(std::string(what) + " has shape " + in.ShapeString() +
                                   ", expected " + expected + "] with batch >= 1");
  }
  return Status::Ok();
}

Result<std::vector<int64_t>> Model::OutputShape(int begin, int end) const {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  return shapes_[static_cast<size_t>(end)];
}

Result<Model::ParamSlice> Model::ParamRange(int begin, int end) const {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  return ParamSlice{offsets_[static_cast<size_t>(begin)],
                    offsets_[static_cast<size_t>(end)] - offsets_[static_cast<size_t>(begin)]};
}

Status Model::SetParams(std::span<const float> values) {
  if (static_cast<int64_t>(values.size()) != param_count()) {
    return Status::InvalidArgument("got " + std::to_string(values.size()) +
                                   " parameters for a model of " + std::to_string(param_count()));
  }
  std::copy(values.begin(), values.end(), params_.begin());
  return Status::Ok();
}

const Tensor& Model::RunForward(Worker& w, int begin, int end, const Tensor& in,
                                bool training) const {
  const Tensor* cur = &in;
  for (int i = begin; i < end; ++i) {
    const auto k = static_cast<size_t>(i);
    w.layers[k]->Forward(*cur, &w.acts[k], training);
    cur = &w.acts[k];
  }
  return *cur;
}

// Copies rows [n0, n1) of `src` into `dst`.
static void CopyRows(const Tensor& src, int64_t n0, int64_t n1, Tensor* dst) {
  std::vector<int64_t> shape = src.shape();
  shape[0] = n1 - n0;
  dst->Resize(shape);
  const int64_t ss = src.sample_size();
  std::copy_n(src.data() + n0 * ss, (n1 - n0) * ss, dst->data());
}

Status Model::Forward(int begin, int end, const Tensor& in, Tensor* out) const {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  FEDSLICE_RETURN_IF_ERROR(CheckInput(begin, in, "input to layer " + std::to_string(begin)));
  for (int i = begin; i < end; ++i) train_batch_[static_cast<size_t>(i)] = 0;
  const int64_t batch = in.batch();
  const int workers = static_cast<int>(std::min<int64_t>(NumThreads(), batch));
  if (workers <= 1) {
    // One worker: the layers parallelise internally instead.
    *out = RunForward(workers_[0], begin, end, in, false);
    return Status::Ok();
  }
  EnsureWorkers(workers);
  Tensor input_copy;
  const Tensor* src = &in;
  if (out == &in) {
    input_copy = in;
    src = &input_copy;
  }
  std::vector<int64_t> out_shape = {batch};
  out_shape.insert(out_shape.end(), shapes_[static_cast<size_t>(end)].begin(),
                   shapes_[static_cast<size_t>(end)].end());
  out->Resize(out_shape);
#pragma omp parallel num_threads(workers)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = batch * t / nt, n1 = batch * (t + 1) / nt;
    Worker& w = workers_[static_cast<size_t>(t)];
    CopyRows(*src, n0, n1, &w.input);
    const Tensor& y = RunForward(w, begin, end, w.input, false);
    std::copy_n(y.data(), y.size(), out->data() + n0 * y.sample_size());
  }
  return Status::Ok();
}

Status Model::TrainForward(int begin, int end, const Tensor& in, Tensor* out) {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  FEDSLICE_RETURN_IF_ERROR(CheckInput(begin, in, "input to layer " + std::to_string(begin)));
  *out = RunForward(workers_[0], begin, end, in, true);
  for (int i = begin; i < end; ++i) train_batch_[static_cast<size_t>(i)] = in.batch();
  return Status::Ok();
}

Status Model::Backward(int begin, int end, const Tensor& grad_out, Tensor* grad_in) {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  FEDSLICE_RETURN_IF_ERROR(
      CheckInput(end, grad_out, "gradient of the output of layer " + std::to_string(end - 1)));
  const int64_t batch = grad_out.batch();
  for (int i = begin; i < end; ++i) {
    if (train_batch_[static_cast<size_t>(i)] != batch) {
      return Status::FailedPrecondition(
          "Backward over layer " + std::to_string(i) + " with a batch of " +
          std::to_string(batch) + " needs a TrainForward with that batch just before it");
    }
  }
  Worker& w = workers_[0];
  // Without grad_in, nothing below the first layer that has parameters needs a gradient:
  // that layer skips its input gradient (for the first dense layer of the MLP, a third of
  // its backward work) and the parameter-free layers before it are not run at all.
  const int last = grad_in == nullptr ? std::clamp(first_param_layer_, begin, end - 1) : begin;
  Tensor* bufs[2] = {&w.grad_a, &w.grad_b};
  const Tensor* cur = &grad_out;
  for (int i = end - 1; i >= last; --i) {
    Tensor* dst = (i == last && grad_in == nullptr) ? nullptr : bufs[i % 2];
    w.layers[static_cast<size_t>(i)]->Backward(*cur, dst);
    cur = dst;
  }
  if (grad_in != nullptr) *grad_in = *cur;
  return Status::Ok();
}

void Model::RunBackward(Worker& w, const Tensor& grad_logits) const {
  const int last = std::min(first_param_layer_, num_layers() - 1);
  Tensor* bufs[2] = {&w.grad_a, &w.grad_b};
  const Tensor* cur = &grad_logits;
  for (int i = num_layers() - 1; i >= last; --i) {
    Tensor* dst = i == last ? nullptr : bufs[i % 2];
    w.layers[static_cast<size_t>(i)]->Backward(*cur, dst);
    cur = dst;
  }
}

Result<float> Model::RunTrainStep(const Tensor& in, std::span<const int32_t> labels,
                                  Sgd* optimizer, std::span<const float> prox_anchor) {
  FEDSLICE_RETURN_IF_ERROR(CheckInput(0, in, "training input"));
  const int64_t batch = in.batch();
  if (static_cast<int64_t>(labels.size()) != batch) {
    return Status::InvalidArgument(std::to_string(labels.size()) + " labels for a batch of " +
                                   std::to_string(batch));
  }
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] < 0 || labels[i] >= num_classes()) {
      return Status::InvalidArgument("label " + std::to_string(labels[i]) + " of sample " +
                                     std::to_string(i) + " is outside [0, " +
                                     std::to_string(num_classes()) + ")");
    }
  }
  if (optimizer != nullptr) {
    FEDSLICE_RETURN_IF_ERROR(
        optimizer->PrepareStep(params_.size(), grads_.size(), prox_anchor.size()));
  }
  for (int64_t& b : train_batch_) b = 0;  // the range API's Backward needs a new TrainForward
  // Splitting the batch pays only when there is enough arithmetic per parameter: every
  // worker reads all the weights, and the gradients of all workers are summed each step.
  // Measured on the MLP at batch 10 (40 flops per parameter per step), two workers are
  // slower than one; from ~64 on (the MLP at batch 64, the CNN at batch 10) they are faster.
  const double flops_per_param = static_cast<double>(batch) * forward_flops_ /
                                 static_cast<double>(std::max<int64_t>(1, param_count()));
  const int workers = flops_per_param < kMinFlopsPerParamToSplit
                          ? 1
                          : static_cast<int>(std::min<int64_t>(NumThreads(), batch));
  EnsureWorkers(workers);
  const int64_t params = param_count();
  const float* anchor = prox_anchor.empty() ? nullptr : prox_anchor.data();
  // The mean loss's gradient: every worker scales by the whole batch, not its share.
  const float inv_batch = 1.0f / static_cast<float>(batch);
  auto step = [&](int t, int nt) {
    const int64_t n0 = batch * t / nt, n1 = batch * (t + 1) / nt;
    Worker& w = workers_[static_cast<size_t>(t)];
    const Tensor* x = &in;
    if (nt > 1) {
      CopyRows(in, n0, n1, &w.input);
      x = &w.input;
    }
    const Tensor& logits = RunForward(w, 0, num_layers(), *x, true);
    w.loss_sum = internal::SoftmaxCrossEntropySum(logits, labels.subspan(n0, n1 - n0),
                                                  &w.grad_logits, inv_batch);
    RunBackward(w, w.grad_logits);
  };
  if (workers > 1) {
    const float* grads[64];
    const int ng = std::min(workers, 64);
    int team = 1;
#pragma omp parallel num_threads(ng)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      if (t == 0) team = nt;
      step(t, nt);
      grads[t] = t == 0 ? grads_.data() : workers_[static_cast<size_t>(t)].grads.data();
#pragma omp barrier
      // Sum the workers' gradients (in worker order) into grads_ and, when training, update
      // the parameters in the same pass; threads split the parameters, in packet multiples.
      const int64_t packets = (params + 15) / 16;
      const int64_t p0 = std::min(params, packets * t / nt * 16);
      const int64_t p1 = std::min(params, packets * (t + 1) / nt * 16);
      if (optimizer != nullptr) {
        optimizer->StepRange(params_.data(), grads, nt, grads_.data(), anchor, p0, p1);
      } else {
        for (int k = 1; k < nt; ++k) {
          for (int64_t i = p0; i < p1; ++i) grads_[static_cast<size_t>(i)] += grads[k][i];
        }
      }
    }
    double loss = 0.0;
    for (int t = 0; t < team; ++t) loss += workers_[static_cast<size_t>(t)].loss_sum;
    return static_cast<float>(loss / static_cast<double>(batch));
  }
  step(0, 1);
  if (optimizer != nullptr) {
    const float* g = grads_.data();
    optimizer->StepRange(params_.data(), &g, 1, nullptr, anchor, 0, params);
  }
  return static_cast<float>(workers_[0].loss_sum / static_cast<double>(batch));
}

Result<float> Model::ComputeGradients(const Tensor& in, std::span<const int32_t> labels) {
  return RunTrainStep(in, labels, nullptr, {});
}

Result<float> Model::TrainStep(const Tensor& in, std::span<const int32_t> labels, Sgd& optimizer,
                               std::span<const float> prox_anchor) {
  return RunTrainStep(in, labels, &optimizer, prox_anchor);
}

std::vector<uint64_t> Model::ParamSegments() const {
  std::vector<uint64_t> segments;
  for (int i = 0; i < num_layers(); ++i) {
    const int64_t count = layer(i).param_count();
    if (count > 0) segments.push_back(static_cast<uint64_t>(count));
  }
  return segments;
}

}  // namespace fedslice
