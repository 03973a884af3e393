// Matrix kernels for Dense layers at the small batch sizes of federated clients (10-64).
//
// At such batches Eigen's general GEMM spends as long packing the weight matrix (which is
// much larger than the activations) and zeroing its destination as it does multiplying.
// These kernels read each weight once, straight from the flat buffer, keep a block of
// activations in registers, and write each result once. Each output element is computed by
// one thread in a fixed order, so results do not depend on the thread count.
//
// Layouts (all row-major): x [rows, in], w [out, in] (PyTorch), y / g [rows, out].
#pragma once

#include <cstdint>

namespace fedslice::internal {

// y[r, o] = bias[o] + sum_i x[r, i] * w[o, i].
void DenseForward(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
                  int64_t out, float* y);

// dw[o, i] = sum_r g[r, o] * x[r, i];  db[o] = sum_r g[r, o].
void DenseWeightGrad(const float* g, const float* x, int64_t rows, int64_t in, int64_t out,
                     float* dw, float* db);

// dx[r, i] = sum_o g[r, o] * w[o, i].
void DenseInputGrad(const float* g, const float* w, int64_t rows, int64_t in, int64_t out,
                    float* dx);

}  // namespace fedslice::internal
