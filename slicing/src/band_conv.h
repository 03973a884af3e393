// Internal to the slicing module: the conv2d band kernel that stage executors run for the
// parts of a cut conv2d layer (chain.cc), shared with the profiler (cost.cc) so that the
// band costs a device reports are those of the code that will run them.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <vector>

#include "fedslice/common/tensor.h"
#include "fedslice/model.pb.h"

namespace fedslice::slicing::internal {

using RowMajorMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Columns per product a band aims for (see BandConvForward).
constexpr int64_t kBandColumns = 384;

// Scratch a band keeps from call to call: the im2col columns, the product, a padded plane.
struct BandScratch {
  RowMajorMatrix cols, product;
  std::vector<float> padded;
};

// Output positions [p0, p1) (row-major over the output's rows x cols) of a conv2d whose output
// sample shape is `out_shape` ({oc, rows, cols}), for every sample of `in` ([n, c, h, w]),
// written to positions [p0, p1) of each channel of `out` ([n, oc, P] with P >= p1 positions
// per channel, or [n, oc, rows, cols]; allocated by the caller). `weights` is the layer's
// [oc, c·k·k] followed by its [oc] bias (layers.h layout).
//
// Why not the layer's own Forward on the band: that is one product per sample, [oc, ckk] x
// [ckk, positions], and for a band of a row or two its ~14-28 columns run the GEMM at a
// third of its speed (measured: a one-row band of the cnn's conv2 took 2.4x its share of the
// layer). Here the columns of several samples go into one product of ~kBandColumns columns.
void BandConvForward(const proto::Conv2DSpec& conv, const float* weights, const Tensor& in,
                     const std::vector<int64_t>& out_shape, int64_t p0, int64_t p1, Tensor* out,
                     BandScratch* scratch);

}  // namespace fedslice::slicing::internal
