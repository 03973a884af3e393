#include "fedslice/common/optimizer.h"

#include <cmath>
#include <string>

#include "fedslice/common/threading.h"

namespace fedslice {

Status Sgd::Validate(const SgdOptions& o) {
  if (!std::isfinite(o.lr) || o.lr <= 0.0f) {
    return Status::InvalidArgument("learning rate must be a finite number > 0, got " +
                                   std::to_string(o.lr));
  }
  if (!std::isfinite(o.momentum) || o.momentum < 0.0f || o.momentum >= 1.0f) {
    return Status::InvalidArgument("momentum must be in [0, 1), got " +
                                   std::to_string(o.momentum));
  }
  if (!std::isfinite(o.weight_decay) || o.weight_decay < 0.0f) {
    return Status::InvalidArgument("weight decay must be a finite number >= 0, got " +
                                   std::to_string(o.weight_decay));
  }
  if (!std::isfinite(o.prox_mu) || o.prox_mu < 0.0f) {
    return Status::InvalidArgument("FedProx mu must be a finite number >= 0, got " +
                                   std::to_string(o.prox_mu));
  }
  return Status::Ok();
}

Status Sgd::Step(std::span<float> params, std::span<const float> grads,
                 std::span<const float> prox_anchor) {
  const size_t n = params.size();
  if (grads.size() != n) {
    return Status::InvalidArgument("SGD step: " + std::to_string(grads.size()) +
                                   " gradients for " + std::to_string(n) + " parameters");
  }
  const bool prox = options_.prox_mu > 0.0f;
  if (prox && prox_anchor.size() != n) {
    return Status::InvalidArgument("SGD step: FedProx needs an anchor of " + std::to_string(n) +
                                   " weights, got " + std::to_string(prox_anchor.size()));
  }
  const bool momentum = options_.momentum > 0.0f;
  if (momentum) {
    if (velocity_.empty()) {
      velocity_.assign(n, 0.0f);
    } else if (velocity_.size() != n) {
      return Status::InvalidArgument("SGD step: momentum state holds " +
                                     std::to_string(velocity_.size()) + " values but there are " +
                                     std::to_string(n) + " parameters");
    }
  }
  const float lr = options_.lr, mom = options_.momentum, wd = options_.weight_decay;
  const float mu = options_.prox_mu;
  float* w = params.data();
  const float* g = grads.data();
  const float* a = prox ? prox_anchor.data() : nullptr;
  float* v = momentum ? velocity_.data() : nullptr;
  const auto count = static_cast<int64_t>(n);
  // Elementwise, so splitting across threads cannot change the result.
#pragma omp parallel for simd schedule(static) num_threads(NumThreads())
  for (int64_t i = 0; i < count; ++i) {
    float d = g[i] + wd * w[i];
    if (prox) d += mu * (w[i] - a[i]);
    if (momentum) {
      v[i] = mom * v[i] + d;
      d = v[i];
    }
    w[i] -= lr * d;
  }
  return Status::Ok();
}

}  // namespace fedslice
