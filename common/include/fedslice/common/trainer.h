// Training and evaluation loops: what the CLI, the federated client and the simulator call.
//
// Determinism: Train() shuffles with TrainConfig::seed; the same model, data, config and
// thread count (threading.h) give bit-identical weights on the same build.
// Thread-safety: the functions keep no global state; the Model passed in must not be used by
// another thread during the call.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "fedslice/common/dataset.h"
#include "fedslice/common/model.h"
#include "fedslice/common/optimizer.h"
#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"

namespace fedslice {

struct TrainConfig {
  int epochs = 1;           // >= 0
  int batch_size = 10;      // >= 1; the last batch of an epoch may be smaller
  float lr = 0.01f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  float prox_mu = 0.0f;     // FedProx mu; > 0 needs a prox_anchor
  uint64_t seed = 1;        // shuffling seed
};

struct EpochStats {
  int epoch = 0;             // 1-based
  double mean_loss = 0.0;    // sample-weighted mean training loss over the epoch
  int64_t samples = 0;
  double seconds = 0.0;
};

struct TrainStats {
  double mean_loss = 0.0;    // mean training loss of the last epoch (0 when epochs == 0)
  int64_t num_samples = 0;   // data set size: the weight of this update in FedAvg
  int64_t samples_processed = 0;
  int64_t steps = 0;
  double seconds = 0.0;
};

struct EvalStats {
  double loss = 0.0;       // mean softmax cross-entropy
  double accuracy = 0.0;   // fraction in [0, 1]
  int64_t count = 0;
};

// Checks that `data` fits `model`: non-empty, sample_shape equal to the model's input shape,
// features of the right count and finite, labels in [0, num_classes).
Status ValidateDataset(const Model& model, const data::Dataset& data);

// Mini-batch SGD (optimizer.h) for config.epochs epochs over `data`, reshuffled every epoch.
// prox_anchor: the global weights for FedProx (param_count() floats), needed iff prox_mu > 0.
// on_epoch, when set, is called after every epoch. Fails with InvalidArgument on a bad
// config / data / anchor (model untouched) and with Aborted if the loss becomes non-finite
// (the model is then restored to its weights before the call).
Result<TrainStats> Train(Model& model, const data::Dataset& data, const TrainConfig& config,
                         std::span<const float> prox_anchor = {},
                         std::function<void(const EpochStats&)> on_epoch = {});

// As above with a caller-owned optimizer, so that its momentum state can persist across
// calls or be checkpointed; config.lr/momentum/weight_decay/prox_mu are ignored in favour of
// optimizer.options().
// after_step, when set, is called after every optimizer step with the number of steps done so
// far (1-based); it may change the model's weights and the optimizer's learning rate (what
// the client's sparse refit does). An error it returns ends training like a divergence
// does: the model is restored and the error returned.
Result<TrainStats> Train(Model& model, const data::Dataset& data, const TrainConfig& config,
                         Sgd& optimizer, std::span<const float> prox_anchor = {},
                         std::function<void(const EpochStats&)> on_epoch = {},
                         std::function<Status(int64_t steps_done)> after_step = {});

// Loss and accuracy of `model` on `data`, in batches of batch_size (>= 1).
Result<EvalStats> Evaluate(const Model& model, const data::Dataset& data, int batch_size = 256);

// Logits for every sample: [data.size(), num_classes].
Result<Tensor> Predict(const Model& model, const data::Dataset& data, int batch_size = 256);

}  // namespace fedslice
