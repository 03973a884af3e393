// Federation: the round logic of federated training, shared by the networked coordinator
// (coordinator_server.h) and the in-process simulator (simulation.h), so that both make the
// same choices: which clients train in a round, what task each gets (weights, seed,
// hyperparameters), how results are validated and folded in, when a round completes, and
// what is evaluated, checkpointed and written as metrics.
//
// A round, as the caller drives it:
//   BeginRound(available clients, attempt)  -> one FitTask per sampled client
//   AcceptFitResult(client, result) ...     -> folds each valid update in as it arrives
//   MarkDropped(client) ...                 -> disconnects, missed deadlines
//   FinishRound(...)                        -> if >= min_fit answered: aggregate, evaluate,
//                                              checkpoint, metrics; else the round is retried
//                                              by BeginRound(..., attempt + 1)
//
// Memory is O(model): updates are folded into the strategy's aggregate as they arrive.
// Thread-safety: none; the caller serialises all calls (the coordinator's round thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fedslice/common/codec.h"
#include "fedslice/common/dataset.h"
#include "fedslice/common/model.h"
#include "fedslice/common/status.h"
#include "fedslice/coordinator.pb.h"
#include "fedslice/coordinator/checkpoint.h"
#include "fedslice/coordinator/metrics.h"
#include "fedslice/coordinator/strategy.h"
#include "fedslice/wire.pb.h"

namespace fedslice::coordinator {

struct FederationConfig {
  proto::ModelSpec model;
  // Parameters of the initial global model (e.g. a model file trained elsewhere), of `model`'s
  // parameter count; empty: the spec's seeded initialisation. A checkpoint being resumed wins.
  std::vector<float> initial_params;
  // Total rounds of the run (a resumed run counts on). 0 only with initial_params: no
  // training, the initial model is final (the coordinator then only serves inference).
  uint32_t rounds = 10;
  double fraction = 0.1;          // C: fraction of available clients asked per round
  size_t min_fit = 2;             // a round needs at least this many results
  uint32_t local_epochs = 1;      // E
  uint32_t batch_size = 10;       // B
  float learning_rate = 0.05f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  StrategyConfig strategy = StrategyConfig::Defaults(StrategyConfig::Kind::kFedAvg);
  proto::CodecConfig codec;           // uplink codec named in every FitTask
  proto::CodecConfig downlink_codec;  // how the global weights travel to clients (fp32)
  uint64_t seed = 1;              // root seed: sampling and every client's shuffling
  std::chrono::milliseconds round_deadline{std::chrono::minutes(5)};
  int eval_batch_size = 256;
  // Where checkpoints (<out_dir>/checkpoints) and metrics (<out_dir>/metrics.{csv,jsonl})
  // go. Empty: neither is written (tests, throw-away simulations).
  std::filesystem::path out_dir;

  // InvalidArgument naming the first bad field.
  Status Validate() const;
  // The settings a resumed run must share with the checkpoint (see CheckResume).
  RunConfig Fingerprint() const;
};

// One client's task in a round.
struct Assignment {
  std::string client_id;
  proto::FitTask task;
};

struct RoundPlan {
  uint64_t round = 0;
  uint32_t attempt = 0;
  std::vector<Assignment> assignments;  // in ascending client_id order
};

class Federation {
 public:
  // Builds the initial global model from config.model, or resumes from the newest checkpoint
  // under config.out_dir (refusing one written by a run with other settings). `test_set`,
  // when given, is what the global model is evaluated on after every round.
  static Result<std::unique_ptr<Federation>> Create(FederationConfig config,
                                                    std::optional<data::Dataset> test_set);

  const FederationConfig& config() const { return config_; }
  const Model& global_model() const { return *global_; }
  // Rounds completed so far (a resumed run starts from the checkpoint's round).
  uint64_t completed_rounds() const { return completed_rounds_; }
  bool finished() const { return completed_rounds_ >= config_.rounds; }
  bool round_open() const { return round_open_; }
  const proto::RunConfig& run_config_message() const { return run_config_message_; }
  // Metrics of every round this process completed, oldest first.
  const std::vector<proto::RoundMetrics>& history() const { return history_; }

  // Samples clients for round completed_rounds() + 1 from `available` (client ids, any
  // order, no duplicates) and makes their tasks. `attempt` > 0 retries a round that fell
  // short of min_fit with a fresh sample. FailedPrecondition when fewer than min_fit clients
  // are available or a round is already open.
  Result<RoundPlan> BeginRound(std::vector<std::string> available, uint32_t attempt);

  // Validates `result` (a task of this round given to this client and not yet answered,
  // update of the model's size, finite, a positive sample count) and folds it in.
  // On error the aggregate is unchanged and the status says why (for the client's Error
  // reply): InvalidArgument for a malformed result, FailedPrecondition for one out of turn.
  Status AcceptFitResult(const std::string& client_id, const proto::FitResult& result);

  // The client will not answer this round (disconnected, deadline passed). No-op if it was
  // not asked or already answered.
  void MarkDropped(const std::string& client_id);

  // Clients asked this round that have neither answered nor been dropped.
  std::vector<std::string> PendingClients() const;

  struct Traffic {
    uint64_t bytes_up = 0;
    uint64_t bytes_down = 0;
  };
  // Ends the open round. With at least min_fit results the strategy produces the next global
  // model, which is evaluated on the test set; returns the round's metrics, to be completed
  // (e.g. with a federated evaluation of the new model) and passed to CommitRound.
  // Otherwise Unavailable ("round N attempt A: 1 of 2 needed results arrived"): the global
  // model is unchanged and the caller retries with BeginRound(..., attempt + 1).
  Result<proto::RoundMetrics> FinishRound(const Traffic& traffic);

  // Makes the finished round durable: appends its metrics, then checkpoints. In that order,
  // so that a coordinator killed in between resumes at this round again and the metrics
  // writer drops the row of the round it re-runs: every round appears exactly once.
  Status CommitRound(const proto::RoundMetrics& metrics);

  // Folds clients' evaluations of the new global model (sample-weighted) into `metrics`.
  // Reports that are inconsistent (no samples, more correct than samples, non-finite loss)
  // are skipped.
  // The current global weights encoded with the downlink codec (FitTasks, EvaluateTasks).
  Status EncodeGlobalWeights(proto::EncodedTensor* out) const;

  static void AddFederatedEvaluation(const std::vector<proto::EvaluateResult>& results,
                                     proto::RoundMetrics* metrics);

 private:
  Federation() = default;
  Status Resume(const proto::Checkpoint& checkpoint);
  Status SaveCheckpoint();

  FederationConfig config_;
  std::optional<data::Dataset> test_set_;
  std::unique_ptr<Model> global_;
  std::unique_ptr<Strategy> strategy_;
  codec::CodecSpec uplink_codec_;
  codec::CodecSpec downlink_codec_;
  std::optional<CheckpointStore> checkpoints_;
  std::unique_ptr<MetricsWriter> metrics_;
  proto::RunConfig run_config_message_;
  uint64_t completed_rounds_ = 0;
  std::vector<proto::RoundMetrics> history_;

  // The open round.
  bool round_open_ = false;
  bool commit_pending_ = false;  // FinishRound succeeded, CommitRound not yet called
  uint32_t attempt_ = 0;
  std::chrono::steady_clock::time_point round_started_;
  std::map<std::string, uint64_t> task_of_;  // client -> task id, for clients asked
  std::set<std::string> answered_;
  std::set<std::string> dropped_;
  size_t rejected_ = 0;
  double train_loss_sum_ = 0;  // sample-weighted
  uint64_t train_samples_ = 0;
};

// Seed of a client's local shuffling in a round: a pure function of the run seed, the round
// and the client id, so a simulated and a networked client draw the same batches.
uint64_t ClientRoundSeed(uint64_t run_seed, uint64_t round, const std::string& client_id);

}  // namespace fedslice::coordinator
