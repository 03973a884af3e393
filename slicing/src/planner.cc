#include "fedslice/slicing/planner.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace fedslice::slicing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool FiniteNonNegative(double x) { return std::isfinite(x) && x >= 0; }

std::string DeviceLabel(const Device& d, size_t index) {
  return d.name.empty() ? "device " + std::to_string(index) : "device '" + d.name + "'";
}

Status ValidateInputs(std::span<const LayerCost> costs, std::span<const Device> devices,
                      const PlanOptions& options) {
  if (costs.empty()) return Status::InvalidArgument("the model has no layers");
  if (devices.empty()) return Status::InvalidArgument("no devices to plan over");
  if (devices.size() > static_cast<size_t>(kMaxDevices)) {
    return Status::InvalidArgument(std::to_string(devices.size()) + " devices; at most " +
                                   std::to_string(kMaxDevices) + " are supported");
  }
  if (options.micro_batch < 1 || options.micro_batch > (1 << 20)) {
    return Status::InvalidArgument("micro-batch must be in [1, 1048576], got " +
                                   std::to_string(options.micro_batch));
  }
  if (options.in_flight < 0 || options.in_flight > 1024) {
    return Status::InvalidArgument("in_flight must be in [0, 1024]");
  }
  if (options.num_stages < 0 || options.num_stages > static_cast<int>(devices.size()) ||
      options.num_stages > static_cast<int>(costs.size())) {
    return Status::InvalidArgument(
        std::to_string(options.num_stages) + " stages asked for, but there are " +
        std::to_string(devices.size()) + " devices and " + std::to_string(costs.size()) +
        " layers (each stage needs a device and at least one layer)");
  }
  for (size_t k = 0; k < devices.size(); ++k) {
    const Device& d = devices[k];
    const std::string label = DeviceLabel(d, k);
    if (d.layer_ms_per_sample.size() != costs.size()) {
      return Status::InvalidArgument(label + " has times for " +
                                     std::to_string(d.layer_ms_per_sample.size()) +
                                     " layers, the model has " + std::to_string(costs.size()));
    }
    for (size_t i = 0; i < costs.size(); ++i) {
      if (!FiniteNonNegative(d.layer_ms_per_sample[i])) {
        return Status::InvalidArgument(label + ": time of layer " + std::to_string(i) +
                                       " must be finite and >= 0");
      }
    }
    if (!d.entry_ms_per_sample.empty() && d.entry_ms_per_sample.size() != costs.size()) {
      return Status::InvalidArgument(label + " has entry times for " +
                                     std::to_string(d.entry_ms_per_sample.size()) +
                                     " layers, the model has " + std::to_string(costs.size()));
    }
    for (size_t i = 0; i < d.entry_ms_per_sample.size(); ++i) {
      if (!FiniteNonNegative(d.entry_ms_per_sample[i])) {
        return Status::InvalidArgument(label + ": entry time of layer " + std::to_string(i) +
                                       " must be finite and >= 0");
      }
    }
    if (!std::isfinite(d.link_bandwidth_bytes_per_s) || d.link_bandwidth_bytes_per_s <= 0) {
      return Status::InvalidArgument(label + ": link bandwidth must be finite and > 0");
    }
    if (!FiniteNonNegative(d.link_latency_ms) || !FiniteNonNegative(d.overhead_ms) ||
        !FiniteNonNegative(d.io_ms_per_byte)) {
      return Status::InvalidArgument(label +
                                     ": link latency, overhead and I/O cost must be finite, >= 0");
    }
    if (d.num_threads < 1) return Status::InvalidArgument(label + ": num_threads must be >= 1");
  }
  return Status::Ok();
}

// Dynamic programme over states (which devices are still usable) x layers placed. A state id
// only ever grows along a transition, so visiting ids in increasing order is topological.
//   kAny:   state = bitmask of devices used; next device = any unused one.
//   kGiven: state = k, devices [0, k) are behind us; next device = any d >= k, state d + 1.
// With a fixed stage count S the kGiven state also counts the stages placed:
// id = k · (S + 1) + count (still growing along transitions); with subsets the count is the
// mask's popcount. Only end states with S stages count as plans.
class Search {
 public:
  Search(std::span<const LayerCost> costs, std::span<const Device> devices,
         const PlanOptions& options, bool subsets)
      : n_(static_cast<int>(costs.size())),
        k_(static_cast<int>(devices.size())),
        subsets_(subsets),
        stages_(options.num_stages),
        stride_(!subsets && options.num_stages > 0 ? static_cast<size_t>(options.num_stages) + 1
                                                   : 1),
        num_states_(subsets ? (size_t{1} << devices.size()) : (devices.size() + 1) * stride_) {
    // est_[(d * n + b) * n + (e - 1)]: every stage every device could run.
    est_.resize(static_cast<size_t>(k_) * static_cast<size_t>(n_) * static_cast<size_t>(n_));
    for (int d = 0; d < k_; ++d) {
      for (int b = 0; b < n_; ++b) {
        for (int e = b + 1; e <= n_; ++e) {
          est_[Index(d, b, e)] =
              EstimateStage(costs, devices[static_cast<size_t>(d)], b, e, options);
        }
      }
    }
  }

  const StageEstimate& Estimate(int d, int b, int e) const { return est_[Index(d, b, e)]; }

  // Pass 1 (latency = false): minimal bottleneck. Pass 2 (latency = true): minimal latency
  // over plans whose stages all take <= bound. Returns the best value at "all n layers
  // placed" (kInf if none) and keeps the parents for Reconstruct.
  double Run(bool latency, double bound) {
    const size_t cols = static_cast<size_t>(n_) + 1;
    value_.assign(num_states_ * cols, kInf);
    parent_.assign(num_states_ * cols, Parent{});
    value_[0] = 0;  // state 0, no layer placed
    for (size_t s = 0; s < num_states_; ++s) {
      for (int j = 0; j < n_; ++j) {
        const double v = value_[s * cols + static_cast<size_t>(j)];
        if (v == kInf) continue;
        if (stages_ > 0 && StagesIn(s) >= stages_) continue;
        for (int d = FirstDevice(s); d < k_; ++d) {
          if (subsets_ && (s >> d & 1U) != 0) continue;
          const size_t next = subsets_ ? (s | size_t{1} << d)
                                       : (static_cast<size_t>(d) + 1) * stride_ +
                                             (stride_ > 1 ? s % stride_ + 1 : 0);
          for (int e = j + 1; e <= n_; ++e) {
            const StageEstimate& est = Estimate(d, j, e);
            if (!est.fits) continue;
            double nv;
            if (latency) {
              if (est.stage_ms > bound) continue;
              nv = v + est.compute_ms + est.transfer_ms;
            } else {
              nv = std::max(v, est.stage_ms);
            }
            double& slot = value_[next * cols + static_cast<size_t>(e)];
            if (nv < slot) {
              slot = nv;
              parent_[next * cols + static_cast<size_t>(e)] = Parent{s, j, d};
            }
          }
        }
      }
    }
    best_state_ = 0;
    double best = kInf;
    for (size_t s = 0; s < num_states_; ++s) {
      const double v = value_[s * cols + static_cast<size_t>(n_)];
      if (stages_ > 0 && StagesIn(s) != stages_) continue;
      if (v < best) {
        best = v;
        best_state_ = s;
      }
    }
    return best;
  }

  // The stages of the best plan of the last Run, in pipeline order: (device, begin, end).
  std::vector<std::tuple<int, int, int>> Reconstruct() const {
    const size_t cols = static_cast<size_t>(n_) + 1;
    std::vector<std::tuple<int, int, int>> stages;
    size_t s = best_state_;
    int e = n_;
    while (e > 0) {
      const Parent& p = parent_[s * cols + static_cast<size_t>(e)];
      stages.emplace_back(p.device, p.layer, e);
      s = p.state;
      e = p.layer;
    }
    std::reverse(stages.begin(), stages.end());
    return stages;
  }

 private:
  struct Parent {
    size_t state = 0;
    int layer = 0;
    int device = -1;
  };

  size_t Index(int d, int b, int e) const {
    return (static_cast<size_t>(d) * static_cast<size_t>(n_) + static_cast<size_t>(b)) *
               static_cast<size_t>(n_) +
           static_cast<size_t>(e - 1);
  }
  int FirstDevice(size_t s) const { return subsets_ ? 0 : static_cast<int>(s / stride_); }
  // Stages placed on the way to state s (only tracked with a fixed count).
  int StagesIn(size_t s) const {
    return subsets_ ? std::popcount(s) : static_cast<int>(s % stride_);
  }

  int n_, k_;
  bool subsets_;
  int stages_;
  size_t stride_;
  size_t num_states_;
  std::vector<StageEstimate> est_;
  std::vector<double> value_;
  std::vector<Parent> parent_;
  size_t best_state_ = 0;
};

// Why no split fits: the first layer no device can hold alone, or the whole.
Status Infeasible(std::span<const LayerCost> costs, std::span<const Device> devices,
                  const PlanOptions& options, const Search& search) {
  const int n = static_cast<int>(costs.size());
  size_t largest = 0;
  for (size_t d = 1; d < devices.size(); ++d) {
    if (devices[d].memory_budget_bytes > devices[largest].memory_budget_bytes) largest = d;
  }
  const std::string budget = FormatBytes(static_cast<double>(devices[largest].memory_budget_bytes));
  for (int i = 0; i < n; ++i) {
    bool fits = false;
    for (size_t d = 0; d < devices.size() && !fits; ++d) {
      fits = search.Estimate(static_cast<int>(d), i, i + 1).fits;
    }
    if (fits) continue;
    const LayerCost& c = costs[static_cast<size_t>(i)];
    const StageEstimate& on_largest = search.Estimate(static_cast<int>(largest), i, i + 1);
    return Status::ResourceExhausted(
        "layer " + std::to_string(i) + " (" + c.kind + " '" + c.name + "', " +
        FormatBytes(static_cast<double>(c.param_bytes)) + " of parameters; " +
        FormatBytes(static_cast<double>(on_largest.memory_bytes)) +
        " with the activations of a micro-batch of " + std::to_string(options.micro_batch) +
        ") fits no device: the largest budget is " + budget + " (" +
        DeviceLabel(devices[largest], largest) + ")");
  }
  double params = 0, budgets = 0;
  for (const LayerCost& c : costs) params += static_cast<double>(c.param_bytes);
  for (const Device& d : devices) budgets += static_cast<double>(d.memory_budget_bytes);
  return Status::ResourceExhausted(
      "every layer fits some device alone, but no split of the " + std::to_string(n) +
      " layers over the " + std::to_string(devices.size()) +
      " devices fits their memory budgets (" + FormatBytes(params) +
      " of parameters plus activations, budgets " + FormatBytes(budgets) +
      " in total): add devices, raise budgets or lower the micro-batch");
}

}  // namespace

Result<Device> DeviceFromProfile(const proto::DeviceProfile& profile,
                                 std::span<const LayerCost> costs, const LinkDefaults& link) {
  Device d;
  d.name = profile.device_name();
  const std::string label = d.name.empty() ? "device" : "device '" + d.name + "'";
  const double slowdown = profile.slowdown() == 0 ? 1.0 : profile.slowdown();
  if (!std::isfinite(slowdown) || slowdown < 1.0) {
    return Status::InvalidArgument(label + ": slowdown must be a finite factor >= 1");
  }
  const size_t n = costs.size();
  d.layer_ms_per_sample.assign(n, 0.0);
  if (profile.layer_timings_size() > 0) {
    d.layer_join_ms_per_sample.assign(n, 0.0);
    d.layer_band_fixed_ms_per_sample.assign(n, 0.0);
    d.layer_band_row_ms_per_sample.assign(n, 0.0);
    if (static_cast<size_t>(profile.layer_timings_size()) != n) {
      return Status::InvalidArgument(label + " reports timings of " +
                                     std::to_string(profile.layer_timings_size()) +
                                     " layers, the model has " + std::to_string(n));
    }
    std::vector<bool> seen(n, false);
    for (const proto::LayerTiming& t : profile.layer_timings()) {
      const size_t i = t.layer_index();
      if (i >= n || seen[i]) {
        return Status::InvalidArgument(label + ": bad or repeated layer_index " +
                                       std::to_string(i) + " in its layer timings");
      }
      if (!t.layer_name().empty() && t.layer_name() != costs[i].name) {
        return Status::InvalidArgument(label + " timed layer " + std::to_string(i) + " as '" +
                                       t.layer_name() + "', the model's layer is '" +
                                       costs[i].name + "' (timings of another model?)");
      }
      if (!FiniteNonNegative(t.forward_ms_per_sample())) {
        return Status::InvalidArgument(label + ": forward time of layer " + std::to_string(i) +
                                       " must be finite and >= 0");
      }
      if (!FiniteNonNegative(t.join_ms_per_sample()) ||
          !FiniteNonNegative(t.band_fixed_ms_per_sample()) ||
          !FiniteNonNegative(t.band_row_ms_per_sample())) {
        return Status::InvalidArgument(label + ": join and band times of layer " +
                                       std::to_string(i) + " must be finite and >= 0");
      }
      seen[i] = true;
      d.layer_ms_per_sample[i] = t.forward_ms_per_sample() * slowdown;
      d.layer_join_ms_per_sample[i] = t.join_ms_per_sample() * slowdown;
      d.layer_band_fixed_ms_per_sample[i] = t.band_fixed_ms_per_sample() * slowdown;
      d.layer_band_row_ms_per_sample[i] = t.band_row_ms_per_sample() * slowdown;
    }
  } else {
    if (!std::isfinite(profile.flops()) || profile.flops() <= 0) {
      return Status::InvalidArgument(label + " reports neither layer timings nor flops > 0");
    }
    for (size_t i = 0; i < n; ++i) {
      d.layer_ms_per_sample[i] = 1000.0 * costs[i].forward_flops * slowdown / profile.flops();
    }
  }
  d.memory_budget_bytes = profile.memory_budget_bytes();
  const double bw = profile.link_bandwidth_bytes_per_s();
  const double lat = profile.link_latency_ms();
  if (!FiniteNonNegative(bw) || !FiniteNonNegative(lat)) {
    return Status::InvalidArgument(label + ": link bandwidth and latency must be finite, >= 0");
  }
  d.link_bandwidth_bytes_per_s = bw > 0 ? bw : link.bandwidth_bytes_per_s;
  d.link_latency_ms = lat > 0 ? lat : link.latency_ms;
  d.num_threads = std::max(1, static_cast<int>(profile.num_threads()));
  if (!FiniteNonNegative(profile.activation_io_ms_per_mb())) {
    return Status::InvalidArgument(label + ": activation_io_ms_per_mb must be finite and >= 0");
  }
  if (profile.io_shares_compute()) {
    d.io_ms_per_byte = profile.activation_io_ms_per_mb() * slowdown / 1e6;
  }
  return d;
}

StageEstimate EstimateStage(std::span<const LayerCost> costs, const Device& device, int begin,
                            int end, const PlanOptions& options) {
  StageEstimate s;
  const auto m = static_cast<int64_t>(options.micro_batch);
  double ms_per_sample = 0;
  int64_t params = 0, outputs = 0, scratch = 0;
  for (int i = begin; i < end; ++i) {
    const LayerCost& c = costs[static_cast<size_t>(i)];
    ms_per_sample += device.layer_ms_per_sample[static_cast<size_t>(i)];
    params += c.param_bytes;
    if (!c.continues_in_next || i + 1 == end) outputs += c.output_bytes;
    scratch = std::max(scratch, c.scratch_bytes);
  }
  const int64_t in_bytes = costs[static_cast<size_t>(begin)].input_bytes;
  const int64_t out_bytes = costs[static_cast<size_t>(end - 1)].output_bytes;
  if (!device.entry_ms_per_sample.empty()) {
    ms_per_sample += device.entry_ms_per_sample[static_cast<size_t>(begin)];
  }
  ms_per_sample += device.io_ms_per_byte * static_cast<double>(in_bytes + out_bytes);
  s.compute_ms = device.overhead_ms + static_cast<double>(m) * ms_per_sample;
  s.bytes_sent = m * out_bytes;
  s.transfer_ms = device.link_latency_ms +
                  1000.0 * static_cast<double>(s.bytes_sent) / device.link_bandwidth_bytes_per_s;
  s.stage_ms = std::max(s.compute_ms, s.transfer_ms);
  s.memory_bytes =
      static_cast<uint64_t>(params + int64_t{device.num_threads} * scratch +
                            m * (outputs + int64_t{options.in_flight} * (in_bytes + out_bytes)));
  s.fits = device.memory_budget_bytes == 0 || s.memory_bytes <= device.memory_budget_bytes;
  return s;
}

Result<Plan> PlanPipeline(std::span<const LayerCost> costs, std::span<const Device> devices,
                          const PlanOptions& options) {
  FEDSLICE_RETURN_IF_ERROR(ValidateInputs(costs, devices, options));
  const double n = static_cast<double>(costs.size());
  const double k = static_cast<double>(devices.size());
  // The subset search costs ~2^K · K · n² steps; beyond ~1e8 it would take seconds.
  const bool subsets = options.order == DeviceOrder::kAny &&
                       devices.size() <= static_cast<size_t>(kMaxOrderSearchDevices) &&
                       std::ldexp(k * n * n, static_cast<int>(devices.size())) <= 1e8;
  Search search(costs, devices, options, subsets);
  const double bottleneck = search.Run(/*latency=*/false, 0);
  if (bottleneck == kInf) {
    if (options.num_stages > 0) {
      PlanOptions free = options;
      free.num_stages = 0;
      Search any(costs, devices, free, subsets);
      if (any.Run(/*latency=*/false, 0) != kInf) {
        return Status::ResourceExhausted("no split into " + std::to_string(options.num_stages) +
                                         " stages fits the devices' memory budgets; fewer "
                                         "stages would");
      }
      return Infeasible(costs, devices, free, any);
    }
    return Infeasible(costs, devices, options, search);
  }
  const double latency = search.Run(/*latency=*/true, bottleneck);
  if (latency == kInf) return Status::Internal("planner: no plan within its own bottleneck");

  Plan plan;
  plan.micro_batch = options.micro_batch;
  plan.order_searched = subsets;
  for (const auto& [d, b, e] : search.Reconstruct()) {
    PlannedStage stage;
    stage.device = d;
    stage.device_name = devices[static_cast<size_t>(d)].name;
    stage.begin = b;
    stage.end = e;
    stage.estimate = search.Estimate(d, b, e);
    plan.bottleneck_ms = std::max(plan.bottleneck_ms, stage.estimate.stage_ms);
    plan.latency_ms += stage.estimate.compute_ms + stage.estimate.transfer_ms;
    plan.stages.push_back(std::move(stage));
  }
  plan.throughput_samples_per_s =
      plan.bottleneck_ms > 0 ? 1000.0 * options.micro_batch / plan.bottleneck_ms : kInf;
  return plan;
}

std::string FormatBytes(double bytes) {
  char buf[32];
  if (bytes < 1024) {
    std::snprintf(buf, sizeof buf, "%.0f B", bytes);
  } else if (bytes < 1024.0 * 1024) {
    std::snprintf(buf, sizeof buf, "%.1f KB", bytes / 1024);
  } else if (bytes < 1024.0 * 1024 * 1024) {
    std::snprintf(buf, sizeof buf, "%.1f MB", bytes / (1024.0 * 1024));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f GB", bytes / (1024.0 * 1024 * 1024));
  }
  return buf;
}

std::string FormatPlan(const Plan& plan, std::span<const LayerCost> costs) {
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof line, "%-5s  %-28s  %-12s  %10s  %11s  %11s  %9s  %9s\n", "slice",
                "layers", "device", "compute ms", "sent onward", "transfer ms", "stage ms",
                "memory");
  out << line;
  size_t bottleneck_slice = 0;
  for (size_t s = 0; s < plan.stages.size(); ++s) {
    const PlannedStage& st = plan.stages[s];
    if (st.estimate.stage_ms == plan.bottleneck_ms && bottleneck_slice == 0) {
      bottleneck_slice = s + 1;
    }
    std::string layers = std::to_string(st.begin) + "-" + std::to_string(st.end - 1);
    if (st.end <= static_cast<int>(costs.size()) && st.begin < st.end) {
      const std::string& first = costs[static_cast<size_t>(st.begin)].name;
      const std::string& last = costs[static_cast<size_t>(st.end - 1)].name;
      layers.append(" (").append(first);
      if (st.end - st.begin > 1) layers.append("..").append(last);
      layers.append(")");
    }
    // Not `"#" + to_string(...)`: GCC 12 reports a false -Wrestrict on it (GCC bug 105329).
    std::string device = st.device_name;
    if (device.empty()) device.append("#").append(std::to_string(st.device));
    std::snprintf(line, sizeof line, "%5zu  %-28s  %-12s  %10.3f  %11s  %11.3f  %9.3f  %9s\n",
                  s + 1, layers.c_str(), device.c_str(), st.estimate.compute_ms,
                  FormatBytes(static_cast<double>(st.estimate.bytes_sent)).c_str(),
                  st.estimate.transfer_ms, st.estimate.stage_ms,
                  FormatBytes(static_cast<double>(st.estimate.memory_bytes)).c_str());
    out << line;
  }
  std::snprintf(line, sizeof line,
                "micro-batch %d: bottleneck %.3f ms (slice %zu), throughput %.1f samples/s, "
                "latency %.3f ms%s\n",
                plan.micro_batch, plan.bottleneck_ms, bottleneck_slice,
                plan.throughput_samples_per_s, plan.latency_ms,
                plan.order_searched ? "" : " (devices in the given order)");
  out << line;
  return out.str();
}

}  // namespace fedslice::slicing
