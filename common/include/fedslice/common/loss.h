// Softmax cross-entropy, the loss every FedSlice classifier trains with.
#pragma once

#include <cstdint>
#include <span>

#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"

namespace fedslice {

// Mean over the batch of -log(softmax(logits_i)[labels_i]), computed stably (log-sum-exp
// shifted by the row maximum). logits: [batch, classes]; labels: batch entries in
// [0, classes). grad, when not null, receives dLoss/dLogits = (softmax - onehot) / batch with
// the logits' shape. Fails with InvalidArgument on a shape mismatch or a label out of range
// (grad is then unspecified). Thread-safe for distinct output tensors.
Result<float> SoftmaxCrossEntropy(const Tensor& logits, std::span<const int32_t> labels,
                                  Tensor* grad);

}  // namespace fedslice
