// Training throughput of the built-in models (the issue-2 bar: on 2 threads, mlp at batch 10
// >= 30,000 samples/s and cnn at batch 10 >= 600 samples/s) and the machine's sgemm rate for
// scale. Run with --benchmark_format=json for the samples_per_second / gflops counters.
#include <benchmark/benchmark.h>

#include <random>

#include "fedslice/common/model_zoo.h"
#include "fedslice/common/tensor.h"
#include "fedslice/common/threading.h"
#include "fedslice/common/trainer.h"

namespace fedslice {
namespace {

// Random MNIST-shaped samples: throughput does not depend on the values.
data::Dataset RandomMnist(int64_t n) {
  data::Dataset d;
  d.sample_shape = {1, 28, 28};
  d.num_classes = 10;
  d.features.resize(static_cast<size_t>(n) * 784);
  d.labels.resize(static_cast<size_t>(n));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : d.features) x = u(rng);
  for (int32_t& y : d.labels) y = static_cast<int32_t>(rng() % 10);
  return d;
}

// One benchmark iteration = one epoch of Train() (shuffle, batching, forward, backward, SGD
// with momentum) over `samples` samples.
void TrainThroughput(benchmark::State& state, const proto::ModelSpec& spec, int64_t samples) {
  const int batch = static_cast<int>(state.range(0));
  SetNumThreads(static_cast<int>(state.range(1)));
  Model model = *Model::Create(spec);
  const data::Dataset data = RandomMnist(samples);
  TrainConfig config{.epochs = 1, .batch_size = batch, .lr = 0.01f, .momentum = 0.9f};
  for (auto _ : state) {
    config.seed++;
    Result<TrainStats> stats = Train(model, data, config);
    if (!stats.ok()) {
      state.SkipWithError(stats.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(model.params().data());
  }
  state.counters["samples_per_second"] = benchmark::Counter(
      static_cast<double>(state.iterations() * samples), benchmark::Counter::kIsRate);
  state.counters["threads"] = static_cast<double>(NumThreads());
  SetNumThreads(0);
}

void BM_TrainMlp(benchmark::State& state) { TrainThroughput(state, MlpSpec(), 2000); }
void BM_TrainCnn(benchmark::State& state) { TrainThroughput(state, CnnSpec(), 320); }

// Args: {batch, threads}.
BENCHMARK(BM_TrainMlp)->ArgsProduct({{10, 64}, {1, 2}})->ArgNames({"batch", "threads"})
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TrainCnn)->ArgsProduct({{10, 64}, {1, 2}})->ArgNames({"batch", "threads"})
    ->Unit(benchmark::kMillisecond)->UseRealTime();

// n x n x n single-precision matrix product with Eigen, the engine's GEMM.
void BM_Sgemm(benchmark::State& state) {
  const int64_t n = state.range(0);
  SetNumThreads(static_cast<int>(state.range(1)));
  RowMatrix a = RowMatrix::Random(n, n), b = RowMatrix::Random(n, n), c(n, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["gflops"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 2.0 * n * n * n / 1e9,
      benchmark::Counter::kIsRate);
  SetNumThreads(0);
}
BENCHMARK(BM_Sgemm)->ArgsProduct({{512}, {1, 2}})->ArgNames({"n", "threads"})->UseRealTime();

}  // namespace
}  // namespace fedslice

BENCHMARK_MAIN();
