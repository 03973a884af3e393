#include "fedslice/client/local_trainer.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "fedslice/common/optimizer.h"
#include "fedslice/common/trainer.h"

namespace fedslice::client {

LocalTrainer::LocalTrainer(data::Dataset train, std::optional<data::Dataset> test)
    : train_(std::move(train)), test_(std::move(test)) {}

Status LocalTrainer::SetModel(const proto::ModelSpec& spec, const std::string& run_id) {
  FEDSLICE_ASSIGN_OR_RETURN(Model model, Model::Create(spec));
  FEDSLICE_RETURN_IF_ERROR(ValidateDataset(model, train_).WithContext("local training data"));
  if (test_) {
    FEDSLICE_RETURN_IF_ERROR(ValidateDataset(model, *test_).WithContext("local test data"));
  }
  if (model_ == nullptr || run_id != run_id_ || model_->param_count() != model.param_count()) {
    feedback_.Reset();
  }
  model_ = std::make_unique<Model>(std::move(model));
  run_id_ = run_id;
  return Status::Ok();
}

Status LocalTrainer::LoadWeights(const proto::EncodedTensor& weights) {
  if (model_ == nullptr) {
    return Status::FailedPrecondition("no model yet: the coordinator has not sent Welcome");
  }
  const auto expected = static_cast<uint64_t>(model_->param_count());
  if (weights.num_values() != expected) {
    return Status::InvalidArgument("global weights have " + std::to_string(weights.num_values()) +
                                   " values, the model has " + std::to_string(expected));
  }
  // Decode into a scratch copy so a bad payload leaves the model untouched. Any codec: the
  // coordinator may compress the downlink too.
  std::vector<float> values(expected);
  FEDSLICE_RETURN_IF_ERROR(codec::Decode(weights, values));
  return model_->SetParams(values);
}

namespace {

// The sparse refit of one Fit (LocalTrainer::Fit, CodecConfig.sparse_refit), run as Train's
// after-step hook. After step `switch_after` it takes x = (local - global) + residual, keeps
// the values top-k picks from x on top of the global weights and resets every other weight
// to its global value; from then on it holds those at their global values after every step.
class SparseRefitHook {
 public:
  SparseRefitHook(Model& model, const data::Dataset& train, std::span<const float> global,
                  std::span<const float> residual, const codec::CodecSpec& spec,
                  int64_t switch_after, float refit_lr, Sgd& optimizer)
      : model_(model),
        train_(train),
        global_(global),
        residual_(residual),
        spec_(spec),
        switch_after_(switch_after),
        refit_lr_(refit_lr),
        optimizer_(optimizer) {}

  Status operator()(int64_t steps_done) {
    if (steps_done < switch_after_) return Status::Ok();
    std::span<float> params = model_.params();
    if (steps_done > switch_after_) {
      // Gather the kept weights, write the global ones everywhere, put the kept back: two
      // passes of k and one copy of n, rather than a branch per weight.
      for (size_t j = 0; j < kept_.size(); ++j) kept_values_[j] = params[kept_[j]];
      std::copy(global_.begin(), global_.end(), params.begin());
      for (size_t j = 0; j < kept_.size(); ++j) params[kept_[j]] = kept_values_[j];
      return Status::Ok();
    }
    dense_delta_.resize(params.size());
    std::vector<float> x(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      dense_delta_[i] = params[i] - global_[i];
      x[i] = residual_.empty() ? dense_delta_[i] : dense_delta_[i] + residual_[i];
    }
    FEDSLICE_ASSIGN_OR_RETURN(kept_, codec::SelectTopK(spec_, x));
    kept_values_.resize(kept_.size());
    std::copy(global_.begin(), global_.end(), params.begin());
    for (const uint32_t i : kept_) params[i] = global_[i] + x[i];
    FEDSLICE_ASSIGN_OR_RETURN(const EvalStats start, fedslice::Evaluate(model_, train_));
    loss_at_switch_ = start.loss;
    optimizer_.set_lr(refit_lr_);
    return Status::Ok();
  }

  bool switched() const { return !kept_.empty(); }
  std::span<const uint32_t> kept() const { return kept_; }
  // local - global when the refit began: the update of the dense steps.
  std::span<const float> dense_delta() const { return dense_delta_; }
  // Loss on the local training data of global + the kept values, before any refit step.
  double loss_at_switch() const { return loss_at_switch_; }

 private:
  Model& model_;
  const data::Dataset& train_;
  std::span<const float> global_;
  std::span<const float> residual_;
  const codec::CodecSpec& spec_;
  const int64_t switch_after_;
  const float refit_lr_;
  Sgd& optimizer_;
  std::vector<uint32_t> kept_;
  std::vector<float> kept_values_;
  std::vector<float> dense_delta_;
  double loss_at_switch_ = 0;
};

}  // namespace

Result<proto::FitResult> LocalTrainer::Fit(const proto::FitTask& task) {
  const auto started = std::chrono::steady_clock::now();
  FEDSLICE_RETURN_IF_ERROR(LoadWeights(task.global_weights()).WithContext("FitTask"));
  if (task.batch_size() == 0) return Status::InvalidArgument("FitTask: batch_size must be >= 1");
  FEDSLICE_ASSIGN_OR_RETURN(codec::CodecSpec update_codec, codec::ParseCodec(task.codec()));
  if (update_codec.per_segment_scale) update_codec.segments = model_->ParamSegments();
  Result<codec::SparseRefit> refit = codec::ParseSparseRefit(task.codec());
  if (!refit.ok()) return refit.status().WithContext("FitTask");
  const bool feedback = codec::WantsErrorFeedback(update_codec, task.codec());

  const std::vector<float> global(model_->params().begin(), model_->params().end());
  TrainConfig config;
  config.epochs = static_cast<int>(task.local_epochs());
  config.batch_size = static_cast<int>(task.batch_size());
  config.lr = task.learning_rate();
  config.momentum = task.momentum();
  config.weight_decay = task.weight_decay();
  config.prox_mu = task.prox_mu();
  config.seed = task.seed();
  // Train checks the options; the refit needs the optimizer to change its learning rate.
  Sgd optimizer({config.lr, config.momentum, config.weight_decay, config.prox_mu});

  // The refit takes the last `share` of the steps, and at least one step stays dense.
  const int64_t steps_per_epoch = (train_.size() + config.batch_size - 1) / config.batch_size;
  const int64_t total_steps = std::max<int64_t>(config.epochs, 0) * steps_per_epoch;
  const int64_t refit_steps =
      refit->on() ? std::min<int64_t>(std::llround(refit->share * static_cast<double>(total_steps)),
                                      total_steps - 1)
                  : 0;
  std::optional<SparseRefitHook> hook;
  if (refit_steps > 0) {
    hook.emplace(*model_, train_, global, feedback ? feedback_.residual() : std::span<float>(),
                 update_codec, total_steps - refit_steps,
                 static_cast<float>(config.lr * refit->lr_scale), optimizer);
  }
  double last_epoch_loss = 0;
  auto stats = fedslice::Train(
      *model_, train_, config, optimizer,
      config.prox_mu > 0 ? std::span<const float>(global) : std::span<const float>(),
      [&](const EpochStats& epoch) { last_epoch_loss = epoch.mean_loss; },
      hook ? std::function<Status(int64_t)>(std::ref(*hook)) : nullptr);

  // The update is the change the client made: local weights minus the weights it received.
  std::vector<float> delta(global.size());
  bool fall_back = false;
  if (!stats.ok()) {
    // Train has restored the global weights. A refit that diverged leaves the dense steps'
    // update to send; any other failure sends nothing.
    if (!(hook && hook->switched() && stats.status().code() == Status::Code::kAborted)) {
      return stats.status().WithContext("local training");
    }
    fall_back = true;
  } else if (hook && hook->switched()) {
    FEDSLICE_ASSIGN_OR_RETURN(const EvalStats end, fedslice::Evaluate(*model_, train_));
    fall_back = !(end.loss <= hook->loss_at_switch());
  }
  const std::span<const float> local = model_->params();
  const bool refitted = hook && hook->switched() && !fall_back;
  if (fall_back) {
    ++sparse_refit_fallbacks_;
    spdlog::warn("round {}: sparse refit {}; sending the update of the dense steps", task.round(),
                 stats.ok() ? "raised the local loss" : "diverged");
    std::copy(hook->dense_delta().begin(), hook->dense_delta().end(), delta.begin());
  } else if (!refitted) {
    for (size_t i = 0; i < delta.size(); ++i) delta[i] = local[i] - global[i];
  }
  TrainStats done;
  if (stats.ok()) {
    done = *stats;
  } else {
    done.num_samples = train_.size();
    done.mean_loss = last_epoch_loss;
    done.steps = total_steps;
  }

  proto::FitResult result;
  result.set_round(task.round());
  result.set_task_id(task.task_id());
  // The codec's random rounding (qsgd) is seeded per task, so a rerun sends the same bytes.
  const uint64_t codec_seed = task.seed() ^ 0x9e3779b97f4a7c15ULL;
  if (refitted) {
    // Exactly the refit values are sent: alone in a vector of zeros they are the ones top-k
    // keeps, and they decode to themselves. What stays owed is the dense steps' update plus
    // the old residual, off them.
    std::vector<float> sent(global.size(), 0.0f);
    for (const uint32_t i : hook->kept()) sent[i] = local[i] - global[i];
    FEDSLICE_RETURN_IF_ERROR(
        codec::Encode(update_codec, sent, result.mutable_update(), codec_seed));
    if (feedback) {
      std::vector<float> intended(hook->dense_delta().begin(), hook->dense_delta().end());
      const std::span<const float> residual = feedback_.residual();
      for (size_t i = 0; i < residual.size(); ++i) intended[i] += residual[i];
      for (const uint32_t i : hook->kept()) intended[i] = sent[i];
      FEDSLICE_RETURN_IF_ERROR(feedback_.Update(intended, sent));
    }
  } else if (feedback) {
    FEDSLICE_RETURN_IF_ERROR(
        feedback_.Encode(update_codec, delta, result.mutable_update(), codec_seed));
  } else {
    FEDSLICE_RETURN_IF_ERROR(
        codec::Encode(update_codec, delta, result.mutable_update(), codec_seed));
  }
  result.set_num_samples(static_cast<uint64_t>(done.num_samples));
  result.set_train_loss(done.mean_loss);
  result.set_num_steps(static_cast<uint64_t>(done.steps));
  result.set_compute_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return result;
}

Result<proto::EvaluateResult> LocalTrainer::Evaluate(const proto::EvaluateTask& task) {
  const auto started = std::chrono::steady_clock::now();
  if (!test_) return Status::FailedPrecondition("this client holds no local test data");
  FEDSLICE_RETURN_IF_ERROR(LoadWeights(task.weights()).WithContext("EvaluateTask"));
  const int batch = task.batch_size() == 0 ? 256 : static_cast<int>(task.batch_size());
  FEDSLICE_ASSIGN_OR_RETURN(EvalStats stats, fedslice::Evaluate(*model_, *test_, batch));
  proto::EvaluateResult result;
  result.set_round(task.round());
  result.set_task_id(task.task_id());
  result.set_num_samples(static_cast<uint64_t>(stats.count));
  result.set_loss(stats.loss);
  result.set_num_correct(
      static_cast<uint64_t>(std::llround(stats.accuracy * static_cast<double>(stats.count))));
  result.set_compute_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return result;
}

}  // namespace fedslice::client
