#include "fedslice/slicing/chain.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"
#include "fedslice/slicing/pipeline.h"

namespace fedslice::slicing {
namespace {

using ::testing::HasSubstr;

// Cuts of conv2d layers by whole rows (and of dense layers by feature); with by_position,
// the conv2d layers (only those: indices 0 and 3 in the cnn) are cut by output position.
proto::ChainSpec Splits(std::initializer_list<std::pair<int, int>> cuts, bool by_position = false) {
  proto::ChainSpec spec;
  for (auto [layer, parts] : cuts) {
    auto* s = spec.add_splits();
    s->set_layer_index(static_cast<uint32_t>(layer));
    s->set_parts(static_cast<uint32_t>(parts));
    s->set_by_position(by_position && (layer == 0 || layer == 3));
  }
  return spec;
}

// The cnn's conv2 (layer 3) cut by sample into `parts`.
proto::ChainSpec Conv2BySample(int parts) {
  proto::ChainSpec spec = Splits({{3, parts}});
  spec.mutable_splits(0)->set_by_sample(true);
  return spec;
}

Tensor RandomInput(const Model& model, int64_t batch, uint64_t seed) {
  std::vector<int64_t> shape = {batch};
  for (int64_t d : model.InputShape(0)) shape.push_back(d);
  Tensor t(shape);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : t.span()) x = u(rng);
  return t;
}

// Runs `model` stage by stage over `bounds` (unit boundaries 0 = b0 < b1 < ... = num_units),
// each stage with its own executor built from packed parameters, through the message form
// when `codec` is given.
Tensor RunPipeline(const Model& model, const Chain& chain, const std::vector<int>& bounds,
                   const Tensor& input, const codec::CodecSpec* codec = nullptr) {
  Tensor main = input, carry;
  proto::ActivationBatch batch;
  if (codec != nullptr) {
    batch.set_num_samples(static_cast<uint32_t>(input.batch()));
    EXPECT_TRUE(EncodeActivation(input, *codec::ParseCodec("fp32"), batch.mutable_data()).ok());
  }
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    auto packed = chain.PackSlice(model.params(), bounds[s], bounds[s + 1]);
    EXPECT_TRUE(packed.ok()) << packed.status().ToString();
    auto ex = StageExecutor::Create(chain, bounds[s], bounds[s + 1], *packed);
    EXPECT_TRUE(ex.ok()) << ex.status().ToString();
    if (codec != nullptr) {
      const bool last = s + 2 == bounds.size();
      auto next = (*ex)->Run(batch, last ? *codec::ParseCodec("fp32") : *codec);
      EXPECT_TRUE(next.ok()) << next.status().ToString();
      batch = std::move(*next);
      continue;
    }
    Tensor out, out_carry;
    const Status st = (*ex)->Run(main, carry, &out, &out_carry);
    EXPECT_TRUE(st.ok()) << st.ToString();
    main = std::move(out);
    carry = std::move(out_carry);
  }
  if (codec != nullptr) {
    EXPECT_EQ(batch.unit(), static_cast<uint32_t>(chain.num_units()));
    Tensor logits;
    EXPECT_TRUE(DecodeActivation(batch.data(),
                                 {input.batch(), static_cast<int64_t>(model.num_classes())},
                                 &logits)
                    .ok());
    return logits;
  }
  EXPECT_EQ(carry.size(), 0);
  return main;
}

TEST(ChainTest, WholeLayersAreOneUnitEach) {
  auto chain = Chain::Create(CnnSpec(), {});
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  EXPECT_EQ(chain->num_units(), chain->num_layers());
  EXPECT_EQ(chain->MainShape(0), (std::vector<int64_t>{1, 28, 28}));
  EXPECT_EQ(chain->MainShape(chain->num_units()), (std::vector<int64_t>{10}));
  for (int u = 0; u <= chain->num_units(); ++u) EXPECT_TRUE(chain->CarryShape(u).empty());
  EXPECT_EQ(chain->Describe(0, 3), "conv1..pool1");
}

TEST(ChainTest, CutLayerCarriesItsInputAndTheRowsDone) {
  // cnn: conv1 relu1 pool1 conv2 relu2 pool2 flatten fc1 relu3 fc2; conv2 outputs
  // {64, 14, 14} and is cut into bands of output rows.
  auto chain = Chain::Create(CnnSpec(), Splits({{3, 3}}));
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  ASSERT_EQ(chain->num_units(), 12);
  EXPECT_EQ(chain->FirstUnitOfLayer(3), 3);
  EXPECT_EQ(chain->FirstUnitOfLayer(4), 6);
  // Counted in positions: rows 4-8 are positions 56-125.
  EXPECT_EQ(chain->unit(4).out_begin, 4 * 14);
  EXPECT_EQ(chain->unit(4).out_end, 9 * 14);
  EXPECT_EQ(chain->unit(5).out_end, 14 * 14);
  EXPECT_EQ(chain->MainShape(4), (std::vector<int64_t>{32, 14, 14}));  // conv2's input
  EXPECT_EQ(chain->CarryShape(4), (std::vector<int64_t>{64, 4, 14}));
  EXPECT_EQ(chain->CarryShape(5), (std::vector<int64_t>{64, 9, 14}));
  EXPECT_TRUE(chain->CarryShape(6).empty());
  EXPECT_EQ(chain->MainShape(6), (std::vector<int64_t>{64, 14, 14}));
  EXPECT_EQ(chain->Describe(2, 5), "pool1..conv2[1/3]");
}

// Cut by position, a part can end inside a row: the carry is {channels, positions done}.
TEST(ChainTest, ConvCutByPositionCarriesThePositionsDone) {
  auto chain = Chain::Create(CnnSpec(), Splits({{3, 5}}, /*by_position=*/true));
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  ASSERT_EQ(chain->num_units(), 14);
  const int conv2 = chain->FirstUnitOfLayer(3);
  const std::vector<int64_t> begins = {0, 39, 78, 117, 156};  // 196 · j / 5
  for (int j = 0; j < 5; ++j) {
    EXPECT_EQ(chain->unit(conv2 + j).out_begin, begins[static_cast<size_t>(j)]);
    EXPECT_EQ(chain->unit(conv2 + j).out_end, j == 4 ? 196 : begins[static_cast<size_t>(j) + 1]);
  }
  EXPECT_TRUE(chain->CarryShape(conv2).empty());
  EXPECT_EQ(chain->CarryShape(conv2 + 1), (std::vector<int64_t>{64, 39}));
  EXPECT_EQ(chain->CarryShape(conv2 + 4), (std::vector<int64_t>{64, 156}));
  EXPECT_EQ(chain->MainShape(conv2 + 4), (std::vector<int64_t>{32, 14, 14}));
  EXPECT_EQ(chain->MainShape(conv2 + 5), (std::vector<int64_t>{64, 14, 14}));
  auto model = Model::Create(CnnSpec());
  ASSERT_TRUE(model.ok());
  const auto costs = chain->UnitCosts(ComputeLayerCosts(*model));
  EXPECT_EQ(costs[static_cast<size_t>(conv2 + 1)].output_bytes, 4 * (32 * 14 * 14 + 64 * 78));
  // Finer than rows and finer than 14 parts: up to 64 parts of the 196 positions.
  EXPECT_TRUE(Chain::Create(CnnSpec(), Splits({{3, 64}}, true)).ok());
}

TEST(ChainTest, UnitCostsAddUpToTheLayers) {
  auto model = Model::Create(CnnSpec());
  ASSERT_TRUE(model.ok());
  const auto layer_costs = ComputeLayerCosts(*model);
  auto chain = Chain::Create(CnnSpec(), Splits({{3, 5}, {7, 2}}));
  ASSERT_TRUE(chain.ok());
  const auto unit_costs = chain->UnitCosts(layer_costs);
  ASSERT_EQ(static_cast<int>(unit_costs.size()), chain->num_units());
  double flops = 0, layer_flops = 0;
  int64_t params = 0, layer_params = 0;
  for (const auto& c : unit_costs) flops += c.forward_flops, params += c.param_bytes;
  for (const auto& c : layer_costs) layer_flops += c.forward_flops, layer_params += c.param_bytes;
  EXPECT_NEAR(flops, layer_flops, 1e-9 * layer_flops);
  EXPECT_NEAR(static_cast<double>(params), static_cast<double>(layer_params), 8.0);  // rounding
  EXPECT_EQ(layer_params, 4 * chain->SliceParamCount(0, chain->num_units()));
  // A boundary inside conv2 (bands of rows 0-1, 2-4, ...) sends its input (32x14x14) plus the
  // rows done (64 channels x 5 rows x 14).
  EXPECT_EQ(unit_costs[4].output_bytes, 4 * (32 * 14 * 14 + 64 * 5 * 14));
  // A stage holding bands of conv2 holds all of its weights; a dense part only its rows.
  EXPECT_EQ(chain->SliceParamCount(3, 5), chain->SliceParamCount(3, 4));
  EXPECT_EQ(chain->SliceParamCount(3, 4), 64 * 32 * 25 + 64);
  EXPECT_EQ(unit_costs[7].output_bytes, layer_costs[3].output_bytes);  // last part
  EXPECT_EQ(unit_costs[4].name, "conv2[1/5]");
  const std::vector<double> layer_ms(static_cast<size_t>(chain->num_layers()), 2.0);
  const auto unit_ms = chain->UnitTimes(layer_ms);
  EXPECT_DOUBLE_EQ(unit_ms[3] + unit_ms[4] + unit_ms[5] + unit_ms[6] + unit_ms[7], 2.0);
}

// A stage beginning at part j > 0 joins the outputs of parts 0..j-1: the carried share of
// the layer's join time; whole layers and first parts cost nothing to enter.
TEST(ChainTest, UnitEntryTimesAreTheCarriedShareOfTheJoin) {
  auto chain = Chain::Create(CnnSpec(), Splits({{3, 7}, {7, 4}}));
  ASSERT_TRUE(chain.ok());
  std::vector<double> join(static_cast<size_t>(chain->num_layers()), 0.0);
  join[3] = 1.4;  // conv2: 14 output rows, 2 per part
  join[7] = 2.0;  // fc1: 512 features, 128 per part
  const std::vector<double> entry = chain->UnitEntryTimes(join);
  ASSERT_EQ(entry.size(), static_cast<size_t>(chain->num_units()));
  const int conv2 = chain->FirstUnitOfLayer(3), fc1 = chain->FirstUnitOfLayer(7);
  for (int u = 0; u < chain->num_units(); ++u) {
    double expected = 0;
    if (u > conv2 && u < conv2 + 7) expected = 1.4 * (2.0 * (u - conv2)) / 14.0;
    if (u > fc1 && u < fc1 + 4) expected = 2.0 * (128.0 * (u - fc1)) / 512.0;
    EXPECT_DOUBLE_EQ(entry[static_cast<size_t>(u)], expected) << chain->Describe(u, u + 1);
  }
  EXPECT_EQ(chain->UnitEntryTimes({}), std::vector<double>(entry.size(), 0.0));
}

// With band costs, a part of a cut conv2d layer costs its rows at the band rate, and the
// part a stage's band begins with (part 0 here, a later part on entry) also the band's fixed
// cost; dense parts keep their share of the layer. UnitDevice maps a whole device at once.
TEST(ChainTest, BandCostsPriceTheRowsAndOneFixedCostPerBand) {
  auto chain = Chain::Create(CnnSpec(), Splits({{3, 7}, {7, 4}}));
  ASSERT_TRUE(chain.ok());
  const auto n = static_cast<size_t>(chain->num_layers());
  Device by_layer;
  by_layer.layer_ms_per_sample.assign(n, 1.0);
  by_layer.layer_join_ms_per_sample.assign(n, 0.0);
  by_layer.layer_join_ms_per_sample[3] = 1.4;
  by_layer.layer_band_fixed_ms_per_sample.assign(n, 0.0);
  by_layer.layer_band_row_ms_per_sample.assign(n, 0.0);
  by_layer.layer_band_fixed_ms_per_sample[3] = 0.3;  // conv2: 14 rows, 2 per part
  by_layer.layer_band_row_ms_per_sample[3] = 0.1;
  const Device d = chain->UnitDevice(by_layer);
  ASSERT_EQ(d.layer_ms_per_sample.size(), static_cast<size_t>(chain->num_units()));
  ASSERT_EQ(d.entry_ms_per_sample.size(), static_cast<size_t>(chain->num_units()));
  const int conv2 = chain->FirstUnitOfLayer(3), fc1 = chain->FirstUnitOfLayer(7);
  for (int u = 0; u < chain->num_units(); ++u) {
    const auto k = static_cast<size_t>(u);
    double time = 1.0, entry = 0.0;
    if (u >= conv2 && u < conv2 + 7) {
      time = 2 * 0.1 + (u == conv2 ? 0.3 : 0.0);
      if (u > conv2) entry = 1.4 * (2.0 * (u - conv2)) / 14.0 + 0.3;
    }
    if (u >= fc1 && u < fc1 + 4) time = 0.25;  // dense: its share, no band costs
    EXPECT_DOUBLE_EQ(d.layer_ms_per_sample[k], time) << chain->Describe(u, u + 1);
    EXPECT_DOUBLE_EQ(d.entry_ms_per_sample[k], entry) << chain->Describe(u, u + 1);
  }
  // A stage holding all of conv2 computes one band: fixed + 14 rows.
  double whole = 0;
  for (int u = conv2; u < conv2 + 7; ++u) whole += d.layer_ms_per_sample[static_cast<size_t>(u)];
  EXPECT_DOUBLE_EQ(whole, 0.3 + 14 * 0.1);
  // Without band costs (older profiles), parts take their share of the layer's time.
  by_layer.layer_band_row_ms_per_sample.clear();
  by_layer.layer_band_fixed_ms_per_sample.clear();
  const Device shares = chain->UnitDevice(by_layer);
  EXPECT_DOUBLE_EQ(shares.layer_ms_per_sample[static_cast<size_t>(conv2)], 2.0 / 14.0);
  EXPECT_DOUBLE_EQ(shares.entry_ms_per_sample[static_cast<size_t>(conv2 + 1)], 1.4 * 2 / 14.0);
}

// Cut by sample, part j of P computes samples [n·j/P, n·(j+1)/P) of a micro-batch of n: the
// main activation stays conv2's whole input, the carry is the samples done so far.
TEST(ChainTest, ConvCutBySampleCarriesTheSamplesDone) {
  auto chain = Chain::Create(CnnSpec(), Conv2BySample(4));
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  ASSERT_EQ(chain->num_units(), 13);
  const int conv2 = chain->FirstUnitOfLayer(3);
  EXPECT_TRUE(chain->BySample(3));
  EXPECT_FALSE(chain->BySample(0));
  EXPECT_TRUE(chain->CarryShape(conv2).empty());
  EXPECT_EQ(chain->CarrySamples(conv2, 64), 0);
  for (int j = 1; j < 4; ++j) {
    EXPECT_EQ(chain->MainShape(conv2 + j), (std::vector<int64_t>{32, 14, 14}));
    EXPECT_EQ(chain->CarryShape(conv2 + j), (std::vector<int64_t>{64, 14, 14}));
    EXPECT_EQ(chain->CarrySamples(conv2 + j, 64), 16 * j);
    EXPECT_EQ(chain->SampleBegin(conv2 + j, 64), 16 * j);
    EXPECT_EQ(chain->SampleEnd(conv2 + j, 64), 16 * (j + 1));
  }
  // Rounded down, so a small batch's early parts may hold no sample (and carry none on).
  EXPECT_EQ(chain->CarrySamples(conv2 + 1, 3), 0);
  EXPECT_EQ(chain->CarrySamples(conv2 + 2, 3), 1);
  EXPECT_EQ(chain->CarrySamples(conv2 + 3, 3), 2);
  EXPECT_EQ(chain->SampleEnd(conv2 + 3, 3), 3);
  EXPECT_EQ(chain->CarrySamples(conv2 + 4, 64), 0);  // relu2: the layer is whole again
  EXPECT_EQ(chain->Describe(conv2 + 1, conv2 + 3), "conv2[1/4]..conv2[2/4]");

  // Costs: each part a quarter of the layer, by the layer's own kernel (no band costs); the
  // bytes crossing after part j are conv2's input plus (j + 1) quarters of its output.
  auto model = Model::Create(CnnSpec());
  ASSERT_TRUE(model.ok());
  const auto layer_costs = ComputeLayerCosts(*model);
  const auto costs = chain->UnitCosts(layer_costs);
  const LayerCost& conv2_cost = layer_costs[3];
  EXPECT_DOUBLE_EQ(costs[static_cast<size_t>(conv2 + 1)].forward_flops,
                   conv2_cost.forward_flops / 4);
  EXPECT_EQ(costs[static_cast<size_t>(conv2 + 1)].output_bytes,
            4 * (32 * 14 * 14 + 2 * 64 * 14 * 14 / 4));
  EXPECT_EQ(costs[static_cast<size_t>(conv2 + 3)].output_bytes, conv2_cost.output_bytes);
  std::vector<double> layer_ms(10, 1.0), band_fixed(10, 0.0), band_row(10, 0.0), join(10, 0.0);
  layer_ms[3] = 8.0;
  band_fixed[3] = 0.5;  // would apply to bands; not to a cut by sample
  band_row[3] = 0.6;
  join[3] = 0.4;
  const std::vector<double> times = chain->UnitTimes(layer_ms, band_fixed, band_row);
  const std::vector<double> entry = chain->UnitEntryTimes(join, band_fixed);
  for (int j = 0; j < 4; ++j) {
    EXPECT_DOUBLE_EQ(times[static_cast<size_t>(conv2 + j)], 2.0) << "part " << j;
    EXPECT_DOUBLE_EQ(entry[static_cast<size_t>(conv2 + j)], 0.1 * j) << "part " << j;
  }
  // A device of one thread grows the carry in place (no join); of two, it joins.
  Device by_layer;
  by_layer.layer_ms_per_sample = layer_ms;
  by_layer.layer_join_ms_per_sample = join;
  by_layer.num_threads = 1;
  EXPECT_DOUBLE_EQ(chain->UnitDevice(by_layer).entry_ms_per_sample[static_cast<size_t>(conv2 + 3)],
                   0.0);
  by_layer.num_threads = 2;
  EXPECT_DOUBLE_EQ(chain->UnitDevice(by_layer).entry_ms_per_sample[static_cast<size_t>(conv2 + 3)],
                   0.3);
  // The parts hold the whole layer's weights, once per run of them.
  EXPECT_EQ(chain->SliceParamCount(conv2 + 1, conv2 + 3), 64 * (32 * 25 + 1));
}

TEST(ChainTest, RejectsBadCuts) {
  auto expect_bad = [](const proto::ChainSpec& spec, const std::string& what) {
    auto chain = Chain::Create(CnnSpec(), spec);
    ASSERT_FALSE(chain.ok()) << what;
    EXPECT_EQ(chain.status().code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(chain.status().message(), HasSubstr(what));
  };
  expect_bad(Splits({{99, 2}}), "the model has 10 layers");
  expect_bad(Splits({{1, 2}}), "only conv2d and dense");
  expect_bad(Splits({{3, 2}, {0, 2}}), "strictly increasing");
  expect_bad(Splits({{3, 1}}), "parts = 1");
  expect_bad(Splits({{0, 29}}), "parts = 29");        // conv1 has 28 output rows
  expect_bad(Splits({{0, 65}}, true), "parts = 65");  // 784 positions, but at most 64 parts
  proto::ChainSpec dense_by_position = Splits({{7, 2}});
  dense_by_position.mutable_splits(0)->set_by_position(true);
  expect_bad(dense_by_position, "conv2d layers only");
  proto::ChainSpec dense_by_sample = Splits({{7, 2}});
  dense_by_sample.mutable_splits(0)->set_by_sample(true);
  expect_bad(dense_by_sample, "conv2d layers only");
  proto::ChainSpec both = Conv2BySample(4);
  both.mutable_splits(0)->set_by_position(true);
  expect_bad(both, "exclude each other");
  expect_bad(Conv2BySample(65), "parts = 65");
  EXPECT_TRUE(Chain::Create(CnnSpec(), Conv2BySample(64)).ok());
  proto::ModelSpec broken = CnnSpec();
  broken.set_num_classes(7);
  EXPECT_FALSE(Chain::Create(broken, {}).ok());
}

TEST(ChainTest, AutoSplitCutsTheHeavyLayers) {
  auto model = Model::Create(CnnSpec());
  ASSERT_TRUE(model.ok());
  const auto costs = ComputeLayerCosts(*model);
  EXPECT_EQ(AutoSplit(CnnSpec(), costs, 1).splits_size(), 0);
  const proto::ChainSpec spec = AutoSplit(CnnSpec(), costs, 4);
  ASSERT_GE(spec.splits_size(), 1);
  // conv2, ~80% of the FLOPs, cut by position into ceil(16 · 4 · share) parts: finer than
  // its 14 rows.
  EXPECT_EQ(spec.splits(0).layer_index(), 3u);
  EXPECT_TRUE(spec.splits(0).by_position());
  double total = 0;
  for (const auto& c : costs) total += c.forward_flops;
  EXPECT_EQ(spec.splits(0).parts(),
            static_cast<uint32_t>(std::ceil(64 * costs[3].forward_flops / total)));
  EXPECT_GT(spec.splits(0).parts(), 14u);
  EXPECT_GE(AutoSplit(CnnSpec(), costs, 2).splits(0).parts(), 26u);  // ceil(32 x share)
  EXPECT_TRUE(Chain::Create(CnnSpec(), spec).ok());
  // A stage holds one band's output however finely its layer is cut: memory does not grow
  // with the number of parts.
  for (int stages : {2, 4}) {
    auto chain = Chain::Create(CnnSpec(), AutoSplit(CnnSpec(), costs, stages));
    ASSERT_TRUE(chain.ok());
    auto whole = Chain::Create(CnnSpec(), {});
    ASSERT_TRUE(whole.ok());
    Device device;
    device.name = "d";
    device.layer_ms_per_sample.assign(static_cast<size_t>(chain->num_units()), 1.0);
    PlanOptions options;
    const StageEstimate cut =
        EstimateStage(chain->UnitCosts(costs), device, 0, chain->num_units(), options);
    device.layer_ms_per_sample.assign(static_cast<size_t>(whole->num_units()), 1.0);
    const StageEstimate not_cut =
        EstimateStage(whole->UnitCosts(costs), device, 0, whole->num_units(), options);
    EXPECT_NEAR(static_cast<double>(cut.memory_bytes), static_cast<double>(not_cut.memory_bytes),
                64.0)
        << stages << " stages";
  }
}

// With the micro-batch known, a conv2d is cut by sample when the batch has samples enough
// for the grain wanted: into the largest divisor of the batch up to 64 (equal parts), else
// into min(batch, 64) parts; with too few samples, by position as without it.
TEST(ChainTest, AutoSplitCutsConvBySampleWhenTheBatchAllows) {
  auto model = Model::Create(CnnSpec());
  ASSERT_TRUE(model.ok());
  const auto costs = ComputeLayerCosts(*model);
  auto conv2_split = [&](int stages, int micro_batch) {
    const proto::ChainSpec spec = AutoSplit(CnnSpec(), costs, stages, micro_batch);
    EXPECT_TRUE(Chain::Create(CnnSpec(), spec).ok());
    return spec.splits(0);
  };
  proto::LayerSplit split = conv2_split(4, 64);
  EXPECT_EQ(split.layer_index(), 3u);
  EXPECT_TRUE(split.by_sample());
  EXPECT_FALSE(split.by_position());
  EXPECT_EQ(split.parts(), 64u);
  double total = 0;
  for (const auto& c : costs) total += c.forward_flops;
  const auto wanted = static_cast<uint32_t>(std::ceil(64 * costs[3].forward_flops / total));
  ASSERT_GT(wanted, 40u);  // conv2 is ~80% of the FLOPs: 4 stages want ~52 parts
  ASSERT_LE(wanted, 60u);
  EXPECT_EQ(conv2_split(4, 128).parts(), 64u);  // 2 samples each
  EXPECT_EQ(conv2_split(4, 120).parts(), 60u);  // the largest divisor in [wanted, 64]
  EXPECT_EQ(conv2_split(4, 61).parts(), 61u);   // 61 is prime: one sample each
  EXPECT_EQ(conv2_split(4, 67).parts(), 64u);   // no divisor: parts of 1-2 samples
  EXPECT_TRUE(conv2_split(4, 67).by_sample());
  EXPECT_EQ(conv2_split(2, 64).parts(), 64u);
  // 8 samples cannot cut conv2 as finely as 4 stages want: positions.
  split = conv2_split(4, 8);
  EXPECT_FALSE(split.by_sample());
  EXPECT_TRUE(split.by_position());
  EXPECT_EQ(split.parts(), AutoSplit(CnnSpec(), costs, 4).splits(0).parts());
}

// Whole-layer slices give exactly the single-process logits, for any cut points, batch sizes
// and thread counts the engine promises determinism for.
TEST(StageExecutorTest, WholeLayerSlicesAreBitIdenticalToTheModel) {
  for (const auto& spec : {MlpSpec(), CnnSpec()}) {
    auto model = Model::Create(spec);
    ASSERT_TRUE(model.ok());
    auto chain = Chain::Create(spec, {});
    ASSERT_TRUE(chain.ok());
    const int n = chain->num_units();
    std::mt19937_64 rng(5);
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      for (int64_t batch : {2, 17, 64}) {
        const Tensor input = RandomInput(*model, batch, static_cast<uint64_t>(batch));
        Tensor expected;
        ASSERT_TRUE(model->Forward(input, &expected).ok());
        for (int trial = 0; trial < 4; ++trial) {
          std::vector<int> bounds = {0};
          for (int u = 1; u < n; ++u) {
            if (rng() % 3 == 0) bounds.push_back(u);
          }
          bounds.push_back(n);
          const Tensor got = RunPipeline(*model, *chain, bounds, input);
          ASSERT_EQ(got.shape(), expected.shape());
          for (int64_t i = 0; i < got.size(); ++i) {
            ASSERT_EQ(got.data()[i], expected.data()[i])
                << spec.name() << " batch " << batch << " threads " << threads << " value " << i;
          }
        }
      }
    }
    SetNumThreads(0);
  }
}

TEST(StageExecutorTest, CutLayersMatchTheModelClosely) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  for (bool by_position : {false, true}) {
    SCOPED_TRACE(by_position ? "conv2 cut by position" : "conv2 cut by row");
    // By position, conv2's 9 parts of 21-22 positions end inside rows.
    auto chain = Chain::Create(spec, Splits({{3, by_position ? 9 : 7}, {7, 3}}, by_position));
    ASSERT_TRUE(chain.ok());
    const Tensor input = RandomInput(*model, 33, 9);
    Tensor expected;
    ASSERT_TRUE(model->Forward(input, &expected).ok());
    // Stage boundaries inside conv2 (after parts 1 and 4) and inside fc1.
    const int fc1 = chain->FirstUnitOfLayer(7);
    for (const std::vector<int>& bounds :
         {std::vector<int>{0, 5, 8, chain->num_units()},
          std::vector<int>{0, 4, 6, 9, fc1 + 1, chain->num_units()},
          std::vector<int>{0, chain->num_units()}}) {
      const Tensor got = RunPipeline(*model, *chain, bounds, input);
      ASSERT_EQ(got.shape(), expected.shape());
      for (int64_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got.data()[i], expected.data()[i], 1e-5) << "value " << i;
      }
    }
  }
}

// A conv2d cut by sample runs the layer's own kernel on each stage's samples: exactly the
// single-process logits, for stage boundaries anywhere (inside conv2 and elsewhere), batch
// sizes that leave some parts without a sample, one and two threads, tensors and messages.
TEST(StageExecutorTest, ConvCutBySampleIsBitIdenticalToTheModel) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  auto chain = Chain::Create(spec, Conv2BySample(8));
  ASSERT_TRUE(chain.ok());
  const int conv2 = chain->FirstUnitOfLayer(3), n = chain->num_units();
  const auto fp32 = *codec::ParseCodec("fp32");
  for (int threads : {1, 2}) {
    SetNumThreads(threads);
    for (int64_t batch : {1, 5, 16, 33}) {
      const Tensor input = RandomInput(*model, batch, static_cast<uint64_t>(batch) + 40);
      Tensor expected;
      ASSERT_TRUE(model->Forward(input, &expected).ok());
      for (const std::vector<int>& bounds :
           {std::vector<int>{0, conv2 + 3, n},
            std::vector<int>{0, conv2 + 1, conv2 + 2, conv2 + 7, n},
            std::vector<int>{0, conv2, conv2 + 8, n},
            std::vector<int>{0, 2, conv2 + 5, conv2 + 6, n - 2, n}, std::vector<int>{0, n}}) {
        for (bool messages : {false, true}) {
          const Tensor got = RunPipeline(*model, *chain, bounds, input, messages ? &fp32 : nullptr);
          ASSERT_EQ(got.shape(), expected.shape());
          for (int64_t i = 0; i < got.size(); ++i) {
            ASSERT_EQ(got.data()[i], expected.data()[i])
                << "batch " << batch << ", threads " << threads << ", second bound " << bounds[1]
                << (messages ? ", messages" : ", tensors") << ", value " << i;
          }
        }
      }
    }
  }
  SetNumThreads(0);
}

// A stage inside a conv2d cut by sample checks the carry's sample count against the batch.
TEST(StageExecutorTest, ConvCutBySampleRejectsACarryOfTheWrongSamples) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  auto chain = Chain::Create(spec, Conv2BySample(4));
  ASSERT_TRUE(chain.ok());
  const int conv2 = chain->FirstUnitOfLayer(3);
  auto packed = chain->PackSlice(model->params(), conv2 + 2, chain->num_units());
  ASSERT_TRUE(packed.ok());
  auto ex = StageExecutor::Create(*chain, conv2 + 2, chain->num_units(), *packed);
  ASSERT_TRUE(ex.ok()) << ex.status().ToString();
  const auto fp32 = *codec::ParseCodec("fp32");
  auto batch_of = [&](int64_t samples, int64_t carried) {
    Tensor main({samples, 32, 14, 14}), carry({carried, 64, 14, 14});
    main.SetZero();
    carry.SetZero();
    proto::ActivationBatch b;
    b.set_unit(static_cast<uint32_t>(conv2 + 2));
    b.set_num_samples(static_cast<uint32_t>(samples));
    EXPECT_TRUE(EncodeActivation(main, fp32, b.mutable_data()).ok());
    if (carried > 0) {
      EXPECT_TRUE(EncodeActivation(carry, fp32, b.mutable_carry()).ok());
    }
    return b;
  };
  // 8 samples: parts 0-1 did samples 0-3.
  auto r = (*ex)->Run(batch_of(8, 4), fp32);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->data().shape(0), 8);
  auto wrong = (*ex)->Run(batch_of(8, 5), fp32);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.status().message(), HasSubstr("expected [4, 64, 14, 14]"));
  proto::ActivationBatch none = batch_of(8, 4);
  none.clear_carry();
  wrong = (*ex)->Run(none, fp32);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.status().message(), HasSubstr("needs one"));
  // 1 sample: parts 0-1 hold none of it, so nothing may be carried in.
  EXPECT_TRUE((*ex)->Run(batch_of(1, 0), fp32).ok());
  proto::ActivationBatch extra = batch_of(1, 0);
  Tensor one({1, 64, 14, 14});
  one.SetZero();
  ASSERT_TRUE(EncodeActivation(one, fp32, extra.mutable_carry()).ok());
  wrong = (*ex)->Run(extra, fp32);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.status().message(), HasSubstr("no sample done yet"));
  // The tensor form checks the carry too.
  Tensor main({8, 32, 14, 14}), carry({3, 64, 14, 14}), out, out_carry;
  main.SetZero();
  carry.SetZero();
  const Status st = (*ex)->Run(main, carry, &out, &out_carry);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("takes [4, 64, 14, 14]"));
  EXPECT_TRUE((*ex)->Run(batch_of(8, 4), fp32).ok());  // still working
}

// Bands of a strided, padded conv2d (BandConvForward's edge cases: padding rows above and
// below, columns skipped by the stride, groups of samples with a short last group).
TEST(StageExecutorTest, BandsOfAStridedPaddedConvMatchTheModel) {
  proto::ModelSpec spec = CnnSpec();
  auto* conv2 = spec.mutable_layers(3)->mutable_conv2d();
  conv2->set_kernel(3);
  conv2->set_stride(2);
  conv2->set_padding(1);  // 14x14 -> 7x7; pool2 -> 3x3
  spec.mutable_layers(7)->mutable_dense()->set_in_features(64 * 3 * 3);
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  // 7 parts: by row one row each; by position 7 positions each of the 49 (rows by chance)
  // and 6 parts of 8-9 positions, which end inside rows.
  for (auto [parts, by_position] : {std::pair{7, false}, std::pair{7, true}, std::pair{6, true}}) {
    SCOPED_TRACE(std::to_string(parts) + (by_position ? " parts by position" : " parts by row"));
    auto chain = Chain::Create(spec, Splits({{3, parts}}, by_position));
    ASSERT_TRUE(chain.ok()) << chain.status().ToString();
    const int first = chain->FirstUnitOfLayer(3);
    for (int64_t batch : {1, 7, 33}) {
      const Tensor input = RandomInput(*model, batch, static_cast<uint64_t>(batch) + 40);
      Tensor expected;
      ASSERT_TRUE(model->Forward(input, &expected).ok());
      for (const std::vector<int>& bounds :
           {std::vector<int>{0, first + 1, chain->num_units()},
            std::vector<int>{0, first + 3, first + 5, chain->num_units()},
            std::vector<int>{0, first + 5, chain->num_units()}}) {
        const Tensor got = RunPipeline(*model, *chain, bounds, input);
        ASSERT_EQ(got.shape(), expected.shape());
        for (int64_t i = 0; i < got.size(); ++i) {
          ASSERT_NEAR(got.data()[i], expected.data()[i], 1e-5)
              << "batch " << batch << ", value " << i;
        }
      }
    }
  }
}

TEST(StageExecutorTest, MessagesRoundTripWithFp32Fp16AndInt8Activations) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  auto chain = Chain::Create(spec, Splits({{3, 4}}));
  ASSERT_TRUE(chain.ok());
  const Tensor input = RandomInput(*model, 16, 2);
  Tensor expected;
  ASSERT_TRUE(model->Forward(input, &expected).ok());
  const std::vector<int> bounds = {0, 5, chain->num_units()};
  auto fp32 = codec::ParseCodec("fp32");
  const Tensor exact = RunPipeline(*model, *chain, bounds, input, &*fp32);
  auto int8 = codec::ParseCodec("int8");
  const Tensor approx = RunPipeline(*model, *chain, bounds, input, &*int8);
  auto fp16 = codec::ParseCodec("fp16");
  const Tensor half = RunPipeline(*model, *chain, bounds, input, &*fp16);
  double max_exact = 0, max_approx = 0, max_half = 0, scale = 0;
  for (int64_t i = 0; i < expected.size(); ++i) {
    max_exact = std::max(max_exact, double{std::abs(exact.data()[i] - expected.data()[i])});
    max_approx = std::max(max_approx, double{std::abs(approx.data()[i] - expected.data()[i])});
    max_half = std::max(max_half, double{std::abs(half.data()[i] - expected.data()[i])});
    scale = std::max(scale, double{std::abs(expected.data()[i])});
  }
  EXPECT_LE(max_exact, 1e-5);
  // int8 quantises each 256-value block to 1/255 of its range: a small, non-zero error.
  EXPECT_GT(max_approx, 0.0);
  EXPECT_LE(max_approx, 0.05 * scale);
  // fp16 rounds each value to 11 significant bits: smaller still, and not zero.
  EXPECT_GT(max_half, 0.0);
  EXPECT_LE(max_half, 0.005 * scale);
  EXPECT_LT(max_half, max_approx);
}

// Executors keep their buffers from batch to batch and hand results over by swapping: a run
// must not see anything of the previous one (other batch sizes included). A slice that ends
// inside the layer it starts in forwards the layer's input as it came (the same bytes).
TEST(StageExecutorTest, RepeatedMessagesOfOtherSizesGiveTheModelsLogits) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  auto chain = Chain::Create(spec, Splits({{3, 7}}));
  ASSERT_TRUE(chain.ok());
  const int conv2 = chain->FirstUnitOfLayer(3);
  // Stage 1 computes conv2[2/7] alone, stage 2 conv2[3..4/7]: they pass conv2's input on.
  const std::vector<int> bounds = {0, conv2 + 2, conv2 + 3, conv2 + 5, chain->num_units()};
  std::vector<std::unique_ptr<StageExecutor>> stages;
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    auto packed = chain->PackSlice(model->params(), bounds[s], bounds[s + 1]);
    ASSERT_TRUE(packed.ok());
    auto ex = StageExecutor::Create(*chain, bounds[s], bounds[s + 1], *packed);
    ASSERT_TRUE(ex.ok()) << ex.status().ToString();
    stages.push_back(std::move(*ex));
  }
  // Timing runs on synthetic input (slow-device emulation, stage_host.h) report the layers'
  // time and leave the executors working: the logits below are still the model's.
  for (const auto& stage : stages) {
    auto times = stage->TimeRuns(16, 2, *codec::ParseCodec("int8"));
    ASSERT_TRUE(times.ok()) << times.status().ToString();
    EXPECT_GT(times->cpu_seconds, 0);
    EXPECT_GT(times->wall_seconds, 0);
    EXPECT_LT(times->wall_seconds, 60);  // a minimum of real runs, not the initial sentinel
  }
  EXPECT_EQ(stages[0]->TimeRuns(0, 1, *codec::ParseCodec("fp32")).status().code(),
            Status::Code::kInvalidArgument);
  EXPECT_EQ(stages[0]->TimeRuns(8, 0, *codec::ParseCodec("fp32")).status().code(),
            Status::Code::kInvalidArgument);
  EXPECT_EQ(stages[0]->TimeRuns(8, 1, *codec::ParseCodec("int4")).status().code(),
            Status::Code::kInvalidArgument);
  for (const char* codec_name : {"fp32", "fp16", "int8"}) {
    auto codec = codec::ParseCodec(codec_name);
    ASSERT_TRUE(codec.ok());
    for (int64_t batch_size : {33, 7, 64, 33}) {
      const Tensor input = RandomInput(*model, batch_size, static_cast<uint64_t>(batch_size));
      Tensor expected;
      ASSERT_TRUE(model->Forward(input, &expected).ok());
      proto::ActivationBatch batch;
      batch.set_batch_id(static_cast<uint64_t>(batch_size));
      batch.set_num_samples(static_cast<uint32_t>(batch_size));
      ASSERT_TRUE(EncodeActivation(input, *codec::ParseCodec("fp32"), batch.mutable_data()).ok());
      for (size_t s = 0; s < stages.size(); ++s) {
        const bool last = s + 1 == stages.size();
        const std::string data_in = batch.data().SerializeAsString();
        auto next = stages[s]->Run(std::move(batch), last ? *codec::ParseCodec("fp32") : *codec);
        ASSERT_TRUE(next.ok()) << next.status().ToString();
        // Stages 1 and 2 end inside conv2, where they start: conv2's input goes on as it came.
        const bool same_bytes = next->data().SerializeAsString() == data_in;
        EXPECT_EQ(same_bytes, s == 1 || s == 2) << codec_name << ", stage " << s;
        EXPECT_EQ(next->batch_id(), static_cast<uint64_t>(batch_size));
        batch = std::move(*next);
      }
      Tensor logits;
      ASSERT_TRUE(DecodeActivation(batch.data(), expected.shape(), &logits).ok());
      const double tolerance = std::string(codec_name) == "fp32" ? 1e-5 : 0.05;
      double scale = 0;
      for (float x : expected.span()) scale = std::max(scale, double{std::abs(x)});
      for (int64_t i = 0; i < logits.size(); ++i) {
        ASSERT_NEAR(logits.data()[i], expected.data()[i], tolerance * std::max(1.0, scale))
            << codec_name << ", batch of " << batch_size << ", value " << i;
      }
    }
  }
}

TEST(StageExecutorTest, RejectsBadBatchesAndKeepsWorking) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  ASSERT_TRUE(model.ok());
  auto chain = Chain::Create(spec, Splits({{3, 4}}));
  ASSERT_TRUE(chain.ok());
  auto packed = chain->PackSlice(model->params(), 4, 8);
  ASSERT_TRUE(packed.ok());
  auto ex = StageExecutor::Create(*chain, 4, 8, *packed);
  ASSERT_TRUE(ex.ok()) << ex.status().ToString();
  auto fp32 = *codec::ParseCodec("fp32");

  Tensor main({2, 32, 14, 14}), carry({2, 64, 3, 14});  // conv2 rows 0-2 done
  main.SetZero();
  carry.SetZero();
  proto::ActivationBatch good;
  good.set_unit(4);
  good.set_num_samples(2);
  ASSERT_TRUE(EncodeActivation(main, fp32, good.mutable_data()).ok());
  ASSERT_TRUE(EncodeActivation(carry, fp32, good.mutable_carry()).ok());

  auto expect_bad = [&](proto::ActivationBatch b, const std::string& what) {
    auto r = (*ex)->Run(b, fp32);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(r.status().ToString(), HasSubstr(what));
  };
  proto::ActivationBatch b = good;
  b.set_unit(3);
  expect_bad(b, "starts at unit 4");
  b = good;
  b.clear_carry();
  expect_bad(b, "needs one");
  b = good;
  b.mutable_data()->set_shape(1, 31);
  expect_bad(b, "expected [2, 32, 14, 14]");
  b = good;
  b.set_num_samples(3);
  expect_bad(b, "expected [3, 32, 14, 14]");
  b = good;
  const float nan = std::nanf("");
  b.mutable_data()->mutable_payload()->replace(8, 4, reinterpret_cast<const char*>(&nan), 4);
  expect_bad(b, "finite");
  b = good;
  b.mutable_carry()->set_codec("topk:0.1");
  expect_bad(b, "not supported");

  auto r = (*ex)->Run(good, fp32);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->unit(), 8u);
  EXPECT_EQ(r->carry().num_values(), 0u);
  EXPECT_EQ(r->data().shape(0), 2);

  EXPECT_FALSE(StageExecutor::Create(*chain, 4, 8, std::span(*packed).first(10)).ok());
  std::vector<float> poisoned = *packed;
  poisoned[3] = std::nanf("");
  auto bad = StageExecutor::Create(*chain, 4, 8, poisoned);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("not finite"));
}

TEST(EndpointTest, ParsesHostPortAndRejectsTheRest) {
  auto a = ParseEndpoint("client-1:7001");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "client-1");
  EXPECT_EQ(a->port, 7001);
  EXPECT_EQ(a->ToString(), "client-1:7001");
  auto v6 = ParseEndpoint("[::1]:9");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->ToString(), "[::1]:9");
  for (const char* bad :
       {"", "host", ":80", "host:0", "host:65536", "host:8x", "::1:80", "[::1:80"}) {
    EXPECT_FALSE(ParseEndpoint(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace fedslice::slicing
