// Stochastic gradient descent with momentum, weight decay and an optional FedProx proximal
// term, over a model's flat parameter and gradient buffers. PyTorch's SGD semantics:
//   g = grad + weight_decay * w + prox_mu * (w - anchor)
//   v = momentum * v + g            (v starts at zero; skipped when momentum == 0)
//   w = w - lr * v
//
// Thread-safety: none (one optimizer per model). The momentum state is one flat buffer
// with the parameters' layout, exposed so that checkpoints can save and restore it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "fedslice/common/status.h"

namespace fedslice {

struct SgdOptions {
  float lr = 0.01f;
  float momentum = 0.0f;      // in [0, 1)
  float weight_decay = 0.0f;  // L2 coefficient, >= 0
  float prox_mu = 0.0f;       // FedProx mu, >= 0; needs an anchor in Step()
};

class Sgd {
 public:
  // Options are checked by Validate(), not here, so that callers can report the error.
  explicit Sgd(const SgdOptions& options) : options_(options) {}

  // InvalidArgument when an option is non-finite or out of range.
  static Status Validate(const SgdOptions& options);

  // One update of `params` from `grads` (same size). `prox_anchor` is required (same size)
  // when prox_mu > 0, ignored otherwise. The first Step sizes the momentum buffer; later
  // steps must use the same size. On error nothing is changed.
  Status Step(std::span<float> params, std::span<const float> grads,
              std::span<const float> prox_anchor = {});

  // The two halves of Step() for callers that split one step across threads
  // (Model::TrainStep). PrepareStep checks sizes like Step() and sizes the momentum state;
  // StepRange then updates params[begin, end) from the sum of `num_grads` gradient buffers
  // (added in order), writing that sum to grad_sum when not null (may alias grads[0]).
  // prox_anchor may be null when prox_mu == 0. Disjoint ranges may run concurrently.
  Status PrepareStep(size_t param_count, size_t grad_count, size_t anchor_count);
  void StepRange(float* params, const float* const* grads, int num_grads, float* grad_sum,
                 const float* prox_anchor, int64_t begin, int64_t end);

  const SgdOptions& options() const { return options_; }
  void set_lr(float lr) { options_.lr = lr; }

  // Momentum state: empty before the first Step (or when momentum == 0).
  std::span<const float> momentum_buffer() const { return velocity_; }
  // Restores a saved momentum state (empty clears it).
  void SetMomentumBuffer(std::span<const float> v) { velocity_.assign(v.begin(), v.end()); }
  void Reset() { velocity_.clear(); }

 private:
  SgdOptions options_;
  std::vector<float> velocity_;
};

}  // namespace fedslice
