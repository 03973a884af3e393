#include "fedslice/slicing/cost.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>

#include "band_conv.h"
#include "fedslice/common/layers.h"
#include "fedslice/common/threading.h"

namespace fedslice::slicing {
namespace {

using Clock = std::chrono::steady_clock;

int64_t Elements(const std::vector<int64_t>& shape) {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
}

}  // namespace

std::vector<LayerCost> ComputeLayerCosts(const Model& model) {
  std::vector<LayerCost> costs;
  const int n = model.num_layers();
  costs.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const proto::LayerSpec& spec = model.spec().layers(i);
    const Layer& layer = model.layer(i);
    const std::vector<int64_t>& in = model.InputShape(i);
    const std::vector<int64_t>& out = model.InputShape(i + 1);
    LayerCost c;
    c.index = i;
    c.name = spec.name();
    c.kind = std::string(layer.kind());
    c.param_bytes = 4 * layer.param_count();
    c.input_bytes = 4 * Elements(in);
    c.output_bytes = 4 * Elements(out);
    const auto out_elements = static_cast<double>(Elements(out));
    if (spec.has_dense()) {
      c.forward_flops = 2.0 * static_cast<double>(Elements(in)) * out_elements;
    } else if (spec.has_conv2d()) {
      // in = {C, H, W}, out = {OC, OH, OW}: each output element is a C·k·k dot product.
      const auto k = static_cast<int64_t>(spec.conv2d().kernel());
      const int64_t patch = in[0] * k * k;
      c.forward_flops = 2.0 * static_cast<double>(patch) * out_elements;
      c.scratch_bytes = 4 * patch * out[1] * out[2];
    } else if (spec.has_maxpool2d()) {
      const auto k = static_cast<double>(spec.maxpool2d().kernel());
      c.forward_flops = k * k * out_elements;
    } else if (spec.has_relu()) {
      c.forward_flops = out_elements;
    }
    costs.push_back(std::move(c));
  }
  return costs;
}

Result<std::vector<proto::LayerTiming>> MeasureLayerTimes(const Model& model,
                                                          const TimingOptions& options) {
  if (options.batch < 1 || options.batch > 4096) {
    return Status::InvalidArgument("timing batch must be in [1, 4096], got " +
                                   std::to_string(options.batch));
  }
  if (options.budget.count() <= 0) {
    return Status::InvalidArgument("timing budget must be positive");
  }
  if (options.max_runs < 1) return Status::InvalidArgument("timing max_runs must be >= 1");
  const int n = model.num_layers();
  const auto start = Clock::now();

  // The layers run one after the other on the output their predecessor just wrote, each
  // into a buffer kept from run to run, as a stage's executor runs a slice. Timing each
  // layer through Model::Forward instead (a fresh pass per layer on an input last touched a
  // whole pass earlier, and a copy of its output) made the memory-bound layers look up to
  // twice as slow as they run in a pipeline: the cnn's conv1..pool1 profiled at 6.4 ms per
  // 64 images and ran in 3.5-4.3 ms as a stage, and the planner gave that stage too little.
  //
  // Each layer's parameters start on a 64-byte boundary (as aligned as Eigen's allocator, 64
  // bytes with AVX-512), as in a stage's executor, which keeps one aligned buffer per unit. In a
  // plain std::vector they started wherever malloc put it (16 bytes past a page for a large block),
  // and the cnn's fc1, whose kernel streams 6.4 MB of weights, timed 1.3 ms aligned and 1.9-2.2 ms
  // misaligned: the profile said 2.2 ms where the stage ran in 1.5, and the planner gave the last
  // stage ~15% too little work.
  constexpr int64_t kAlignFloats = 16;
  std::vector<std::unique_ptr<Layer>> layers;
  std::vector<int64_t> param_offsets;
  int64_t padded = 0;
  for (int i = 0; i < n; ++i) {
    FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer,
                              CreateLayer(model.spec().layers(i), model.InputShape(i), i));
    param_offsets.push_back(padded);
    padded += (layer->param_count() + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    layers.push_back(std::move(layer));
  }
  std::vector<float, Eigen::aligned_allocator<float>> params(static_cast<size_t>(padded));
  int64_t offset = 0;
  for (int i = 0; i < n; ++i) {
    const auto k = static_cast<size_t>(i);
    const int64_t count = layers[k]->param_count();
    std::copy_n(model.params().data() + offset, count, params.data() + param_offsets[k]);
    offset += count;
    // Inference writes no gradients: the parameters double as the gradient buffer.
    layers[k]->BindParams(params.data() + param_offsets[k], params.data() + param_offsets[k]);
  }
  std::vector<Tensor> acts(static_cast<size_t>(n) + 1);
  std::vector<int64_t> shape = {options.batch};
  shape.insert(shape.end(), model.InputShape(0).begin(), model.InputShape(0).end());
  acts[0] = Tensor(shape);
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (float& x : acts[0].span()) x = uniform(rng);

  // Layers a pipeline may cut: a stage beginning inside one copies the positions / features
  // carried in next to its own (chain.h). Timed here as the copy of the whole output in the
  // pieces a stage copies: per sample and channel, the positions of a conv2d output; per
  // sample, the features of a dense one.
  std::vector<bool> cuttable(static_cast<size_t>(n), false);
  for (int i = 0; i < n; ++i) {
    const auto& spec = model.spec().layers(i);
    cuttable[static_cast<size_t>(i)] = spec.has_conv2d() || spec.has_dense();
  }
  Tensor joined;
  auto join = [&](const Tensor& out) {
    joined.Resize(out.shape());
    const int64_t samples = out.batch();
    const int64_t groups = out.shape().size() == 4 ? out.dim(1) : 1;
    const int64_t piece = out.sample_size() / groups;
    for (int64_t s = 0; s < samples; ++s) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = (s * groups + g) * piece;
        std::copy_n(out.data() + at, piece, joined.data() + at);
      }
    }
  };

  // conv2d layers a pipeline may cut into bands of output positions: a band of one row and one
  // of all rows, through the kernel a stage runs bands with, give band_fixed and band_row
  // (wire.proto, LayerTiming): the planner then charges a stage holding p positions
  // fixed + p·row/cols instead of p/positions of the layer's time, which left out what a band
  // costs on its own.
  struct BandTimes {
    internal::BandScratch scratch;
    Tensor out;
    std::vector<double> one_row, all_rows;
  };
  std::vector<std::optional<BandTimes>> bands(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const auto& spec = model.spec().layers(i);
    if (spec.has_conv2d() && model.InputShape(i + 1)[1] > 1) {  // output {c, rows, w}
      bands[static_cast<size_t>(i)].emplace();
    }
  }
  auto time_band = [&](int i, int64_t r1, const float* weights, std::vector<double>* times,
                       bool timed) {
    BandTimes& b = *bands[static_cast<size_t>(i)];
    const std::vector<int64_t>& out_shape = model.InputShape(i + 1);  // {c, rows, cols}
    const auto t0 = Clock::now();
    internal::BandConvForward(model.spec().layers(i).conv2d(), weights,
                              acts[static_cast<size_t>(i)], out_shape, 0, r1 * out_shape[2], &b.out,
                              &b.scratch);
    if (timed)
      times->push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  };

  std::vector<std::vector<double>> runs(static_cast<size_t>(n)), joins(static_cast<size_t>(n));
  // Run 0 is the warm-up (allocations, page faults), not timed.
  for (int run = 0; run <= options.max_runs; ++run) {
    if (run > 1 && Clock::now() - start >= options.budget) break;
    for (int i = 0; i < n; ++i) {
      const auto k = static_cast<size_t>(i);
      const auto t0 = Clock::now();
      layers[k]->Forward(acts[k], &acts[k + 1], false);
      const auto t1 = Clock::now();
      if (run > 0) runs[k].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      if (cuttable[k]) {
        join(acts[k + 1]);
        if (run > 0) {
          joins[k].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t1).count());
        }
      }
      if (bands[k]) {
        BandTimes& b = *bands[k];
        b.out.Resize(acts[k + 1].shape());
        const float* weights = params.data() + param_offsets[k];
        time_band(i, 1, weights, &b.one_row, run > 0);
        time_band(i, acts[k + 1].dim(2), weights, &b.all_rows, run > 0);
      }
    }
  }

  std::vector<proto::LayerTiming> timings;
  timings.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const std::vector<double>& r = runs[static_cast<size_t>(i)];
    // A clock tick can read 0 for a tiny layer; 1 ns keeps the time positive (the planner
    // and the profile validation reject non-positive times).
    const double ms = std::max(*std::min_element(r.begin(), r.end()), 1e-6);
    proto::LayerTiming t;
    t.set_layer_index(static_cast<uint32_t>(i));
    t.set_layer_name(model.spec().layers(i).name());
    t.set_forward_ms_per_sample(ms / options.batch);
    t.set_backward_ms_per_sample(0.0);
    if (const std::vector<double>& j = joins[static_cast<size_t>(i)]; !j.empty()) {
      t.set_join_ms_per_sample(std::max(*std::min_element(j.begin(), j.end()), 1e-6) /
                               options.batch);
    }
    if (const std::optional<BandTimes>& b = bands[static_cast<size_t>(i)]; b) {
      // t(r) = fixed + r·row through t(1) and t(rows), each the fastest of its runs; noise
      // can make the fit dip below 0, which no band costs.
      const double rows = static_cast<double>(model.InputShape(i + 1)[1]);
      const double one = *std::min_element(b->one_row.begin(), b->one_row.end());
      const double all = *std::min_element(b->all_rows.begin(), b->all_rows.end());
      const double row = std::max((all - one) / (rows - 1.0), 1e-6);
      t.set_band_row_ms_per_sample(row / options.batch);
      t.set_band_fixed_ms_per_sample(std::max(one - row, 0.0) / options.batch);
    }
    timings.push_back(std::move(t));
  }
  return timings;
}

double MeasureGemmFlops(std::chrono::milliseconds budget) {
  // 256 x 256 is the size class of the models' dense layers times a micro-batch: large
  // enough to reach the kernel's sustained rate, small enough that one product takes ~1 ms.
  constexpr int kN = 256;
  Eigen::MatrixXf a = Eigen::MatrixXf::Constant(kN, kN, 0.5f);
  Eigen::MatrixXf b = Eigen::MatrixXf::Constant(kN, kN, 0.25f);
  Eigen::MatrixXf c(kN, kN);
  c.noalias() = a * b;  // warm-up: page faults, thread start
  int64_t products = 0;
  const auto start = Clock::now();
  auto elapsed = Clock::duration::zero();
  do {
    c.noalias() = a * b;
    ++products;
    elapsed = Clock::now() - start;
  } while (elapsed < budget);
  volatile float sink = c(0, 0);  // keeps the products from being optimised away
  (void)sink;
  const double seconds = std::max(1e-9, std::chrono::duration<double>(elapsed).count());
  return 2.0 * kN * kN * kN * static_cast<double>(products) / seconds;
}

Result<proto::DeviceProfile> MeasureDeviceProfile(const Model* model,
                                                  const ProfileOptions& options) {
  if (!std::isfinite(options.slowdown) || options.slowdown < 1.0) {
    return Status::InvalidArgument("slowdown must be a finite factor >= 1");
  }
  if (!std::isfinite(options.link_bandwidth_bytes_per_s) ||
      options.link_bandwidth_bytes_per_s < 0 || !std::isfinite(options.link_latency_ms) ||
      options.link_latency_ms < 0) {
    return Status::InvalidArgument("link bandwidth and latency must be finite and >= 0");
  }
  proto::DeviceProfile profile;
  if (model != nullptr) {
    FEDSLICE_ASSIGN_OR_RETURN(auto timings, MeasureLayerTimes(*model, options.timing));
    for (auto& t : timings) *profile.add_layer_timings() = std::move(t);
  }
  profile.set_flops(MeasureGemmFlops(options.flops_budget));
  profile.set_memory_budget_bytes(options.memory_budget_bytes);
  profile.set_link_bandwidth_bytes_per_s(options.link_bandwidth_bytes_per_s);
  profile.set_link_latency_ms(options.link_latency_ms);
  profile.set_num_threads(static_cast<uint32_t>(NumThreads()));
  profile.set_slowdown(options.slowdown);
  profile.set_device_name(options.device_name);
  return profile;
}

}  // namespace fedslice::slicing
