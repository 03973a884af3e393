#include "fedslice/common/loss.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "loss_internal.h"

namespace fedslice {

namespace internal {

double SoftmaxCrossEntropySum(const Tensor& logits, std::span<const int32_t> labels, Tensor* grad,
                              float grad_scale) {
  const int64_t batch = logits.batch();
  const int64_t classes = logits.dim(1);
  if (grad != nullptr) grad->Resize(logits.shape());
  double total = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    const int32_t y = labels[static_cast<size_t>(i)];
    const float* z = logits.data() + i * classes;
    // Shifted by the row maximum so that exp() cannot overflow.
    const float max = *std::max_element(z, z + classes);
    double sum = 0.0;
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(static_cast<double>(z[c] - max));
    const double log_sum = std::log(sum);
    total += log_sum - static_cast<double>(z[y] - max);
    if (grad != nullptr) {
      float* g = grad->data() + i * classes;
      for (int64_t c = 0; c < classes; ++c) {
        const double p = std::exp(static_cast<double>(z[c] - max) - log_sum);
        g[c] = static_cast<float>(p) * grad_scale;
      }
      g[y] -= grad_scale;
    }
  }
  return total;
}

}  // namespace internal

Result<float> SoftmaxCrossEntropy(const Tensor& logits, std::span<const int32_t> labels,
                                  Tensor* grad) {
  if (logits.rank() != 2 || logits.batch() < 1 || logits.dim(1) < 1) {
    return Status::InvalidArgument("softmax cross-entropy needs [batch, classes] logits, got " +
                                   logits.ShapeString());
  }
  const int64_t batch = logits.batch();
  const int64_t classes = logits.dim(1);
  if (static_cast<int64_t>(labels.size()) != batch) {
    return Status::InvalidArgument("softmax cross-entropy: " + std::to_string(labels.size()) +
                                   " labels for a batch of " + std::to_string(batch));
  }
  for (int64_t i = 0; i < batch; ++i) {
    const int32_t y = labels[static_cast<size_t>(i)];
    if (y < 0 || y >= classes) {
      return Status::InvalidArgument("label " + std::to_string(y) + " of sample " +
                                     std::to_string(i) + " is outside [0, " +
                                     std::to_string(classes) + ")");
    }
  }
  const float inv_batch = 1.0f / static_cast<float>(batch);
  const double total = internal::SoftmaxCrossEntropySum(logits, labels, grad, inv_batch);
  return static_cast<float>(total / static_cast<double>(batch));
}

}  // namespace fedslice
