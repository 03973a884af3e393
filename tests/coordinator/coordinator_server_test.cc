// The networked coordinator against clients that break the protocol: every bad message gets
// an Error reply, and the global model changes only through a valid update.
#include "fedslice/coordinator/coordinator_server.h"

#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "testing/net_test_util.h"
#include "testing/test_util.h"

namespace fedslice::coordinator {
namespace {

using namespace std::chrono_literals;
using testing::RawTlsClient;
using testing::RawTlsOptions;
using testing::Stamp;

// A small model (16 inputs -> 10 classes) keeps the messages small.
proto::ModelSpec TinySpec() {
  proto::ModelSpec spec;
  spec.set_name("tiny");
  spec.add_input_shape(1);
  spec.add_input_shape(4);
  spec.add_input_shape(4);
  spec.set_num_classes(10);
  spec.set_init_seed(7);
  spec.add_layers()->mutable_flatten();
  auto* dense = spec.add_layers()->mutable_dense();
  dense->set_in_features(16);
  dense->set_out_features(10);
  return spec;
}

class CoordinatorServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pki = testing::TestPki::Create(dir_.path(), 2);
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_ = *pki;
    CoordinatorOptions options;
    options.federation.model = TinySpec();
    options.federation.rounds = 1;
    options.federation.fraction = 1.0;
    options.federation.min_fit = 1;
    options.federation.round_deadline = 20s;
    options.min_available = 1;
    options.tls = pki_.ServerConfig();
    auto server = CoordinatorServer::Start(options, std::nullopt);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
    initial_ = server_->GlobalWeights();
    runner_ = std::thread([this] { run_status_ = server_->Run(); });
  }

  void TearDown() override {
    if (server_) server_->Stop();
    if (runner_.joinable()) runner_.join();
  }

  std::unique_ptr<RawTlsClient> Connect(const std::string& name) {
    RawTlsOptions options{pki_.ca(), pki_.cert(name), pki_.key(name)};
    auto client = RawTlsClient::Connect(server_->port(), options);
    EXPECT_TRUE(client.ok()) << client.status().ToString();
    return client.ok() ? std::move(client).value() : nullptr;
  }

  // Sends `envelope` and expects an Error with `code` in reply.
  void ExpectError(RawTlsClient& client, proto::Envelope envelope, proto::ErrorCode code) {
    ASSERT_TRUE(client.WriteEnvelope(Stamp(std::move(envelope), ++seq_)).ok());
    auto reply = client.Read(5s);
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    ASSERT_TRUE(reply->has_error()) << net::BodyName(*reply);
    EXPECT_EQ(reply->error().code(), code) << reply->error().message();
    EXPECT_FALSE(reply->error().message().empty());
  }

  proto::Envelope FitResult(const proto::FitTask& task, std::vector<float> delta) {
    proto::Envelope e;
    auto* result = e.mutable_fit_result();
    result->set_round(task.round());
    result->set_task_id(task.task_id());
    result->set_num_samples(10);
    result->set_train_loss(1.0);
    // Encoded by hand: EncodeFp32 refuses NaN at the source, a hostile client does not.
    auto* update = result->mutable_update();
    update->set_codec("fp32");
    update->set_num_values(delta.size());
    update->set_payload(std::string(reinterpret_cast<const char*>(delta.data()),
                                    delta.size() * sizeof(float)));
    return e;
  }

  testing::TempDir dir_;
  testing::TestPki pki_;
  std::unique_ptr<CoordinatorServer> server_;
  std::vector<float> initial_;
  std::thread runner_;
  Status run_status_;
  uint64_t seq_ = 0;
};

TEST_F(CoordinatorServerTest, BadMessagesGetErrorsAndNeverChangeTheModel) {
  auto client = Connect("client-0");
  ASSERT_NE(client, nullptr);

  // Out of turn: a result before registering.
  proto::FitTask no_task;
  ExpectError(*client, FitResult(no_task, std::vector<float>(initial_.size(), 0.f)),
              proto::ERROR_UNEXPECTED_MESSAGE);

  ASSERT_TRUE(client->WriteEnvelope(Stamp(testing::MakeHello("client-0"), ++seq_)).ok());
  auto welcome = client->Read(5s);
  ASSERT_TRUE(welcome.ok()) << welcome.status().ToString();
  ASSERT_TRUE(welcome->has_welcome()) << net::BodyName(*welcome);
  EXPECT_EQ(welcome->welcome().model().name(), "tiny");

  auto task_envelope = client->Read(5s);
  ASSERT_TRUE(task_envelope.ok()) << task_envelope.status().ToString();
  ASSERT_TRUE(task_envelope->has_fit_task()) << net::BodyName(*task_envelope);
  const proto::FitTask task = task_envelope->fit_task();
  EXPECT_EQ(task.round(), 1u);
  EXPECT_EQ(task.global_weights().num_values(), initial_.size());

  const size_t n = initial_.size();
  // Wrong shape.
  ExpectError(*client, FitResult(task, std::vector<float>(n + 1, 0.f)),
              proto::ERROR_SHAPE_MISMATCH);
  // NaN and Inf.
  std::vector<float> nan_delta(n, 0.f);
  nan_delta[3] = std::nanf("");
  ExpectError(*client, FitResult(task, nan_delta), proto::ERROR_INVALID_TENSOR);
  std::vector<float> inf_delta(n, 0.f);
  inf_delta[0] = INFINITY;
  ExpectError(*client, FitResult(task, inf_delta), proto::ERROR_INVALID_TENSOR);
  // A payload that lies about its length.
  proto::Envelope lying = FitResult(task, std::vector<float>(n, 0.f));
  lying.mutable_fit_result()->mutable_update()->mutable_payload()->resize(n * 4 - 4);
  ExpectError(*client, lying, proto::ERROR_INVALID_TENSOR);
  // A task this client was never given.
  proto::FitTask other = task;
  other.set_task_id(task.task_id() + 1);
  ExpectError(*client, FitResult(other, std::vector<float>(n, 0.f)), proto::ERROR_UNKNOWN_TASK);
  // No samples (caught by the transport's envelope validation).
  proto::Envelope empty = FitResult(task, std::vector<float>(n, 0.f));
  empty.mutable_fit_result()->set_num_samples(0);
  ExpectError(*client, empty, proto::ERROR_INVALID_MESSAGE);
  // An evaluation nobody asked for, and a message only the coordinator sends.
  proto::Envelope eval;
  eval.mutable_evaluate_result()->set_task_id(99);
  eval.mutable_evaluate_result()->set_num_samples(1);
  ExpectError(*client, eval, proto::ERROR_UNKNOWN_TASK);
  proto::Envelope wrong_direction;
  *wrong_direction.mutable_fit_task() = task;
  ExpectError(*client, wrong_direction, proto::ERROR_UNEXPECTED_MESSAGE);

  EXPECT_EQ(server_->completed_rounds(), 0u);
  EXPECT_EQ(server_->GlobalWeights(), initial_);

  // The session survived all of that: a valid update completes the round, and with one
  // client FedAvg applies it exactly.
  std::vector<float> delta(n);
  for (size_t i = 0; i < n; ++i) delta[i] = 0.001f * static_cast<float>(i % 7);
  ASSERT_TRUE(client->WriteEnvelope(Stamp(FitResult(task, delta), ++seq_)).ok());
  runner_.join();
  EXPECT_TRUE(run_status_.ok()) << run_status_.ToString();
  EXPECT_EQ(server_->completed_rounds(), 1u);
  const std::vector<float> after = server_->GlobalWeights();
  ASSERT_EQ(after.size(), n);
  for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(after[i], initial_[i] + delta[i]) << i;
  // The run is complete: the client is told so with a normal Bye.
  auto bye = client->Read(5s);
  ASSERT_TRUE(bye.ok()) << bye.status().ToString();
  ASSERT_TRUE(bye->has_bye()) << net::BodyName(*bye);
  EXPECT_EQ(bye->bye().reason(), proto::BYE_NORMAL);
}

TEST_F(CoordinatorServerTest, HelloWithAnotherIdentityIsRejected) {
  auto client = Connect("client-1");
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->WriteEnvelope(Stamp(testing::MakeHello("client-0"), ++seq_)).ok());
  auto reply = client->Read(5s);
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  ASSERT_TRUE(reply->has_reject()) << net::BodyName(*reply);
  EXPECT_EQ(reply->reject().reason(), proto::REJECT_NOT_AUTHORIZED);
  EXPECT_TRUE(client->WaitForClose(5s).ok());
  EXPECT_EQ(server_->num_registered(), 0u);
}

TEST_F(CoordinatorServerTest, MalformedFrameClosesOnlyThatSession) {
  auto good = Connect("client-0");
  ASSERT_NE(good, nullptr);
  ASSERT_TRUE(good->WriteEnvelope(Stamp(testing::MakeHello("client-0"), 1)).ok());
  auto welcome = good->Read(5s);
  ASSERT_TRUE(welcome.ok() && welcome->has_welcome());

  auto bad = Connect("client-1");
  ASSERT_NE(bad, nullptr);
  // A frame header announcing 1 GiB: refused before anything is allocated.
  const uint8_t oversized[] = {'F', 'S', 'L', '1', 0x40, 0x00, 0x00, 0x00};
  ASSERT_TRUE(bad->Write(oversized).ok());
  EXPECT_TRUE(bad->WaitForClose(5s).ok());

  // The registered client still gets its task.
  auto task = good->Read(5s);
  ASSERT_TRUE(task.ok()) << task.status().ToString();
  EXPECT_TRUE(task->has_fit_task()) << net::BodyName(*task);
  EXPECT_EQ(server_->GlobalWeights(), initial_);
}

}  // namespace
}  // namespace fedslice::coordinator
