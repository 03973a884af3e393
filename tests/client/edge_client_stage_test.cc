// EdgeClient as a pipeline stage host, against an in-process fake coordinator (a net::Server
// with a RecordingHandler) and a test requester (client-2) that talks to the client's stage
// server directly.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "fedslice/client/device_profile.h"
#include "fedslice/client/edge_client.h"
#include "fedslice/common/codec.h"
#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/pipeline.h"
#include "testing/net_fixture.h"
#include "testing/test_util.h"

namespace fedslice::client {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
using testing::RecordingHandler;

constexpr uint64_t kPipeline = 11;
const char* const kClient = "client-1";
const char* const kRequester = "client-2";

data::Dataset SyntheticData(int n) {
  data::Dataset d;
  d.sample_shape = {1, 28, 28};
  d.num_classes = 10;
  d.features.resize(static_cast<size_t>(n * d.sample_size()));
  for (size_t i = 0; i < d.features.size(); ++i) {
    d.features[i] = static_cast<float>((i * 2654435761u) % 256) / 255.0f;
  }
  for (int i = 0; i < n; ++i) d.labels.push_back(i % 10);
  return d;
}

proto::Envelope Welcome(const proto::ModelSpec& spec) {
  proto::Envelope e;
  e.mutable_welcome()->set_session_id("s1");
  *e.mutable_welcome()->mutable_model() = spec;
  e.mutable_welcome()->mutable_run_config()->set_run_id("stage-run");
  e.mutable_welcome()->mutable_run_config()->set_total_rounds(1);
  return e;
}

class EdgeClientStageTest : public testing::NetTest {
 protected:
  void SetUp() override {
    NetTest::SetUp();
    auto model = Model::Create(MlpSpec());
    ASSERT_TRUE(model.ok());
    model_ = std::make_unique<Model>(std::move(*model));
  }

  EdgeClientOptions Options(uint16_t port, bool stages) {
    EdgeClientOptions o;
    o.host = "127.0.0.1";
    o.port = port;
    o.tls = pki().Config(kClient);
    o.connect_timeout = 5s;
    o.welcome_timeout = 5s;
    o.initial_backoff = 20ms;
    o.max_backoff = 200ms;
    DeviceProfileOptions profile;
    profile.flops_budget = 5ms;
    o.profile = MeasureDeviceProfile(profile);
    if (stages) {
      o.stage = slicing::StageHostOptions{};
      o.stage_timing.batch = 8;
      o.stage_timing.budget = 50ms;
      o.stage_timing.max_runs = 2;
    }
    return o;
  }

  struct Running {
    EdgeClient* client = nullptr;
    std::thread thread;
    Status status = Status::Internal("not finished");
    Status Join() {
      if (thread.joinable()) thread.join();
      return status;
    }
    ~Running() {
      if (thread.joinable()) {
        client->Stop();
        thread.join();
      }
    }
  };
  static void Start(EdgeClient& client, Running& running) {
    running.client = &client;
    running.thread = std::thread([&] { running.status = client.Run(); });
  }

  static proto::Envelope Expect(RecordingHandler& handler, proto::Envelope::BodyCase body) {
    auto message = handler.WaitMessage(30s);
    EXPECT_TRUE(message.has_value()) << "no message";
    if (!message) return {};
    EXPECT_EQ(message->envelope.body_case(), body) << net::BodyName(message->envelope);
    return message->envelope;
  }

  // A one-stage pipeline over the whole mlp (or the first `end` units of a 2-stage one).
  proto::Envelope Assign(uint32_t end = 6) {
    auto chain = slicing::Chain::Create(model_->spec(), {});
    EXPECT_TRUE(chain.ok());
    proto::Envelope e;
    proto::SliceAssign* a = e.mutable_slice_assign();
    a->set_pipeline_id(kPipeline);
    a->set_stage_index(0);
    a->set_num_stages(end == 6 ? 1 : 2);
    *a->mutable_model() = model_->spec();
    a->set_unit_begin(0);
    a->set_unit_end(end);
    auto packed = chain->PackSlice(model_->params(), 0, static_cast<int>(end));
    EXPECT_TRUE(packed.ok());
    EXPECT_TRUE(net::EncodeFp32(*packed, a->mutable_weights()).ok());
    a->set_upstream_identity(kRequester);
    a->set_requester_identity(kRequester);
    if (end != 6) {
      a->set_downstream_endpoint("127.0.0.1:1");
      a->set_downstream_identity("client-0");
    }
    a->set_micro_batch(8);
    a->set_in_flight(2);
    a->set_activation_codec("fp32");
    return e;
  }

  std::unique_ptr<net::Channel> Join(const std::string& endpoint, bool sink) {
    auto parsed = slicing::ParseEndpoint(endpoint);
    EXPECT_TRUE(parsed.ok()) << parsed.status().ToString();
    if (!parsed.ok()) return nullptr;
    net::ConnectOptions connect{kClient, kClient};
    auto channel =
        net::Channel::Connect(parsed->host, parsed->port, pki().Config(kRequester), 10s, connect);
    EXPECT_TRUE(channel.ok()) << channel.status().ToString();
    if (!channel.ok()) return nullptr;
    proto::Envelope join;
    join.mutable_stage_join()->set_pipeline_id(kPipeline);
    join.mutable_stage_join()->set_upstream(true);
    join.mutable_stage_join()->set_sink(sink);
    EXPECT_TRUE((*channel)->Send(std::move(join)).ok());
    return std::move(*channel);
  }

  Tensor Input(int64_t batch, uint64_t seed) const {
    Tensor t({batch, 1, 28, 28});
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (float& x : t.span()) x = u(rng);
    return t;
  }

  static proto::Envelope Batch(const Tensor& input, uint64_t batch_id) {
    proto::Envelope e;
    proto::ActivationBatch* b = e.mutable_activation_batch();
    b->set_pipeline_id(kPipeline);
    b->set_batch_id(batch_id);
    b->set_num_samples(static_cast<uint32_t>(input.batch()));
    EXPECT_TRUE(
        slicing::EncodeActivation(input, *codec::ParseCodec("fp32"), b->mutable_data()).ok());
    return e;
  }

  // Sends `input` through the stage on `channel` and checks the logits bit for bit.
  void ExpectServed(net::Channel& channel, uint64_t batch_id) {
    Tensor input = Input(5, batch_id);
    ASSERT_TRUE(channel.Send(Batch(input, batch_id)).ok());
    auto got = channel.Receive(30s);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_TRUE(got->has_activation_batch()) << net::BodyName(*got);
    EXPECT_EQ(got->activation_batch().batch_id(), batch_id);
    Tensor logits, expected;
    ASSERT_TRUE(slicing::DecodeActivation(got->activation_batch().data(), {5, 10}, &logits).ok());
    ASSERT_TRUE(model_->Forward(input, &expected).ok());
    for (int64_t j = 0; j < logits.size(); ++j) ASSERT_EQ(logits.data()[j], expected.data()[j]);
  }

  static bool ClosedByPeer(net::Channel& channel) {
    for (int i = 0; i < 10; ++i) {
      auto got = channel.Receive(20s);
      if (!got.ok()) return got.status().code() != Status::Code::kDeadlineExceeded;
      if (!got->has_error() && !got->has_bye()) return false;
    }
    return false;
  }

  std::unique_ptr<Model> model_;
};

TEST_F(EdgeClientStageTest, ReportsTimingsHostsTheAssignedSliceAndReleasesIt) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(16), std::nullopt);
  EdgeClientOptions options = Options(server->port(), true);
  options.slowdown = 2.0;
  // A container limited to 0.5 CPU, the stage computing on one engine thread: the profile
  // says 2 x 2 = 4 times slower than the timings.
  testing::TempDir cgroup;
  std::ofstream(cgroup.path() / "cpu.max") << "50000 100000\n";
  options.cgroup_root = cgroup.path().string();
  options.stage->engine_threads = 1;
  EdgeClient client(options, trainer);
  Running running;
  Start(client, running);

  auto open = handler->WaitOpen(10s);
  ASSERT_TRUE(open.has_value());
  auto hello = Expect(*handler, proto::Envelope::kHello);
  const std::string endpoint = hello.hello().stage_endpoint();
  EXPECT_THAT(endpoint, ::testing::StartsWith("127.0.0.1:"));
  EXPECT_TRUE(hello.hello().profile().layer_timings().empty());  // no model known yet

  ASSERT_TRUE((*open)->Send(Welcome(MlpSpec())).ok());
  auto update = Expect(*handler, proto::Envelope::kProfileUpdate);
  const proto::DeviceProfile& profile = update.profile_update().profile();
  ASSERT_EQ(profile.layer_timings_size(), model_->num_layers());
  for (int i = 0; i < profile.layer_timings_size(); ++i) {
    EXPECT_EQ(profile.layer_timings(i).layer_index(), static_cast<uint32_t>(i));
    EXPECT_GT(profile.layer_timings(i).forward_ms_per_sample(), 0.0);
  }
  EXPECT_EQ(profile.slowdown(), 4.0);
  EXPECT_GT(profile.flops(), 0.0);
  // Half a CPU cannot run the engine thread and the I/O at once: the planner is told that
  // the stage's network work comes out of its compute, and what it costs per MB.
  EXPECT_TRUE(profile.io_shares_compute());
  EXPECT_GT(profile.activation_io_ms_per_mb(), 0.0);
  EXPECT_TRUE(std::isfinite(profile.activation_io_ms_per_mb()));

  ASSERT_TRUE((*open)->Send(Assign()).ok());
  auto ready = Expect(*handler, proto::Envelope::kSliceReady);
  EXPECT_EQ(ready.slice_ready().pipeline_id(), kPipeline);
  EXPECT_EQ(ready.slice_ready().stage_index(), 0u);
  EXPECT_TRUE(ready.slice_ready().ok()) << ready.slice_ready().message();
  EXPECT_EQ(client.slices_assigned(), 1u);

  auto requester = Join(endpoint, /*sink=*/true);
  ASSERT_TRUE(requester);
  ExpectServed(*requester, 1);

  // A bad assignment is refused with the reason; the slice already hosted keeps serving.
  proto::Envelope bad = Assign();
  bad.mutable_slice_assign()->set_pipeline_id(kPipeline + 1);
  bad.mutable_slice_assign()->mutable_weights()->set_num_values(3);
  bad.mutable_slice_assign()->mutable_weights()->set_payload(std::string(12, '\0'));
  ASSERT_TRUE((*open)->Send(std::move(bad)).ok());
  ready = Expect(*handler, proto::Envelope::kSliceReady);
  EXPECT_EQ(ready.slice_ready().pipeline_id(), kPipeline + 1);
  EXPECT_FALSE(ready.slice_ready().ok());
  EXPECT_THAT(ready.slice_ready().message(), HasSubstr("parameters"));
  ExpectServed(*requester, 2);

  proto::Envelope release;
  release.mutable_slice_release()->set_pipeline_id(kPipeline);
  ASSERT_TRUE((*open)->Send(std::move(release)).ok());
  EXPECT_TRUE(ClosedByPeer(*requester));

  (*open)->Close(Status::Ok());
  Status run = running.Join();
  EXPECT_TRUE(run.ok()) << run.ToString();
}

TEST_F(EdgeClientStageTest, AStageThatCannotDeliverIsReportedAsSliceReadyNotOk) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(16), std::nullopt);
  EdgeClientOptions options = Options(server->port(), true);
  options.stage->downstream_connect_budget = 300ms;
  EdgeClient client(options, trainer);
  Running running;
  Start(client, running);

  auto open = handler->WaitOpen(10s);
  ASSERT_TRUE(open.has_value());
  auto hello = Expect(*handler, proto::Envelope::kHello);
  ASSERT_TRUE((*open)->Send(Welcome(MlpSpec())).ok());
  Expect(*handler, proto::Envelope::kProfileUpdate);
  ASSERT_TRUE((*open)->Send(Assign(/*end=*/3)).ok());  // stage 0 of 2; nobody at port 1
  EXPECT_TRUE(Expect(*handler, proto::Envelope::kSliceReady).slice_ready().ok());

  auto requester = Join(hello.hello().stage_endpoint(), /*sink=*/false);
  ASSERT_TRUE(requester);
  ASSERT_TRUE(requester->Send(Batch(Input(2, 1), 1)).ok());
  auto failed = Expect(*handler, proto::Envelope::kSliceReady);
  EXPECT_EQ(failed.slice_ready().pipeline_id(), kPipeline);
  EXPECT_FALSE(failed.slice_ready().ok());
  EXPECT_THAT(failed.slice_ready().message(), HasSubstr("unreachable"));

  // Losing the coordinator drops the slice: its sessions close, and after the reconnect the
  // timings (measured once per model) are reported again.
  (*open)->Close(Status::Unavailable("coordinator restarting"));
  EXPECT_TRUE(ClosedByPeer(*requester));
  auto reopened = handler->WaitOpen(10s);
  ASSERT_TRUE(reopened.has_value());
  Expect(*handler, proto::Envelope::kHello);
  ASSERT_TRUE((*reopened)->Send(Welcome(MlpSpec())).ok());
  auto again = Expect(*handler, proto::Envelope::kProfileUpdate);
  EXPECT_EQ(again.profile_update().profile().layer_timings_size(), model_->num_layers());
  client.Stop();
  EXPECT_EQ(running.Join().code(), Status::Code::kAborted);
}

TEST_F(EdgeClientStageTest, WithoutStageHostingNothingChangesAndSlicesAreDeclined) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(16), std::nullopt);
  EdgeClient client(Options(server->port(), false), trainer);
  Running running;
  Start(client, running);

  auto open = handler->WaitOpen(10s);
  ASSERT_TRUE(open.has_value());
  auto hello = Expect(*handler, proto::Envelope::kHello);
  EXPECT_TRUE(hello.hello().stage_endpoint().empty());
  ASSERT_TRUE((*open)->Send(Welcome(MlpSpec())).ok());
  ASSERT_TRUE((*open)->Send(Assign()).ok());
  // The next message is the answer: no ProfileUpdate from a client that hosts no stages.
  auto ready = Expect(*handler, proto::Envelope::kSliceReady);
  EXPECT_FALSE(ready.slice_ready().ok());
  EXPECT_THAT(ready.slice_ready().message(), HasSubstr("does not host pipeline stages"));
  (*open)->Close(Status::Ok());
  EXPECT_TRUE(running.Join().ok());
  EXPECT_EQ(client.slices_assigned(), 0u);
}

TEST(EdgeClientStageOptionsTest, StageOptionsAreValidated) {
  EdgeClientOptions o;
  o.host = "127.0.0.1";
  o.port = 1;
  o.tls.ca_file = o.tls.cert_file = o.tls.key_file = "x.pem";
  EXPECT_TRUE(o.Validate().ok()) << o.Validate().ToString();
  o.stage = slicing::StageHostOptions{};
  EXPECT_TRUE(o.Validate().ok());
  o.stage->bind_address = "0.0.0.0";
  EXPECT_THAT(o.Validate().message(), HasSubstr("advertise"));
  o.stage->advertise_host = "client-1";
  o.stage_timing.batch = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("timing"));
}

}  // namespace
}  // namespace fedslice::client
