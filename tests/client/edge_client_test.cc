// EdgeClient against an in-process fake coordinator: a net::Server whose RecordingHandler lets
// each test play the coordinator's part message by message.
#include "fedslice/client/edge_client.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "fedslice/client/device_profile.h"
#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "testing/net_fixture.h"
#include "testing/subprocess.h"

namespace fedslice::client {
namespace {

using namespace std::chrono_literals;
using testing::RecordingHandler;

// A small private data set of MNIST-shaped samples (the built-in MLP's input).
data::Dataset SyntheticData(int n, std::vector<int64_t> shape = {1, 28, 28}) {
  data::Dataset d;
  d.sample_shape = std::move(shape);
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
  e.mutable_welcome()->mutable_run_config()->set_run_id("test-run");
  e.mutable_welcome()->mutable_run_config()->set_total_rounds(5);
  e.mutable_welcome()->mutable_run_config()->set_next_round(1);
  return e;
}

// A FitTask carrying `weights` (as fp32, or `raw` as is when given).
proto::Envelope FitTask(uint64_t round, uint64_t task_id, const proto::EncodedTensor& weights) {
  proto::Envelope e;
  proto::FitTask* t = e.mutable_fit_task();
  t->set_round(round);
  t->set_task_id(task_id);
  *t->mutable_global_weights() = weights;
  t->set_local_epochs(1);
  t->set_batch_size(8);
  t->set_learning_rate(0.05f);
  t->set_deadline_ms(120'000);
  t->set_seed(5);
  return e;
}

proto::EncodedTensor Fp32(std::span<const float> values) {
  proto::EncodedTensor t;
  EXPECT_TRUE(net::EncodeFp32(values, &t).ok());
  return t;
}

class EdgeClientTest : public testing::NetTest {
 protected:
  void SetUp() override {
    NetTest::SetUp();
    auto model = Model::Create(MlpSpec());
    ASSERT_TRUE(model.ok());
    weights_.assign(model->params().begin(), model->params().end());
  }

  EdgeClientOptions Options(uint16_t port, const std::string& name = "client-1") {
    EdgeClientOptions o;
    o.host = "127.0.0.1";
    o.port = port;
    o.tls = pki().Config(name);
    o.connect_timeout = 5s;
    o.welcome_timeout = 5s;
    o.initial_backoff = 20ms;
    o.max_backoff = 200ms;
    DeviceProfileOptions profile;
    profile.flops_budget = 5ms;
    o.profile = MeasureDeviceProfile(profile);
    return o;
  }

  // Runs client.Run() on a thread. Join() waits for it; the destructor (a failed ASSERT
  // leaving the test early) stops the client first, so no test can hang on it.
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

  // Waits for the client's session and its Hello.
  net::SessionPtr ExpectHello(RecordingHandler& handler, const std::string& name = "client-1") {
    auto open = handler.WaitOpen(10s);
    EXPECT_TRUE(open.has_value());
    if (!open) return nullptr;
    auto hello = handler.WaitMessage(10s);
    EXPECT_TRUE(hello.has_value());
    if (!hello) return nullptr;
    EXPECT_TRUE(hello->envelope.has_hello()) << net::BodyName(hello->envelope);
    EXPECT_EQ(hello->envelope.hello().client_id(), name);
    return *open;
  }

  // The next message on any session, which must be `body`.
  proto::Envelope Expect(RecordingHandler& handler, proto::Envelope::BodyCase body,
                         std::chrono::milliseconds timeout = 30s) {
    auto message = handler.WaitMessage(timeout);
    EXPECT_TRUE(message.has_value()) << "no message";
    if (!message) return {};
    EXPECT_EQ(message->envelope.body_case(), body) << net::BodyName(message->envelope);
    return message->envelope;
  }

  std::vector<float> weights_;
};

TEST_F(EdgeClientTest, RegistersWithCertificateIdentityTrainsAndEndsOnByeNormal) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(32), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);

  auto open = handler->WaitOpen(10s);
  ASSERT_TRUE(open.has_value());
  auto hello = Expect(*handler, proto::Envelope::kHello);
  auto identity = net::CertificateIdentity(pki().cert("client-1"));
  ASSERT_TRUE(identity.ok());
  EXPECT_EQ(hello.hello().client_id(), *identity);
  EXPECT_EQ(hello.hello().protocol_major(), net::kProtocolMajor);
  EXPECT_EQ(hello.hello().protocol_minor(), net::kProtocolMinor);
  EXPECT_GT(hello.hello().profile().flops(), 0.0);
  EXPECT_GE(hello.hello().profile().num_threads(), 1U);
  EXPECT_EQ(hello.hello().profile().slowdown(), 1.0);

  ASSERT_TRUE((*open)->Send(Welcome(MlpSpec())).ok());
  ASSERT_TRUE((*open)->Send(FitTask(3, 77, Fp32(weights_))).ok());
  auto result = Expect(*handler, proto::Envelope::kFitResult);
  EXPECT_EQ(result.fit_result().round(), 3U);
  EXPECT_EQ(result.fit_result().task_id(), 77U);
  EXPECT_EQ(result.fit_result().update().num_values(), weights_.size());
  EXPECT_EQ(result.fit_result().num_samples(), 32U);
  EXPECT_TRUE(std::isfinite(result.fit_result().train_loss()));
  auto update = net::DecodeFp32(result.fit_result().update(), weights_.size());
  ASSERT_TRUE(update.ok()) << update.status().ToString();
  // Training moved the weights: the update is not all zeros.
  EXPECT_GT(std::count_if(update->begin(), update->end(), [](float v) { return v != 0.0f; }), 0);

  (*open)->Close(Status::Ok());  // Bye{BYE_NORMAL}: run complete
  Status run = running.Join();
  EXPECT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(client.fit_tasks_done(), 1U);
  EXPECT_EQ(client.sessions_registered(), 1U);
}

TEST_F(EdgeClientTest, BadTasksAreAnsweredWithErrorsAndTheSessionStays) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(16), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr session = ExpectHello(*handler);
  ASSERT_NE(session, nullptr);
  ASSERT_TRUE(session->Send(Welcome(MlpSpec())).ok());

  // Wrong size.
  std::vector<float> short_weights(10, 0.5f);
  ASSERT_TRUE(session->Send(FitTask(1, 1, Fp32(short_weights))).ok());
  auto error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_SHAPE_MISMATCH) << error.error().message();
  EXPECT_NE(error.error().message().find("199210"), std::string::npos) << error.error().message();

  // A NaN among the right number of values (EncodeFp32 refuses NaN, so patch the payload).
  proto::EncodedTensor nan_weights = Fp32(weights_);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan_weights.mutable_payload()->data() + 4 * 1234, &nan, sizeof(nan));
  ASSERT_TRUE(session->Send(FitTask(1, 2, nan_weights)).ok());
  error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_INVALID_TENSOR) << error.error().message();

  // (A tensor whose payload lies about its size never reaches the client: the transport
  // validates every EncodedTensor on both ends; see net_fault_test.)

  // An update codec the client does not implement.
  proto::Envelope odd_codec = FitTask(1, 3, Fp32(weights_));
  odd_codec.mutable_fit_task()->mutable_codec()->set_name("carrier-pigeon");
  ASSERT_TRUE(session->Send(odd_codec).ok());
  error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_INVALID_MESSAGE) << error.error().message();

  // No local test data.
  proto::Envelope evaluate;
  evaluate.mutable_evaluate_task()->set_round(1);
  evaluate.mutable_evaluate_task()->set_task_id(5);
  evaluate.mutable_evaluate_task()->set_batch_size(64);
  *evaluate.mutable_evaluate_task()->mutable_weights() = Fp32(weights_);
  ASSERT_TRUE(session->Send(evaluate).ok());
  error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_UNSUPPORTED_MESSAGE) << error.error().message();

  // Out of turn: a second Welcome.
  ASSERT_TRUE(session->Send(Welcome(MlpSpec())).ok());
  error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_UNEXPECTED_MESSAGE) << error.error().message();

  // Still the same session, and the trainer still works.
  EXPECT_TRUE(session->is_open());
  ASSERT_TRUE(session->Send(FitTask(2, 6, Fp32(weights_))).ok());
  auto result = Expect(*handler, proto::Envelope::kFitResult);
  EXPECT_EQ(result.fit_result().task_id(), 6U);
  EXPECT_EQ(result.fit_result().num_samples(), 16U);

  session->Close(Status::Ok());
  EXPECT_TRUE(running.Join().ok());
  EXPECT_EQ(client.sessions_registered(), 1U);
  EXPECT_EQ(handler->opened_count(), 1);
}

TEST_F(EdgeClientTest, EvaluatesWithLocalTestData) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(16), SyntheticData(20));
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr session = ExpectHello(*handler);
  ASSERT_NE(session, nullptr);
  ASSERT_TRUE(session->Send(Welcome(MlpSpec())).ok());
  proto::Envelope evaluate;
  evaluate.mutable_evaluate_task()->set_round(4);
  evaluate.mutable_evaluate_task()->set_task_id(9);
  evaluate.mutable_evaluate_task()->set_batch_size(64);
  *evaluate.mutable_evaluate_task()->mutable_weights() = Fp32(weights_);
  ASSERT_TRUE(session->Send(evaluate).ok());
  auto result = Expect(*handler, proto::Envelope::kEvaluateResult);
  EXPECT_EQ(result.evaluate_result().round(), 4U);
  EXPECT_EQ(result.evaluate_result().task_id(), 9U);
  EXPECT_EQ(result.evaluate_result().num_samples(), 20U);
  EXPECT_LE(result.evaluate_result().num_correct(), 20U);
  session->Close(Status::Ok());
  EXPECT_TRUE(running.Join().ok());
}

TEST_F(EdgeClientTest, ByeNormalBeforeWelcomeMeansTheRunIsAlreadyComplete) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr session = ExpectHello(*handler);
  ASSERT_NE(session, nullptr);
  session->Close(Status::Ok());
  Status run = running.Join();
  EXPECT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(client.sessions_registered(), 0U);
}

TEST_F(EdgeClientTest, ReconnectsAfterTheServerRestartsOnTheSamePort) {
  auto handler1 = std::make_shared<RecordingHandler>();
  auto server1 = StartServer(handler1);
  ASSERT_NE(server1, nullptr);
  const uint16_t port = server1->port();
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClient client(Options(port), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr first = ExpectHello(*handler1);
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(first->Send(Welcome(MlpSpec())).ok());

  // The coordinator goes away (Bye{BYE_SHUTTING_DOWN}); while it is down, the client's
  // attempts are refused and it backs off.
  server1->Stop();
  ASSERT_TRUE(handler1->WaitClosed(10s).has_value());
  server1.reset();
  std::this_thread::sleep_for(300ms);

  auto handler2 = std::make_shared<RecordingHandler>();
  net::ServerOptions same_port;
  same_port.port = port;
  auto server2 = StartServer(handler2, pki().ServerConfig(), same_port);
  ASSERT_NE(server2, nullptr);
  net::SessionPtr second = ExpectHello(*handler2);
  ASSERT_NE(second, nullptr);
  ASSERT_TRUE(second->Send(Welcome(MlpSpec())).ok());
  ASSERT_TRUE(second->Send(FitTask(2, 11, Fp32(weights_))).ok());
  auto result = Expect(*handler2, proto::Envelope::kFitResult);
  EXPECT_EQ(result.fit_result().task_id(), 11U);
  second->Close(Status::Ok());
  Status run = running.Join();
  EXPECT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(client.sessions_registered(), 2U);
}

TEST_F(EdgeClientTest, RetriesAfterDuplicateIdentityRejectAndGivesUpOnNotAuthorized) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);

  net::SessionPtr first = ExpectHello(*handler);
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(first->Send(net::MakeReject(proto::REJECT_DUPLICATE_IDENTITY, "taken", 50)).ok());
  first->Close(Status::PermissionDenied("duplicate"));
  // It comes back by itself; this time it is told it may never join.
  net::SessionPtr second = ExpectHello(*handler);
  ASSERT_NE(second, nullptr);
  ASSERT_TRUE(second->Send(net::MakeReject(proto::REJECT_NOT_AUTHORIZED, "not on the list")).ok());
  Status run = running.Join();
  EXPECT_EQ(run.code(), Status::Code::kPermissionDenied) << run.ToString();
  EXPECT_NE(run.message().find("REJECT_NOT_AUTHORIZED"), std::string::npos) << run.ToString();
  EXPECT_NE(run.message().find("not on the list"), std::string::npos) << run.ToString();
}

TEST_F(EdgeClientTest, DataThatDoesNotFitTheModelIsFatalAndReported) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(8, {1, 10, 10}), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr session = ExpectHello(*handler);
  ASSERT_NE(session, nullptr);
  ASSERT_TRUE(session->Send(Welcome(MlpSpec())).ok());
  auto error = Expect(*handler, proto::Envelope::kError);
  EXPECT_EQ(error.error().code(), proto::ERROR_SHAPE_MISMATCH);
  Status run = running.Join();
  EXPECT_EQ(run.code(), Status::Code::kFailedPrecondition) << run.ToString();
  EXPECT_EQ(client.sessions_registered(), 0U);
}

TEST_F(EdgeClientTest, CertificateFromAnotherCaIsFatalNotRetried) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClientOptions options = Options(server->port());
  options.tls.cert_file = pki().cert("other_client");
  options.tls.key_file = pki().key("other_client");
  // Bounded so that a regression (taking the refusal for a hiccup) fails instead of hanging.
  options.max_connect_attempts = 3;
  EdgeClient client(options, trainer);
  Status run = client.Run();
  EXPECT_EQ(run.code(), Status::Code::kPermissionDenied) << run.ToString();
  EXPECT_EQ(handler->opened_count(), 0);
}

TEST_F(EdgeClientTest, GivesUpAfterMaxConnectAttempts) {
  auto port = testing::PickFreePort();
  ASSERT_TRUE(port.ok());
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClientOptions options = Options(*port);
  options.max_connect_attempts = 3;
  options.initial_backoff = 5ms;
  options.max_backoff = 10ms;
  EdgeClient client(options, trainer);
  Status run = client.Run();
  EXPECT_EQ(run.code(), Status::Code::kUnavailable) << run.ToString();
  EXPECT_NE(run.message().find("3 failed attempts"), std::string::npos) << run.ToString();
}

TEST_F(EdgeClientTest, StopEndsRunAndTellsTheCoordinator) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClient client(Options(server->port()), trainer);
  Running running;
  Start(client, running);
  net::SessionPtr session = ExpectHello(*handler);
  ASSERT_NE(session, nullptr);
  ASSERT_TRUE(session->Send(Welcome(MlpSpec())).ok());
  std::thread stopper([&] { client.Stop(); });
  stopper.join();
  Status run = running.Join();
  EXPECT_EQ(run.code(), Status::Code::kAborted) << run.ToString();
  auto bye = Expect(*handler, proto::Envelope::kBye, 10s);
  EXPECT_EQ(bye.bye().reason(), proto::BYE_SHUTTING_DOWN);
}

TEST_F(EdgeClientTest, StopDuringBackoffEndsRun) {
  auto port = testing::PickFreePort();
  ASSERT_TRUE(port.ok());
  LocalTrainer trainer(SyntheticData(8), std::nullopt);
  EdgeClientOptions options = Options(*port);
  options.initial_backoff = std::chrono::minutes(10);  // Run would sit in its first wait
  options.max_backoff = std::chrono::minutes(10);
  EdgeClient client(options, trainer);
  Running running;
  Start(client, running);
  std::this_thread::sleep_for(200ms);
  client.Stop();
  EXPECT_EQ(running.Join().code(), Status::Code::kAborted);
}

TEST(EdgeClientOptionsTest, ValidateNamesTheBadField) {
  EdgeClientOptions o;
  o.tls.ca_file = "ca.pem";
  o.tls.cert_file = "c.pem";
  o.tls.key_file = "c.key";
  EXPECT_NE(o.Validate().message().find("host"), std::string::npos);
  o.host = "127.0.0.1";
  EXPECT_NE(o.Validate().message().find("port"), std::string::npos);
  o.port = 7400;
  EXPECT_TRUE(o.Validate().ok()) << o.Validate().ToString();
  o.max_backoff = std::chrono::milliseconds(1);
  EXPECT_NE(o.Validate().message().find("backoff"), std::string::npos);
  o.max_backoff = std::chrono::seconds(10);
  o.slowdown = 0.5;
  EXPECT_NE(o.Validate().message().find("slowdown"), std::string::npos);
  o.slowdown = std::nan("");
  EXPECT_FALSE(o.Validate().ok());
  o.slowdown = 1.0;
  o.max_connect_attempts = -1;
  EXPECT_FALSE(o.Validate().ok());
  o.max_connect_attempts = 0;
  o.tls.cert_file.clear();
  EXPECT_FALSE(o.Validate().ok());
}

TEST(EdgeClientRunTest, UnreadableCertificateIsReportedBeforeConnecting) {
  testing::TempDir dir;
  EdgeClientOptions o;
  o.host = "127.0.0.1";
  o.port = 1;  // never contacted
  o.tls.ca_file = (dir.path() / "ca.pem").string();
  o.tls.cert_file = (dir.path() / "missing.pem").string();
  o.tls.key_file = (dir.path() / "missing.key").string();
  LocalTrainer trainer(SyntheticData(4), std::nullopt);
  EdgeClient client(o, trainer);
  Status run = client.Run();
  EXPECT_FALSE(run.ok());
  EXPECT_NE(run.message().find("missing.pem"), std::string::npos) << run.ToString();
}

}  // namespace
}  // namespace fedslice::client
