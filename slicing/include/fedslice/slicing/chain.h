// The chain a pipeline is cut from, and the executor that runs one slice of it.
//
// Units. The planner places contiguous ranges of *units*. Every layer of the model is one unit,
// except the layers a proto::ChainSpec splits: a conv2d layer cut into P parts by output
// POSITION (rows x cols, row-major: a band of positions of every channel; or, without
// LayerSplit.by_position, by whole rows) and a dense layer cut by output feature become P
// consecutive units, part j computing outputs [out_begin, out_end) from the layer's input
// (conv2d: counted in positions either way). Why: one layer can hold most of a model's work
// (the cnn's conv2 is ~80% of its FLOPs), so whole-layer slices cannot balance K stages;
// parts of it can. Positions rather than channels for conv2d: a band reads only the input
// rows under it, so the parts' im2col work adds up to the layer's (cutting by channel repeats
// the whole im2col in every part: measured +37% of the cnn's compute for 2 stages, against
// +7% with bands; bench/stage_bench). Positions rather than rows: a row of the cnn's conv2 is
// 1/14 of it, ~4-6 ms of a 4x-slower device against stages of ~25 ms, too coarse to balance
// 3-4 stages.
//
// A conv2d layer can also be cut by SAMPLE (LayerSplit.by_sample): part j of P computes the
// whole layer for samples [n·j/P, n·(j+1)/P) of a micro-batch of n, with the layer's own
// kernel (Conv2DLayer::ForwardSamples). Why, and why AutoSplit prefers it when the
// micro-batch has samples enough: the layer computes one sample at a time anyway, so the parts
// add up to exactly the layer's work and results (bit-identical to one process), where each
// band of positions pays a fixed cost (the input rows under its edges, a product's set-up) and
// the band kernel ran slower than the layer's own: with bands the cnn's 2-4 stages did 7-9%
// more work than one process, by sample 0-1% (bench/stage_bench), and the 4-stage pipeline
// of emulated devices went from 3.33x to 3.6x one device (bench/pipeline_bench.sh).
//
// What crosses a boundary before unit u (the "activation" a stage receives):
//   main  [batch] + MainShape(u): the input of u's layer (for u = num_units(): the logits),
//   carry [batch] + CarryShape(u): when u is part j > 0 of a split layer, the outputs of parts
//         0..j-1: positions [0, out_begin(u)) of every channel of a conv2d ({c, positions};
//         {c, rows, cols} when it is cut by whole rows), features [0, out_begin(u)) of a
//         dense layer; otherwise empty. Cut by sample, the carry is [CarrySamples(u, batch)]
//         + the layer's output shape: the samples done so far (none, so no carry, when the
//         earlier parts hold no sample of a small batch).
// A stage that ends inside a split layer so sends the layer's input onward with the rows /
// features computed so far; the stage that computes its last part joins them.
//
// Slice parameters ("packed"): the parameters of units [b, e) in unit order; a whole layer's
// are its parameters as in the model's flat buffer (layers.h layout); a run of bands of a
// conv2d needs all of that layer's parameters, packed once; a dense part's are the rows
// [out_begin, out_end) of the layer's weights followed by the same range of its bias (the
// layout of a dense layer with out_end - out_begin outputs). So a stage receives only its
// slice's parameters, never the whole model's.
//
// Thread-safety: Chain is immutable after Create (share it freely). A StageExecutor is not
// thread-safe (scratch buffers): one thread runs it at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fedslice/common/codec.h"
#include "fedslice/common/layers.h"
#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"
#include "fedslice/model.pb.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/planner.h"
#include "fedslice/wire.pb.h"

namespace fedslice::slicing {

struct Unit {
  int layer = 0;  // model layer index
  int part = 0;   // 0 .. parts-1
  int parts = 1;  // 1: the whole layer
  // Output positions (conv2d: row-major over rows x cols) or features (dense) this unit
  // computes; a whole layer of another kind has [0, 0).
  int64_t out_begin = 0;
  int64_t out_end = 0;
};

// Most parts a layer may be cut into (keeps the chain, and the planner's search, small).
inline constexpr int kMaxLayerParts = 64;
// AutoSplit cuts a layer holding a share s of the model's FLOPs into about
// kPartsPerStageShare · K · s parts for K stages.
inline constexpr double kPartsPerStageShare = 16.0;

class Chain {
 public:
  // Validates `model` (as Model::Create does) and `spec`: layer indices strictly increasing
  // and in range, only conv2d and dense layers, by_position only for conv2d,
  // 2 <= parts <= min(kMaxLayerParts, what is cut).
  // InvalidArgument names the offending entry.
  static Result<Chain> Create(const proto::ModelSpec& model, const proto::ChainSpec& spec);

  const proto::ModelSpec& model() const { return model_; }
  const proto::ChainSpec& spec() const { return spec_; }
  int num_layers() const { return static_cast<int>(layer_shapes_.size()) - 1; }
  int num_units() const { return static_cast<int>(units_.size()); }
  const Unit& unit(int u) const { return units_[static_cast<size_t>(u)]; }
  // Offset of layer i's parameters in the model's flat buffer (i = num_layers() gives the
  // model's parameter count).
  int64_t LayerParamOffset(int layer) const { return layer_offsets_[static_cast<size_t>(layer)]; }
  // First unit of layer i (i = num_layers() gives num_units()).
  int FirstUnitOfLayer(int layer) const { return first_unit_[static_cast<size_t>(layer)]; }

  // Sample shapes at the boundary before unit u, 0 <= u <= num_units() (see the file comment).
  // CarryShape is empty when nothing is carried.
  const std::vector<int64_t>& MainShape(int u) const;
  std::vector<int64_t> CarryShape(int u) const;
  // Samples of the carry at boundary u for a micro-batch of `batch`: 0 when nothing is
  // carried (CarryShape empty, or a cut by sample whose earlier parts hold no sample of so
  // small a batch), the samples done so far for a cut by sample, else `batch`.
  int64_t CarrySamples(int u, int64_t batch) const;
  // A part of a layer cut by sample computes samples [SampleBegin, SampleEnd) of a micro-batch
  // of `batch`: batch · out_begin / parts to batch · out_end / parts (rounded down).
  int64_t SampleBegin(int u, int64_t batch) const;
  int64_t SampleEnd(int u, int64_t batch) const;
  // Whether `layer` is cut by sample (LayerSplit.by_sample).
  bool BySample(int layer) const;
  // Sample shape of the first `done` outputs (0 < done < all) of cut layer `layer`, as
  // CarryShape gives them (not for a cut by sample).
  std::vector<int64_t> DoneShape(int layer, int64_t done) const;

  // The planner's costs per unit, from the model's per-layer costs (ComputeLayerCosts): a part
  // gets its share of the layer's FLOPs and parameters; input_bytes counts main + carry
  // entering it and output_bytes what leaves it (main + carry, or the layer's output after
  // the last part). Names are "conv2[2/7]" for parts.
  std::vector<LayerCost> UnitCosts(std::span<const LayerCost> layer_costs) const;
  // Per-unit times from per-layer times (size num_layers()): a part takes its share. With band
  // costs (size num_layers(), or empty; 0 = not measured), a part of a cut conv2d layer of
  // `cols` output columns takes positions × band_row / cols, and part 0 also band_fixed (a
  // stage's band begins there).
  std::vector<double> UnitTimes(std::span<const double> layer_ms,
                                std::span<const double> band_fixed_ms = {},
                                std::span<const double> band_row_ms = {}) const;
  // Per-unit entry times (planner.h, Device::entry_ms_per_sample) from per-layer join times
  // (size num_layers(), or empty: then all 0): a stage beginning at part j > 0 joins the
  // outputs of parts 0..j-1 and pays that share of its layer's join, plus its band's fixed
  // cost when `band_fixed_ms` is given (conv2d); elsewhere 0.
  std::vector<double> UnitEntryTimes(std::span<const double> layer_join_ms,
                                     std::span<const double> band_fixed_ms = {}) const;
  // `by_layer` (DeviceFromProfile) with its times mapped onto this chain's units, as
  // PlanPipeline over UnitCosts needs them: UnitTimes and UnitEntryTimes of its per-layer
  // forward, join and band times; a device of one engine thread enters a cut by sample at no
  // cost (its stage grows the carry in place instead of joining it).
  Device UnitDevice(const Device& by_layer) const;

  // Number of packed parameters of units [b, e) (0 <= b < e <= num_units()).
  int64_t SliceParamCount(int begin, int end) const;
  // The packed parameters of units [b, e) taken from the model's flat buffer.
  // InvalidArgument for a bad range or model_params.size() != the model's parameter count.
  Result<std::vector<float>> PackSlice(std::span<const float> model_params, int begin,
                                       int end) const;
  // "conv1..relu2", "conv2[3..6/7]..fc2": layer names of units [b, e), for plans and logs.
  std::string Describe(int begin, int end) const;

 private:
  Chain() = default;
  proto::ModelSpec model_;
  proto::ChainSpec spec_;
  std::vector<Unit> units_;
  std::vector<int> first_unit_;                     // per layer, plus num_units()
  std::vector<std::vector<int64_t>> layer_shapes_;  // input shape of each layer, plus output
  std::vector<std::vector<int64_t>> unit_main_;     // MainShape per boundary
  std::vector<int64_t> layer_offsets_;              // into the model's flat buffer
  std::vector<int64_t> layer_params_;               // per layer
  std::vector<bool> by_position_;                   // per layer: a conv2d cut by position
  std::vector<bool> by_sample_;                     // per layer: a conv2d cut by sample
  // What the units of cut layer `layer` count out_begin / out_end in: parts (by sample),
  // positions (conv2d) or features (dense).
  int64_t UnitSpan(int layer) const;
};

// Which layers to cut for a pipeline of up to `max_stages` stages: a conv2d or dense layer
// holding more than 1/(4·max_stages) of the model's forward FLOPs is cut into
// ceil(kPartsPerStageShare·max_stages·share) parts (conv2d by position; at most its output
// positions / features and kMaxLayerParts). Given the `micro_batch` (> 0) and at least that
// many samples in it, a conv2d is cut by sample instead, into the largest divisor of the
// micro-batch in [that many, kMaxLayerParts] (equal parts), or else min(micro_batch,
// kMaxLayerParts) parts. Either way stage boundaries can fall within
// ~1/(16·max_stages) of the ideal balance. Finer is nearly free (a stage runs its
// consecutive parts as one band); coarser was not: with 2·K parts the cnn's 3- and 4-stage
// plans were 14% off balance, with 4·K its 2-stage plan 13% (7 bands of conv2, each ~9% of
// the model), and with its 14 rows as the finest grain the 4-stage plan left its first stage
// ~20% short of the others. max_stages <= 1: no cuts.
proto::ChainSpec AutoSplit(const proto::ModelSpec& model, std::span<const LayerCost> layer_costs,
                           int max_stages, int micro_batch = 0);

// Runs units [begin, end) of a chain with the slice's packed parameters. Whole-layer runs
// split the batch over the engine's worker threads exactly as Model::Forward does (and each
// layer's weights keep the alignment they have in a Model), so a plan without cut layers
// gives logits bit-identical to single-process inference with the same batch size, and so
// does one with conv2d layers cut by sample (each sample through the layer's own kernel, on
// the worker Model::Forward gives it); parts by position, row or feature are separate
// products, which can round differently (|Δ| ~1e-7). Consecutive parts of one layer within
// the slice run as one band / one product / one range of samples.
class StageExecutor {
 public:
  // `packed` must hold Chain::SliceParamCount(begin, end) finite values (copied).
  // InvalidArgument for a bad range, wrong size or a non-finite value (index named).
  static Result<std::unique_ptr<StageExecutor>> Create(const Chain& chain, int begin, int end,
                                                       std::span<const float> packed);
  ~StageExecutor();
  StageExecutor(const StageExecutor&) = delete;
  StageExecutor& operator=(const StageExecutor&) = delete;

  int unit_begin() const { return begin_; }
  int unit_end() const { return end_; }
  const Chain& chain() const { return chain_; }

  // in: [batch] + MainShape(begin), carry: [batch] + CarryShape(begin) (ignored, may be
  // empty, when that shape is empty); 1 <= batch <= kMaxBatch. Writes out: [batch] +
  // MainShape(end) and out_carry: [batch] + CarryShape(end) (left empty when that is empty).
  // InvalidArgument (nothing run) on a shape mismatch.
  Status Run(const Tensor& in, const Tensor& carry, Tensor* out, Tensor* out_carry);

  // The message form, for a stage: checks batch.unit == unit_begin(), num_samples in
  // [1, kMaxBatch], decodes data and carry (fp32, fp16 or int8, sizes checked against the shapes
  // before anything is allocated, values finite), runs, and encodes the result into a new
  // ActivationBatch (same pipeline_id and batch_id, unit = unit_end()) with `codec` —
  // callers pass fp32 for the logits of the last stage. InvalidArgument on any mismatch.
  //
  // `times`, when given, receives the cost of the layers alone (decoding and encoding the
  // activations excluded): wall time and this thread's CPU time. Slow-device emulation
  // scales the layers' time only, as the planner's device model does (transfers, codecs
  // included, are the link's part).
  struct ComputeTimes {
    double wall_seconds = 0;
    double cpu_seconds = 0;
  };
  Result<proto::ActivationBatch> Run(const proto::ActivationBatch& batch,
                                     const codec::CodecSpec& codec, ComputeTimes* times = nullptr);
  // The same, but a slice that ends inside the layer it starts in may take batch.data (sent
  // on as it came) instead of copying it; the rest of `batch` is left as it was.
  Result<proto::ActivationBatch> Run(proto::ActivationBatch&& batch, const codec::CodecSpec& codec,
                                     ComputeTimes* times = nullptr);

  // Runs the message form `runs` times (>= 1) on `batch` (1..kMaxBatch) samples of fixed
  // pseudo-random input (and carry), encoding with `codec`, and returns the fastest layers'
  // time of those runs (wall and CPU minima, as ComputeTimes above). Also allocates the
  // buffers later batches reuse. InvalidArgument for bad counts or a codec Run rejects.
  Result<ComputeTimes> TimeRuns(int batch, int runs, const codec::CodecSpec& codec);

  static constexpr int64_t kMaxBatch = 4096;

 private:
  struct Impl;
  // True when the slice ends inside the layer it starts in: its output's main part is its
  // input, unchanged.
  bool PassesInputThrough() const;
  // Run, but the passed-through input is copied to `out` only when `copy_passthrough`.
  // `carry_storage`, when not null, is `carry` itself, ours to take: a cut by sample may grow
  // it into the layer's output in place (its samples are already at the front) instead of
  // copying them.
  Status RunTensors(const Tensor& in, const Tensor& carry, Tensor* out, Tensor* out_carry,
                    bool copy_passthrough, Tensor* carry_storage = nullptr);
  Result<proto::ActivationBatch> RunMessage(const proto::ActivationBatch& batch,
                                            proto::EncodedTensor* take_data,
                                            const codec::CodecSpec& codec, ComputeTimes* times);
  StageExecutor(const Chain& chain, int begin, int end);
  Chain chain_;
  int begin_ = 0;
  int end_ = 0;
  std::unique_ptr<Impl> impl_;
};

// Encodes `tensor` (rank >= 2, batch first) into an EncodedTensor with its shape set, with
// "fp32" or "int8" (block size: codec default). InvalidArgument for another codec or a
// non-finite value.
Status EncodeActivation(const Tensor& tensor, const codec::CodecSpec& codec,
                        proto::EncodedTensor* out);
// Decodes an activation of exactly `shape` (batch first): shape and num_values must match
// before anything is allocated; fp32, fp16 or int8 only. InvalidArgument otherwise.
Status DecodeActivation(const proto::EncodedTensor& encoded, const std::vector<int64_t>& shape,
                        Tensor* out);

}  // namespace fedslice::slicing
