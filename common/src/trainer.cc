#include "fedslice/common/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fedslice/common/loss.h"
#include "init_random.h"

namespace fedslice {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Copies samples order[first, first + count) into `batch` ([count] + sample_shape) and
// their labels into `labels`.
void Gather(const data::Dataset& data, std::span<const int64_t> order, Tensor* batch,
            std::vector<int32_t>* labels) {
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t ss = data.sample_size();
  std::vector<int64_t> shape = {n};
  shape.insert(shape.end(), data.sample_shape.begin(), data.sample_shape.end());
  batch->Resize(shape);
  labels->resize(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = order[static_cast<size_t>(k)];
    std::copy_n(data.features.data() + i * ss, ss, batch->data() + k * ss);
    (*labels)[static_cast<size_t>(k)] = data.labels[static_cast<size_t>(i)];
  }
}

Status CheckBatchSize(int batch_size) {
  if (batch_size < 1) {
    return Status::InvalidArgument("batch size must be >= 1, got " + std::to_string(batch_size));
  }
  return Status::Ok();
}

}  // namespace

Status ValidateDataset(const Model& model, const data::Dataset& data) {
  const std::vector<int64_t>& want = model.InputShape(0);
  if (data.sample_shape != want) {
    return Status::InvalidArgument("data set samples have shape " +
                                   Tensor::ShapeToString(data.sample_shape) + " but model '" +
                                   model.spec().name() + "' takes " +
                                   Tensor::ShapeToString(want));
  }
  if (data.size() == 0) return Status::InvalidArgument("data set is empty");
  if (static_cast<int64_t>(data.features.size()) != data.size() * data.sample_size()) {
    return Status::InvalidArgument(
        "data set has " + std::to_string(data.features.size()) + " feature values for " +
        std::to_string(data.size()) + " samples of " + std::to_string(data.sample_size()));
  }
  for (size_t i = 0; i < data.labels.size(); ++i) {
    if (data.labels[i] < 0 || data.labels[i] >= model.num_classes()) {
      return Status::InvalidArgument("label " + std::to_string(data.labels[i]) + " of sample " +
                                     std::to_string(i) + " is outside [0, " +
                                     std::to_string(model.num_classes()) + ")");
    }
  }
  const auto bad = std::find_if(data.features.begin(), data.features.end(),
                                [](float x) { return !std::isfinite(x); });
  if (bad != data.features.end()) {
    const int64_t pos = bad - data.features.begin();
    return Status::InvalidArgument("feature " + std::to_string(pos % data.sample_size()) +
                                   " of sample " + std::to_string(pos / data.sample_size()) +
                                   " is not finite");
  }
  return Status::Ok();
}

Result<TrainStats> Train(Model& model, const data::Dataset& data, const TrainConfig& config,
                         std::span<const float> prox_anchor,
                         std::function<void(const EpochStats&)> on_epoch) {
  const SgdOptions options{config.lr, config.momentum, config.weight_decay, config.prox_mu};
  FEDSLICE_RETURN_IF_ERROR(Sgd::Validate(options));
  Sgd optimizer(options);
  return Train(model, data, config, optimizer, prox_anchor, std::move(on_epoch));
}

Result<TrainStats> Train(Model& model, const data::Dataset& data, const TrainConfig& config,
                         Sgd& optimizer, std::span<const float> prox_anchor,
                         std::function<void(const EpochStats&)> on_epoch,
                         std::function<Status(int64_t steps_done)> after_step) {
  const auto start = Clock::now();
  FEDSLICE_RETURN_IF_ERROR(Sgd::Validate(optimizer.options()));
  if (config.epochs < 0) {
    return Status::InvalidArgument("epochs must be >= 0, got " + std::to_string(config.epochs));
  }
  FEDSLICE_RETURN_IF_ERROR(CheckBatchSize(config.batch_size));
  FEDSLICE_RETURN_IF_ERROR(ValidateDataset(model, data));
  if (optimizer.options().prox_mu > 0.0f) {
    if (static_cast<int64_t>(prox_anchor.size()) != model.param_count()) {
      return Status::InvalidArgument("FedProx needs the global weights (" +
                                     std::to_string(model.param_count()) + " values), got " +
                                     std::to_string(prox_anchor.size()));
    }
    if (!std::all_of(prox_anchor.begin(), prox_anchor.end(),
                     [](float x) { return std::isfinite(x); })) {
      return Status::InvalidArgument("FedProx anchor weights are not all finite");
    }
  }
  if (!optimizer.momentum_buffer().empty() &&
      static_cast<int64_t>(optimizer.momentum_buffer().size()) != model.param_count()) {
    return Status::InvalidArgument("optimizer momentum state does not match the model size");
  }

  // Kept so that a diverging run leaves the model as it was.
  const std::vector<float> initial(model.params().begin(), model.params().end());
  const std::vector<float> initial_velocity(optimizer.momentum_buffer().begin(),
                                            optimizer.momentum_buffer().end());
  const float initial_lr = optimizer.options().lr;
  auto restore = [&] {
    std::copy(initial.begin(), initial.end(), model.params().begin());
    optimizer.SetMomentumBuffer(initial_velocity);
    optimizer.set_lr(initial_lr);
  };

  TrainStats stats;
  stats.num_samples = data.size();
  std::vector<int64_t> order(static_cast<size_t>(data.size()));
  std::mt19937_64 rng(config.seed);
  Tensor batch;
  std::vector<int32_t> labels;
  for (int epoch = 1; epoch <= config.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    // Fisher-Yates with a portable index transform: the same order on every platform.
    std::iota(order.begin(), order.end(), int64_t{0});
    for (size_t i = order.size() - 1; i > 0; --i) {
      std::swap(order[i], order[internal::UniformIndex(rng, i + 1)]);
    }
    double loss_sum = 0.0;
    for (size_t first = 0; first < order.size(); first += config.batch_size) {
      const size_t count = std::min<size_t>(config.batch_size, order.size() - first);
      Gather(data, std::span<const int64_t>(order).subspan(first, count), &batch, &labels);
      Result<float> loss = model.TrainStep(batch, labels, optimizer, prox_anchor);
      if (!loss.ok()) return loss.status().WithContext("training step");
      if (!std::isfinite(*loss)) {
        restore();
        return Status::Aborted("training diverged: the loss became " + std::to_string(*loss) +
                               " in epoch " + std::to_string(epoch) +
                               "; weights restored (try a lower learning rate)");
      }
      loss_sum += static_cast<double>(*loss) * static_cast<double>(count);
      ++stats.steps;
      if (after_step) {
        if (Status hooked = after_step(stats.steps); !hooked.ok()) {
          restore();
          return hooked;
        }
      }
    }
    EpochStats es;
    es.epoch = epoch;
    es.samples = data.size();
    es.mean_loss = loss_sum / static_cast<double>(data.size());
    es.seconds = SecondsSince(epoch_start);
    stats.mean_loss = es.mean_loss;
    stats.samples_processed += data.size();
    if (on_epoch) on_epoch(es);
  }
  stats.seconds = SecondsSince(start);
  return stats;
}

Result<Tensor> Predict(const Model& model, const data::Dataset& data, int batch_size) {
  FEDSLICE_RETURN_IF_ERROR(CheckBatchSize(batch_size));
  FEDSLICE_RETURN_IF_ERROR(ValidateDataset(model, data));
  const int64_t n = data.size();
  const int64_t classes = model.num_classes();
  Tensor logits({n, classes});
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  Tensor batch, out;
  std::vector<int32_t> labels;
  for (int64_t first = 0; first < n; first += batch_size) {
    const int64_t count = std::min<int64_t>(batch_size, n - first);
    Gather(data, std::span<const int64_t>(order).subspan(first, count), &batch, &labels);
    FEDSLICE_RETURN_IF_ERROR(model.Forward(batch, &out));
    std::copy_n(out.data(), count * classes, logits.data() + first * classes);
  }
  return logits;
}

Result<EvalStats> Evaluate(const Model& model, const data::Dataset& data, int batch_size) {
  FEDSLICE_ASSIGN_OR_RETURN(Tensor logits, Predict(model, data, batch_size));
  FEDSLICE_ASSIGN_OR_RETURN(float loss, SoftmaxCrossEntropy(logits, data.labels, nullptr));
  const int64_t classes = model.num_classes();
  int64_t correct = 0;
  for (int64_t i = 0; i < data.size(); ++i) {
    const float* z = logits.data() + i * classes;
    const int64_t pred = std::max_element(z, z + classes) - z;
    if (pred == data.labels[static_cast<size_t>(i)]) ++correct;
  }
  EvalStats stats;
  stats.loss = loss;
  stats.accuracy = static_cast<double>(correct) / static_cast<double>(data.size());
  stats.count = data.size();
  return stats;
}

}  // namespace fedslice
