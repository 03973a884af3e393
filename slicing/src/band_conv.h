// Internal to the slicing module: the conv2d band kernel that stage executors run for the
// parts of a cut conv2d layer (chain.cc), shared with the profiler (cost.cc) so that the
// band costs a device reports are those of the code that will run them.
#pragma once

#include <Eigen/Core>
#include <cstdint>

#include "fedslice/common/tensor.h"
#include "fedslice/model.pb.h"

namespace fedslice::slicing::internal {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Columns per product a band aims for (see BandConvForward).
constexpr int64_t kBandColumns = 384;

// Output rows [r0, r1) of a conv2d, for every sample of `in` ([n, c, h, w]), written to rows
// [r0, r1) of `out` ([n, oc, out_rows, ow], allocated by the caller). `weights` is the layer's
// [oc, c·k·k] followed by its [oc] bias (layers.h layout). `cols` and `product` are scratch,
// kept by the caller from call to call.
//
// Why not the layer's own Forward on the band: that is one product per sample, [oc, ckk] x
// [ckk, rows·ow], and for a band of one or two rows its ~14-28 columns run the GEMM at a
// third of its speed (measured: a one-row band of the cnn's conv2 took 2.4x its share of the
// layer). Here the columns of several samples go into one product of ~kBandColumns columns.
void BandConvForward(const proto::Conv2DSpec& conv, const float* weights, const Tensor& in,
                     int64_t r0, int64_t r1, Tensor* out, RowMajorMatrix* cols,
                     RowMajorMatrix* product);

}  // namespace fedslice::slicing::internal
