// LocalTrainer: what an edge client does with a FitTask or an EvaluateTask, independent of
// how the task arrived. The networked client (edge_client.h) and the in-process simulator
// (`fedslice sim`) both call it, which is what makes a simulated run and a networked run with
// the same seeds produce the same global model.
//
// The trainer owns the client's private data; nothing here ever serialises a sample. Only the
// update (local weights minus the global weights received) leaves, encoded as the task says.
//
// Thread-safety: none; one trainer per client, used by one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "fedslice/common/codec.h"
#include "fedslice/common/dataset.h"
#include "fedslice/common/model.h"
#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::client {

class LocalTrainer {
 public:
  // `train` is the client's private training data; `test` (optional) serves EvaluateTasks.
  LocalTrainer(data::Dataset train, std::optional<data::Dataset> test);

  // Builds the model the coordinator announced (Welcome.model) and checks that the private
  // data fits it (sample shape, label range, finite values). On error the trainer keeps the
  // model it had before. `run_id` (Welcome.run_config.run_id) scopes the error-feedback
  // residual: a reconnect within the same run keeps it, a new run starts from zero.
  Status SetModel(const proto::ModelSpec& spec, const std::string& run_id = "");
  bool has_model() const { return model_ != nullptr; }

  // Trains from the task's global weights (any codec) for its local epochs and returns the
  // FitResult (round and task id echoed, update encoded with the task's codec — plus the
  // error-feedback residual when the codec wants it —, sample count, last-epoch train loss).
  // With a topk codec and a sparse refit share s > 0 (CodecConfig.sparse_refit), the last
  // s of the local steps train only the values top-k picks after the first 1 - s, from
  // global + (those values of update + residual), at lr_scale times the learning rate: the
  // update is fit to what can be sent instead of cut from a dense one. Should that phase
  // diverge or end with a higher loss on the local data than it began with, the update of
  // the dense steps is sent instead (sparse_refit_fallbacks() counts these).
  // Errors, with nothing sent: no model (FailedPrecondition); weights of the wrong size or
  // codec, or non-finite (InvalidArgument); bad hyperparameters or refit settings
  // (InvalidArgument); training diverged (Aborted).
  Result<proto::FitResult> Fit(const proto::FitTask& task);

  // Loss and accuracy of the task's weights on the local test data (FailedPrecondition when
  // the client has none).
  Result<proto::EvaluateResult> Evaluate(const proto::EvaluateTask& task);

  int64_t num_train_samples() const { return train_.size(); }
  // What error feedback still owes the coordinator (empty before the first lossy update).
  std::span<const float> residual() const { return feedback_.residual(); }
  const data::Dataset& train_data() const { return train_; }
  // Fits whose sparse refit was abandoned for the dense steps' update (see Fit).
  int64_t sparse_refit_fallbacks() const { return sparse_refit_fallbacks_; }

 private:
  Status LoadWeights(const proto::EncodedTensor& weights);

  data::Dataset train_;
  std::optional<data::Dataset> test_;
  std::unique_ptr<Model> model_;
  std::string run_id_;
  codec::ErrorFeedback feedback_;
  int64_t sparse_refit_fallbacks_ = 0;
};

}  // namespace fedslice::client
