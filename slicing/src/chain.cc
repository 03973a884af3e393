#include "fedslice/slicing/chain.h"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <limits>
#include <optional>
#include <random>

#include "band_conv.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/threading.h"
#include "fedslice/slicing/pipeline.h"

namespace fedslice::slicing {
namespace {

using internal::BandConvForward;
using internal::RowMajorMatrix;

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t p = 1;
  for (int64_t d : shape) p *= d;
  return p;
}

bool Splittable(const proto::LayerSpec& layer) { return layer.has_conv2d() || layer.has_dense(); }

// What a split's parts divide: a conv2d layer's output positions (by_position) or rows, a
// dense layer's output features. `out_shape` is the layer's output sample shape.
int64_t SplitOutputs(const proto::LayerSpec& layer, const std::vector<int64_t>& out_shape,
                     bool by_position) {
  if (!layer.has_conv2d()) return out_shape[0];
  return by_position ? out_shape[1] * out_shape[2] : out_shape[1];
}

// What a unit's [out_begin, out_end) counts: a conv2d's output positions (rows x cols,
// row-major: a band of whole rows is a run of positions too), a dense layer's features.
int64_t UnitOutputs(const std::vector<int64_t>& out_shape) {
  return out_shape.size() == 3 ? out_shape[1] * out_shape[2] : out_shape[0];
}

// A dense layer computing `count` of the outputs of `layer`.
proto::LayerSpec DensePartSpec(const proto::LayerSpec& layer, int64_t count) {
  proto::LayerSpec part = layer;
  part.mutable_dense()->set_out_features(static_cast<int32_t>(count));
  return part;
}

std::vector<int64_t> WithBatch(int64_t batch, const std::vector<int64_t>& shape) {
  std::vector<int64_t> s = {batch};
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

// Rows [n0, n1) of `src` into `dst`.
void CopyRows(const Tensor& src, int64_t n0, int64_t n1, Tensor* dst) {
  std::vector<int64_t> shape = src.shape();
  shape[0] = n1 - n0;
  dst->Resize(shape);
  const int64_t ss = src.sample_size();
  std::copy_n(src.data() + n0 * ss, (n1 - n0) * ss, dst->data());
}

// Copies src [n][groups][count] into dst [n][groups][dst_count] at `at` of the last
// dimension (conv2d outputs: groups = channels, count = positions).
void CopyOutputs(const Tensor& src, int64_t groups, int64_t count, Tensor* dst, int64_t dst_count,
                 int64_t at) {
  const int64_t batch = src.batch();
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      std::copy_n(src.data() + (n * groups + g) * count, count,
                  dst->data() + (n * groups + g) * dst_count + at);
    }
  }
}

// CPU time this thread has used, in seconds.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

constexpr int64_t kAlignFloats = 16;  // 64 bytes, Model's buffer alignment

}  // namespace

Result<Chain> Chain::Create(const proto::ModelSpec& model, const proto::ChainSpec& spec) {
  if (model.layers_size() == 0) return Status::InvalidArgument("the model has no layers");
  Chain chain;
  chain.model_ = model;
  chain.spec_ = spec;
  std::vector<int64_t> shape(model.input_shape().begin(), model.input_shape().end());
  if (shape.empty()) return Status::InvalidArgument("the model's input_shape is empty");
  for (int64_t d : shape) {
    if (d < 1 || d > (int64_t{1} << 20)) {
      return Status::InvalidArgument("input_shape " + ShapeString(shape) + " is out of range");
    }
  }
  chain.layer_shapes_.push_back(shape);
  chain.layer_offsets_.push_back(0);
  for (int i = 0; i < model.layers_size(); ++i) {
    FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer,
                              CreateLayer(model.layers(i), chain.layer_shapes_.back(), i));
    chain.layer_params_.push_back(layer->param_count());
    chain.layer_offsets_.push_back(chain.layer_offsets_.back() + layer->param_count());
    chain.layer_shapes_.push_back(layer->output_shape());
  }
  if (chain.layer_shapes_.back() != std::vector<int64_t>{model.num_classes()}) {
    return Status::InvalidArgument("the last layer outputs " +
                                   ShapeString(chain.layer_shapes_.back()) +
                                   " but num_classes is " + std::to_string(model.num_classes()));
  }
  const int n = model.layers_size();
  std::vector<int> parts(static_cast<size_t>(n), 1);
  std::vector<bool> by_position(static_cast<size_t>(n), false);
  std::vector<bool> by_sample(static_cast<size_t>(n), false);
  int previous = -1;
  for (int s = 0; s < spec.splits_size(); ++s) {
    const auto& split = spec.splits(s);
    const std::string what =
        "chain split " + std::to_string(s) + " (layer " + std::to_string(split.layer_index()) + ")";
    if (split.layer_index() >= static_cast<uint32_t>(n)) {
      return Status::InvalidArgument(what + ": the model has " + std::to_string(n) + " layers");
    }
    const int layer = static_cast<int>(split.layer_index());
    if (layer <= previous) {
      return Status::InvalidArgument(what + ": layer indices must be strictly increasing");
    }
    previous = layer;
    const auto& l = model.layers(layer);
    if (!Splittable(l)) {
      return Status::InvalidArgument(what + ": only conv2d and dense layers can be cut");
    }
    if ((split.by_position() || split.by_sample()) && !l.has_conv2d()) {
      return Status::InvalidArgument(what +
                                     ": by_position and by_sample apply to conv2d layers only");
    }
    if (split.by_position() && split.by_sample()) {
      return Status::InvalidArgument(what + ": by_position and by_sample exclude each other");
    }
    // By sample, a part may hold no sample of a small micro-batch (it then computes nothing).
    const int64_t limit =
        split.by_sample()
            ? kMaxLayerParts
            : std::min<int64_t>(kMaxLayerParts,
                                SplitOutputs(l, chain.layer_shapes_[static_cast<size_t>(layer) + 1],
                                             split.by_position()));
    if (split.parts() < 2 || split.parts() > limit) {
      return Status::InvalidArgument(what + ": parts = " + std::to_string(split.parts()) +
                                     ", must be in [2, " + std::to_string(limit) + "]");
    }
    parts[static_cast<size_t>(layer)] = static_cast<int>(split.parts());
    by_position[static_cast<size_t>(layer)] = split.by_position();
    by_sample[static_cast<size_t>(layer)] = split.by_sample();
  }
  for (int i = 0; i < n; ++i) {
    chain.first_unit_.push_back(static_cast<int>(chain.units_.size()));
    const auto& l = model.layers(i);
    const int p = parts[static_cast<size_t>(i)];
    const auto& out_shape = chain.layer_shapes_[static_cast<size_t>(i) + 1];
    const bool positions = by_position[static_cast<size_t>(i)];
    const bool samples = by_sample[static_cast<size_t>(i)];
    // By sample, part j is [j, j + 1) in P-ths of the micro-batch (SampleBegin).
    int64_t outputs = 0;
    if (samples) {
      outputs = p;
    } else if (Splittable(l)) {
      outputs = SplitOutputs(l, out_shape, positions);
    }
    // Rows are counted in positions too: row r begins at position r · cols.
    const int64_t scale = l.has_conv2d() && !positions && !samples ? out_shape[2] : 1;
    for (int j = 0; j < p; ++j) {
      Unit u;
      u.layer = i;
      u.part = j;
      u.parts = p;
      u.out_begin = outputs * j / p * scale;
      u.out_end = outputs * (j + 1) / p * scale;
      chain.units_.push_back(u);
      chain.unit_main_.push_back(chain.layer_shapes_[static_cast<size_t>(i)]);
    }
  }
  chain.first_unit_.push_back(static_cast<int>(chain.units_.size()));
  chain.unit_main_.push_back(chain.layer_shapes_.back());
  chain.by_position_ = std::move(by_position);
  chain.by_sample_ = std::move(by_sample);
  return chain;
}

const std::vector<int64_t>& Chain::MainShape(int u) const {
  return unit_main_[static_cast<size_t>(u)];
}

std::vector<int64_t> Chain::CarryShape(int u) const {
  if (u >= num_units() || unit(u).part == 0) return {};
  if (BySample(unit(u).layer)) return layer_shapes_[static_cast<size_t>(unit(u).layer) + 1];
  return DoneShape(unit(u).layer, unit(u).out_begin);
}

int64_t Chain::CarrySamples(int u, int64_t batch) const {
  if (u >= num_units() || unit(u).part == 0) return 0;
  return BySample(unit(u).layer) ? SampleBegin(u, batch) : batch;
}

int64_t Chain::SampleBegin(int u, int64_t batch) const {
  const Unit& x = unit(u);
  return batch * x.out_begin / x.parts;
}

int64_t Chain::SampleEnd(int u, int64_t batch) const {
  const Unit& x = unit(u);
  return batch * x.out_end / x.parts;
}

bool Chain::BySample(int layer) const { return by_sample_[static_cast<size_t>(layer)]; }

int64_t Chain::UnitSpan(int layer) const {
  if (BySample(layer)) return FirstUnitOfLayer(layer + 1) - FirstUnitOfLayer(layer);
  return UnitOutputs(layer_shapes_[static_cast<size_t>(layer) + 1]);
}

std::vector<int64_t> Chain::DoneShape(int layer, int64_t done) const {
  // conv2d cut by position: {c, positions}; by row: {c, rows, cols} (the same values in the
  // same order); dense: {features}.
  const std::vector<int64_t>& shape = layer_shapes_[static_cast<size_t>(layer) + 1];
  if (shape.size() != 3) return {done};
  if (by_position_[static_cast<size_t>(layer)]) return {shape[0], done};
  return {shape[0], done / shape[2], shape[2]};
}

std::vector<LayerCost> Chain::UnitCosts(std::span<const LayerCost> layer_costs) const {
  std::vector<LayerCost> costs;
  costs.reserve(units_.size());
  for (int u = 0; u < num_units(); ++u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    const LayerCost& layer = layer_costs[static_cast<size_t>(unit.layer)];
    LayerCost c = layer;
    c.index = u;
    if (unit.parts > 1) {
      const auto& out_shape = layer_shapes_[static_cast<size_t>(unit.layer) + 1];
      const int64_t outputs = UnitSpan(unit.layer);
      const double share =
          static_cast<double>(unit.out_end - unit.out_begin) / static_cast<double>(outputs);
      // Bytes of one output position (conv2d: c floats) or feature; by sample, of a P-th of
      // the output (per sample of the micro-batch, on average).
      const int64_t plane_bytes = 4 * Product(out_shape) / outputs;
      c.name =
          layer.name + "[" + std::to_string(unit.part) + "/" + std::to_string(unit.parts) + "]";
      c.forward_flops = layer.forward_flops * share;
      // A conv2d band needs all of the layer's weights, once per stage holding bands of it;
      // counting a share per band keeps the bytes additive over units (and under-counts a
      // stage's memory by at most the layer's parameters).
      c.param_bytes =
          static_cast<int64_t>(std::llround(static_cast<double>(layer.param_bytes) * share));
      c.input_bytes = layer.input_bytes + unit.out_begin * plane_bytes;
      c.output_bytes = unit.part + 1 == unit.parts ? layer.output_bytes
                                                   : layer.input_bytes + unit.out_end * plane_bytes;
      c.continues_in_next = unit.part + 1 < unit.parts;
    }
    costs.push_back(std::move(c));
  }
  return costs;
}

std::vector<double> Chain::UnitTimes(std::span<const double> layer_ms,
                                     std::span<const double> band_fixed_ms,
                                     std::span<const double> band_row_ms) const {
  std::vector<double> times;
  times.reserve(units_.size());
  for (const Unit& unit : units_) {
    const auto layer = static_cast<size_t>(unit.layer);
    double t = layer_ms[layer];
    if (unit.parts > 1) {
      const auto& out_shape = layer_shapes_[layer + 1];
      const auto count = static_cast<double>(unit.out_end - unit.out_begin);
      if (BySample(unit.layer)) {
        // Its share of the samples through the layer's own kernel: no band, no fixed cost.
        t *= count / static_cast<double>(unit.parts);
      } else if (out_shape.size() == 3 && !band_row_ms.empty() && band_row_ms[layer] > 0) {
        // A band's positions at the band kernel's rate (band_row is per output row of cols
        // positions); the part a stage's band begins with pays the band's fixed cost (the
        // first part here, a later one in UnitEntryTimes).
        t = count * band_row_ms[layer] / static_cast<double>(out_shape[2]) +
            (unit.part == 0 && !band_fixed_ms.empty() ? band_fixed_ms[layer] : 0.0);
      } else {
        t *= count / static_cast<double>(UnitOutputs(out_shape));
      }
    }
    times.push_back(t);
  }
  return times;
}

std::vector<double> Chain::UnitEntryTimes(std::span<const double> layer_join_ms,
                                          std::span<const double> band_fixed_ms) const {
  std::vector<double> times(units_.size(), 0.0);
  for (size_t u = 0; u < units_.size(); ++u) {
    const Unit& unit = units_[u];
    if (unit.parts <= 1 || unit.part == 0) continue;
    const auto layer = static_cast<size_t>(unit.layer);
    const auto& out_shape = layer_shapes_[layer + 1];
    const auto outputs = static_cast<double>(UnitSpan(unit.layer));
    if (!layer_join_ms.empty()) {
      times[u] = layer_join_ms[layer] * static_cast<double>(unit.out_begin) / outputs;
    }
    if (out_shape.size() == 3 && !BySample(unit.layer) && !band_fixed_ms.empty()) {
      times[u] += band_fixed_ms[layer];
    }
  }
  return times;
}

Device Chain::UnitDevice(const Device& by_layer) const {
  Device d = by_layer;
  d.layer_ms_per_sample =
      UnitTimes(by_layer.layer_ms_per_sample, by_layer.layer_band_fixed_ms_per_sample,
                by_layer.layer_band_row_ms_per_sample);
  d.entry_ms_per_sample =
      UnitEntryTimes(by_layer.layer_join_ms_per_sample, by_layer.layer_band_fixed_ms_per_sample);
  if (by_layer.num_threads <= 1) {
    // On one engine thread a stage grows a carry of the samples done into the layer's output
    // in place (StageExecutor's message form): entering a cut by sample joins nothing.
    for (size_t u = 0; u < units_.size(); ++u) {
      if (BySample(units_[u].layer)) d.entry_ms_per_sample[u] = 0.0;
    }
  }
  return d;
}

int64_t Chain::SliceParamCount(int begin, int end) const {
  int64_t count = 0;
  for (int u = begin; u < end; ++u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    const int64_t params = layer_params_[static_cast<size_t>(unit.layer)];
    const auto& out_shape = layer_shapes_[static_cast<size_t>(unit.layer) + 1];
    if (unit.parts == 1) {
      count += params;
    } else if (out_shape.size() == 3) {
      // conv2d bands: the whole layer, once for each run of its bands in the slice.
      if (u == begin || units_[static_cast<size_t>(u) - 1].layer != unit.layer) count += params;
    } else {
      count += (unit.out_end - unit.out_begin) * (params / out_shape[0]);
    }
  }
  return count;
}

Result<std::vector<float>> Chain::PackSlice(std::span<const float> model_params, int begin,
                                            int end) const {
  if (begin < 0 || begin >= end || end > num_units()) {
    return Status::InvalidArgument("unit range [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") is not within [0, " +
                                   std::to_string(num_units()) + "]");
  }
  if (static_cast<int64_t>(model_params.size()) != layer_offsets_.back()) {
    return Status::InvalidArgument("the model has " + std::to_string(layer_offsets_.back()) +
                                   " parameters, got " + std::to_string(model_params.size()));
  }
  std::vector<float> packed;
  packed.reserve(static_cast<size_t>(SliceParamCount(begin, end)));
  for (int u = begin; u < end; ++u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    const int64_t offset = layer_offsets_[static_cast<size_t>(unit.layer)];
    const int64_t params = layer_params_[static_cast<size_t>(unit.layer)];
    const float* p = model_params.data() + offset;
    if (unit.parts == 1) {
      packed.insert(packed.end(), p, p + params);
      continue;
    }
    if (layer_shapes_[static_cast<size_t>(unit.layer) + 1].size() == 3) {
      if (u == begin || units_[static_cast<size_t>(u) - 1].layer != unit.layer) {
        packed.insert(packed.end(), p, p + params);
      }
      continue;
    }
    const int64_t outputs = layer_shapes_[static_cast<size_t>(unit.layer) + 1][0];
    const int64_t fan_in = params / outputs - 1;  // weights per output; then one bias
    packed.insert(packed.end(), p + unit.out_begin * fan_in, p + unit.out_end * fan_in);
    const float* bias = p + outputs * fan_in;
    packed.insert(packed.end(), bias + unit.out_begin, bias + unit.out_end);
  }
  return packed;
}

std::string Chain::Describe(int begin, int end) const {
  auto name = [&](int u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    std::string s = model_.layers(unit.layer).name();
    if (s.empty()) s = "layer" + std::to_string(unit.layer);
    if (unit.parts > 1)
      s += "[" + std::to_string(unit.part) + "/" + std::to_string(unit.parts) + "]";
    return s;
  };
  if (begin < 0 || begin >= end || end > num_units()) return "(empty)";
  return end - begin == 1 ? name(begin) : name(begin) + ".." + name(end - 1);
}

proto::ChainSpec AutoSplit(const proto::ModelSpec& model, std::span<const LayerCost> layer_costs,
                           int max_stages, int micro_batch) {
  proto::ChainSpec spec;
  if (max_stages <= 1) return spec;
  // Output shapes, to bound the parts (a chain of this model validates them again).
  std::vector<std::vector<int64_t>> shapes = {
      std::vector<int64_t>(model.input_shape().begin(), model.input_shape().end())};
  for (int i = 0; i < model.layers_size(); ++i) {
    auto layer = CreateLayer(model.layers(i), shapes.back(), i);
    if (!layer.ok()) return spec;
    shapes.push_back((*layer)->output_shape());
  }
  double total = 0;
  for (const LayerCost& c : layer_costs) total += c.forward_flops;
  if (total <= 0) return spec;
  for (int i = 0; i < model.layers_size() && i < static_cast<int>(layer_costs.size()); ++i) {
    const auto& l = model.layers(i);
    if (!Splittable(l)) continue;
    const double share = layer_costs[static_cast<size_t>(i)].forward_flops / total;
    if (share <= 1.0 / (4.0 * max_stages)) continue;
    const auto wanted = static_cast<int64_t>(std::ceil(kPartsPerStageShare * max_stages * share));
    // By sample when the micro-batch has samples enough for the grain wanted: the parts then
    // run the layer's own kernel on their samples, which add up to the whole layer; bands
    // of positions each pay a fixed cost (the rows under a band's edges, a product's set-up).
    // P = the largest divisor of the micro-batch within [wanted, 64], so that every part holds
    // the same number of samples (the planner's share of each is exact); failing that,
    // min(batch, 64) parts, whose sample counts differ by one.
    int64_t sample_parts = 0;
    if (l.has_conv2d() && micro_batch >= wanted && wanted <= kMaxLayerParts) {
      sample_parts = std::min<int64_t>(micro_batch, kMaxLayerParts);
      for (int64_t p = sample_parts; p >= wanted; --p) {
        if (micro_batch % p == 0) {
          sample_parts = p;
          break;
        }
      }
    }
    const bool by_position = l.has_conv2d() && sample_parts == 0;
    const int64_t parts =
        sample_parts > 0
            ? sample_parts
            : std::min<int64_t>({wanted,
                                 SplitOutputs(l, shapes[static_cast<size_t>(i) + 1], by_position),
                                 kMaxLayerParts});
    if (parts < 2) continue;
    auto* split = spec.add_splits();
    split->set_layer_index(static_cast<uint32_t>(i));
    split->set_parts(static_cast<uint32_t>(parts));
    split->set_by_position(by_position);
    split->set_by_sample(sample_parts > 0);
  }
  return spec;
}

// ---------------------------------------------------------------------------------------------
// StageExecutor

struct StageExecutor::Impl {
  using FloatBuffer = std::vector<float, Eigen::aligned_allocator<float>>;
  // One unit's parameters, placed so that their address modulo 64 bytes is the one they have
  // in a Model (some kernels take different code paths, and so round differently, by
  // alignment).
  struct UnitParams {
    FloatBuffer buffer;
    int64_t pad = 0;
    float* data() { return buffer.data() + pad; }
  };
  // A worker's layers (one per unit) and scratch: layers keep per-batch state, so threads
  // cannot share them.
  struct Worker {
    std::vector<std::unique_ptr<Layer>> layers;
    std::vector<Tensor> acts;
    Tensor input, carry, combined, out, out_carry;
    internal::BandScratch band;  // conv2d bands (BandConvForward)
  };
  std::vector<UnitParams> params;
  // The layer each unit runs, with the sample shape it takes; none for a conv2d band
  // (BandConvForward reads its weights from `params`) and for the later parts of a group.
  std::vector<std::optional<proto::LayerSpec>> unit_specs;
  std::vector<std::vector<int64_t>> unit_inputs;
  std::vector<Worker> workers;

  // A worker with its own layers for units [begin, end); InvalidArgument for a bad spec.
  Result<Worker> NewWorker(const Chain& chain, int begin, int end) {
    Worker w;
    for (int u = begin; u < end; ++u) {
      const auto k = static_cast<size_t>(u - begin);
      if (!unit_specs[k]) {
        w.layers.emplace_back();
        continue;
      }
      FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer,
                                CreateLayer(*unit_specs[k], unit_inputs[k], chain.unit(u).layer));
      // Inference never writes gradients; the parameter pointer doubles as the gradient one
      // so that no gradient buffer is allocated.
      float* p = params[k].data();
      layer->BindParams(p, p);
      w.layers.push_back(std::move(layer));
    }
    w.acts.resize(static_cast<size_t>(end - begin));
    return w;
  }
  // The message form's decoded input and result, kept from batch to batch: fresh buffers of
  // a few megabytes each time cost page faults worth a good part of a small slice's compute.
  Tensor msg_in, msg_carry, msg_out, msg_out_carry;
};

StageExecutor::StageExecutor(const Chain& chain, int begin, int end)
    : chain_(chain), begin_(begin), end_(end), impl_(std::make_unique<Impl>()) {}

StageExecutor::~StageExecutor() = default;

Result<std::unique_ptr<StageExecutor>> StageExecutor::Create(const Chain& chain, int begin, int end,
                                                             std::span<const float> packed) {
  if (begin < 0 || begin >= end || end > chain.num_units()) {
    return Status::InvalidArgument("unit range [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") is not within [0, " +
                                   std::to_string(chain.num_units()) + "]");
  }
  const int64_t expected = chain.SliceParamCount(begin, end);
  if (static_cast<int64_t>(packed.size()) != expected) {
    return Status::InvalidArgument("the slice " + chain.Describe(begin, end) + " has " +
                                   std::to_string(expected) + " parameters, got " +
                                   std::to_string(packed.size()));
  }
  if (const size_t bad = net::FindNonFinite(packed); bad != packed.size()) {
    return Status::InvalidArgument("slice parameter " + std::to_string(bad) + " is not finite");
  }
  std::unique_ptr<StageExecutor> ex(new StageExecutor(chain, begin, end));
  Impl& impl = *ex->impl_;
  // Consecutive parts of one cut layer within the slice run as one layer over their joint
  // outputs: one im2col and one product instead of one per part (a part is a planning unit,
  // not an execution one). Such a group's layer sits at its first unit; the others get none.
  int64_t at = 0;
  for (int u = begin; u < end;) {
    const Unit& unit = chain.unit(u);
    const auto& layer_spec = chain.model().layers(unit.layer);
    int last = u;
    while (unit.parts > 1 && last + 1 < end && chain.unit(last + 1).layer == unit.layer) ++last;
    const int64_t count = chain.SliceParamCount(u, last + 1);
    // Where the weights sit in the model's flat buffer (for their alignment).
    int64_t model_offset = chain.LayerParamOffset(unit.layer);
    Impl::UnitParams p;
    std::optional<proto::LayerSpec> spec = layer_spec;
    // A run of parts cut by sample is the whole layer (all its weights, its own kernel) run on
    // some of the samples: the last branch.
    if (unit.parts > 1 && layer_spec.has_conv2d() && !chain.BySample(unit.layer)) {
      // Output rows [out_begin(u), out_end(last)): BandConvForward, with the whole layer's
      // weights.
      p.pad = model_offset % kAlignFloats;
      p.buffer.assign(static_cast<size_t>(p.pad + count), 0.0f);
      std::copy_n(packed.data() + at, count, p.data());
      at += count;
      spec.reset();
    } else if (unit.parts > 1 && !layer_spec.has_conv2d()) {
      const int64_t outputs = chain.unit(last).out_end - unit.out_begin;
      const int64_t fan_in = count / outputs - 1;  // weights per output; then one bias
      // Weights are rows [out_begin, out_end) of the layer's [outputs, fan_in].
      model_offset += unit.out_begin * fan_in;
      p.pad = model_offset % kAlignFloats;
      p.buffer.assign(static_cast<size_t>(p.pad + count), 0.0f);
      // Packed per part: its weight rows, then its biases. Joined: all rows, then all biases.
      float* weights = p.data();
      float* biases = p.data() + outputs * fan_in;
      for (int v = u; v <= last; ++v) {
        const int64_t rows = chain.unit(v).out_end - chain.unit(v).out_begin;
        weights = std::copy_n(packed.data() + at, rows * fan_in, weights);
        biases = std::copy_n(packed.data() + at + rows * fan_in, rows, biases);
        at += rows * (fan_in + 1);
      }
      spec = DensePartSpec(layer_spec, outputs);
    } else {
      p.pad = model_offset % kAlignFloats;
      p.buffer.assign(static_cast<size_t>(p.pad + std::max<int64_t>(count, 1)), 0.0f);
      std::copy_n(packed.data() + at, count, p.data());
      at += count;
    }
    impl.params.push_back(std::move(p));
    impl.unit_specs.push_back(std::move(spec));
    impl.unit_inputs.push_back(chain.MainShape(u));
    for (int v = u + 1; v <= last; ++v) {
      impl.params.emplace_back();
      impl.unit_specs.emplace_back();
      impl.unit_inputs.emplace_back();
    }
    u = last + 1;
  }
  // Build worker 0 now so that spec problems surface here, not in Run.
  FEDSLICE_ASSIGN_OR_RETURN(Impl::Worker w, impl.NewWorker(chain, begin, end));
  impl.workers.push_back(std::move(w));
  return ex;
}

Status StageExecutor::Run(const Tensor& in, const Tensor& carry, Tensor* out, Tensor* out_carry) {
  return RunTensors(in, carry, out, out_carry, /*copy_passthrough=*/true);
}

bool StageExecutor::PassesInputThrough() const {
  return end_ < chain_.num_units() && chain_.unit(end_).part > 0 &&
         chain_.unit(end_).layer == chain_.unit(begin_).layer;
}

Status StageExecutor::RunTensors(const Tensor& in, const Tensor& carry, Tensor* out,
                                 Tensor* out_carry, bool copy_passthrough, Tensor* carry_storage) {
  const int64_t batch = in.batch();
  if (batch < 1 || batch > kMaxBatch) {
    return Status::InvalidArgument("batch of " + std::to_string(batch) +
                                   " samples; must be in [1, " + std::to_string(kMaxBatch) + "]");
  }
  if (in.shape() != WithBatch(batch, chain_.MainShape(begin_))) {
    return Status::InvalidArgument("input is " + ShapeString(in.shape()) + ", the slice " +
                                   chain_.Describe(begin_, end_) + " takes " +
                                   ShapeString(WithBatch(batch, chain_.MainShape(begin_))));
  }
  // A carry of no samples (a cut by sample whose earlier parts hold none of so small a batch)
  // is no carry.
  const int64_t carry_samples = chain_.CarrySamples(begin_, batch);
  const std::vector<int64_t> carry_shape =
      carry_samples > 0 ? chain_.CarryShape(begin_) : std::vector<int64_t>{};
  if (!carry_shape.empty() && carry.shape() != WithBatch(carry_samples, carry_shape)) {
    return Status::InvalidArgument("carry is " + ShapeString(carry.shape()) + ", the slice " +
                                   chain_.Describe(begin_, end_) + " takes " +
                                   ShapeString(WithBatch(carry_samples, carry_shape)));
  }
  Impl& impl = *impl_;
  // The same batch split as Model::Forward: min(threads, batch) workers, each running every
  // unit on its rows; one worker lets the layers parallelise internally.
  const int workers = static_cast<int>(std::min<int64_t>(NumThreads(), batch));
  while (static_cast<int>(impl.workers.size()) < std::max(workers, 1)) {
    FEDSLICE_ASSIGN_OR_RETURN(Impl::Worker w, impl.NewWorker(chain_, begin_, end_));
    impl.workers.push_back(std::move(w));
  }
  out->Resize(WithBatch(batch, chain_.MainShape(end_)));
  const int64_t out_carry_samples = chain_.CarrySamples(end_, batch);
  const std::vector<int64_t> out_carry_shape =
      out_carry_samples > 0 ? chain_.CarryShape(end_) : std::vector<int64_t>{};
  if (!out_carry_shape.empty()) {
    out_carry->Resize(WithBatch(out_carry_samples, out_carry_shape));
  } else {
    *out_carry = Tensor();
  }

  // Runs every unit on rows [n0, n0 + rows_in.batch()) of the batch; the results land in the
  // worker's out/out_carry. rows_carry holds those of the rows that are carried in (all of
  // them, but for a layer cut by sample: those below the samples done).
  auto run_rows = [&](Impl::Worker& w, const Tensor& rows_in, const Tensor* rows_carry,
                      int64_t n0) {
    const Tensor* cur = &rows_in;
    Tensor* cur_act = nullptr;  // cur when it is one of w.acts (ours to swap away), else null
    const int64_t rows = rows_in.batch();
    int u = begin_;
    while (u < end_) {
      const Unit& unit = chain_.unit(u);
      const size_t k = static_cast<size_t>(u - begin_);
      if (unit.parts == 1) {
        w.layers[k]->Forward(*cur, &w.acts[k], false);
        cur = cur_act = &w.acts[k];
        ++u;
        continue;
      }
      // Parts u..last of one cut layer, joined into one layer: they compute the layer's
      // samples (cut by sample), positions (conv2d) or features (dense) [out_begin(u),
      // out_end(last)) from its input; those go after the ones carried in.
      const auto& out_shape = chain_.MainShape(chain_.FirstUnitOfLayer(unit.layer + 1));
      const bool conv = out_shape.size() == 3;
      int last = u;
      while (last + 1 < end_ && chain_.unit(last + 1).layer == unit.layer) ++last;
      const bool ends_inside = chain_.unit(last).part + 1 < chain_.unit(last).parts;
      const size_t k0 = static_cast<size_t>(u - begin_);
      if (chain_.BySample(unit.layer)) {
        // Samples [first, done) of the batch (here, of these rows), computed by the layer's
        // own kernel straight into the layer's output after the [0, first) carried in:
        // [done] samples when the slice ends inside the layer (the carry onward), else all.
        const int64_t first = std::clamp<int64_t>(chain_.SampleBegin(u, batch) - n0, 0, rows);
        const int64_t done = std::clamp<int64_t>(chain_.SampleEnd(last, batch) - n0, 0, rows);
        const int64_t in_size = Product(chain_.MainShape(u)), out_size = Product(out_shape);
        const std::vector<int64_t> combined_shape = WithBatch(ends_inside ? done : rows, out_shape);
        if (first > 0 && carry_storage != nullptr && rows_carry == carry_storage &&
            carry_storage->capacity() >= Product(combined_shape)) {
          // The carried samples are already at the front of the carry's storage: grow it into
          // the layer's output rather than copy them (up to megabytes, in compute time).
          std::swap(w.combined, *carry_storage);
          w.combined.Resize(combined_shape);
        } else {
          w.combined.Resize(combined_shape);
          if (first > 0) std::copy_n(rows_carry->data(), first * out_size, w.combined.data());
        }
        auto* layer = static_cast<Conv2DLayer*>(w.layers[k0].get());
        layer->ForwardSamples(cur->data() + first * in_size, done - first,
                              w.combined.data() + first * out_size);
      } else {
        const int64_t done = chain_.unit(last).out_end;
        // Viewed as [samples][groups][outputs]: conv2d {c, rows, w} has groups = c and
        // outputs = rows · w positions; dense {features} has groups = 1.
        const int64_t groups = conv ? out_shape[0] : 1;
        w.combined.Resize(WithBatch(
            rows, done == UnitOutputs(out_shape) ? out_shape : chain_.DoneShape(unit.layer, done)));
        if (unit.part > 0) {
          CopyOutputs(*rows_carry, groups, unit.out_begin, &w.combined, done, 0);
        }
        if (conv) {
          BandConvForward(chain_.model().layers(unit.layer).conv2d(), impl.params[k0].data(), *cur,
                          out_shape, unit.out_begin, done, &w.combined, &w.band);
        } else {
          w.layers[k0]->Forward(*cur, &w.acts[k0], false);
          CopyOutputs(w.acts[k0], groups, done - unit.out_begin, &w.combined, done, unit.out_begin);
        }
      }
      if (ends_inside) {
        // The slice ends inside the layer: its input goes on, with the outputs done
        // so far. (Swapped, not copied: these are megabytes, and this is the stage's
        // compute time.) An input that passes through untouched is copied only when the
        // caller needs it (the message form forwards the encoded bytes instead).
        std::swap(w.out_carry, w.combined);
        if (cur_act != nullptr) {
          std::swap(w.out, *cur_act);
        } else if (copy_passthrough) {
          w.out = rows_in;
        }
        return;
      }
      std::swap(w.acts[static_cast<size_t>(last - begin_)], w.combined);
      cur = cur_act = &w.acts[static_cast<size_t>(last - begin_)];
      u = last + 1;
    }
    if (cur_act != nullptr) {
      std::swap(w.out, *cur_act);
    } else {
      w.out = rows_in;
    }
  };

  if (workers <= 1) {
    Impl::Worker& w = impl.workers[0];
    run_rows(w, in, carry_shape.empty() ? nullptr : &carry, 0);
    std::swap(*out, w.out);
    if (!out_carry_shape.empty()) std::swap(*out_carry, w.out_carry);
    return Status::Ok();
  }
#pragma omp parallel num_threads(workers)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = batch * t / nt, n1 = batch * (t + 1) / nt;
    Impl::Worker& w = impl.workers[static_cast<size_t>(t)];
    CopyRows(in, n0, n1, &w.input);
    // The carry's rows among ours: all of them, or (cut by sample) those below its samples.
    const int64_t c0 = std::min(n0, carry_samples), c1 = std::min(n1, carry_samples);
    if (c1 > c0) CopyRows(carry, c0, c1, &w.carry);
    run_rows(w, w.input, c1 > c0 ? &w.carry : nullptr, n0);
    std::copy_n(w.out.data(), w.out.size(), out->data() + n0 * w.out.sample_size());
    if (!out_carry_shape.empty() && n0 < out_carry_samples) {
      std::copy_n(w.out_carry.data(), w.out_carry.size(),
                  out_carry->data() + n0 * w.out_carry.sample_size());
    }
  }
  return Status::Ok();
}

Result<proto::ActivationBatch> StageExecutor::Run(const proto::ActivationBatch& batch,
                                                  const codec::CodecSpec& codec,
                                                  ComputeTimes* times) {
  return RunMessage(batch, nullptr, codec, times);
}

Result<proto::ActivationBatch> StageExecutor::Run(proto::ActivationBatch&& batch,
                                                  const codec::CodecSpec& codec,
                                                  ComputeTimes* times) {
  return RunMessage(batch, batch.mutable_data(), codec, times);
}

Result<proto::ActivationBatch> StageExecutor::RunMessage(const proto::ActivationBatch& batch,
                                                         proto::EncodedTensor* take_data,
                                                         const codec::CodecSpec& codec,
                                                         ComputeTimes* times) {
  if (batch.unit() != static_cast<uint32_t>(begin_)) {
    return Status::InvalidArgument("activation batch " + std::to_string(batch.batch_id()) +
                                   " enters at unit " + std::to_string(batch.unit()) +
                                   ", this stage starts at unit " + std::to_string(begin_));
  }
  if (batch.num_samples() < 1 || batch.num_samples() > kMaxBatch) {
    return Status::InvalidArgument("activation batch " + std::to_string(batch.batch_id()) +
                                   " has " + std::to_string(batch.num_samples()) +
                                   " samples; must be in [1, " + std::to_string(kMaxBatch) + "]");
  }
  const int64_t n = batch.num_samples();
  Tensor& in = impl_->msg_in;
  Tensor& carry = impl_->msg_carry;
  Status s = DecodeActivation(batch.data(), WithBatch(n, chain_.MainShape(begin_)), &in);
  if (!s.ok())
    return s.WithContext("activation batch " + std::to_string(batch.batch_id()) + " data");
  const int64_t carry_samples = chain_.CarrySamples(begin_, n);
  if (carry_samples > 0) {
    if (!batch.has_carry()) {
      return Status::InvalidArgument("activation batch " + std::to_string(batch.batch_id()) +
                                     " has no carry; unit " + std::to_string(begin_) +
                                     " is inside a cut layer and needs one");
    }
    if (chain_.BySample(chain_.unit(begin_).layer)) {
      // Room for the layer's whole output behind the samples done, which RunTensors then
      // computes in place.
      carry.Resize(WithBatch(n, chain_.CarryShape(begin_)));
    }
    s = DecodeActivation(batch.carry(), WithBatch(carry_samples, chain_.CarryShape(begin_)),
                         &carry);
    if (!s.ok())
      return s.WithContext("activation batch " + std::to_string(batch.batch_id()) + " carry");
  } else if (batch.has_carry() && batch.carry().num_values() != 0) {
    return Status::InvalidArgument(
        "activation batch " + std::to_string(batch.batch_id()) + " carries values into unit " +
        std::to_string(begin_) +
        (chain_.CarryShape(begin_).empty()
             ? ", which starts a layer"
             : ", where a batch of " + std::to_string(n) + " has no sample done yet"));
  }
  Tensor& out = impl_->msg_out;
  Tensor& out_carry = impl_->msg_out_carry;
  const auto wall_start = std::chrono::steady_clock::now();
  const double cpu_start = ThreadCpuSeconds();
  // A slice that ends inside the layer it starts in sends that layer's input on as it came:
  // the received bytes are forwarded rather than encoded again (when the codec is the same).
  const bool forward_input = PassesInputThrough() && batch.data().codec() == codec.name;
  FEDSLICE_RETURN_IF_ERROR(RunTensors(in, carry, &out, &out_carry, !forward_input,
                                      carry_samples > 0 ? &carry : nullptr));
  if (times != nullptr) {
    times->cpu_seconds = ThreadCpuSeconds() - cpu_start;
    times->wall_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  }
  proto::ActivationBatch result;
  result.set_pipeline_id(batch.pipeline_id());
  result.set_batch_id(batch.batch_id());
  result.set_unit(static_cast<uint32_t>(end_));
  result.set_num_samples(batch.num_samples());
  if (forward_input && take_data != nullptr) {
    result.mutable_data()->Swap(take_data);
  } else if (forward_input) {
    *result.mutable_data() = batch.data();
  } else {
    FEDSLICE_RETURN_IF_ERROR(EncodeActivation(out, codec, result.mutable_data()));
  }
  if (out_carry.size() > 0) {
    FEDSLICE_RETURN_IF_ERROR(EncodeActivation(out_carry, codec, result.mutable_carry()));
  }
  return result;
}

Result<StageExecutor::ComputeTimes> StageExecutor::TimeRuns(int batch, int runs,
                                                            const codec::CodecSpec& codec) {
  if (batch < 1 || batch > kMaxBatch || runs < 1) {
    return Status::InvalidArgument("timing runs need a batch in [1, " + std::to_string(kMaxBatch) +
                                   "] and runs >= 1");
  }
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  auto random_tensor = [&](const std::vector<int64_t>& shape, proto::EncodedTensor* out) {
    Tensor t(WithBatch(batch, shape));
    for (float& x : t.span()) x = uniform(rng);
    return EncodeActivation(t, *codec::ParseCodec("fp32"), out);
  };
  proto::ActivationBatch input;
  input.set_unit(static_cast<uint32_t>(begin_));
  input.set_num_samples(static_cast<uint32_t>(batch));
  FEDSLICE_RETURN_IF_ERROR(random_tensor(chain_.MainShape(begin_), input.mutable_data()));
  if (const int64_t carried = chain_.CarrySamples(begin_, batch); carried > 0) {
    Tensor t(WithBatch(carried, chain_.CarryShape(begin_)));
    for (float& x : t.span()) x = uniform(rng);
    FEDSLICE_RETURN_IF_ERROR(
        EncodeActivation(t, *codec::ParseCodec("fp32"), input.mutable_carry()));
  }
  ComputeTimes best{std::numeric_limits<double>::max(), std::numeric_limits<double>::max()};
  for (int r = 0; r < runs; ++r) {
    ComputeTimes t;
    FEDSLICE_ASSIGN_OR_RETURN(proto::ActivationBatch out, Run(input, codec, &t));
    (void)out;
    best.wall_seconds = std::min(best.wall_seconds, t.wall_seconds);
    best.cpu_seconds = std::min(best.cpu_seconds, t.cpu_seconds);
  }
  return best;
}

Status EncodeActivation(const Tensor& tensor, const codec::CodecSpec& codec,
                        proto::EncodedTensor* out) {
  if (!IsActivationCodec(codec.name)) {
    return Status::InvalidArgument("activation codec '" + codec.name + "' is not supported; use " +
                                   std::string(kActivationCodecList));
  }
  FEDSLICE_RETURN_IF_ERROR(codec::Encode(codec, tensor.span(), out));
  out->clear_shape();
  for (int64_t d : tensor.shape()) out->add_shape(d);
  return Status::Ok();
}

Status DecodeActivation(const proto::EncodedTensor& encoded, const std::vector<int64_t>& shape,
                        Tensor* out) {
  if (!IsActivationCodec(encoded.codec())) {
    return Status::InvalidArgument("activation codec '" + encoded.codec().substr(0, 64) +
                                   "' is not supported; use " + std::string(kActivationCodecList));
  }
  const std::vector<int64_t> got(encoded.shape().begin(), encoded.shape().end());
  if (got != shape) {
    return Status::InvalidArgument("tensor shape " + ShapeString(got) + ", expected " +
                                   ShapeString(shape));
  }
  const int64_t count = Product(shape);
  if (encoded.num_values() != static_cast<uint64_t>(count)) {
    return Status::InvalidArgument("tensor has " + std::to_string(encoded.num_values()) +
                                   " values, its shape " + ShapeString(shape) + " needs " +
                                   std::to_string(count));
  }
  out->Resize(shape);
  return codec::Decode(encoded, out->span());
}

namespace internal {

void BandConvForward(const proto::Conv2DSpec& conv, const float* weights, const Tensor& in,
                     const std::vector<int64_t>& out_shape, int64_t p0, int64_t p1, Tensor* out,
                     BandScratch* scratch) {
  const int64_t n = in.batch(), oc = out_shape[0];
  ConvGeometry g;
  g.c = in.dim(1);
  g.h = in.dim(2);
  g.w = in.dim(3);
  g.k = conv.kernel();
  g.pad = conv.padding();
  g.stride = conv.stride() == 0 ? 1 : conv.stride();
  g.out_h = out_shape[1];
  g.out_w = out_shape[2];
  const int64_t positions = out->sample_size() / oc;  // of `out`: p1 or more
  const int64_t ckk = g.c * g.k * g.k;
  const int64_t per_sample = p1 - p0;
  const int64_t group = std::clamp<int64_t>(kBandColumns / per_sample, 1, n);
  Eigen::Map<const RowMajorMatrix> w_map(weights, oc, ckk);
  const float* bias = weights + oc * ckk;
  RowMajorMatrix& cols = scratch->cols;
  RowMajorMatrix& product = scratch->product;
  for (int64_t s0 = 0; s0 < n; s0 += group) {
    const int64_t gs = std::min(group, n - s0);
    const int64_t columns = gs * per_sample;
    cols.resize(ckk, columns);
    // cols [ckk, gs·per_sample]: row (ch·k + ki)·k + kj, column (sample, position).
    for (int64_t j = 0; j < gs; ++j) {
      Im2ColPositions(in.data() + (s0 + j) * g.c * g.h * g.w, g, p0, p1,
                      cols.data() + j * per_sample, columns, &scratch->padded);
    }
    // [oc, gs·per_sample] = [oc, ckk] x [ckk, gs·per_sample]
    product.resize(oc, columns);
    product.noalias() = w_map * cols;
    for (int64_t j = 0; j < gs; ++j) {
      for (int64_t o = 0; o < oc; ++o) {
        const float* src = product.data() + o * columns + j * per_sample;
        float* dst = out->data() + ((s0 + j) * oc + o) * positions + p0;
        const float b = bias[o];
        for (int64_t i = 0; i < per_sample; ++i) dst[i] = src[i] + b;
      }
    }
  }
}

}  // namespace internal
}  // namespace fedslice::slicing
