// Per-hop overhead of split inference: one micro-batch of activations from one stage to the
// next over mutual TLS 1.3 on loopback, with the framing, Protobuf and activation encoding a
// pipeline pays (slicing/pipeline.h).
//
// The micro-batch is the one that crosses the boundary of the 2-stage `cnn` plan over two
// identical devices (the planner cuts conv2 into parts, so the boundary carries conv2's input
// plus the positions done; see chain.h), 64 images. The sender encodes it (fp32, fp16 or int8) and
// sends; the receiver decodes it with its shape checked, as a stage does, and acknowledges it;
// at most 2 micro-batches are unacknowledged (the pipeline's in_flight). Counters:
//   hop_ms      wall time per micro-batch in steady state (what a pipeline's throughput sees)
//   bytes       frame bytes per micro-batch
//   budget_ms   the bar: 0.5 ms + bytes at 1 GB/s
//   rtt_ms      one micro-batch there and a small acknowledgement back, nothing else in flight
#include <benchmark/benchmark.h>
#include <spdlog/spdlog.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>

#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/server.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/planner.h"

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using namespace fedslice;

fs::path CertDir() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / "fedslice-hop-bench-certs";
    const std::string cmd = std::string("bash '") + FEDSLICE_SOURCE_DIR +
                            "/scripts/make_certs.sh' '" + d.string() + "' 2 >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "make_certs.sh failed\n");
      std::exit(1);
    }
    return d;
  }();
  return dir;
}

net::TlsConfig Tls(const std::string& name) {
  net::TlsConfig tls;
  tls.ca_file = (CertDir() / "ca.pem").string();
  tls.cert_file = (CertDir() / (name + ".pem")).string();
  tls.key_file = (CertDir() / (name + ".key")).string();
  tls.buffer_keep_bytes = size_t{16} << 20;
  return tls;
}

// The activations crossing the 2-stage cnn plan's boundary, for `batch` images.
struct Boundary {
  std::vector<int64_t> main_shape, carry_shape;
  std::string where;
};

Boundary CnnBoundary(int batch) {
  const proto::ModelSpec spec = CnnSpec();
  auto model = Model::Create(spec);
  const auto layer_costs = slicing::ComputeLayerCosts(*model);
  auto chain = slicing::Chain::Create(spec, slicing::AutoSplit(spec, layer_costs, 2, batch));
  proto::DeviceProfile profile;
  profile.set_flops(50e9);
  profile.set_num_threads(1);
  auto device = slicing::DeviceFromProfile(profile, layer_costs);
  device->layer_ms_per_sample = chain->UnitTimes(device->layer_ms_per_sample);
  std::vector<slicing::Device> devices = {*device, *device};
  devices[1].name = "b";
  slicing::PlanOptions options;
  options.micro_batch = batch;
  options.num_stages = 2;
  auto plan = slicing::PlanPipeline(chain->UnitCosts(layer_costs), devices, options);
  const int cut = plan->stages[0].end;
  Boundary b;
  b.main_shape = {batch};
  for (int64_t d : chain->MainShape(cut)) b.main_shape.push_back(d);
  for (int64_t d : chain->CarryShape(cut)) b.carry_shape.push_back(d);
  if (!b.carry_shape.empty())
    b.carry_shape.insert(b.carry_shape.begin(), chain->CarrySamples(cut, batch));
  b.where = "after " + chain->Describe(0, cut);
  return b;
}

Tensor RandomTensor(const std::vector<int64_t>& shape, uint64_t seed) {
  Tensor t(shape);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 2.0f);
  for (float& x : t.span()) x = u(rng);
  return t;
}

// The receiving stage: decodes every ActivationBatch as a stage would and acknowledges it.
class Receiver final : public net::SessionHandler {
 public:
  Receiver(std::vector<int64_t> main_shape, std::vector<int64_t> carry_shape)
      : main_shape_(std::move(main_shape)), carry_shape_(std::move(carry_shape)) {}
  void OnOpen(const net::SessionPtr&) override {}
  void OnMessage(const net::SessionPtr& session, proto::Envelope e) override {
    if (!e.has_activation_batch()) return;
    const auto& batch = e.activation_batch();
    Status s = slicing::DecodeActivation(batch.data(), main_shape_, &main_);
    if (s.ok() && !carry_shape_.empty()) {
      s = slicing::DecodeActivation(batch.carry(), carry_shape_, &carry_);
    }
    if (!s.ok()) {
      spdlog::error("receiver: {}", s.ToString());
      session->Close(s);
      return;
    }
    proto::Envelope ack;
    auto* a = ack.mutable_activation_batch();
    a->set_batch_id(batch.batch_id());
    a->set_num_samples(1);
    (void)net::EncodeFp32(std::vector<float>{0.0f}, a->mutable_data());
    (void)session->Send(std::move(ack));
  }
  void OnClosed(const net::SessionPtr&, const Status&) override {}

 private:
  std::vector<int64_t> main_shape_, carry_shape_;
  Tensor main_, carry_;
};

void BM_PerHop(benchmark::State& state, const char* codec_name) {
  spdlog::set_level(spdlog::level::warn);
  const int batch = static_cast<int>(state.range(0));
  const Boundary boundary = CnnBoundary(batch);
  const auto codec = *codec::ParseCodec(codec_name);
  const Tensor main = RandomTensor(boundary.main_shape, 1);
  const Tensor carry = boundary.carry_shape.empty() ? Tensor() : RandomTensor(boundary.carry_shape, 2);

  boost::asio::io_context io;
  auto work = boost::asio::make_work_guard(io);
  net::ServerOptions server_options;
  server_options.bind_address = "127.0.0.1";
  auto handler = std::make_shared<Receiver>(boundary.main_shape, boundary.carry_shape);
  auto server = net::Server::Start(io, Tls("client-1"), server_options, handler);
  if (!server.ok()) {
    state.SkipWithError(server.status().ToString().c_str());
    return;
  }
  std::thread io_thread([&] { io.run(); });
  net::ConnectOptions connect;
  connect.server_name = "client-1";
  connect.expected_identity = "client-1";
  auto channel = net::Channel::Connect("127.0.0.1", (*server)->port(), Tls("client-0"), 10s, connect);
  if (!channel.ok()) {
    state.SkipWithError(channel.status().ToString().c_str());
    (*server)->Stop();
    work.reset();
    io_thread.join();
    return;
  }
  auto make = [&](uint64_t id) {
    proto::Envelope e;
    auto* b = e.mutable_activation_batch();
    b->set_pipeline_id(1);
    b->set_batch_id(id);
    b->set_unit(1);
    b->set_num_samples(static_cast<uint32_t>(batch));
    (void)slicing::EncodeActivation(main, codec, b->mutable_data());
    if (carry.size() > 0) (void)slicing::EncodeActivation(carry, codec, b->mutable_carry());
    return e;
  };
  const double bytes = static_cast<double>(net::kFrameHeaderBytes + make(0).ByteSizeLong());
  auto fail = [&](const Status& s) { state.SkipWithError(s.ToString().c_str()); };

  // Round trip with nothing else in flight.
  double rtt_total = 0;
  const int rtt_runs = 20;
  for (int i = 0; i < rtt_runs + 2; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (Status s = (*channel)->Send(make(1000 + i)); !s.ok()) return fail(s);
    auto ack = (*channel)->Receive(10s);
    if (!ack.ok()) return fail(ack.status());
    if (i >= 2) rtt_total += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  const int per_iteration = 50;
  uint64_t id = 0;
  double stream_ms = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    int outstanding = 0;
    for (int i = 0; i < per_iteration; ++i) {
      if (outstanding == 2) {
        auto ack = (*channel)->Receive(10s);
        if (!ack.ok()) return fail(ack.status());
        --outstanding;
      }
      if (Status s = (*channel)->Send(make(++id)); !s.ok()) return fail(s);
      ++outstanding;
    }
    for (; outstanding > 0; --outstanding) {
      auto ack = (*channel)->Receive(10s);
      if (!ack.ok()) return fail(ack.status());
    }
    stream_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  state.SetItemsProcessed(state.iterations() * per_iteration);
  state.counters["hop_ms"] = stream_ms / static_cast<double>(state.iterations() * per_iteration);
  state.counters["bytes"] = bytes;
  state.counters["budget_ms"] = 0.5 + bytes / 1e6;
  state.counters["rtt_ms"] = rtt_total / rtt_runs;
  state.SetLabel(boundary.where);
  (*channel)->Close();
  (*server)->Stop();
  work.reset();
  io_thread.join();
}

BENCHMARK_CAPTURE(BM_PerHop, fp32, "fp32")->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_PerHop, fp16, "fp16")->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_PerHop, int8, "int8")->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
