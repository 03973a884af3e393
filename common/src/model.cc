#include "fedslice/common/model.h"

#include <random>
#include <string>

#include "fedslice/common/loss.h"

namespace fedslice {
namespace {

constexpr int kMaxLayers = 1024;
constexpr int64_t kMaxInputDim = int64_t{1} << 20;
constexpr int64_t kMaxInputSize = int64_t{1} << 26;
constexpr int64_t kMaxTotalParams = int64_t{1} << 29;  // 2 GiB of float32
constexpr int64_t kMaxClasses = int64_t{1} << 20;

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
    model.layers_[static_cast<size_t>(i)]->InitParams(rng, UseHe(spec, i));
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
  layers_.clear();
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
    layers_.push_back(std::move(layer));
  }
  if (shapes_.back() != std::vector<int64_t>{spec_.num_classes()}) {
    return Status::InvalidArgument("the last layer outputs " + ShapeStr(shapes_.back()) +
                                   " but num_classes is " + std::to_string(spec_.num_classes()));
  }
  params_.assign(static_cast<size_t>(offsets_.back()), 0.0f);
  grads_.assign(static_cast<size_t>(offsets_.back()), 0.0f);
  acts_.assign(static_cast<size_t>(n), Tensor());
  train_batch_.assign(static_cast<size_t>(n), 0);
  Rebind();
  return Status::Ok();
}

void Model::Rebind() {
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->BindParams(params_.data() + offsets_[i], grads_.data() + offsets_[i]);
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

Status Model::Forward(int begin, int end, const Tensor& in, Tensor* out) const {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  FEDSLICE_RETURN_IF_ERROR(CheckInput(begin, in, "input to layer " + std::to_string(begin)));
  const Tensor* cur = &in;
  for (int i = begin; i < end; ++i) {
    const auto k = static_cast<size_t>(i);
    layers_[k]->Forward(*cur, &acts_[k], /*training=*/false);
    train_batch_[k] = 0;
    cur = &acts_[k];
  }
  *out = *cur;
  return Status::Ok();
}

Status Model::TrainForward(int begin, int end, const Tensor& in, Tensor* out) {
  FEDSLICE_RETURN_IF_ERROR(CheckRange(begin, end));
  FEDSLICE_RETURN_IF_ERROR(CheckInput(begin, in, "input to layer " + std::to_string(begin)));
  const Tensor* cur = &in;
  for (int i = begin; i < end; ++i) {
    const auto k = static_cast<size_t>(i);
    layers_[k]->Forward(*cur, &acts_[k], /*training=*/true);
    train_batch_[k] = in.batch();
    cur = &acts_[k];
  }
  *out = *cur;
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
  // Without grad_in, nothing below the first layer that has parameters needs a gradient:
  // that layer skips its input gradient (for the first dense layer of the MLP, a third of
  // its backward work) and the parameter-free layers before it are not run at all.
  int last = begin;
  if (grad_in == nullptr) {
    while (last < end - 1 && layers_[static_cast<size_t>(last)]->param_count() == 0) ++last;
  }
  Tensor* bufs[2] = {&grad_a_, &grad_b_};
  const Tensor* cur = &grad_out;
  for (int i = end - 1; i >= last; --i) {
    Tensor* dst = (i == last && grad_in == nullptr) ? nullptr : bufs[i % 2];
    layers_[static_cast<size_t>(i)]->Backward(*cur, dst);
    cur = dst;
  }
  if (grad_in != nullptr) *grad_in = *cur;
  return Status::Ok();
}

Result<float> Model::ComputeGradients(const Tensor& in, std::span<const int32_t> labels) {
  FEDSLICE_RETURN_IF_ERROR(TrainForward(0, num_layers(), in, &logits_));
  FEDSLICE_ASSIGN_OR_RETURN(float loss, SoftmaxCrossEntropy(logits_, labels, &grad_logits_));
  FEDSLICE_RETURN_IF_ERROR(Backward(0, num_layers(), grad_logits_, nullptr));
  return loss;
}

}  // namespace fedslice
