// Session life cycle over real mutual TLS on 127.0.0.1: one session per identity, idle
// timeouts and heartbeats, graceful shutdown, send-side checks, large and many messages.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/server.h"
#include "testing/net_fixture.h"

namespace fedslice::testing {
namespace {

using net::Channel;

proto::Envelope Numbered(uint64_t round) {
  proto::Envelope e;
  e.mutable_evaluate_result()->set_round(round);
  e.mutable_evaluate_result()->set_num_samples(10);
  return e;
}

class NetSessionTest : public NetTest {};

TEST_F(NetSessionTest, DuplicateIdentityIsRejectedByDefault) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  auto first = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  auto second = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Status::Code::kPermissionDenied);
  EXPECT_NE(second.status().message().find("REJECT_DUPLICATE_IDENTITY"), std::string::npos)
      << second.status().ToString();
  std::optional<RecordingHandler::Rejected> rejected = handler->WaitRejected();
  ASSERT_TRUE(rejected.has_value());
  EXPECT_NE(rejected->reason.message().find("already holds session"), std::string::npos);
  EXPECT_EQ(server->stats().rejected, 1u);

  // The first session is untouched.
  ASSERT_TRUE((*first)->Send(MakeHello("client-0")).ok());
  std::optional<RecordingHandler::Message> m = handler->WaitMessage();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->session, *session);
  EXPECT_EQ(server->Find("client-0"), *session);

  // Once it is gone, the identity may connect again.
  (*first)->Close();
  ASSERT_TRUE(handler->WaitClosed().has_value());
  auto third = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  ASSERT_TRUE(handler->WaitOpen().has_value());
}

TEST_F(NetSessionTest, DuplicateIdentityCanReplaceTheOldSession) {
  auto handler = std::make_shared<RecordingHandler>();
  net::ServerOptions options;
  options.duplicate_policy = net::DuplicatePolicy::kReplaceExisting;
  auto server = StartServer(handler, pki().ServerConfig(), options);
  ASSERT_NE(server, nullptr);

  auto first = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(first.ok());
  std::optional<net::SessionPtr> old_session = handler->WaitOpen();
  ASSERT_TRUE(old_session.has_value());

  auto second = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  std::optional<net::SessionPtr> new_session = handler->WaitOpen();
  ASSERT_TRUE(new_session.has_value());

  std::optional<RecordingHandler::Closed> closed = handler->WaitClosed();
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->session, *old_session);
  EXPECT_EQ(closed->reason.code(), Status::Code::kAborted);
  // The replaced client is told why.
  Result<proto::Envelope> bye = (*first)->Receive(5s);
  ASSERT_TRUE(bye.ok()) << bye.status().ToString();
  EXPECT_EQ(bye->bye().reason(), proto::BYE_REPLACED);
  EXPECT_FALSE((*first)->Receive(5s).ok());

  EXPECT_EQ(server->Find("client-0"), *new_session);
  ASSERT_TRUE((*second)->Send(MakeHello("client-0")).ok());
  std::optional<RecordingHandler::Message> m = handler->WaitMessage();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->session, *new_session);
}

TEST_F(NetSessionTest, IdleTimeoutDropsASilentPeer) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig config = pki().ServerConfig();
  config.idle_timeout = 300ms;
  config.heartbeat_interval = 100ms;
  auto server = StartServer(handler, config);
  ASSERT_NE(server, nullptr);

  // A raw client completes the handshake and then says nothing, not even heartbeats.
  RawTlsOptions options{pki().ca(), pki().cert("client-0"), pki().key("client-0")};
  auto raw = RawTlsClient::Connect(server->port(), options);
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  ASSERT_TRUE(handler->WaitOpen().has_value());

  // The server says why (the raw client skips the server's heartbeats) and closes.
  Result<proto::Envelope> bye = (*raw)->Read(5s);
  ASSERT_TRUE(bye.ok()) << bye.status().ToString();
  EXPECT_EQ(bye->bye().reason(), proto::BYE_IDLE_TIMEOUT);
  EXPECT_TRUE((*raw)->WaitForClose().ok());
  std::optional<RecordingHandler::Closed> closed = handler->WaitClosed();
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->reason.code(), Status::Code::kDeadlineExceeded);
  EXPECT_NE(closed->reason.message().find("nothing heard from the peer"), std::string::npos);
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetSessionTest, HeartbeatsKeepAnIdleSessionOpen) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig server_config = pki().ServerConfig();
  server_config.idle_timeout = 600ms;
  server_config.heartbeat_interval = 100ms;
  auto server = StartServer(handler, server_config);
  ASSERT_NE(server, nullptr);

  net::TlsConfig client_config = pki().Config("client-0");
  client_config.idle_timeout = 600ms;
  client_config.heartbeat_interval = 100ms;
  auto channel = Channel::Connect("127.0.0.1", server->port(), client_config, 5s);
  ASSERT_TRUE(channel.ok()) << channel.status().ToString();
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  // Several idle timeouts pass without a single application message.
  EXPECT_EQ((*channel)->Receive(2s).status().code(), Status::Code::kDeadlineExceeded);
  EXPECT_FALSE(handler->WaitClosed(10ms).has_value());
  EXPECT_TRUE((*channel)->is_open());
  EXPECT_TRUE((*session)->is_open());
  EXPECT_GE((*session)->stats().frames_received, 3u);  // heartbeats arrived
  EXPECT_GE((*channel)->stats().frames_received, 3u);

  ASSERT_TRUE((*channel)->Send(MakeHello("client-0")).ok());
  std::optional<RecordingHandler::Message> m = handler->WaitMessage();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->envelope.hello().client_id(), "client-0");
}

TEST_F(NetSessionTest, ServerStopClosesEverySessionGracefully) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  auto a = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  auto b = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-1"), 5s);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(handler->WaitOpen().has_value());
  ASSERT_TRUE(handler->WaitOpen().has_value());

  server->Stop();
  for (auto* channel : {&*a, &*b}) {
    Result<proto::Envelope> bye = (*channel)->Receive(5s);
    ASSERT_TRUE(bye.ok()) << bye.status().ToString();
    EXPECT_EQ(bye->bye().reason(), proto::BYE_SHUTTING_DOWN);
    Result<proto::Envelope> after = (*channel)->Receive(5s);
    ASSERT_FALSE(after.ok());
    EXPECT_EQ(after.status().code(), Status::Code::kUnavailable);
    EXPECT_NE(after.status().message().find("server shutting down"), std::string::npos)
        << after.status().ToString();
    EXPECT_FALSE((*channel)->is_open());
  }
  for (int i = 0; i < 2; ++i) {
    std::optional<RecordingHandler::Closed> closed = handler->WaitClosed();
    ASSERT_TRUE(closed.has_value());
    EXPECT_EQ(closed->reason.code(), Status::Code::kUnavailable);
  }
  EXPECT_EQ(server->Sessions().size(), 0u);
  // New connections are refused, and the io_context runs out of work: nothing is left hanging.
  EXPECT_FALSE(Channel::Connect("127.0.0.1", server->port(), pki().Config("client-2"), 2s).ok());
  server.reset();
  EXPECT_TRUE(io_.Stop(5s));
}

TEST_F(NetSessionTest, SendChecksWhatItSends) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig config = pki().ServerConfig();
  config.max_frame_bytes = 4096;
  auto server = StartServer(handler, config);
  ASSERT_NE(server, nullptr);
  auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok());
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  proto::Envelope task;
  auto* fit = task.mutable_fit_task();
  ASSERT_TRUE(net::EncodeFp32(std::vector<float>(8, 1.0f), fit->mutable_global_weights()).ok());
  fit->set_local_epochs(1);
  fit->set_batch_size(1);
  fit->set_learning_rate(std::numeric_limits<float>::quiet_NaN());
  Status s = (*session)->Send(task);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("learning_rate"), std::string::npos) << s.ToString();

  fit->set_learning_rate(0.1f);
  ASSERT_TRUE(net::EncodeFp32(std::vector<float>(2000, 1.0f), fit->mutable_global_weights()).ok());
  s = (*session)->Send(task);
  EXPECT_EQ(s.code(), Status::Code::kResourceExhausted) << s.ToString();

  // Nothing of that reached the client; a valid message still does, with seq 2 (the
  // greeting was 1; refused messages use no sequence number).
  ASSERT_TRUE((*session)->Send(Numbered(1)).ok());
  Result<proto::Envelope> got = (*channel)->Receive(5s);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->evaluate_result().round(), 1u);
  EXPECT_EQ(got->seq(), 2u);

  (*session)->Close();
  EXPECT_EQ((*session)->Send(Numbered(2)).code(), Status::Code::kUnavailable);
  ASSERT_TRUE(handler->WaitClosed().has_value());
  EXPECT_EQ((*channel)->Send(Numbered(3)).code(), Status::Code::kUnavailable);
}

TEST_F(NetSessionTest, ModelSizedMessagesRoundTrip) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok());
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  // The CNN's parameter count, in fp32: 6.7 MB in one frame each way.
  constexpr size_t kCnnParams = 1'663'370;
  std::vector<float> weights(kCnnParams);
  for (size_t i = 0; i < kCnnParams; ++i) weights[i] = std::sin(static_cast<float>(i));
  proto::Envelope task;
  auto* fit = task.mutable_fit_task();
  ASSERT_TRUE(net::EncodeFp32(weights, fit->mutable_global_weights()).ok());
  fit->set_round(1);
  fit->set_local_epochs(1);
  fit->set_batch_size(32);
  fit->set_learning_rate(0.01f);
  ASSERT_TRUE((*session)->Send(std::move(task)).ok());

  Result<proto::Envelope> got = (*channel)->Receive(10s);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::vector<float> decoded(kCnnParams);
  ASSERT_TRUE(net::DecodeFp32(got->fit_task().global_weights(), decoded).ok());
  EXPECT_EQ(decoded, weights);

  proto::Envelope result;
  auto* fr = result.mutable_fit_result();
  for (float& w : decoded) w *= 0.5f;
  ASSERT_TRUE(net::EncodeFp32(decoded, fr->mutable_update()).ok());
  fr->set_round(1);
  fr->set_num_samples(600);
  fr->set_train_loss(0.3);
  ASSERT_TRUE((*channel)->Send(std::move(result)).ok());
  std::optional<RecordingHandler::Message> m = handler->WaitMessage(10s);
  ASSERT_TRUE(m.has_value());
  Result<std::vector<float>> update =
      net::DecodeFp32(m->envelope.fit_result().update(), kCnnParams);
  ASSERT_TRUE(update.ok());
  EXPECT_EQ((*update)[12345], 0.5f * weights[12345]);
  EXPECT_GT((*session)->stats().bytes_received, 4 * kCnnParams);
  EXPECT_GT((*session)->stats().bytes_sent, 4 * kCnnParams);
}

// Large bytes fields are written from the message itself (aliased), small ones copied into
// the frame: a message mixing both, with fields serialized after a large payload (shape after
// payload, carry after data), must arrive byte for byte, also when many are queued at once
// and the queue moves them.
TEST_F(NetSessionTest, FramesWithAliasedPayloadsArriveByteForByte) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok());
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  auto bytes = [](size_t n, uint8_t salt) {
    std::string b(n, '\0');
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<char>((i * 131 + salt) & 0xff);
    return b;
  };
  // Sizes around the 8 KB aliasing threshold and one of megabytes, odd on purpose.
  const std::vector<std::pair<size_t, size_t>> sizes = {
      {1 << 20, 8191}, {8193, 8192}, {100, 300'001}, {3'000'017, 0}, {8300, 8300}};
  std::vector<std::string> expected;
  for (size_t i = 0; i < sizes.size(); ++i) {
    proto::Envelope e;
    auto* b = e.mutable_activation_batch();
    b->set_pipeline_id(7);
    b->set_batch_id(i + 1);
    b->set_unit(3);
    b->set_num_samples(1);
    b->mutable_data()->set_codec("int8");
    b->mutable_data()->set_num_values(sizes[i].first);
    b->mutable_data()->set_payload(bytes(sizes[i].first, static_cast<uint8_t>(i)));
    b->mutable_data()->add_shape(static_cast<int64_t>(sizes[i].first));
    if (sizes[i].second > 0) {
      b->mutable_carry()->set_codec("int8");
      b->mutable_carry()->set_num_values(sizes[i].second);
      b->mutable_carry()->set_payload(bytes(sizes[i].second, static_cast<uint8_t>(100 + i)));
      b->mutable_carry()->add_shape(static_cast<int64_t>(sizes[i].second));
    }
    expected.push_back(e.activation_batch().SerializeAsString());
    ASSERT_TRUE((*session)->Send(std::move(e)).ok());  // all queued before any is written
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    Result<proto::Envelope> got = (*channel)->Receive(10s);
    ASSERT_TRUE(got.ok()) << i << ": " << got.status().ToString();
    ASSERT_TRUE(got->has_activation_batch());
    EXPECT_EQ(got->activation_batch().batch_id(), i + 1);
    EXPECT_TRUE(got->activation_batch().SerializeAsString() == expected[i]) << "message " << i;
  }
}

TEST_F(NetSessionTest, ManyMessagesArriveInOrderDespiteASlowReader) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok());
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  constexpr int kCount = 200;
  std::atomic<int> written{0};
  for (int i = 0; i < kCount; ++i) {
    ASSERT_TRUE((*session)
                    ->Send(Numbered(i),
                           [&](const Status& s) {
                             if (s.ok()) written.fetch_add(1);
                           })
                    .ok());
  }
  // The channel pauses reading once its small inbox is full and resumes as we drain it.
  std::this_thread::sleep_for(100ms);
  uint64_t last_seq = 0;
  for (int i = 0; i < kCount; ++i) {
    Result<proto::Envelope> got = (*channel)->Receive(5s);
    ASSERT_TRUE(got.ok()) << i << ": " << got.status().ToString();
    EXPECT_EQ(got->evaluate_result().round(), static_cast<uint64_t>(i));
    EXPECT_GT(got->seq(), last_seq);
    last_seq = got->seq();
  }
  // The last write callbacks may run just after the client has read the bytes.
  for (int i = 0; i < 500 && written.load() < kCount; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(written.load(), kCount);
}

TEST_F(NetSessionTest, ConcurrentClientsAreServedInParallel) {
  auto handler = std::make_shared<RecordingHandler>();
  handler->set_echo(true);
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  constexpr int kMessages = 40;
  std::vector<std::thread> clients;
  std::atomic<int> echoed{0};
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&, c] {
      const std::string name = "client-" + std::to_string(c);
      auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config(name), 5s);
      ASSERT_TRUE(channel.ok()) << channel.status().ToString();
      // One thread receives while this one sends.
      std::thread receiver([&] {
        for (int i = 0; i < kMessages; ++i) {
          Result<proto::Envelope> got = (*channel)->Receive(10s);
          ASSERT_TRUE(got.ok()) << got.status().ToString();
          EXPECT_EQ(got->evaluate_result().round(), static_cast<uint64_t>(c * 1000 + i));
          echoed.fetch_add(1);
        }
      });
      for (int i = 0; i < kMessages; ++i) {
        ASSERT_TRUE((*channel)->Send(Numbered(c * 1000 + i)).ok());
      }
      receiver.join();
      (*channel)->Close();
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(echoed.load(), 3 * kMessages);
  for (int c = 0; c < 3; ++c) {
    std::optional<RecordingHandler::Closed> closed = handler->WaitClosed();
    ASSERT_TRUE(closed.has_value());
    EXPECT_TRUE(closed->reason.ok()) << closed->reason.ToString();
  }
}

TEST_F(NetSessionTest, LargeMessagesFlowBothWaysAtOnce) {
  // Full duplex: the server echoes activation-sized frames while the client is still sending,
  // so TLS reads and writes of one session interleave.
  auto handler = std::make_shared<RecordingHandler>();
  handler->set_echo(true);
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  auto channel = Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok());

  constexpr int kMessages = 12;
  constexpr size_t kValues = 64 * 32 * 14 * 14;  // a 64-image CNN activation batch
  std::thread sender([&] {
    std::vector<float> values(kValues);
    for (int m = 0; m < kMessages; ++m) {
      for (size_t i = 0; i < kValues; ++i) values[i] = static_cast<float>(m * 7 + i % 1000);
      proto::Envelope e;
      auto* task = e.mutable_evaluate_task();
      task->set_round(m);
      task->set_batch_size(64);
      ASSERT_TRUE(net::EncodeFp32(values, task->mutable_weights()).ok());
      ASSERT_TRUE((*channel)->Send(std::move(e)).ok());
    }
  });
  std::vector<float> decoded(kValues);
  for (int m = 0; m < kMessages; ++m) {
    Result<proto::Envelope> got = (*channel)->Receive(20s);
    ASSERT_TRUE(got.ok()) << m << ": " << got.status().ToString();
    EXPECT_EQ(got->evaluate_task().round(), static_cast<uint64_t>(m));
    ASSERT_TRUE(net::DecodeFp32(got->evaluate_task().weights(), decoded).ok());
    EXPECT_EQ(decoded[0], static_cast<float>(m * 7));
    EXPECT_EQ(decoded[kValues - 1], static_cast<float>(m * 7 + (kValues - 1) % 1000));
  }
  sender.join();
}

TEST_F(NetSessionTest, APeerThatStopsReadingIsPushedBackThenDropped) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig config = pki().ServerConfig();
  config.write_timeout = 300ms;
  config.max_frame_bytes = 64 << 10;
  config.max_send_queue_bytes = 256 << 10;
  auto server = StartServer(handler, config);
  ASSERT_NE(server, nullptr);

  // Handshakes, then never reads: TCP buffers fill, then the send queue, then a write stalls.
  RawTlsOptions options{pki().ca(), pki().cert("client-0"), pki().key("client-0")};
  auto raw = RawTlsClient::Connect(server->port(), options);
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());

  proto::Envelope big;
  ASSERT_TRUE(net::EncodeFp32(std::vector<float>(15000, 1.0f),
                              big.mutable_evaluate_task()->mutable_weights())
                  .ok());
  big.mutable_evaluate_task()->set_batch_size(1);
  // Keep offering frames until the session is gone; some must be refused on the way.
  bool pushed_back = false;
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < give_up) {
    Status s = (*session)->Send(big);
    if (s.code() == Status::Code::kUnavailable) break;  // dropped
    if (s.code() == Status::Code::kResourceExhausted) {
      pushed_back = true;
      std::this_thread::sleep_for(1ms);
    } else {
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }
  EXPECT_TRUE(pushed_back);
  std::optional<RecordingHandler::Closed> closed = handler->WaitClosed(10s);
  ASSERT_TRUE(closed.has_value());
  EXPECT_EQ(closed->reason.code(), Status::Code::kDeadlineExceeded) << closed->reason.ToString();
  ExpectServesGoodClient(*server, *handler);
}

}  // namespace
}  // namespace fedslice::testing
