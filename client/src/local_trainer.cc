#include "fedslice/client/local_trainer.h"

#include <chrono>
#include <cmath>
#include <string>
#include <vector>

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

Result<proto::FitResult> LocalTrainer::Fit(const proto::FitTask& task) {
  const auto started = std::chrono::steady_clock::now();
  FEDSLICE_RETURN_IF_ERROR(LoadWeights(task.global_weights()).WithContext("FitTask"));
  if (task.batch_size() == 0) return Status::InvalidArgument("FitTask: batch_size must be >= 1");
  FEDSLICE_ASSIGN_OR_RETURN(codec::CodecSpec update_codec, codec::ParseCodec(task.codec()));
  if (update_codec.per_segment_scale) update_codec.segments = model_->ParamSegments();

  const std::vector<float> global(model_->params().begin(), model_->params().end());
  TrainConfig config;
  config.epochs = static_cast<int>(task.local_epochs());
  config.batch_size = static_cast<int>(task.batch_size());
  config.lr = task.learning_rate();
  config.momentum = task.momentum();
  config.weight_decay = task.weight_decay();
  config.prox_mu = task.prox_mu();
  config.seed = task.seed();
  auto stats = fedslice::Train(
      *model_, train_, config,
      config.prox_mu > 0 ? std::span<const float>(global) : std::span<const float>());
  if (!stats.ok()) return stats.status().WithContext("local training");

  // The update is the change the client made: local weights minus the weights it received.
  std::vector<float> delta(global.size());
  const std::span<const float> local = model_->params();
  for (size_t i = 0; i < delta.size(); ++i) delta[i] = local[i] - global[i];

  proto::FitResult result;
  result.set_round(task.round());
  result.set_task_id(task.task_id());
  // The codec's random rounding (qsgd) is seeded per task, so a rerun sends the same bytes.
  const uint64_t codec_seed = task.seed() ^ 0x9e3779b97f4a7c15ULL;
  if (codec::WantsErrorFeedback(update_codec, task.codec())) {
    FEDSLICE_RETURN_IF_ERROR(
        feedback_.Encode(update_codec, delta, result.mutable_update(), codec_seed));
  } else {
    FEDSLICE_RETURN_IF_ERROR(
        codec::Encode(update_codec, delta, result.mutable_update(), codec_seed));
  }
  result.set_num_samples(static_cast<uint64_t>(stats->num_samples));
  result.set_train_loss(stats->mean_loss);
  result.set_num_steps(static_cast<uint64_t>(stats->steps));
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
