// The loss as the training step needs it: on a share of a batch, with the gradient scaled by
// the whole batch, and labels already checked.
#pragma once

#include <cstdint>
#include <span>

#include "fedslice/common/tensor.h"

namespace fedslice::internal {

// Sum over rows of -log(softmax(logits_i)[labels_i]); grad (resized like logits) receives
// (softmax - onehot) * grad_scale. Labels must be in [0, classes).
double SoftmaxCrossEntropySum(const Tensor& logits, std::span<const int32_t> labels, Tensor* grad,
                              float grad_scale);

}  // namespace fedslice::internal
