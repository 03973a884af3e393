// Federated round overhead over mutual TLS on loopback, and simulation speed.
//
// BM_RoundOverhead: a CoordinatorServer and 10 clients on 127.0.0.1. The clients answer each
// FitTask at once with an update of the right size (their "compute" is decoding the weights
// and encoding the update, timed and reported as compute_seconds), so what remains of a
// round's wall time is the coordinator's overhead: sending the global model to every client,
// receiving and validating the updates, aggregating, and the TLS framing. Counters:
//   round_ms           mean wall time of a round
//   overhead_ms        round_ms minus the slowest client's compute time in that round
//   bytes_per_round    bytes on the wire (frames, both directions) per round
//
// BM_SimulationRoundsPerMinute: `fedslice sim`'s set-up from the federated-training issue
// (100 clients, 2 label shards each, C = 0.1, E = 5, B = 10, mlp) on MNIST-10k, 5 rounds.
#include <benchmark/benchmark.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "fedslice/common/idx.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/coordinator/coordinator_server.h"
#include "fedslice/coordinator/simulation.h"

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using fedslice::Status;

constexpr int kClients = 10;

fs::path CertDir() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / "fedslice-bench-certs";
    const std::string cmd = std::string("bash '") + FEDSLICE_SOURCE_DIR +
                            "/scripts/make_certs.sh' '" + d.string() + "' " +
                            std::to_string(kClients) + " >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "make_certs.sh failed\n");
      std::exit(1);
    }
    return d;
  }();
  return dir;
}

fedslice::net::TlsConfig Tls(const std::string& name) {
  fedslice::net::TlsConfig tls;
  tls.ca_file = (CertDir() / "ca.pem").string();
  tls.cert_file = (CertDir() / (name + ".pem")).string();
  tls.key_file = (CertDir() / (name + ".key")).string();
  return tls;
}

// Slowest client compute time per round, as the clients measured it.
struct ComputeTimes {
  std::mutex mu;
  std::map<uint64_t, double> slowest;
  void Record(uint64_t round, double seconds) {
    std::lock_guard lock(mu);
    slowest[round] = std::max(slowest[round], seconds);
  }
};

// A client that answers every FitTask immediately with a small update.
void FastClient(uint16_t port, int index, ComputeTimes* times) {
  const std::string name = "client-" + std::to_string(index);
  auto channel = fedslice::net::Channel::Connect("127.0.0.1", port, Tls(name), 10s);
  if (!channel.ok()) return;
  fedslice::proto::Envelope hello;
  hello.mutable_hello()->set_client_id(name);
  hello.mutable_hello()->set_protocol_major(fedslice::net::kProtocolMajor);
  hello.mutable_hello()->set_protocol_minor(fedslice::net::kProtocolMinor);
  if (!(*channel)->Send(std::move(hello)).ok()) return;
  for (;;) {
    auto message = (*channel)->Receive(60s);
    if (!message.ok() || message->has_bye()) return;
    if (!message->has_fit_task()) continue;
    const auto started = std::chrono::steady_clock::now();
    const auto& task = message->fit_task();
    auto weights = fedslice::net::DecodeFp32(task.global_weights());
    if (!weights.ok()) return;
    std::vector<float> delta(weights->size(), 1e-4f);
    fedslice::proto::Envelope reply;
    auto* result = reply.mutable_fit_result();
    result->set_round(task.round());
    result->set_task_id(task.task_id());
    result->set_num_samples(100);
    if (!fedslice::net::EncodeFp32(delta, result->mutable_update()).ok()) return;
    const double compute =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    result->set_compute_seconds(compute);
    times->Record(task.round(), compute);
    if (!(*channel)->Send(std::move(reply)).ok()) return;
  }
}

void BM_RoundOverhead(benchmark::State& state, const char* model) {
  const int rounds = static_cast<int>(state.range(0));
  for (auto _ : state) {
    fedslice::coordinator::CoordinatorOptions options;
    options.federation.model = *fedslice::BuiltinSpec(model);
    options.federation.rounds = static_cast<uint32_t>(rounds);
    options.federation.fraction = 1.0;
    options.federation.min_fit = kClients;
    options.min_available = kClients;
    options.tls = Tls("coordinator");
    auto server = fedslice::coordinator::CoordinatorServer::Start(options, std::nullopt);
    if (!server.ok()) {
      state.SkipWithError(server.status().ToString().c_str());
      return;
    }
    ComputeTimes times;
    std::vector<std::thread> clients;
    for (int i = 0; i < kClients; ++i) {
      clients.emplace_back(FastClient, (*server)->port(), i, &times);
    }
    Status run = (*server)->Run();
    for (auto& t : clients) t.join();
    if (!run.ok()) {
      state.SkipWithError(run.ToString().c_str());
      return;
    }
    double seconds = 0;
    double overhead = 0;
    double bytes = 0;
    for (const auto& m : (*server)->History()) {
      seconds += m.seconds();
      overhead += m.seconds() - times.slowest[m.round()];
      bytes += static_cast<double>(m.bytes_up() + m.bytes_down());
    }
    state.counters["round_ms"] = 1e3 * seconds / rounds;
    state.counters["overhead_ms"] = 1e3 * overhead / rounds;
    state.counters["bytes_per_round"] = bytes / rounds;
  }
}

void BM_SimulationRoundsPerMinute(benchmark::State& state) {
  const fs::path data = fs::path(FEDSLICE_SOURCE_DIR) / "data" / "mnist-10k";
  auto train = fedslice::data::LoadMnist(data, fedslice::data::Split::kTrain);
  auto test = fedslice::data::LoadMnist(data, fedslice::data::Split::kTest);
  if (!train.ok() || !test.ok()) {
    state.SkipWithError("MNIST-10k missing: run scripts/fetch_mnist.sh");
    return;
  }
  fedslice::coordinator::SimulationConfig config;
  config.num_clients = 100;
  config.partition.kind = fedslice::data::PartitionScheme::kShards;
  config.federation.model = *fedslice::BuiltinSpec("mlp");
  config.federation.rounds = static_cast<uint32_t>(state.range(0));
  config.federation.fraction = 0.1;
  config.federation.min_fit = 1;
  config.federation.local_epochs = 5;
  config.federation.batch_size = 10;
  config.federation.learning_rate = 0.05f;
  for (auto _ : state) {
    const auto started = std::chrono::steady_clock::now();
    auto metrics = fedslice::coordinator::RunSimulation(config, *train, *test);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    if (!metrics.ok()) {
      state.SkipWithError(metrics.status().ToString().c_str());
      return;
    }
    state.counters["rounds_per_minute"] = 60.0 * static_cast<double>(metrics->size()) / seconds;
  }
}

}  // namespace

BENCHMARK_CAPTURE(BM_RoundOverhead, mlp, "mlp")->Arg(10)->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK_CAPTURE(BM_RoundOverhead, cnn, "cnn")->Arg(5)->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(BM_SimulationRoundsPerMinute)->Arg(5)->Iterations(1)->Unit(benchmark::kSecond);

int main(int argc, char** argv) {
  spdlog::set_level(spdlog::level::warn);  // per-round logs would drown the figures
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
