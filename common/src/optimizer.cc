#include "fedslice/common/optimizer.h"

#include <omp.h>

#include <cmath>
#include <string>

#include "fedslice/common/threading.h"
#include "simd.h"

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

Status Sgd::PrepareStep(size_t n, size_t grad_count, size_t anchor_count) {
  if (grad_count != n) {
    return Status::InvalidArgument("SGD step: " + std::to_string(grad_count) +
                                   " gradients for " + std::to_string(n) + " parameters");
  }
  if (options_.prox_mu > 0.0f && anchor_count != n) {
    return Status::InvalidArgument("SGD step: FedProx needs an anchor of " + std::to_string(n) +
                                   " weights, got " + std::to_string(anchor_count));
  }
  if (options_.momentum > 0.0f) {
    if (velocity_.empty()) {
      velocity_.assign(n, 0.0f);
    } else if (velocity_.size() != n) {
      return Status::InvalidArgument("SGD step: momentum state holds " +
                                     std::to_string(velocity_.size()) + " values but there are " +
                                     std::to_string(n) + " parameters");
    }
  }
  return Status::Ok();
}

namespace {

// One packet (or partial packet) of the update, in packet arithmetic throughout so that
// every element gets the same operations wherever a range is split:
//   g = sum of grads; d = g + wd * w [+ mu * (w - anchor)]; v = m * v + d; w -= lr * v.
template <bool kMomentum, bool kProx, bool kPartial>
inline void UpdatePacket(const SgdOptions& o, float* w, const float* const* grads, int ng,
                         float* grad_sum, float* v, const float* a, int64_t i, size_t n) {
  using namespace internal;
  auto load = [&](const float* p) {
    if constexpr (kPartial) return PartialLoad(p + i, n);
    else return ploadu<Packet>(p + i);
  };
  auto store = [&](float* p, const Packet& x) {
    if constexpr (kPartial) PartialStore(p + i, x, n);
    else pstoreu(p + i, x);
  };
  Packet g = load(grads[0]);
  for (int k = 1; k < ng; ++k) g = padd(g, load(grads[k]));
  if (grad_sum != nullptr) store(grad_sum, g);
  const Packet wv = load(w);
  Packet d = pmadd(pset1<Packet>(o.weight_decay), wv, g);
  if constexpr (kProx) d = pmadd(pset1<Packet>(o.prox_mu), psub(wv, load(a)), d);
  if constexpr (kMomentum) {
    d = pmadd(pset1<Packet>(o.momentum), load(v), d);
    store(v, d);
  }
  store(w, psub(wv, pmul(pset1<Packet>(o.lr), d)));
}

template <bool kMomentum, bool kProx>
void UpdateRange(const SgdOptions& o, float* w, const float* const* grads, int ng,
                 float* grad_sum, float* v, const float* a, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + internal::kLanes <= end; i += internal::kLanes) {
    UpdatePacket<kMomentum, kProx, false>(o, w, grads, ng, grad_sum, v, a, i, 0);
  }
  if (i < end) {
    UpdatePacket<kMomentum, kProx, true>(o, w, grads, ng, grad_sum, v, a, i,
                                         static_cast<size_t>(end - i));
  }
}

}  // namespace

void Sgd::StepRange(float* params, const float* const* grads, int num_grads, float* grad_sum,
                    const float* prox_anchor, int64_t begin, int64_t end) {
  const bool momentum = options_.momentum > 0.0f, prox = options_.prox_mu > 0.0f;
  float* v = velocity_.data();
  if (momentum && prox) {
    UpdateRange<true, true>(options_, params, grads, num_grads, grad_sum, v, prox_anchor, begin, end);
  } else if (momentum) {
    UpdateRange<true, false>(options_, params, grads, num_grads, grad_sum, v, nullptr, begin, end);
  } else if (prox) {
    UpdateRange<false, true>(options_, params, grads, num_grads, grad_sum, nullptr, prox_anchor,
                             begin, end);
  } else {
    UpdateRange<false, false>(options_, params, grads, num_grads, grad_sum, nullptr, nullptr,
                              begin, end);
  }
}

Status Sgd::Step(std::span<float> params, std::span<const float> grads,
                 std::span<const float> prox_anchor) {
  FEDSLICE_RETURN_IF_ERROR(PrepareStep(params.size(), grads.size(), prox_anchor.size()));
  const auto n = static_cast<int64_t>(params.size());
  const float* g = grads.data();
  const float* a = options_.prox_mu > 0.0f ? prox_anchor.data() : nullptr;
  // Elementwise, so splitting across threads cannot change the result.
  const int threads = n >= (int64_t{1} << 16) && !omp_in_parallel() ? NumThreads() : 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    StepRange(params.data(), &g, 1, nullptr, a, n * t / nt, n * (t + 1) / nt);
  }
  return Status::Ok();
}

}  // namespace fedslice
