#include "fedslice/slicing/planner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/slicing/cost.h"

namespace fedslice::slicing {
namespace {

using ::testing::HasSubstr;

Model Build(const proto::ModelSpec& spec) {
  auto model = Model::Create(spec);
  EXPECT_TRUE(model.ok()) << model.status().ToString();
  return std::move(model).value();
}

// ---------------------------------------------------------------- static costs, by hand

TEST(LayerCostTest, MlpByHand) {
  const auto costs = ComputeLayerCosts(Build(MlpSpec()));
  ASSERT_EQ(costs.size(), 6U);
  EXPECT_EQ(costs[0].kind, "flatten");
  EXPECT_EQ(costs[0].forward_flops, 0);
  EXPECT_EQ(costs[0].input_bytes, 4 * 784);
  EXPECT_EQ(costs[0].output_bytes, 4 * 784);
  EXPECT_EQ(costs[1].name, "fc1");
  EXPECT_EQ(costs[1].forward_flops, 2.0 * 784 * 200);
  EXPECT_EQ(costs[1].param_bytes, 4 * (784 * 200 + 200));
  EXPECT_EQ(costs[1].output_bytes, 4 * 200);
  EXPECT_EQ(costs[2].forward_flops, 200);  // relu: one op per element
  EXPECT_EQ(costs[5].forward_flops, 2.0 * 200 * 10);
  EXPECT_EQ(costs[5].output_bytes, 40);
  int64_t params = 0;
  for (const auto& c : costs) params += c.param_bytes;
  EXPECT_EQ(params, 4 * 199210);
}

TEST(LayerCostTest, CnnByHand) {
  const auto costs = ComputeLayerCosts(Build(CnnSpec()));
  ASSERT_EQ(costs.size(), 10U);
  EXPECT_EQ(costs[0].forward_flops, 2.0 * 32 * 1 * 5 * 5 * 28 * 28);
  EXPECT_EQ(costs[0].output_bytes, 4 * 32 * 28 * 28);
  EXPECT_EQ(costs[0].scratch_bytes, 4 * 1 * 5 * 5 * 28 * 28);
  EXPECT_EQ(costs[2].kind, "maxpool2d");
  EXPECT_EQ(costs[2].forward_flops, 4.0 * 32 * 14 * 14);
  EXPECT_EQ(costs[2].output_bytes, 4 * 32 * 14 * 14);
  EXPECT_EQ(costs[3].name, "conv2");
  EXPECT_EQ(costs[3].forward_flops, 64.0 * 32 * 5 * 5 * 14 * 14 * 2);
  EXPECT_EQ(costs[3].param_bytes, 4 * (64 * 32 * 25 + 64));
  EXPECT_EQ(costs[3].input_bytes, 4 * 32 * 14 * 14);
  EXPECT_EQ(costs[3].scratch_bytes, 4 * 32 * 25 * 14 * 14);
  EXPECT_EQ(costs[7].name, "fc1");
  EXPECT_EQ(costs[7].forward_flops, 2.0 * 3136 * 512);
  EXPECT_EQ(costs[7].param_bytes, 4 * (3136 * 512 + 512));
  EXPECT_EQ(costs[9].output_bytes, 40);
  int64_t params = 0;
  for (const auto& c : costs) params += c.param_bytes;
  EXPECT_EQ(params, 4 * 1663370);
}

// ---------------------------------------------------------------- stage estimate, by hand

TEST(EstimateStageTest, ComputeTransferAndMemoryByHand) {
  std::vector<LayerCost> costs(3);
  costs[0] = {0, "a", "dense", 0, 1000, 40, 80, 0};
  costs[1] = {1, "b", "conv2d", 0, 2000, 80, 120, 500};
  costs[2] = {2, "c", "relu", 0, 0, 120, 120, 0};
  Device d;
  d.layer_ms_per_sample = {0.5, 0.25, 1.0};
  d.link_bandwidth_bytes_per_s = 1e6;
  d.link_latency_ms = 2;
  d.overhead_ms = 0.5;
  d.num_threads = 3;
  PlanOptions options;
  options.micro_batch = 10;
  options.in_flight = 2;
  const StageEstimate s = EstimateStage(costs, d, 0, 2, options);
  EXPECT_DOUBLE_EQ(s.compute_ms, 0.5 + 10 * 0.75);
  EXPECT_EQ(s.bytes_sent, 10 * 120);
  EXPECT_DOUBLE_EQ(s.transfer_ms, 2 + 1000.0 * 1200 / 1e6);
  EXPECT_DOUBLE_EQ(s.stage_ms, 8.0);
  // params + threads * scratch + m * (outputs + in_flight * (in + out))
  EXPECT_EQ(s.memory_bytes, 3000U + 3 * 500 + 10 * (200 + 2 * (40 + 120)));
  EXPECT_TRUE(s.fits);
  d.memory_budget_bytes = s.memory_bytes - 1;
  EXPECT_FALSE(EstimateStage(costs, d, 0, 2, options).fits);
  d.memory_budget_bytes = s.memory_bytes;
  EXPECT_TRUE(EstimateStage(costs, d, 0, 2, options).fits);
  // A stage pays the entry time of the layer it begins at, per sample, and no other's.
  d.entry_ms_per_sample = {0.0, 0.125, 4.0};
  EXPECT_DOUBLE_EQ(EstimateStage(costs, d, 0, 2, options).compute_ms, 0.5 + 10 * 0.75);
  EXPECT_DOUBLE_EQ(EstimateStage(costs, d, 1, 2, options).compute_ms, 0.5 + 10 * (0.25 + 0.125));
  EXPECT_DOUBLE_EQ(EstimateStage(costs, d, 1, 3, options).compute_ms, 0.5 + 10 * (1.25 + 0.125));
  // A device whose network work shares its CPU pays it per byte in and out.
  d.io_ms_per_byte = 0.001;
  EXPECT_DOUBLE_EQ(EstimateStage(costs, d, 1, 3, options).compute_ms,
                   0.5 + 10 * (1.25 + 0.125 + 0.001 * (80 + 120)));
  d.io_ms_per_byte = -1;
  EXPECT_THAT(PlanPipeline(costs, std::vector<Device>{d}, options).status().message(),
              HasSubstr("I/O cost"));
}

// Entry times move a boundary: two identical devices, four equal layers; joining before
// layer 2 is expensive, so the planner cuts elsewhere although 2 + 2 is the even split.
TEST(PlannerTest, EntryTimesMoveStageBoundaries) {
  std::vector<LayerCost> costs(4);
  for (int i = 0; i < 4; ++i) {
    costs[static_cast<size_t>(i)] = {i, "l" + std::to_string(i), "dense", 1000, 0, 4, 4, 0};
  }
  Device d;
  d.layer_ms_per_sample = {1, 1, 1, 1};
  std::vector<Device> devices = {d, d};
  devices[1].name = "b";
  PlanOptions options;
  options.micro_batch = 1;
  options.num_stages = 2;
  auto even = PlanPipeline(costs, devices, options);
  ASSERT_TRUE(even.ok()) << even.status().ToString();
  EXPECT_EQ(even->stages[0].end, 2);
  EXPECT_DOUBLE_EQ(even->bottleneck_ms, 2.0);
  for (Device& dev : devices) dev.entry_ms_per_sample = {0, 0, 1.5, 0};
  auto moved = PlanPipeline(costs, devices, options);
  ASSERT_TRUE(moved.ok()) << moved.status().ToString();
  EXPECT_NE(moved->stages[0].end, 2);
  EXPECT_DOUBLE_EQ(moved->bottleneck_ms, 3.0);  // 3 + 1 (or 1 + 3) beats 2 + (1.5 + 2)
  devices[0].entry_ms_per_sample = {0, 0};      // wrong size
  EXPECT_THAT(PlanPipeline(costs, devices, options).status().message(),
              HasSubstr("entry times for 2 layers"));
  devices[0].entry_ms_per_sample = {0, 0, -1, 0};
  EXPECT_THAT(PlanPipeline(costs, devices, options).status().message(),
              HasSubstr("entry time of layer 2"));
}

// ---------------------------------------------------------------- brute force

struct Best {
  double bottleneck = std::numeric_limits<double>::infinity();
  double latency = std::numeric_limits<double>::infinity();
};

// Every split of [0, n) into contiguous slices and every injective assignment of devices to
// them (in increasing device order only when `given_order`).
void BruteForce(std::span<const LayerCost> costs, std::span<const Device> devices,
                const PlanOptions& options, bool given_order, int begin, uint32_t used,
                int last_device, double bottleneck, double latency, Best* best) {
  const int n = static_cast<int>(costs.size());
  if (begin == n) {
    if (options.num_stages > 0 && std::popcount(used) != options.num_stages) return;
    if (bottleneck < best->bottleneck ||
        (bottleneck == best->bottleneck && latency < best->latency)) {
      best->bottleneck = bottleneck;
      best->latency = latency;
    }
    return;
  }
  for (int d = given_order ? last_device + 1 : 0; d < static_cast<int>(devices.size()); ++d) {
    if ((used >> d & 1U) != 0) continue;
    for (int end = begin + 1; end <= n; ++end) {
      const StageEstimate s =
          EstimateStage(costs, devices[static_cast<size_t>(d)], begin, end, options);
      if (!s.fits) continue;
      BruteForce(costs, devices, options, given_order, end, used | 1U << d, d,
                 std::max(bottleneck, s.stage_ms), latency + s.compute_ms + s.transfer_ms, best);
    }
  }
}

std::vector<LayerCost> RandomCosts(std::mt19937_64& rng, int n) {
  std::uniform_int_distribution<int64_t> bytes(1, 200000);
  std::uniform_real_distribution<double> flops(1e3, 1e7);
  std::vector<LayerCost> costs(static_cast<size_t>(n));
  int64_t in = bytes(rng);
  for (int i = 0; i < n; ++i) {
    LayerCost& c = costs[static_cast<size_t>(i)];
    c.index = i;
    c.name = std::string("l").append(std::to_string(i));
    c.kind = "dense";
    c.forward_flops = flops(rng);
    c.param_bytes = rng() % 3 == 0 ? 0 : bytes(rng) * 10;
    c.input_bytes = in;
    c.output_bytes = bytes(rng);
    c.scratch_bytes = rng() % 4 == 0 ? bytes(rng) : 0;
    in = c.output_bytes;
  }
  return costs;
}

std::vector<Device> RandomDevices(std::mt19937_64& rng, std::span<const LayerCost> costs, int k,
                                  int64_t total_memory) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<Device> devices;
  const bool identical = rng() % 4 == 0;  // exercises ties between devices
  for (int d = 0; d < k; ++d) {
    if (identical && d > 0) {
      devices.push_back(devices[0]);
      devices.back().name = std::string("d").append(std::to_string(d));
      continue;
    }
    Device dev;
    dev.name = std::string("d").append(std::to_string(d));
    const double gflops = 0.5 + 20 * unit(rng);
    for (const auto& c : costs) {
      // Per-layer speed varies around the device's FLOPS, as measured timings do.
      dev.layer_ms_per_sample.push_back(c.forward_flops / (gflops * 1e6) * (0.5 + unit(rng)));
    }
    if (rng() % 2 == 0) {
      // Entry costs (joining carried outputs) at some layers: a stage's cost then depends on
      // where it begins, not only on the layers it sums.
      for (size_t i = 0; i < costs.size(); ++i) {
        dev.entry_ms_per_sample.push_back(rng() % 3 == 0 ? 0.0 : 0.2 * unit(rng));
      }
    }
    // Budget from "everything fits" down to "hardly anything fits"; sometimes no limit.
    dev.memory_budget_bytes =
        rng() % 5 == 0
            ? 0
            : static_cast<uint64_t>(static_cast<double>(total_memory) * (0.05 + 1.2 * unit(rng)));
    dev.link_bandwidth_bytes_per_s = 1e6 * std::pow(10.0, 3 * unit(rng));
    dev.link_latency_ms = rng() % 3 == 0 ? 0 : 2 * unit(rng);
    dev.overhead_ms = rng() % 2 == 0 ? 0 : unit(rng);
    dev.num_threads = 1 + static_cast<int>(rng() % 3);
    devices.push_back(std::move(dev));
  }
  return devices;
}

// Checks that `plan` is a valid plan of `costs` over `devices` and that its figures are the
// sums/maxima of its stages' estimates.
void ExpectConsistent(const Plan& plan, std::span<const LayerCost> costs,
                      std::span<const Device> devices, const PlanOptions& options) {
  ASSERT_FALSE(plan.stages.empty());
  int next = 0;
  uint64_t used = 0;
  double bottleneck = 0, latency = 0;
  for (const PlannedStage& s : plan.stages) {
    EXPECT_EQ(s.begin, next);
    EXPECT_LT(s.begin, s.end);
    next = s.end;
    ASSERT_GE(s.device, 0);
    ASSERT_LT(s.device, static_cast<int>(devices.size()));
    EXPECT_EQ(used >> s.device & 1U, 0U) << "device used twice";
    used |= uint64_t{1} << s.device;
    const StageEstimate e =
        EstimateStage(costs, devices[static_cast<size_t>(s.device)], s.begin, s.end, options);
    EXPECT_TRUE(e.fits);
    EXPECT_EQ(e.stage_ms, s.estimate.stage_ms);
    bottleneck = std::max(bottleneck, e.stage_ms);
    latency += e.compute_ms + e.transfer_ms;
  }
  EXPECT_EQ(next, static_cast<int>(costs.size()));
  EXPECT_EQ(plan.bottleneck_ms, bottleneck);
  EXPECT_DOUBLE_EQ(plan.latency_ms, latency);
  EXPECT_DOUBLE_EQ(plan.throughput_samples_per_s, 1000.0 * options.micro_batch / bottleneck);
}

// fixed_stages: every trial asks for a stage count in [1, min(devices, layers)].
void CheckAgainstBruteForce(DeviceOrder order, bool fixed_stages = false) {
  std::mt19937_64 rng((order == DeviceOrder::kAny ? 20240611 : 77) + (fixed_stages ? 5 : 0));
  int feasible = 0, infeasible = 0;
  for (int trial = 0; trial < 300; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const int n = 1 + static_cast<int>(rng() % 10);
    const int k = 1 + static_cast<int>(rng() % 4);
    const auto costs = RandomCosts(rng, n);
    PlanOptions options;
    options.micro_batch = 1 + static_cast<int>(rng() % 64);
    options.in_flight = static_cast<int>(rng() % 3);
    options.order = order;
    if (fixed_stages) options.num_stages = 1 + static_cast<int>(rng() % std::min(n, k));
    int64_t total = 0;
    for (const auto& c : costs) {
      total += c.param_bytes + c.scratch_bytes + options.micro_batch * 3 * c.output_bytes;
    }
    const auto devices = RandomDevices(rng, costs, k, total);
    Best best;
    BruteForce(costs, devices, options, order == DeviceOrder::kGiven, 0, 0, -1, 0, 0, &best);
    auto plan = PlanPipeline(costs, devices, options);
    if (std::isinf(best.bottleneck)) {
      ++infeasible;
      ASSERT_FALSE(plan.ok());
      EXPECT_EQ(plan.status().code(), Status::Code::kResourceExhausted);
      EXPECT_FALSE(plan.status().message().empty());
      continue;
    }
    ++feasible;
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    EXPECT_EQ(plan->order_searched, order == DeviceOrder::kAny);
    ExpectConsistent(*plan, costs, devices, options);
    if (fixed_stages) {
      EXPECT_EQ(static_cast<int>(plan->stages.size()), options.num_stages);
    }
    EXPECT_EQ(plan->bottleneck_ms, best.bottleneck);
    EXPECT_NEAR(plan->latency_ms, best.latency, 1e-9 * best.latency);
  }
  // The generator must exercise both outcomes for the test to mean anything.
  EXPECT_GT(feasible, 100);
  EXPECT_GT(infeasible, 10);
}

TEST(PlannerTest, MatchesBruteForceWhenChoosingDevicesAndOrder) {
  CheckAgainstBruteForce(DeviceOrder::kAny);
}

TEST(PlannerTest, MatchesBruteForceInGivenOrder) { CheckAgainstBruteForce(DeviceOrder::kGiven); }

TEST(PlannerTest, MatchesBruteForceWithAFixedStageCount) {
  CheckAgainstBruteForce(DeviceOrder::kAny, /*fixed_stages=*/true);
  CheckAgainstBruteForce(DeviceOrder::kGiven, /*fixed_stages=*/true);
}

TEST(PlannerTest, RefusesMoreStagesThanDevicesOrLayers) {
  std::mt19937_64 rng(3);
  const auto costs = RandomCosts(rng, 3);
  const auto devices = RandomDevices(rng, costs, 2, 0);
  PlanOptions options;
  options.num_stages = 3;
  auto plan = PlanPipeline(costs, devices, options);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(plan.status().message().find("3 stages"), std::string::npos);
}

// ---------------------------------------------------------------- specific plans

Device FlopsDevice(std::span<const LayerCost> costs, const std::string& name, double gflops) {
  proto::DeviceProfile profile;
  profile.set_device_name(name);
  profile.set_flops(gflops * 1e9);
  profile.set_link_bandwidth_bytes_per_s(1e12);
  profile.set_link_latency_ms(1e-9);
  auto d = DeviceFromProfile(profile, costs);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return *d;
}

TEST(PlannerTest, OneDeviceRunsTheWholeModel) {
  const auto costs = ComputeLayerCosts(Build(CnnSpec()));
  const std::vector<Device> devices = {FlopsDevice(costs, "only", 10)};
  auto plan = PlanPipeline(costs, devices, PlanOptions{});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_EQ(plan->stages.size(), 1U);
  EXPECT_EQ(plan->stages[0].begin, 0);
  EXPECT_EQ(plan->stages[0].end, 10);
  EXPECT_EQ(plan->stages[0].device_name, "only");
  double flops = 0;
  for (const auto& c : costs) flops += c.forward_flops;
  EXPECT_NEAR(plan->stages[0].estimate.compute_ms, 64 * 1000 * flops / 10e9, 1e-9);
}

TEST(PlannerTest, IdenticalDevicesGetEqualStagesOfEqualLayers) {
  // Six identical layers over three identical devices: two layers each.
  std::vector<LayerCost> costs(6);
  for (int i = 0; i < 6; ++i) costs[static_cast<size_t>(i)] = {i, "l", "dense", 1e6, 0, 64, 64, 0};
  std::vector<Device> devices(3, FlopsDevice(costs, "x", 1));
  auto plan = PlanPipeline(costs, devices, PlanOptions{});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_EQ(plan->stages.size(), 3U);
  for (const auto& s : plan->stages) EXPECT_EQ(s.end - s.begin, 2);
  EXPECT_NEAR(plan->bottleneck_ms, 64 * 2 * 1e6 / 1e9 * 1000, 1e-6);
}

// Minimal max-sum over splits of `t` into at most k contiguous parts.
double BestBalanced(const std::vector<double>& t, int k) {
  const int n = static_cast<int>(t.size());
  std::vector<std::vector<double>> best(static_cast<size_t>(k) + 1,
                                        std::vector<double>(static_cast<size_t>(n) + 1, 1e300));
  best[0][0] = 0;
  for (int p = 1; p <= k; ++p) {
    for (int e = 1; e <= n; ++e) {
      double sum = 0;
      for (int b = e - 1; b >= 0; --b) {
        sum += t[static_cast<size_t>(b)];
        best[p][e] = std::min(best[p][e], std::max(best[p - 1][b], sum));
      }
      best[p][e] = std::min(best[p][e], best[p - 1][e]);
    }
  }
  return best[k][n];
}

TEST(PlannerTest, IdenticalDevicesSplitTheCnnIntoBalancedStages) {
  const auto costs = ComputeLayerCosts(Build(CnnSpec()));
  const Device one = FlopsDevice(costs, "pi", 2);
  double total = 0;
  for (double t : one.layer_ms_per_sample) total += 64 * t;
  for (int k = 2; k <= 4; ++k) {
    SCOPED_TRACE("k = " + std::to_string(k));
    std::vector<Device> devices(static_cast<size_t>(k), one);
    auto plan = PlanPipeline(costs, devices, PlanOptions{});
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    EXPECT_GE(plan->stages.size(), 2U);
    EXPECT_LT(plan->bottleneck_ms, total);
    std::vector<double> t;
    for (double x : one.layer_ms_per_sample) t.push_back(64 * x);
    EXPECT_NEAR(plan->bottleneck_ms, BestBalanced(t, k), 1e-9);
    EXPECT_GE(plan->bottleneck_ms, total / k - 1e-9);
  }
}

TEST(PlannerTest, SlowLinkKeepsLayersTogether) {
  // A fast second device behind a very slow link: sending anything costs more than computing
  // everything on the first device, so the plan uses one device.
  const auto costs = ComputeLayerCosts(Build(MlpSpec()));
  Device a = FlopsDevice(costs, "a", 1);
  Device b = FlopsDevice(costs, "b", 100);
  a.link_bandwidth_bytes_per_s = 1e3;
  b.link_bandwidth_bytes_per_s = 1e3;
  auto plan = PlanPipeline(costs, std::vector<Device>{a, b}, PlanOptions{});
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_EQ(plan->stages.size(), 1U);
  EXPECT_EQ(plan->stages[0].device_name, "b");  // the logits leave either way; b computes faster
}

TEST(PlannerTest, RefusesALayerThatFitsNoDeviceNamingIt) {
  const auto costs = ComputeLayerCosts(Build(CnnSpec()));  // fc1 holds 6.1 MB of weights
  std::vector<Device> devices = {FlopsDevice(costs, "a", 1), FlopsDevice(costs, "b", 1)};
  devices[0].memory_budget_bytes = 3 << 20;
  devices[1].memory_budget_bytes = 4 << 20;
  PlanOptions options;
  options.micro_batch = 1;  // at 64, conv1's activations alone (19 MB) would not fit
  auto plan = PlanPipeline(costs, devices, options);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), Status::Code::kResourceExhausted);
  EXPECT_THAT(plan.status().message(), HasSubstr("layer 7 (dense 'fc1', 6.1 MB of parameters"));
  EXPECT_THAT(plan.status().message(), HasSubstr("the largest budget is 4.0 MB (device 'b')"));
}

TEST(PlannerTest, RefusesLayersThatFitOnlyOneAtATime) {
  std::vector<LayerCost> costs(3);
  for (int i = 0; i < 3; ++i) costs[static_cast<size_t>(i)] = {i, "l", "dense", 1e6, 1000, 4, 4, 0};
  std::vector<Device> devices(2, FlopsDevice(costs, "x", 1));
  PlanOptions options;
  options.micro_batch = 1;
  options.in_flight = 0;
  for (auto& d : devices) d.memory_budget_bytes = 1100;  // one layer each, three layers
  auto plan = PlanPipeline(costs, devices, options);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), Status::Code::kResourceExhausted);
  EXPECT_THAT(plan.status().message(), HasSubstr("no split of the 3 layers over the 2 devices"));
  devices.push_back(devices[0]);  // a third device makes it fit
  EXPECT_TRUE(PlanPipeline(costs, devices, options).ok());
}

TEST(PlannerTest, RejectsBadInput) {
  const auto costs = ComputeLayerCosts(Build(MlpSpec()));
  const Device good = FlopsDevice(costs, "a", 1);
  EXPECT_EQ(PlanPipeline(costs, {}, PlanOptions{}).status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(PlanPipeline({}, std::vector<Device>{good}, PlanOptions{}).status().code(),
            Status::Code::kInvalidArgument);
  PlanOptions zero;
  zero.micro_batch = 0;
  EXPECT_EQ(PlanPipeline(costs, std::vector<Device>{good}, zero).status().code(),
            Status::Code::kInvalidArgument);
  Device short_times = good;
  short_times.layer_ms_per_sample.pop_back();
  EXPECT_THAT(
      PlanPipeline(costs, std::vector<Device>{short_times}, PlanOptions{}).status().message(),
      HasSubstr("has times for 5 layers, the model has 6"));
  Device nan = good;
  nan.layer_ms_per_sample[2] = std::nan("");
  EXPECT_EQ(PlanPipeline(costs, std::vector<Device>{nan}, PlanOptions{}).status().code(),
            Status::Code::kInvalidArgument);
  Device no_link = good;
  no_link.link_bandwidth_bytes_per_s = 0;
  EXPECT_EQ(PlanPipeline(costs, std::vector<Device>{no_link}, PlanOptions{}).status().code(),
            Status::Code::kInvalidArgument);
}

TEST(PlannerTest, FormatsATable) {
  const auto costs = ComputeLayerCosts(Build(CnnSpec()));
  std::vector<Device> devices = {FlopsDevice(costs, "a", 2), FlopsDevice(costs, "b", 2)};
  auto plan = PlanPipeline(costs, devices, PlanOptions{});
  ASSERT_TRUE(plan.ok());
  const std::string table = FormatPlan(*plan, costs);
  EXPECT_THAT(table, HasSubstr("slice"));
  EXPECT_THAT(table, HasSubstr("conv1"));
  EXPECT_THAT(table, HasSubstr("fc2"));
  EXPECT_THAT(table, HasSubstr("throughput"));
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(6.5 * 1024 * 1024), "6.5 MB");
}

// ---------------------------------------------------------------- profiles

TEST(DeviceFromProfileTest, TimingsAreScaledBySlowdown) {
  const auto costs = ComputeLayerCosts(Build(MlpSpec()));
  proto::DeviceProfile p;
  p.set_device_name("slow");
  p.set_slowdown(4);
  p.set_memory_budget_bytes(123);
  for (int i = 0; i < 6; ++i) {
    auto* t = p.add_layer_timings();
    t->set_layer_index(static_cast<uint32_t>(5 - i));  // order does not matter
    t->set_layer_name(costs[static_cast<size_t>(5 - i)].name);
    t->set_forward_ms_per_sample(0.01 * (i + 1));
    t->set_join_ms_per_sample(0.001 * i);
    t->set_band_fixed_ms_per_sample(0.002 * i);
    t->set_band_row_ms_per_sample(0.0005 * i);
  }
  auto d =
      DeviceFromProfile(p, costs, LinkDefaults{.bandwidth_bytes_per_s = 5e8, .latency_ms = 0.3});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_DOUBLE_EQ(d->layer_ms_per_sample[5], 4 * 0.01);
  EXPECT_DOUBLE_EQ(d->layer_ms_per_sample[0], 4 * 0.06);
  EXPECT_DOUBLE_EQ(d->layer_join_ms_per_sample[0], 4 * 0.005);
  EXPECT_DOUBLE_EQ(d->layer_band_fixed_ms_per_sample[0], 4 * 0.010);
  EXPECT_DOUBLE_EQ(d->layer_band_row_ms_per_sample[1], 4 * 0.002);
  EXPECT_TRUE(d->entry_ms_per_sample.empty());  // per unit: made by Chain::UnitEntryTimes
  EXPECT_EQ(d->io_ms_per_byte, 0);              // its I/O does not share its CPU
  EXPECT_EQ(d->memory_budget_bytes, 123U);
  EXPECT_EQ(d->link_bandwidth_bytes_per_s, 5e8);
  EXPECT_EQ(d->link_latency_ms, 0.3);

  proto::DeviceProfile other = p;
  other.mutable_layer_timings(0)->set_layer_name("conv1");
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(), HasSubstr("another model"));
  other = p;
  other.mutable_layer_timings()->RemoveLast();
  EXPECT_EQ(DeviceFromProfile(other, costs).status().code(), Status::Code::kInvalidArgument);
  other = p;
  other.mutable_layer_timings(1)->set_layer_index(0);
  other.mutable_layer_timings(1)->set_layer_name("");
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(), HasSubstr("repeated"));
  other = p;
  other.set_slowdown(0.5);
  EXPECT_EQ(DeviceFromProfile(other, costs).status().code(), Status::Code::kInvalidArgument);
  other = p;
  other.mutable_layer_timings(2)->set_join_ms_per_sample(std::nan(""));
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(), HasSubstr("join and band"));
  other = p;
  other.mutable_layer_timings(3)->set_band_fixed_ms_per_sample(-1);
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(), HasSubstr("join and band"));
  other = p;
  other.mutable_layer_timings(4)->set_band_row_ms_per_sample(
      std::numeric_limits<double>::infinity());
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(), HasSubstr("join and band"));
  other = p;
  other.set_activation_io_ms_per_mb(0.5);
  other.set_io_shares_compute(true);
  auto shared = DeviceFromProfile(other, costs);
  ASSERT_TRUE(shared.ok()) << shared.status().ToString();
  EXPECT_DOUBLE_EQ(shared->io_ms_per_byte, 0.5 * 4 / 1e6);  // × slowdown
  other.set_activation_io_ms_per_mb(std::nan(""));
  EXPECT_THAT(DeviceFromProfile(other, costs).status().message(),
              HasSubstr("activation_io_ms_per_mb"));
}

TEST(DeviceFromProfileTest, FlopsModelWithoutTimings) {
  const auto costs = ComputeLayerCosts(Build(MlpSpec()));
  proto::DeviceProfile p;
  p.set_flops(2e9);
  p.set_slowdown(3);
  auto d = DeviceFromProfile(p, costs);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_DOUBLE_EQ(d->layer_ms_per_sample[1], 1000.0 * 2 * 784 * 200 * 3 / 2e9);
  EXPECT_EQ(d->layer_ms_per_sample[0], 0);
  p.set_flops(0);
  EXPECT_THAT(DeviceFromProfile(p, costs).status().message(),
              HasSubstr("neither layer timings nor flops"));
}

TEST(MeasureTest, LayerTimesArePositiveAndFinite) {
  const Model model = Build(CnnSpec());
  TimingOptions options;
  options.batch = 8;
  options.budget = std::chrono::milliseconds(100);
  options.max_runs = 3;
  auto timings = MeasureLayerTimes(model, options);
  ASSERT_TRUE(timings.ok()) << timings.status().ToString();
  ASSERT_EQ(timings->size(), 10U);
  for (size_t i = 0; i < timings->size(); ++i) {
    const auto& t = (*timings)[i];
    EXPECT_EQ(t.layer_index(), i);
    EXPECT_EQ(t.layer_name(), model.spec().layers(static_cast<int>(i)).name());
    EXPECT_GT(t.forward_ms_per_sample(), 0);
    EXPECT_TRUE(std::isfinite(t.forward_ms_per_sample()));
    // Join times for the layers a pipeline may cut (conv2d, dense), none for the others.
    const auto& spec = model.spec().layers(static_cast<int>(i));
    if (spec.has_conv2d() || spec.has_dense()) {
      EXPECT_GT(t.join_ms_per_sample(), 0) << t.layer_name();
      EXPECT_TRUE(std::isfinite(t.join_ms_per_sample()));
    } else {
      EXPECT_EQ(t.join_ms_per_sample(), 0) << t.layer_name();
    }
    // Band costs for conv2d layers only (the ones cut into bands of rows): a row > 0 and a
    // fixed cost >= 0, both finite. (Not compared with the layer's own time: that would be
    // a timing assertion, and under a loaded CI the few runs here differ by 4x.)
    if (spec.has_conv2d()) {
      EXPECT_GT(t.band_row_ms_per_sample(), 0) << t.layer_name();
      EXPECT_TRUE(std::isfinite(t.band_row_ms_per_sample())) << t.layer_name();
      EXPECT_GE(t.band_fixed_ms_per_sample(), 0) << t.layer_name();
      EXPECT_TRUE(std::isfinite(t.band_fixed_ms_per_sample())) << t.layer_name();
    } else {
      EXPECT_EQ(t.band_row_ms_per_sample(), 0) << t.layer_name();
      EXPECT_EQ(t.band_fixed_ms_per_sample(), 0) << t.layer_name();
    }
  }
  options.batch = 0;
  EXPECT_EQ(MeasureLayerTimes(model, options).status().code(), Status::Code::kInvalidArgument);
}

TEST(MeasureTest, DeviceProfileFeedsThePlanner) {
  const Model model = Build(MlpSpec());
  ProfileOptions options;
  options.device_name = "emulated";
  options.slowdown = 4;
  options.memory_budget_bytes = 64 << 20;
  options.flops_budget = std::chrono::milliseconds(10);
  options.timing.batch = 16;
  options.timing.budget = std::chrono::milliseconds(50);
  auto profile = MeasureDeviceProfile(&model, options);
  ASSERT_TRUE(profile.ok()) << profile.status().ToString();
  EXPECT_GT(profile->flops(), 0);
  EXPECT_EQ(profile->slowdown(), 4);
  EXPECT_EQ(profile->layer_timings_size(), 6);
  EXPECT_GE(profile->num_threads(), 1U);
  const auto costs = ComputeLayerCosts(model);
  auto device = DeviceFromProfile(*profile, costs);
  ASSERT_TRUE(device.ok()) << device.status().ToString();
  EXPECT_DOUBLE_EQ(device->layer_ms_per_sample[1],
                   4 * profile->layer_timings(1).forward_ms_per_sample());
  options.slowdown = 0.5;
  EXPECT_EQ(MeasureDeviceProfile(nullptr, options).status().code(), Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace fedslice::slicing
