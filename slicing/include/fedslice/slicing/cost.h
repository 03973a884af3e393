// Per-layer cost of a model, the input of the slicing planner (planner.h): a static part
// computed from the spec and shapes (FLOPs, parameter bytes, activation bytes), and a
// measured part (forward time of each layer on this device), which clients report in their
// DeviceProfile at registration.
//
// Static cost model (per sample, fp32):
//   forward_flops: 2 x multiply-accumulates of the weight product for dense and conv2d layers
//     (dense: 2·in·out; conv2d: 2·out_channels·in_channels·k·k·out_h·out_w), bias adds not
//     counted (< 1/(2·fan_in) of the layer); relu: 1 per element; maxpool2d: k·k comparisons
//     per output element; flatten: 0. Elementwise layers are memory-bound, so these counts
//     under-predict their time on the GEMM-FLOPS model; measured timings do not have that
//     problem.
//   param_bytes: 4 x the layer's parameter count (weights and bias).
//   input_bytes / output_bytes: 4 x the sample size entering / leaving the layer. A pipeline
//     stage that ends after layer i sends output_bytes(i) per sample onward.
//   scratch_bytes: per engine worker thread, independent of the batch: conv2d's im2col
//     buffer for one sample (4·in_channels·k·k·out_h·out_w); 0 for the other layers.
//
// Thread-safety: free functions without shared state. MeasureLayerTimes and
// MeasureDeviceProfile run the engine on its worker threads (threading.h) and must not run
// concurrently with training or inference in the same process.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fedslice/common/model.h"
#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::slicing {

struct LayerCost {
  int index = 0;
  std::string name;          // spec name, e.g. "conv2"
  std::string kind;          // "dense", "conv2d", "maxpool2d", "relu", "flatten"
  double forward_flops = 0;  // per sample
  int64_t param_bytes = 0;
  int64_t input_bytes = 0;    // per sample
  int64_t output_bytes = 0;   // per sample
  int64_t scratch_bytes = 0;  // per worker thread
  // A part of a cut layer (Chain::UnitCosts) other than the last: a stage that also holds the
  // next part runs both as one band, so this part's output is never held on its own.
  bool continues_in_next = false;
};

// The static costs of every layer of `model`, in layer order (size num_layers()).
std::vector<LayerCost> ComputeLayerCosts(const Model& model);

struct TimingOptions {
  // Samples per timed Forward; per-sample times are the batch time / batch. Use the
  // micro-batch size the pipeline will run: small batches pay per-call overheads.
  int batch = 64;
  // Rough bound on the total measuring time (warm-up included). At least one timed run of
  // every layer always happens, so a very slow device may exceed it by one pass.
  std::chrono::milliseconds budget{1000};
  // Upper bound on timed runs per layer; the fastest of those done is reported.
  int max_runs = 15;
};

// Times each layer's inference Forward on this device with the engine's current threads, as
// a stage runs them (each on the output its predecessor just wrote, into buffers kept from
// run to run): one warm-up pass over all layers, then up to max_runs timed passes while
// the budget lasts; per layer, the fastest run divided by the batch (interference from
// other work only ever adds time, so the minimum is the steadiest estimate of the device's
// own speed, and it is what slow-device emulation holds against, stage_host.h). conv2d and
// dense layers also get join_ms_per_sample: copying their whole output in the pieces a
// stage beginning inside the cut layer copies; conv2d layers band_fixed_ms_per_sample and
// band_row_ms_per_sample: a band of one output row and one of all rows timed through the
// kernel stages run bands with, fitted as fixed + rows · row. The input is fixed
// pseudo-random data.
// Returns one LayerTiming per layer (index, name, forward_ms_per_sample > 0, finite);
// backward_ms_per_sample is 0 (not measured: split inference does not run backward).
// InvalidArgument for batch < 1 or > 4096, budget <= 0 or max_runs < 1.
//
// The times are this host's. A device emulating one N times slower reports them unchanged
// with DeviceProfile.slowdown = N; the planner multiplies (planner.h, DeviceFromProfile).
Result<std::vector<proto::LayerTiming>> MeasureLayerTimes(const Model& model,
                                                          const TimingOptions& options = {});

// Sustained fp32 FLOPS of a 256x256x256 matrix product on the engine's current threads,
// measured for about `budget` after one warm-up product. Always > 0.
double MeasureGemmFlops(std::chrono::milliseconds budget = std::chrono::milliseconds(150));

struct ProfileOptions {
  std::string device_name;
  // What this device may use for FedSlice; 0 = unknown (the planner then sets no limit).
  uint64_t memory_budget_bytes = 0;
  // Emulation: the device behaves as one `slowdown` times slower than this host (>= 1). The
  // profile records the factor next to the host's measurements; it does not scale them.
  double slowdown = 1.0;
  // Link to the next pipeline stage, as configured or measured by the caller (0 = unknown).
  double link_bandwidth_bytes_per_s = 0;
  double link_latency_ms = 0;
  std::chrono::milliseconds flops_budget{150};
  // Layer timings are measured when a model is given (see MeasureLayerTimes).
  TimingOptions timing;
};

// A DeviceProfile for this host: GEMM FLOPS measured, thread count, the options' budget,
// slowdown, name and link, and per-layer timings of `model` when it is not null.
// InvalidArgument for a slowdown < 1 or not finite, negative link figures, or bad timing
// options.
Result<proto::DeviceProfile> MeasureDeviceProfile(const Model* model,
                                                  const ProfileOptions& options);

}  // namespace fedslice::slicing
