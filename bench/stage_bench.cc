// What cutting the cnn into pipeline stages costs in compute: the stage executors of the
// K-stage plan (K = 1..4, layers cut as the planner does, slicing/chain.h) timed one after
// the other on this thread, on micro-batches of 64, one engine thread (as the emulated
// devices of bench/pipeline_bench.sh run). Counters:
//   sum_ms       the K stages' times added up: the work of one micro-batch through the plan
//   max_ms       the slowest stage: what bounds the pipeline's throughput
//   balance      sum_ms / (K * max_ms): 1 = perfectly balanced stages
//   sK_ratio     stage K's fastest time / the planner's prediction from the profile
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <random>

#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/planner.h"

namespace {

using namespace fedslice;

void BM_CnnStages(benchmark::State& state) {
  const int stages = static_cast<int>(state.range(0));
  const int batch = 64;
  SetNumThreads(1);
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  const auto layer_costs = slicing::ComputeLayerCosts(*model);
  auto chain = slicing::Chain::Create(spec, slicing::AutoSplit(spec, layer_costs, stages, batch));
  // Identical devices with this host's measured layer times, as clients report them.
  slicing::TimingOptions timing;
  timing.batch = batch;
  auto times = slicing::MeasureLayerTimes(*model, timing);
  proto::DeviceProfile profile;
  for (const auto& t : *times) *profile.add_layer_timings() = t;
  auto device = slicing::DeviceFromProfile(profile, layer_costs);
  if (!device.ok()) {
    state.SkipWithError(device.status().ToString().c_str());
    return;
  }
  std::vector<slicing::Device> devices(static_cast<size_t>(stages), chain->UnitDevice(*device));
  for (int i = 0; i < stages; ++i)
    devices[static_cast<size_t>(i)].name = std::string("d").append(std::to_string(i));
  slicing::PlanOptions options;
  options.micro_batch = batch;
  options.num_stages = stages;
  auto plan = slicing::PlanPipeline(chain->UnitCosts(layer_costs), devices, options);
  if (!plan.ok()) {
    state.SkipWithError(plan.status().ToString().c_str());
    return;
  }
  std::vector<std::unique_ptr<slicing::StageExecutor>> executors;
  for (const auto& s : plan->stages) {
    auto packed = chain->PackSlice(model->params(), s.begin, s.end);
    auto executor = packed.ok() ? slicing::StageExecutor::Create(*chain, s.begin, s.end, *packed)
                                : Result<std::unique_ptr<slicing::StageExecutor>>(packed.status());
    if (!executor.ok()) {
      state.SkipWithError(executor.status().ToString().c_str());
      return;
    }
    executors.push_back(std::move(executor).value());
  }
  Tensor input({batch, 1, 28, 28});
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : input.span()) x = u(rng);

  std::vector<double> stage_ms(executors.size(), 0.0);
  std::vector<double> stage_min_ms(executors.size(), 1e300);
  // Kept across iterations, as a stage keeps its buffers from batch to batch.
  Tensor main, carry, out, out_carry;
  for (auto _ : state) {
    main = input;
    carry = Tensor();
    for (size_t k = 0; k < executors.size(); ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      if (Status run = executors[k]->Run(main, carry, &out, &out_carry); !run.ok()) {
        state.SkipWithError(run.ToString().c_str());
        return;
      }
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      stage_ms[k] += ms;
      stage_min_ms[k] = std::min(stage_min_ms[k], ms);
      std::swap(main, out);
      std::swap(carry, out_carry);
    }
    benchmark::DoNotOptimize(main.data());
  }
  double sum = 0, max = 0;
  for (double& ms : stage_ms) {
    ms /= static_cast<double>(state.iterations());
    sum += ms;
    max = std::max(max, ms);
  }
  state.counters["sum_ms"] = sum;
  state.counters["max_ms"] = max;
  state.counters["balance"] = sum / (static_cast<double>(stages) * max);
  state.counters["predicted_max_ms"] = plan->bottleneck_ms;
  // Each stage's fastest run / the planner's prediction (the profile is the fastest of its
  // runs too): where the profile misjudges a slice.
  for (size_t k = 0; k < stage_ms.size(); ++k) {
    char name[32];  // not std::string concatenation: GCC 12's -Wrestrict misfires on it
    std::snprintf(name, sizeof(name), "s%zu_ratio", k);
    state.counters[name] = stage_min_ms[k] / plan->stages[k].estimate.compute_ms;
  }
  std::string label;
  for (const auto& s : plan->stages) {
    if (!label.empty()) label.append(" | ");
    label.append(chain->Describe(s.begin, s.end));
  }
  state.SetLabel(label);
}

BENCHMARK(BM_CnnStages)->DenseRange(1, 4)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
