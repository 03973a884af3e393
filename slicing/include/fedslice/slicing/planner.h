// Pipeline planner: splits a model's n layers into contiguous slices, one per device, over a
// chain of devices, to maximise pipeline throughput within each device's memory budget.
//
// Cost model of one stage (device d running layers [b, e) on micro-batches of m samples):
//   compute_ms  = overhead_ms(d) + m · (entry_d(b) + Σ_{i in [b,e)} t_d(i))
//                 + m · io_d · (input_bytes(b) + output_bytes(e - 1)), where t_d(i) is
//                 d's forward time per sample of layer i (DeviceFromProfile: measured
//                 timings × slowdown, else forward_flops(i) / (flops / slowdown)),
//                 entry_d(b) what beginning at b costs (joining the outputs carried into a
//                 cut layer, Chain::UnitEntryTimes; 0 when not given) and io_d the CPU per
//                 byte received or sent when d's network work shares its CPU with its
//                 layers (0 otherwise: then it overlaps with computing, as below).
//   bytes_sent  = m · output_bytes(e - 1): the activations sent to the next stage; the last
//                 stage sends the logits back to the requester the same way.
//   transfer_ms = latency_ms(d) + 1000 · bytes_sent / bandwidth(d), over d's link onward.
//   stage_ms    = max(compute_ms, transfer_ms): the runtime overlaps sending micro-batch j
//                 with computing micro-batch j + 1, so in steady state a stage delivers one
//                 micro-batch per stage_ms.
//   memory      = param_bytes([b,e)) + threads(d) · max scratch_bytes in [b,e)
//                 + m · (Σ_{i in [b,e)} output_bytes(i)        -- the engine keeps every
//                                                                  layer's output
//                        + in_flight · (input_bytes(b) + output_bytes(e-1)))  -- micro-batches
//                                          received and waiting, or computed and being sent
//                 must be <= memory_budget_bytes(d) (0 = no limit).
// Objectives, in order: (1) the bottleneck max_s stage_ms(s) is minimal (throughput =
// m / bottleneck samples/s); (2) among those plans, the latency of one micro-batch through
// the empty pipeline, Σ_s (compute_ms(s) + transfer_ms(s)), is minimal.
//
// Search: exact for chains. Stage costs do not depend on the neighbouring devices, so a
// state is (layers placed so far, set of devices used). With DeviceOrder::kAny the planner
// chooses which devices to use and in which order (dynamic programming over device subsets,
// O(2^K · K · n²)); that is done for K <= kMaxOrderSearchDevices, above which devices keep
// the given order (O(K · n²)), each used for one slice or skipped. Unused devices are
// allowed: a device that would only add transfer time is left out. The two objectives are
// solved in two passes (minimal bottleneck B*, then minimal latency with every stage <= B*),
// since lexicographic (max, sum) does not decompose over prefixes in one pass.
//
// Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fedslice/common/status.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/wire.pb.h"

namespace fedslice::slicing {

// One candidate device as the planner sees it.
struct Device {
  std::string name;
  // Forward time per sample of every layer of the model, in ms (size n, each finite, >= 0).
  std::vector<double> layer_ms_per_sample;
  // Time per sample, in ms, that a stage beginning at layer (unit) i pays before running it
  // (size n, or empty for none): joining the outputs carried into a cut layer.
  std::vector<double> entry_ms_per_sample;
  // Not read by the planner: the profile's per-layer join times (LayerTiming.
  // join_ms_per_sample × slowdown), from which Chain::UnitEntryTimes makes the entry times
  // of a chain's units. Whole layers have none.
  std::vector<double> layer_join_ms_per_sample;
  // Not read by the planner either: per-layer band costs of conv2d layers (LayerTiming.
  // band_fixed_ms_per_sample and band_row_ms_per_sample × slowdown; 0 = not measured), from
  // which Chain::UnitTimes / UnitEntryTimes cost the parts of a cut layer.
  std::vector<double> layer_band_fixed_ms_per_sample;
  std::vector<double> layer_band_row_ms_per_sample;
  uint64_t memory_budget_bytes = 0;         // 0 = no limit
  double link_bandwidth_bytes_per_s = 1e9;  // to the next stage, > 0
  double link_latency_ms = 0;               // to the next stage, >= 0
  double overhead_ms = 0;                   // fixed cost per micro-batch, >= 0
  // CPU time per byte received or sent that the device's compute pays (its network work
  // shares the CPU with its layers; DeviceProfile.io_shares_compute), ms; 0 = overlapped.
  double io_ms_per_byte = 0;
  int num_threads = 1;                      // engine threads: copies of per-thread scratch
};

// Link figures used when a profile leaves them unset (0).
struct LinkDefaults {
  double bandwidth_bytes_per_s = 1e9;
  double latency_ms = 0.2;
};

// The planner's view of a device from the profile it reported: with layer timings (one per
// layer of `costs`, indices 0..n-1 in any order, names matching when given, finite and
// >= 0), t(i) = forward_ms_per_sample × slowdown (and likewise × slowdown the layer's join
// and band times, layer_join_ms_per_sample and layer_band_*_ms_per_sample);
// otherwise t(i) = 1000 · forward_flops(i) · slowdown / flops. slowdown 0 (unset) means 1.
// io_ms_per_byte = activation_io_ms_per_mb · slowdown / 10^6 when io_shares_compute, else 0.
// Unset link figures take `link`. InvalidArgument naming the device and the field for
// timings of another model, flops <= 0 without timings, slowdown < 1, NaN or negative values.
Result<Device> DeviceFromProfile(const proto::DeviceProfile& profile,
                                 std::span<const LayerCost> costs, const LinkDefaults& link = {});

enum class DeviceOrder {
  kAny,    // the planner picks devices and their order (given order above the limit)
  kGiven,  // stages follow the devices' order; a device may be skipped
};

inline constexpr int kMaxOrderSearchDevices = 12;
inline constexpr int kMaxDevices = 64;

struct PlanOptions {
  int micro_batch = 64;  // samples per micro-batch, >= 1
  DeviceOrder order = DeviceOrder::kAny;
  // Micro-batches a stage holds besides the one it computes (see the memory model); the
  // pipeline runtime must not buffer more than this per stage and direction.
  int in_flight = 2;
  // Exactly this many stages (1 <= num_stages <= number of devices); 0 = as many as give the
  // best plan. With a fixed count every stage holds at least one layer. InvalidArgument when
  // there are fewer devices (or layers) than num_stages; ResourceExhausted when no split into
  // that many stages fits the memory budgets.
  int num_stages = 0;
};

// Cost of one stage under the model above.
struct StageEstimate {
  double compute_ms = 0;
  int64_t bytes_sent = 0;
  double transfer_ms = 0;
  double stage_ms = 0;  // max(compute_ms, transfer_ms)
  uint64_t memory_bytes = 0;
  bool fits = false;  // memory_bytes <= budget (or no budget)
};
StageEstimate EstimateStage(std::span<const LayerCost> costs, const Device& device, int begin,
                            int end, const PlanOptions& options);

struct PlannedStage {
  int device = 0;  // index into the devices given to PlanPipeline
  std::string device_name;
  int begin = 0;  // layers [begin, end)
  int end = 0;
  StageEstimate estimate;
};

struct Plan {
  int micro_batch = 0;
  bool order_searched = false;          // the planner chose the devices' order
  std::vector<PlannedStage> stages;     // in pipeline order, covering [0, n)
  double bottleneck_ms = 0;             // max stage_ms
  double throughput_samples_per_s = 0;  // micro_batch / bottleneck
  double latency_ms = 0;                // Σ (compute_ms + transfer_ms)
};

// The optimal plan (see above) of the layers `costs` describes over `devices`.
// InvalidArgument for no layers, no or more than kMaxDevices devices, a device whose
// layer_ms_per_sample does not have one finite time >= 0 per layer, bad link or options.
// ResourceExhausted when no split fits the memory budgets, naming why: the first layer that
// fits no device alone (its parameter and activation bytes against the largest budget), or
// that the layers fit one at a time but not together.
Result<Plan> PlanPipeline(std::span<const LayerCost> costs, std::span<const Device> devices,
                          const PlanOptions& options);

// The plan as a table: one row per slice (layers with names, device, compute ms, bytes sent
// onward, transfer ms, stage ms, memory), then the bottleneck, throughput and latency.
std::string FormatPlan(const Plan& plan, std::span<const LayerCost> costs);

// "6.4 MB", "512 KB", "12 B" (powers of 1024 named KB/MB/GB, one decimal).
std::string FormatBytes(double bytes);

}  // namespace fedslice::slicing
