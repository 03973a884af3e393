#include "fedslice/common/layers.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "dense_kernels.h"
#include "fedslice/common/threading.h"
#include "init_random.h"

namespace fedslice {
namespace {

// Views into the flat buffers and into per-sample slices of tensors: not necessarily aligned.
using ParamMap = Eigen::Map<RowMatrix>;
using ConstMap = Eigen::Map<const RowMatrix>;
using RowVectorMap = Eigen::Map<Eigen::RowVectorXf>;

// Bounds that reject absurd specs (a typo of a few zeros) before anything is allocated.
constexpr int64_t kMaxDim = int64_t{1} << 20;          // any single dimension
constexpr int64_t kMaxSampleSize = int64_t{1} << 26;   // floats of one sample's activation
constexpr int64_t kMaxLayerParams = int64_t{1} << 28;  // 1 GiB of float32
// Up to this batch size Dense layers use the kernels of dense_kernels.h, beyond it Eigen's
// GEMM, whose packing cost is then amortised over enough rows.
constexpr int64_t kSmallBatch = 64;

void FillUniform(std::mt19937_64& rng, float* p, int64_t n, double bound) {
  for (int64_t i = 0; i < n; ++i) p[i] = internal::UniformSymmetric(rng, bound);
}

double InitBound(bool he, int64_t fan_in, int64_t fan_out) {
  return he ? std::sqrt(6.0 / static_cast<double>(fan_in))
            : std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
}

// Bias gradients are sums that must come out bit-identical for every model instance. Eigen's
// reductions into an unaligned destination mix scalar and packet code paths, which sum in
// different orders, chosen by the destination's address; these loops fix the order.

// out[j] = sum over i of m[i, j] for a row-major rows x cols matrix, rows in order.
void ColumnSums(const float* m, int64_t rows, int64_t cols, float* out) {
  std::fill_n(out, cols, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = m + i * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += row[j];
  }
}

// Sum of n floats in a fixed order: 16 interleaved partial sums (one AVX-512 register), then
// those in order.
float RowSum(const float* x, int64_t n) {
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) partial[k] += x[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) partial[k] += x[i];
  float sum = 0.0f;
  for (float p : partial) sum += p;
  return sum;
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

std::vector<int64_t> Layer::Batched(int64_t batch, const std::vector<int64_t>& shape) {
  std::vector<int64_t> out;
  out.reserve(shape.size() + 1);
  out.push_back(batch);
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

// ---------------------------------------------------------------------------------- Dense

DenseLayer::DenseLayer(int64_t in_features, int64_t out_features)
    : Layer({in_features}, {out_features}), in_(in_features), out_(out_features) {}

void DenseLayer::BindParams(float* params, float* grads) {
  w_ = params;
  b_ = params + out_ * in_;
  dw_ = grads;
  db_ = grads + out_ * in_;
}

void DenseLayer::InitParams(std::mt19937_64& rng, bool he) {
  FillUniform(rng, w_, out_ * in_, InitBound(he, in_, out_));
  std::fill_n(b_, out_, 0.0f);
}

void DenseLayer::Forward(const Tensor& in, Tensor* out, bool training) {
  const int64_t batch = in.batch();
  out->Resize({batch, out_});
  if (batch <= kSmallBatch) {
    internal::DenseForward(in.data(), batch, in_, w_, b_, out_, out->data());
  } else {
    // [B, out] = [B, in] * [in, out]
    out->matrix().noalias() = in.matrix() * ParamMap(w_, out_, in_).transpose();
    out->matrix().rowwise() += RowVectorMap(b_, out_);
  }
  if (training) input_ = in;
}

void DenseLayer::Backward(const Tensor& grad_out, Tensor* grad_in) {
  const int64_t batch = grad_out.batch();
  if (batch <= kSmallBatch) {
    internal::DenseWeightGrad(grad_out.data(), input_.data(), batch, in_, out_, dw_, db_);
  } else {
    // [out, in] = [out, B] * [B, in]
    ParamMap(dw_, out_, in_).noalias() = grad_out.matrix().transpose() * input_.matrix();
    ColumnSums(grad_out.data(), batch, out_, db_);
  }
  if (grad_in == nullptr) return;
  grad_in->Resize(input_.shape());
  if (batch <= kSmallBatch) {
    internal::DenseInputGrad(grad_out.data(), w_, batch, in_, out_, grad_in->data());
  } else {
    // [B, in] = [B, out] * [out, in]
    grad_in->matrix().noalias() = grad_out.matrix() * ParamMap(w_, out_, in_);
  }
}

// --------------------------------------------------------------------------------- Conv2D

Conv2DLayer::Conv2DLayer(const std::vector<int64_t>& input_shape, int64_t out_channels,
                         int64_t kernel, int64_t stride, int64_t padding)
    : Layer(input_shape, {out_channels, (input_shape[1] + 2 * padding - kernel) / stride + 1,
                          (input_shape[2] + 2 * padding - kernel) / stride + 1}),
      c_(input_shape[0]),
      h_(input_shape[1]),
      w_(input_shape[2]),
      oc_(out_channels),
      k_(kernel),
      stride_(stride),
      pad_(padding),
      oh_(output_shape()[1]),
      ow_(output_shape()[2]),
      ckk_(c_ * k_ * k_),
      p_(oh_ * ow_) {}

void Im2ColPositions(const float* in, const ConvGeometry& g, int64_t p0, int64_t p1, float* cols,
                     int64_t ld, std::vector<float>* padded) {
  const int64_t ph = g.h + 2 * g.pad, pw = g.w + 2 * g.pad;
  padded->resize(static_cast<size_t>(ph * pw));
  float* pad_plane = padded->data();
  const int64_t first_row = p0 / g.out_w, first_col = p0 % g.out_w;
  const int64_t last_row = (p1 - 1) / g.out_w;
  // Only the padded rows under the band are read (a band of a few output rows should not
  // pay for the whole plane): padded rows [y0, y1), of which image rows [iy0, iy1).
  const int64_t y0 = first_row * g.stride, y1 = std::min(ph, last_row * g.stride + g.k);
  const int64_t iy0 = std::max(y0 - g.pad, int64_t{0}), iy1 = std::min(y1 - g.pad, g.h);
  // Zero once; the image part of these rows is rewritten for every channel, the padding
  // around it stays 0.
  std::fill(pad_plane + y0 * pw, pad_plane + y1 * pw, 0.0f);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const float* __restrict plane = in + ch * g.h * g.w;
    for (int64_t y = iy0; y < iy1; ++y) {
      // An inline loop, not std::copy: rows are short (14-28 floats) and a memmove call per
      // row cost more than the copy.
      const float* __restrict src = plane + y * g.w;
      float* __restrict dst = pad_plane + (y + g.pad) * pw + g.pad;
      for (int64_t x = 0; x < g.w; ++x) dst[x] = src[x];
    }
    for (int64_t ki = 0; ki < g.k; ++ki) {
      for (int64_t kj = 0; kj < g.k; ++kj) {
        float* __restrict dst = cols + ((ch * g.k + ki) * g.k + kj) * ld;
        // Output row by output row: positions [p, p + len) of row oh read padded row
        // oh · stride + ki from column ow · stride + kj.
        int64_t oh = first_row, ow0 = first_col;
        for (int64_t left = p1 - p0; left > 0; ++oh, ow0 = 0) {
          const int64_t len = std::min(g.out_w - ow0, left);
          const float* __restrict src = pad_plane + (oh * g.stride + ki) * pw + ow0 * g.stride + kj;
          if (g.stride == 1) {
            for (int64_t x = 0; x < len; ++x) dst[x] = src[x];
          } else {
            for (int64_t x = 0; x < len; ++x) dst[x] = src[x * g.stride];
          }
          dst += len;
          left -= len;
        }
      }
    }
  }
}

void Conv2DLayer::BindParams(float* params, float* grads) {
  w_ptr_ = params;
  b_ptr_ = params + oc_ * ckk_;
  dw_ptr_ = grads;
  db_ptr_ = grads + oc_ * ckk_;
}

void Conv2DLayer::InitParams(std::mt19937_64& rng, bool he) {
  FillUniform(rng, w_ptr_, oc_ * ckk_, InitBound(he, ckk_, oc_ * k_ * k_));
  std::fill_n(b_ptr_, oc_, 0.0f);
}

void Conv2DLayer::Im2Col(const float* in, Scratch* s) const {
  const ConvGeometry g{c_, h_, w_, k_, stride_, pad_, oh_, ow_};
  Im2ColPositions(in, g, 0, p_, s->cols.data(), p_, &s->padded);
}

void Conv2DLayer::Col2Im(const float* cols, float* in) const {
  std::fill_n(in, c_ * h_ * w_, 0.0f);
  for (int64_t c = 0; c < c_; ++c) {
    float* plane = in + c * h_ * w_;
    for (int64_t ki = 0; ki < k_; ++ki) {
      for (int64_t kj = 0; kj < k_; ++kj) {
        const float* src = cols + ((c * k_ + ki) * k_ + kj) * p_;
        const int64_t ow_lo = std::clamp<int64_t>((pad_ - kj + stride_ - 1) / stride_, 0, ow_);
        const int64_t ow_hi =
            std::clamp<int64_t>((w_ + pad_ - kj + stride_ - 1) / stride_, ow_lo, ow_);
        const int64_t shift = kj - pad_;
        for (int64_t oh = 0; oh < oh_; ++oh, src += ow_) {
          const int64_t ih = oh * stride_ - pad_ + ki;
          if (ih < 0 || ih >= h_) continue;
          float* row = plane + ih * w_;
          if (stride_ == 1) {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) row[ow + shift] += src[ow];
          } else {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) row[ow * stride_ + shift] += src[ow];
          }
        }
      }
    }
  }
}

int Conv2DLayer::PrepareWorkers(int64_t batch) {
  // Inside a parallel region (Model splits batches across threads) this layer runs on the
  // calling thread, and so does Eigen: it sees the enclosing team and stays sequential with
  // single-thread blocking, so results match a one-thread run exactly.
  const int workers =
      omp_in_parallel() ? 1 : static_cast<int>(std::clamp<int64_t>(NumThreads(), 1, batch));
  if (static_cast<int>(scratch_.size()) < workers) scratch_.resize(static_cast<size_t>(workers));
  return workers;
}

// Samples are spread over the workers (each with its own scratch, Eigen single-threaded
// inside the parallel region); with one worker, Eigen may parallelise each product itself.
// Either way each sample's output is computed by one fixed sequence of operations.
void Conv2DLayer::Forward(const Tensor& in, Tensor* out, bool training) {
  const int64_t batch = in.batch();
  out->Resize({batch, oc_, oh_, ow_});
  ForwardSamples(in.data(), batch, out->data());
  if (training) input_ = in;
}

void Conv2DLayer::ForwardSamples(const float* in, int64_t batch, float* out) {
  if (batch < 1) return;
  const int workers = PrepareWorkers(batch);
  const int64_t in_size = c_ * h_ * w_;
  auto run = [&](int t, int nt) {
    const int64_t n0 = batch * t / nt, n1 = batch * (t + 1) / nt;
    Scratch& s = scratch_[static_cast<size_t>(t)];
    s.cols.Resize({ckk_, p_});
    const ParamMap w(w_ptr_, oc_, ckk_);
    for (int64_t n = n0; n < n1; ++n) {
      Im2Col(in + n * in_size, &s);
      ParamMap y(out + n * oc_ * p_, oc_, p_);
      // [oc, p] = [oc, ckk] * [ckk, p]
      y.noalias() = w * s.cols.matrix();
      for (int64_t oc = 0; oc < oc_; ++oc) y.row(oc).array() += b_ptr_[oc];
    }
  };
  if (workers > 1) {
#pragma omp parallel num_threads(workers)
    run(omp_get_thread_num(), omp_get_num_threads());
  } else {
    run(0, 1);
  }
}

// The im2col columns are recomputed rather than kept from Forward: one sample's columns stay
// in L2 (the whole batch's would not), and im2col costs little next to the products.
void Conv2DLayer::Backward(const Tensor& grad_out, Tensor* grad_in) {
  const int64_t batch = input_.batch();
  const int workers = PrepareWorkers(batch);
  const int64_t in_size = c_ * h_ * w_;
  if (grad_in != nullptr) grad_in->Resize(input_.shape());
  const int64_t params = param_count();
  auto run = [&](int t, int nt) {
    const int64_t n0 = batch * t / nt, n1 = batch * (t + 1) / nt;
    Scratch& s = scratch_[static_cast<size_t>(t)];
    s.cols.Resize({ckk_, p_});
    // Worker 0 accumulates straight into the gradient buffer, the others into partials
    // that are added in worker order afterwards (a fixed order for a given thread count).
    float* dw = dw_ptr_;
    if (t > 0) {
      s.partial.resize(static_cast<size_t>(params));
      dw = s.partial.data();
    }
    float* db = dw + oc_ * ckk_;
    std::fill_n(dw, params, 0.0f);
    ParamMap dw_map(dw, oc_, ckk_);
    const ParamMap w(w_ptr_, oc_, ckk_);
    for (int64_t n = n0; n < n1; ++n) {
      Im2Col(input_.data() + n * in_size, &s);
      const ConstMap g(grad_out.data() + n * oc_ * p_, oc_, p_);
      // [oc, ckk] += [oc, p] * [p, ckk]
      dw_map.noalias() += g * s.cols.matrix().transpose();
      for (int64_t oc = 0; oc < oc_; ++oc) db[oc] += RowSum(g.data() + oc * p_, p_);
      if (grad_in != nullptr) {
        s.dcols.Resize({ckk_, p_});
        // [ckk, p] = [ckk, oc] * [oc, p]
        s.dcols.matrix().noalias() = w.transpose() * g;
        Col2Im(s.dcols.data(), grad_in->data() + n * in_size);
      }
    }
  };
  if (workers > 1) {
#pragma omp parallel num_threads(workers)
    {
      run(omp_get_thread_num(), omp_get_num_threads());
#pragma omp barrier
      // Sum the partials into dw, splitting the parameters between the threads.
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t i0 = params * t / nt, i1 = params * (t + 1) / nt;
      for (int k = 1; k < nt; ++k) {
        const float* src = scratch_[static_cast<size_t>(k)].partial.data();
        for (int64_t i = i0; i < i1; ++i) dw_ptr_[i] += src[i];
      }
    }
  } else {
    run(0, 1);
  }
}

// ------------------------------------------------------------------------------ MaxPool2D

MaxPool2DLayer::MaxPool2DLayer(const std::vector<int64_t>& input_shape, int64_t kernel,
                               int64_t stride)
    : Layer(input_shape, {input_shape[0], (input_shape[1] - kernel) / stride + 1,
                          (input_shape[2] - kernel) / stride + 1}),
      c_(input_shape[0]),
      h_(input_shape[1]),
      w_(input_shape[2]),
      k_(kernel),
      stride_(stride),
      oh_(output_shape()[1]),
      ow_(output_shape()[2]) {}

void MaxPool2DLayer::Forward(const Tensor& in, Tensor* out, bool training) {
  const int64_t batch = in.batch();
  out->Resize({batch, c_, oh_, ow_});
  argmax_.resize(static_cast<size_t>(batch * c_ * oh_ * ow_));
  const int64_t planes = batch * c_;
  const float* src = in.data();
  float* dst = out->data();
  int32_t* arg = argmax_.data();
#pragma omp parallel for schedule(static) num_threads(NumThreads())
  for (int64_t pl = 0; pl < planes; ++pl) {
    const float* x = src + pl * h_ * w_;
    float* y = dst + pl * oh_ * ow_;
    int32_t* a = arg + pl * oh_ * ow_;
    for (int64_t oh = 0; oh < oh_; ++oh) {
      for (int64_t ow = 0; ow < ow_; ++ow) {
        int64_t best_idx = oh * stride_ * w_ + ow * stride_;
        float best = x[best_idx];
        for (int64_t ki = 0; ki < k_; ++ki) {
          for (int64_t kj = 0; kj < k_; ++kj) {
            const int64_t idx = (oh * stride_ + ki) * w_ + ow * stride_ + kj;
            if (x[idx] > best) {
              best = x[idx];
              best_idx = idx;
            }
          }
        }
        y[oh * ow_ + ow] = best;
        a[oh * ow_ + ow] = static_cast<int32_t>(best_idx);
      }
    }
  }
  (void)training;  // argmax_ is cheap enough to record on every call
}

void MaxPool2DLayer::Backward(const Tensor& grad_out, Tensor* grad_in) {
  if (grad_in == nullptr) return;
  const int64_t batch = grad_out.batch();
  grad_in->Resize(Batched(batch, input_shape()));
  const int64_t planes = batch * c_;
  const float* g = grad_out.data();
  float* gi = grad_in->data();
  const int32_t* arg = argmax_.data();
#pragma omp parallel for schedule(static) num_threads(NumThreads())
  for (int64_t pl = 0; pl < planes; ++pl) {
    float* x = gi + pl * h_ * w_;
    std::fill_n(x, h_ * w_, 0.0f);
    const float* y = g + pl * oh_ * ow_;
    const int32_t* a = arg + pl * oh_ * ow_;
    for (int64_t i = 0; i < oh_ * ow_; ++i) x[a[i]] += y[i];
  }
}

// ----------------------------------------------------------------------------------- ReLU

ReluLayer::ReluLayer(const std::vector<int64_t>& input_shape) : Layer(input_shape, input_shape) {}

void ReluLayer::Forward(const Tensor& in, Tensor* out, bool training) {
  out->Resize(in.shape());
  const int64_t n = in.size();
  const float* x = in.data();
  float* y = out->data();
  if (training) {
    // A byte mask rather than a copy of the output: a quarter of the memory traffic.
    mask_.resize(static_cast<size_t>(n));
    uint8_t* m = mask_.data();
    for (int64_t i = 0; i < n; ++i) {
      m[i] = x[i] > 0.0f;
      y[i] = x[i] > 0.0f ? x[i] : 0.0f;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
  }
}

void ReluLayer::Backward(const Tensor& grad_out, Tensor* grad_in) {
  if (grad_in == nullptr) return;
  grad_in->Resize(grad_out.shape());
  const int64_t n = grad_out.size();
  const float* g = grad_out.data();
  const uint8_t* m = mask_.data();
  float* d = grad_in->data();
  for (int64_t i = 0; i < n; ++i) d[i] = m[i] ? g[i] : 0.0f;
}

// -------------------------------------------------------------------------------- Flatten

FlattenLayer::FlattenLayer(const std::vector<int64_t>& input_shape)
    : Layer(input_shape, {Product(input_shape)}) {}

void FlattenLayer::Forward(const Tensor& in, Tensor* out, bool training) {
  out->Resize({in.batch(), output_shape()[0]});
  std::copy_n(in.data(), in.size(), out->data());
  if (training) batch_ = in.batch();
}

void FlattenLayer::Backward(const Tensor& grad_out, Tensor* grad_in) {
  if (grad_in == nullptr) return;
  grad_in->Resize(Batched(batch_, input_shape()));
  std::copy_n(grad_out.data(), grad_out.size(), grad_in->data());
}

// ------------------------------------------------------------------------------- factory

namespace {

std::string LayerName(const proto::LayerSpec& spec, int index) {
  std::string s = "layer " + std::to_string(index);
  if (!spec.name().empty()) s += " ('" + spec.name() + "')";
  return s;
}

Status CheckRange(std::string_view what, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return Status::InvalidArgument(std::string(what) + " is " + std::to_string(value) +
                                   ", must be in [" + std::to_string(lo) + ", " +
                                   std::to_string(hi) + "]");
  }
  return Status::Ok();
}

Result<std::unique_ptr<Layer>> CreateLayerUnchecked(const proto::LayerSpec& spec,
                                                    const std::vector<int64_t>& in) {
  const std::string in_str = Tensor::ShapeToString(in);
  switch (spec.kind_case()) {
    case proto::LayerSpec::kDense: {
      const auto& d = spec.dense();
      if (in.size() != 1) {
        return Status::InvalidArgument("dense needs a 1-D input but gets " + in_str +
                                       "; put a flatten layer before it");
      }
      if (d.in_features() != in[0]) {
        return Status::InvalidArgument("dense in_features is " + std::to_string(d.in_features()) +
                                       " but its input has " + std::to_string(in[0]) + " features");
      }
      FEDSLICE_RETURN_IF_ERROR(CheckRange("dense out_features", d.out_features(), 1, kMaxDim));
      if (int64_t{d.out_features()} * (in[0] + 1) > kMaxLayerParams) {
        return Status::InvalidArgument("dense layer of " + std::to_string(in[0]) + "x" +
                                       std::to_string(d.out_features()) +
                                       " has too many parameters");
      }
      return std::unique_ptr<Layer>(new DenseLayer(in[0], d.out_features()));
    }
    case proto::LayerSpec::kConv2D: {
      const auto& c = spec.conv2d();
      if (in.size() != 3) {
        return Status::InvalidArgument("conv2d needs a {C, H, W} input but gets " + in_str);
      }
      if (c.in_channels() != in[0]) {
        return Status::InvalidArgument("conv2d in_channels is " + std::to_string(c.in_channels()) +
                                       " but its input " + in_str + " has " +
                                       std::to_string(in[0]) + " channels");
      }
      FEDSLICE_RETURN_IF_ERROR(CheckRange("conv2d out_channels", c.out_channels(), 1, 1 << 16));
      FEDSLICE_RETURN_IF_ERROR(CheckRange("conv2d kernel", c.kernel(), 1, 1024));
      const int64_t stride = c.stride() == 0 ? 1 : c.stride();
      FEDSLICE_RETURN_IF_ERROR(CheckRange("conv2d stride", stride, 1, 1024));
      FEDSLICE_RETURN_IF_ERROR(CheckRange("conv2d padding", c.padding(), 0, c.kernel() - 1));
      if (in[1] + 2 * c.padding() < c.kernel() || in[2] + 2 * c.padding() < c.kernel()) {
        return Status::InvalidArgument("conv2d kernel " + std::to_string(c.kernel()) +
                                       " is larger than its padded input " + in_str);
      }
      const int64_t params = int64_t{c.out_channels()} * in[0] * c.kernel() * c.kernel();
      if (params > kMaxLayerParams) {
        return Status::InvalidArgument("conv2d layer has too many parameters (" +
                                       std::to_string(params) + ")");
      }
      return std::unique_ptr<Layer>(
          new Conv2DLayer(in, c.out_channels(), c.kernel(), stride, c.padding()));
    }
    case proto::LayerSpec::kMaxpool2D: {
      const auto& m = spec.maxpool2d();
      if (in.size() != 3) {
        return Status::InvalidArgument("maxpool2d needs a {C, H, W} input but gets " + in_str);
      }
      FEDSLICE_RETURN_IF_ERROR(
          CheckRange("maxpool2d kernel", m.kernel(), 1, std::min(in[1], in[2])));
      const int64_t stride = m.stride() == 0 ? m.kernel() : m.stride();
      FEDSLICE_RETURN_IF_ERROR(CheckRange("maxpool2d stride", stride, 1, 1024));
      return std::unique_ptr<Layer>(new MaxPool2DLayer(in, m.kernel(), stride));
    }
    case proto::LayerSpec::kRelu:
      return std::unique_ptr<Layer>(new ReluLayer(in));
    case proto::LayerSpec::kFlatten:
      return std::unique_ptr<Layer>(new FlattenLayer(in));
    case proto::LayerSpec::KIND_NOT_SET:
      break;
  }
  return Status::InvalidArgument(
      "no layer kind set (expected one of dense, conv2d, maxpool2d, relu, flatten)");
}

}  // namespace

Result<std::unique_ptr<Layer>> CreateLayer(const proto::LayerSpec& spec,
                                           const std::vector<int64_t>& input_shape, int index) {
  const std::string name = LayerName(spec, index);
  if (input_shape.empty()) return Status::InvalidArgument(name + ": empty input shape");
  for (int64_t d : input_shape) {
    if (d < 1 || d > kMaxDim) {
      return Status::InvalidArgument(name + ": input shape " + Tensor::ShapeToString(input_shape) +
                                     " has a dimension outside [1, " + std::to_string(kMaxDim) +
                                     "]");
    }
  }
  Result<std::unique_ptr<Layer>> layer = CreateLayerUnchecked(spec, input_shape);
  if (!layer.ok()) return layer.status().WithContext(name);
  const int64_t out_size = Product((*layer)->output_shape());
  if (out_size > kMaxSampleSize) {
    return Status::InvalidArgument(name + ": output of " + std::to_string(out_size) +
                                   " floats per sample is too large");
  }
  return layer;
}

}  // namespace fedslice
