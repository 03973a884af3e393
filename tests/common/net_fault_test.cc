// Fault injection over a real, authenticated TLS connection: a raw client (tests/testing)
// sends malformed frames. The server must answer with an Error or close that session, log,
// never deliver garbage to the handler, and keep serving everybody else.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "fedslice/common/net/server.h"
#include "fedslice/common/net/wire.h"
#include "testing/net_fixture.h"

namespace fedslice::testing {
namespace {

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Frame header announcing `length` bytes (magic as given).
std::string Header(uint32_t length, const char* magic = "FSL1") {
  std::string h(magic, 4);
  h += static_cast<char>(length >> 24);
  h += static_cast<char>(length >> 16);
  h += static_cast<char>(length >> 8);
  h += static_cast<char>(length);
  return h;
}

class NetFaultTest : public NetTest {
 protected:
  void SetUp() override {
    NetTest::SetUp();
    if (HasFatalFailure()) return;
    handler_ = std::make_shared<RecordingHandler>();
    net::TlsConfig config = pki().ServerConfig();
    config.read_timeout = 300ms;  // for the truncated-frame case
    config.max_bad_messages = 2;
    server_ = StartServer(handler_, config);
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override { server_.reset(); }

  // An authenticated raw connection as client-0, past the server's greeting.
  std::unique_ptr<RawTlsClient> ConnectRaw() {
    RawTlsOptions options{pki().ca(), pki().cert("client-0"), pki().key("client-0")};
    auto raw = RawTlsClient::Connect(server_->port(), options);
    EXPECT_TRUE(raw.ok()) << raw.status().ToString();
    if (!raw.ok()) return nullptr;
    Result<proto::Envelope> greeting = (*raw)->Read(5s, /*skip_heartbeats=*/false);
    EXPECT_TRUE(greeting.ok() && greeting->has_heartbeat());
    session_ = handler_->WaitOpen();
    EXPECT_TRUE(session_.has_value());
    return std::move(*raw);
  }

  // Reads the server's Error reply and checks its code (and in_reply_to_seq when given).
  void ExpectError(RawTlsClient& raw, proto::ErrorCode code, uint64_t in_reply_to = 0) {
    Result<proto::Envelope> reply = raw.Read();
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    ASSERT_TRUE(reply->has_error()) << reply->DebugString();
    EXPECT_EQ(reply->error().code(), code) << reply->error().message();
    EXPECT_FALSE(reply->error().message().empty());
    EXPECT_EQ(reply->error().in_reply_to_seq(), in_reply_to);
  }

  // The server said Bye with `reason`, closed the connection, and reported the close.
  void ExpectClosedBy(RawTlsClient& raw, proto::ByeReason reason, Status::Code code) {
    Result<proto::Envelope> bye = raw.Read();
    ASSERT_TRUE(bye.ok()) << bye.status().ToString();
    ASSERT_TRUE(bye->has_bye()) << bye->DebugString();
    EXPECT_EQ(bye->bye().reason(), reason);
    EXPECT_TRUE(raw.WaitForClose().ok());
    std::optional<RecordingHandler::Closed> closed = handler_->WaitClosed();
    ASSERT_TRUE(closed.has_value());
    EXPECT_EQ(closed->session, *session_);
    EXPECT_EQ(closed->reason.code(), code) << closed->reason.ToString();
  }

  void ExpectNothingDelivered() { EXPECT_FALSE(handler_->WaitMessage(50ms).has_value()); }

  std::shared_ptr<RecordingHandler> handler_;
  std::unique_ptr<net::Server> server_;
  std::optional<net::SessionPtr> session_;
};

TEST_F(NetFaultTest, BadMagicIsAnsweredAndClosed) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  ASSERT_TRUE(raw->Write(Bytes(Header(5, "HTTP") + "hello")).ok());
  ExpectError(*raw, proto::ERROR_MALFORMED_FRAME);
  ExpectClosedBy(*raw, proto::BYE_PROTOCOL_ERROR, Status::Code::kCorruption);
  ExpectNothingDelivered();
  ExpectServesGoodClient(*server_, *handler_);
}

TEST_F(NetFaultTest, OversizedLengthIsAnsweredAndClosedWithoutReadingIt) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  // Announces 2 GiB and sends none of it: the server must not wait for (or allocate) it.
  ASSERT_TRUE(raw->Write(Bytes(Header(0x80000000u))).ok());
  ExpectError(*raw, proto::ERROR_FRAME_TOO_LARGE);
  ExpectClosedBy(*raw, proto::BYE_PROTOCOL_ERROR, Status::Code::kResourceExhausted);
  ExpectServesGoodClient(*server_, *handler_);
}

TEST_F(NetFaultTest, TruncatedFrameHitsTheReadTimeout) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  ASSERT_TRUE(raw->Write(Bytes(Header(100) + std::string(10, 'x'))).ok());
  ExpectClosedBy(*raw, proto::BYE_IDLE_TIMEOUT, Status::Code::kDeadlineExceeded);
  ExpectNothingDelivered();
  ExpectServesGoodClient(*server_, *handler_);
}

TEST_F(NetFaultTest, GarbagePayloadIsAnsweredAndTheSessionGoesOn) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  ASSERT_TRUE(raw->Write(Bytes(Header(64) + std::string(64, '\xff'))).ok());
  ExpectError(*raw, proto::ERROR_MALFORMED_FRAME);
  ExpectNothingDelivered();

  // Framing is still in sync, so a valid message afterwards is delivered.
  ASSERT_TRUE(raw->WriteEnvelope(Stamp(MakeHello("client-0"), 1)).ok());
  std::optional<RecordingHandler::Message> m = handler_->WaitMessage();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->envelope.hello().client_id(), "client-0");
  EXPECT_TRUE((*session_)->is_open());
  EXPECT_EQ((*session_)->stats().bad_messages, 1u);
}

TEST_F(NetFaultTest, TooManyInvalidMessagesCloseTheSession) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  // max_bad_messages = 2: the third closes the session.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(raw->WriteEnvelope(Stamp(proto::Envelope(), i + 1)).ok());  // no body
    ExpectError(*raw, proto::ERROR_INVALID_MESSAGE, i + 1);
  }
  ExpectClosedBy(*raw, proto::BYE_PROTOCOL_ERROR, Status::Code::kInvalidArgument);
  ExpectNothingDelivered();
  ExpectServesGoodClient(*server_, *handler_);
}

TEST_F(NetFaultTest, WrongProtocolMajorIsAnsweredAndClosed) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  proto::Envelope hello = Stamp(MakeHello("client-0"), 1);
  hello.set_protocol_major(net::kProtocolMajor + 1);
  ASSERT_TRUE(raw->WriteEnvelope(hello).ok());
  ExpectError(*raw, proto::ERROR_UNSUPPORTED_VERSION, 1);
  ExpectClosedBy(*raw, proto::BYE_PROTOCOL_ERROR, Status::Code::kFailedPrecondition);
  ExpectNothingDelivered();
  ExpectServesGoodClient(*server_, *handler_);
}

TEST_F(NetFaultTest, InvalidFieldsAndReplayedSeqAreAnswered) {
  auto raw = ConnectRaw();
  ASSERT_NE(raw, nullptr);
  // A NaN in a field: answered, dropped.
  proto::Envelope result = Stamp(proto::Envelope(), 1);
  result.mutable_evaluate_result()->set_num_samples(10);
  result.mutable_evaluate_result()->set_loss(std::numeric_limits<double>::quiet_NaN());
  ASSERT_TRUE(raw->WriteEnvelope(result).ok());
  ExpectError(*raw, proto::ERROR_INVALID_MESSAGE, 1);

  // A valid message, then the same seq again: the replay is answered, not delivered.
  ASSERT_TRUE(raw->WriteEnvelope(Stamp(MakeHello("client-0"), 2)).ok());
  ASSERT_TRUE(handler_->WaitMessage().has_value());
  ASSERT_TRUE(raw->WriteEnvelope(Stamp(MakeHello("client-0"), 2)).ok());
  ExpectError(*raw, proto::ERROR_INVALID_MESSAGE, 2);
  ExpectNothingDelivered();
  EXPECT_TRUE((*session_)->is_open());
}

TEST_F(NetFaultTest, RandomBytesCloseOnlyThatSession) {
  // A good client is connected the whole time and must not notice.
  auto good = net::Channel::Connect("127.0.0.1", server_->port(), pki().Config("client-1"), 5s);
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  std::optional<net::SessionPtr> good_session = handler_->WaitOpen();
  ASSERT_TRUE(good_session.has_value());

  std::mt19937 rng(99);
  for (int round = 0; round < 3; ++round) {
    auto raw = ConnectRaw();
    ASSERT_NE(raw, nullptr);
    std::string noise(4096, '\0');
    for (char& c : noise) c = static_cast<char>(rng());
    // Random bytes almost surely do not start with "FSL1": a framing error.
    (void)raw->Write(Bytes(noise));
    EXPECT_TRUE(raw->WaitForClose().ok());
    std::optional<RecordingHandler::Closed> closed = handler_->WaitClosed();
    ASSERT_TRUE(closed.has_value());
    EXPECT_EQ(closed->session, *session_);
  }
  ExpectNothingDelivered();
  EXPECT_TRUE((*good)->is_open());
  ASSERT_TRUE((*good)->Send(MakeHello("client-1")).ok());
  std::optional<RecordingHandler::Message> m = handler_->WaitMessage();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->session, *good_session);
}

}  // namespace
}  // namespace fedslice::testing
