#include "fedslice/coordinator/federation.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "fedslice/common/model_io.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/codec.h"
#include "fedslice/common/trainer.h"
#include "fedslice/coordinator/sampler.h"

namespace fedslice::coordinator {
namespace {

std::string FormatDouble(double v) {
  std::ostringstream out;
  out.precision(17);
  out << v;
  return out.str();
}

// Task ids are unique within a run, across retries and restarts: round, attempt and the
// client's slot in the plan each have their own bits.
uint64_t MakeTaskId(uint64_t round, uint32_t attempt, size_t slot) {
  return (round << 24) | (static_cast<uint64_t>(attempt & 0xff) << 16) | (slot & 0xffff);
}

uint64_t Fnv1a(const std::string& text) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

int64_t UnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

uint64_t ClientRoundSeed(uint64_t run_seed, uint64_t round, const std::string& client_id) {
  return DeriveSeed(run_seed, round, Fnv1a(client_id));
}

Status FederationConfig::Validate() const {
  if (rounds == 0 && initial_params.empty()) {
    return Status::InvalidArgument("rounds must be >= 1 (0 only with an initial model)");
  }
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    return Status::InvalidArgument("fraction must be in (0, 1], got " + FormatDouble(fraction));
  }
  if (min_fit == 0) return Status::InvalidArgument("min_fit must be >= 1");
  if (batch_size == 0) return Status::InvalidArgument("batch size must be >= 1");
  if (!(std::isfinite(learning_rate) && learning_rate > 0)) {
    return Status::InvalidArgument("learning rate must be a positive number");
  }
  if (!(std::isfinite(momentum) && momentum >= 0 && momentum < 1)) {
    return Status::InvalidArgument("momentum must be in [0, 1)");
  }
  if (!(std::isfinite(weight_decay) && weight_decay >= 0)) {
    return Status::InvalidArgument("weight decay must be >= 0");
  }
  if (round_deadline.count() <= 0) return Status::InvalidArgument("round deadline must be > 0");
  if (eval_batch_size < 1) return Status::InvalidArgument("eval batch size must be >= 1");
  if (auto parsed = codec::ParseCodec(codec); !parsed.ok()) return parsed.status();
  if (auto refit = codec::ParseSparseRefit(codec); !refit.ok()) return refit.status();
  if (auto parsed = codec::ParseCodec(downlink_codec); !parsed.ok()) {
    return parsed.status().WithContext("downlink codec");
  }
  return strategy.Validate();
}

RunConfig FederationConfig::Fingerprint() const {
  RunConfig fingerprint = {
      {"strategy", strategy.ToString()},
      {"codec", codec.name().empty() ? "fp32" : codec.name()},
      {"codec_block_size", std::to_string(codec.block_size())},
      {"error_feedback", codec.error_feedback() ? "on" : "default"},
      {"downlink_codec", downlink_codec.name().empty() ? "fp32" : downlink_codec.name()},
      {"fraction", FormatDouble(fraction)},
      {"min_fit", std::to_string(min_fit)},
      {"seed", std::to_string(seed)},
      {"local_epochs", std::to_string(local_epochs)},
      {"batch_size", std::to_string(batch_size)},
      {"learning_rate", FormatDouble(learning_rate)},
      {"momentum", FormatDouble(momentum)},
      {"weight_decay", FormatDouble(weight_decay)},
  };
  // Only when it is on, so that runs without it (every run before it existed) keep their
  // fingerprint and resume; the effective values, so that "default" cannot hide a change.
  if (auto refit = codec::ParseSparseRefit(codec); refit.ok() && refit->on()) {
    // As floats, the type on the wire: an explicit 0.6 and the default are one setting.
    fingerprint.emplace("sparse_refit", FormatDouble(static_cast<float>(refit->share)));
    fingerprint.emplace("sparse_refit_lr_scale", FormatDouble(static_cast<float>(refit->lr_scale)));
  }
  return fingerprint;
}

Result<std::unique_ptr<Federation>> Federation::Create(FederationConfig config,
                                                       std::optional<data::Dataset> test_set) {
  FEDSLICE_RETURN_IF_ERROR(config.Validate().WithContext("federation config"));
  std::unique_ptr<Federation> fed(new Federation());
  FEDSLICE_ASSIGN_OR_RETURN(Model model, Model::Create(config.model));
  if (!config.initial_params.empty()) {
    if (const size_t bad = net::FindNonFinite(config.initial_params);
        bad < config.initial_params.size()) {
      return Status::InvalidArgument("initial model: parameter " + std::to_string(bad) +
                                     " is not finite");
    }
    FEDSLICE_RETURN_IF_ERROR(model.SetParams(config.initial_params).WithContext("initial model"));
  }
  if (test_set) {
    FEDSLICE_RETURN_IF_ERROR(ValidateDataset(model, *test_set).WithContext("test set"));
  }
  fed->global_ = std::make_unique<Model>(std::move(model));
  FEDSLICE_ASSIGN_OR_RETURN(
      fed->strategy_,
      MakeStrategy(config.strategy, static_cast<size_t>(fed->global_->param_count())));
  FEDSLICE_ASSIGN_OR_RETURN(fed->uplink_codec_, codec::ParseCodec(config.codec));
  FEDSLICE_ASSIGN_OR_RETURN(fed->downlink_codec_, codec::ParseCodec(config.downlink_codec));
  if (fed->downlink_codec_.per_segment_scale) {
    fed->downlink_codec_.segments = fed->global_->ParamSegments();
  }
  fed->config_ = std::move(config);
  fed->test_set_ = std::move(test_set);

  if (!fed->config_.out_dir.empty()) {
    FEDSLICE_ASSIGN_OR_RETURN(CheckpointStore store,
                              CheckpointStore::Open(fed->config_.out_dir / "checkpoints"));
    FEDSLICE_ASSIGN_OR_RETURN(std::optional<proto::Checkpoint> latest, store.LoadLatest());
    fed->checkpoints_.emplace(std::move(store));
    if (latest) FEDSLICE_RETURN_IF_ERROR(fed->Resume(*latest));
    FEDSLICE_ASSIGN_OR_RETURN(
        fed->metrics_,
        MetricsWriter::Open(fed->config_.out_dir / "metrics.csv",
                            fed->config_.out_dir / "metrics.jsonl", fed->completed_rounds_));
  }

  proto::RunConfig& run = fed->run_config_message_;
  // Stable across restarts of the same run (a resume), different for other settings: clients
  // keep their error-feedback residual exactly as long as the run is the same.
  std::string identity = fed->config_.model.SerializeAsString();
  for (const auto& [key, value] : fed->config_.Fingerprint()) identity += key + "=" + value + ";";
  char run_id[32];
  std::snprintf(run_id, sizeof run_id, "run-%016llx",
                static_cast<unsigned long long>(Fnv1a(identity)));
  run.set_run_id(run_id);
  *run.mutable_downlink_codec() = fed->config_.downlink_codec;
  run.set_total_rounds(fed->config_.rounds);
  run.set_next_round(static_cast<uint32_t>(fed->completed_rounds_ + 1));
  *run.mutable_uplink_codec() = fed->config_.codec;
  run.set_seed(fed->config_.seed);
  return fed;
}

Status Federation::Resume(const proto::Checkpoint& checkpoint) {
  FEDSLICE_RETURN_IF_ERROR(CheckResume(checkpoint, config_.model, config_.Fingerprint()));
  FEDSLICE_ASSIGN_OR_RETURN(Model model, FromModelFile(checkpoint.model(), "checkpoint"));
  FEDSLICE_RETURN_IF_ERROR(strategy_->LoadState(checkpoint.strategy_state()));
  global_ = std::make_unique<Model>(std::move(model));
  completed_rounds_ = checkpoint.round();
  spdlog::info("resuming from checkpoint of round {} in {}", completed_rounds_,
               checkpoints_->dir().string());
  return Status::Ok();
}

Result<RoundPlan> Federation::BeginRound(std::vector<std::string> available, uint32_t attempt) {
  if (round_open_) return Status::FailedPrecondition("a round is already open");
  if (commit_pending_) {
    return Status::FailedPrecondition("the previous round awaits CommitRound");
  }
  if (finished()) return Status::FailedPrecondition("all rounds are done");
  std::sort(available.begin(), available.end());
  if (std::adjacent_find(available.begin(), available.end()) != available.end()) {
    return Status::InvalidArgument("duplicate client id among the available clients");
  }
  const uint64_t round = completed_rounds_ + 1;
  FEDSLICE_ASSIGN_OR_RETURN(
      std::vector<std::string> chosen,
      SampleClients<std::string>(available, config_.fraction, config_.min_fit, round,
                                 config_.seed, attempt));
  FEDSLICE_RETURN_IF_ERROR(strategy_->BeginRound(global_->params()));

  proto::FitTask base;
  base.set_round(round);
  FEDSLICE_RETURN_IF_ERROR(EncodeGlobalWeights(base.mutable_global_weights()));
  base.set_local_epochs(config_.local_epochs);
  base.set_batch_size(config_.batch_size);
  base.set_learning_rate(config_.learning_rate);
  base.set_momentum(config_.momentum);
  base.set_weight_decay(config_.weight_decay);
  base.set_prox_mu(strategy_->proximal_mu());
  *base.mutable_codec() = config_.codec;
  base.set_deadline_ms(static_cast<uint32_t>(config_.round_deadline.count()));

  RoundPlan plan;
  plan.round = round;
  plan.attempt = attempt;
  task_of_.clear();
  answered_.clear();
  dropped_.clear();
  rejected_ = 0;
  train_loss_sum_ = 0;
  train_samples_ = 0;
  for (size_t slot = 0; slot < chosen.size(); ++slot) {
    Assignment assignment{chosen[slot], base};
    assignment.task.set_task_id(MakeTaskId(round, attempt, slot));
    assignment.task.set_seed(ClientRoundSeed(config_.seed, round, chosen[slot]));
    task_of_[chosen[slot]] = assignment.task.task_id();
    plan.assignments.push_back(std::move(assignment));
  }
  round_open_ = true;
  attempt_ = attempt;
  round_started_ = std::chrono::steady_clock::now();
  return plan;
}

Status Federation::AcceptFitResult(const std::string& client_id, const proto::FitResult& result) {
  if (!round_open_) return Status::FailedPrecondition("no round is open");
  auto task = task_of_.find(client_id);
  if (task == task_of_.end()) {
    return Status::FailedPrecondition("client " + client_id + " was not asked to train in round " +
                                      std::to_string(completed_rounds_ + 1));
  }
  if (result.round() != completed_rounds_ + 1 || result.task_id() != task->second) {
    return Status::FailedPrecondition("result for round " + std::to_string(result.round()) +
                                      " task " + std::to_string(result.task_id()) +
                                      " does not answer the open task " +
                                      std::to_string(task->second));
  }
  if (answered_.contains(client_id)) {
    return Status::FailedPrecondition("client " + client_id + " already answered this round");
  }
  if (dropped_.contains(client_id)) {
    return Status::FailedPrecondition("client " + client_id +
                                      " was dropped from this round (deadline passed)");
  }
  auto reject = [&](Status status) {
    ++rejected_;
    return status;
  };
  const auto expected = static_cast<uint64_t>(global_->param_count());
  if (result.num_samples() == 0) {
    return reject(Status::InvalidArgument("FitResult: num_samples must be > 0"));
  }
  if (!std::isfinite(result.train_loss())) {
    return reject(Status::InvalidArgument("FitResult: train_loss is not finite"));
  }
  if (result.update().num_values() != expected) {
    return reject(Status::InvalidArgument(
        "FitResult: update has " + std::to_string(result.update().num_values()) +
        " values, the model has " + std::to_string(expected)));
  }
  if (result.update().codec() != uplink_codec_.name) {
    return reject(Status::InvalidArgument("FitResult update is encoded with '" +
                                          result.update().codec() + "', this run uses '" +
                                          uplink_codec_.name + "'"));
  }
  // Sized by what we expect, never by what the peer claims; Decode checks every field.
  std::vector<float> delta(expected);
  if (Status decoded = codec::Decode(result.update(), delta); !decoded.ok()) {
    return reject(decoded.WithContext("FitResult update"));
  }
  if (Status folded = strategy_->Accumulate(delta, result.num_samples()); !folded.ok()) {
    return reject(folded.WithContext("FitResult update"));
  }
  answered_.insert(client_id);
  train_loss_sum_ += result.train_loss() * static_cast<double>(result.num_samples());
  train_samples_ += result.num_samples();
  return Status::Ok();
}

void Federation::MarkDropped(const std::string& client_id) {
  if (!round_open_ || !task_of_.contains(client_id) || answered_.contains(client_id)) return;
  dropped_.insert(client_id);
}

std::vector<std::string> Federation::PendingClients() const {
  std::vector<std::string> pending;
  if (!round_open_) return pending;
  for (const auto& [client, task] : task_of_) {
    if (!answered_.contains(client) && !dropped_.contains(client)) pending.push_back(client);
  }
  return pending;
}

Result<proto::RoundMetrics> Federation::FinishRound(const Traffic& traffic) {
  if (!round_open_) return Status::FailedPrecondition("no round is open");
  const uint64_t round = completed_rounds_ + 1;
  const size_t answered = answered_.size();
  const size_t asked = task_of_.size();
  round_open_ = false;
  if (answered < config_.min_fit) {
    return Status::Unavailable("round " + std::to_string(round) + " attempt " +
                               std::to_string(attempt_) + ": " + std::to_string(answered) +
                               " of " + std::to_string(config_.min_fit) +
                               " needed results arrived");
  }
  FEDSLICE_RETURN_IF_ERROR(strategy_->FinishRound(global_->params()));

  proto::RoundMetrics metrics;
  metrics.set_round(round);
  if (test_set_) {
    FEDSLICE_ASSIGN_OR_RETURN(EvalStats eval,
                              Evaluate(*global_, *test_set_, config_.eval_batch_size));
    metrics.set_accuracy(eval.accuracy);
    metrics.set_loss(eval.loss);
  }
  metrics.set_train_loss(train_samples_ > 0
                             ? train_loss_sum_ / static_cast<double>(train_samples_)
                             : 0.0);
  metrics.set_clients_asked(static_cast<uint32_t>(asked));
  metrics.set_clients_answered(static_cast<uint32_t>(answered));
  metrics.set_clients_dropped(static_cast<uint32_t>(asked - answered - rejected_));
  metrics.set_clients_rejected(static_cast<uint32_t>(rejected_));
  metrics.set_bytes_up(traffic.bytes_up);
  metrics.set_bytes_down(traffic.bytes_down);
  metrics.set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - round_started_).count());
  metrics.set_strategy(std::string(strategy_->name()));
  metrics.set_codec(config_.codec.name().empty() ? "fp32" : config_.codec.name());
  metrics.set_unix_ms(UnixMillis());

  commit_pending_ = true;
  return metrics;
}

Status Federation::CommitRound(const proto::RoundMetrics& metrics) {
  if (!commit_pending_ || metrics.round() != completed_rounds_ + 1) {
    return Status::FailedPrecondition("CommitRound without a finished round");
  }
  if (metrics_) FEDSLICE_RETURN_IF_ERROR(metrics_->Append(metrics));
  completed_rounds_ = metrics.round();
  commit_pending_ = false;
  run_config_message_.set_next_round(static_cast<uint32_t>(completed_rounds_ + 1));
  FEDSLICE_RETURN_IF_ERROR(SaveCheckpoint());
  history_.push_back(metrics);
  return Status::Ok();
}

void Federation::AddFederatedEvaluation(const std::vector<proto::EvaluateResult>& results,
                                        proto::RoundMetrics* metrics) {
  uint64_t samples = 0;
  uint64_t correct = 0;
  double loss = 0;
  for (const auto& r : results) {
    if (r.num_samples() == 0 || r.num_correct() > r.num_samples() || !std::isfinite(r.loss())) {
      continue;
    }
    samples += r.num_samples();
    correct += r.num_correct();
    loss += r.loss() * static_cast<double>(r.num_samples());
  }
  if (samples == 0) return;
  metrics->set_federated_accuracy(static_cast<double>(correct) / static_cast<double>(samples));
  metrics->set_federated_loss(loss / static_cast<double>(samples));
}

Status Federation::EncodeGlobalWeights(proto::EncodedTensor* out) const {
  return codec::Encode(downlink_codec_, global_->params(), out,
                       DeriveSeed(config_.seed, completed_rounds_ + 1, 0xd0));
}

Status Federation::SaveCheckpoint() {
  if (!checkpoints_) return Status::Ok();
  proto::Checkpoint checkpoint =
      MakeCheckpoint(completed_rounds_, ToModelFile(*global_), *strategy_, config_.Fingerprint(),
                     config_.seed);
  return checkpoints_->Save(checkpoint).WithContext("checkpoint of round " +
                                                    std::to_string(completed_rounds_));
}

}  // namespace fedslice::coordinator
