// Mutual TLS: who gets in, who is refused at the handshake, and that the server keeps
// serving after every refusal. Binds 127.0.0.1 only.
#include <gtest/gtest.h>
#include <openssl/ssl.h>

#include <boost/asio/ip/tcp.hpp>
#include <future>
#include <string>

#include "fedslice/common/net/client.h"
#include "fedslice/common/net/server.h"
#include "fedslice/common/net/tls.h"
#include "testing/net_fixture.h"

namespace fedslice::testing {
namespace {

using net::Channel;

class NetTlsTest : public NetTest {
 protected:
  // The server refused a connection at the handshake: counted, reported to OnRejected with a
  // reason containing `needle`, and no session was opened.
  void ExpectRefusedAtHandshake(net::Server& server, RecordingHandler& handler,
                                const std::string& needle) {
    std::optional<RecordingHandler::Rejected> rejected = handler.WaitRejected();
    ASSERT_TRUE(rejected.has_value()) << "the server did not report a refusal";
    EXPECT_NE(rejected->reason.message().find(needle), std::string::npos)
        << rejected->reason.ToString();
    EXPECT_EQ(rejected->remote.rfind("127.0.0.1:", 0), 0u) << rejected->remote;
    EXPECT_EQ(server.stats().handshake_failures, 1u);
    EXPECT_EQ(server.stats().opened, 0u);
    EXPECT_EQ(handler.opened_count(), 0);
  }
};

TEST_F(NetTlsTest, GoodClientExchangesMessagesBothWays) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_TRUE(channel.ok()) << channel.status().ToString();
  EXPECT_EQ((*channel)->peer_identity(), "fedslice-coordinator");
  EXPECT_TRUE((*channel)->is_open());

  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());
  EXPECT_EQ((*session)->peer_identity(), "client-0");
  EXPECT_EQ((*session)->tls_version(), "TLSv1.3");
  EXPECT_EQ((*session)->remote_address().rfind("127.0.0.1:", 0), 0u);
  EXPECT_EQ(server->Find("client-0"), *session);
  EXPECT_EQ(server->Sessions().size(), 1u);

  ASSERT_TRUE((*channel)->Send(MakeHello("client-0")).ok());
  std::optional<RecordingHandler::Message> hello = handler->WaitMessage();
  ASSERT_TRUE(hello.has_value());
  EXPECT_EQ(hello->session, *session);
  EXPECT_EQ(hello->envelope.hello().client_id(), "client-0");
  EXPECT_EQ(hello->envelope.seq(), 1u);
  EXPECT_EQ(hello->envelope.protocol_major(), net::kProtocolMajor);

  proto::Envelope welcome;
  welcome.mutable_welcome()->set_session_id("s-1");
  welcome.mutable_welcome()->mutable_run_config()->set_total_rounds(3);
  ASSERT_TRUE((*session)->Send(welcome).ok());
  Result<proto::Envelope> got = (*channel)->Receive(5s);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->welcome().session_id(), "s-1");
  EXPECT_EQ(got->welcome().run_config().total_rounds(), 3u);
  // The greeting Heartbeat was seq 1 and is not delivered.
  EXPECT_EQ(got->seq(), 2u);

  (*channel)->Close();
  EXPECT_FALSE((*channel)->is_open());
  std::optional<RecordingHandler::Closed> closed = handler->WaitClosed();
  ASSERT_TRUE(closed.has_value());
  EXPECT_TRUE(closed->reason.ok()) << closed->reason.ToString();
  EXPECT_EQ(server->Find("client-0"), nullptr);
  EXPECT_EQ(server->stats().opened, 1u);
  EXPECT_EQ(server->stats().closed, 1u);
}

TEST_F(NetTlsTest, AsyncConnectOnTheServersIoContext) {
  auto server_handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(server_handler);
  ASSERT_NE(server, nullptr);

  auto client_handler = std::make_shared<RecordingHandler>();
  std::promise<Result<net::SessionPtr>> connected;
  Result<net::SessionPtr> pending = net::AsyncConnect(
      io_.io(), "localhost", server->port(), pki().Config("client-2"), {}, client_handler,
      [&connected](Result<net::SessionPtr> r) { connected.set_value(std::move(r)); });
  ASSERT_TRUE(pending.ok()) << pending.status().ToString();
  Result<net::SessionPtr> client = connected.get_future().get();
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  EXPECT_EQ(*client, *pending);
  EXPECT_EQ((*client)->peer_identity(), "fedslice-coordinator");
  ASSERT_TRUE(client_handler->WaitOpen().has_value());

  std::optional<net::SessionPtr> server_side = server_handler->WaitOpen();
  ASSERT_TRUE(server_side.has_value());
  EXPECT_EQ((*server_side)->peer_identity(), "client-2");

  ASSERT_TRUE((*client)->Send(MakeHello("client-2")).ok());
  ASSERT_TRUE(server_handler->WaitMessage().has_value());
  ASSERT_TRUE((*server_side)->Send(MakeHello("echo")).ok());
  std::optional<RecordingHandler::Message> echo = client_handler->WaitMessage();
  ASSERT_TRUE(echo.has_value());
  EXPECT_EQ(echo->envelope.hello().client_id(), "echo");

  (*client)->Close();
  std::optional<RecordingHandler::Closed> client_closed = client_handler->WaitClosed();
  ASSERT_TRUE(client_closed.has_value());
  EXPECT_TRUE(client_closed->reason.ok()) << client_closed->reason.ToString();
  std::optional<RecordingHandler::Closed> server_closed = server_handler->WaitClosed();
  ASSERT_TRUE(server_closed.has_value());
  EXPECT_TRUE(server_closed->reason.ok()) << server_closed->reason.ToString();
}

TEST_F(NetTlsTest, RefusesAClientWithoutCertificate) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  RawTlsOptions options;
  options.ca_file = pki().ca();  // verifies the server, presents nothing
  Result<std::unique_ptr<RawTlsClient>> raw = RawTlsClient::Connect(server->port(), options);
  if (raw.ok()) {
    // TLS 1.3: the refusal arrives after the client's side of the handshake.
    EXPECT_FALSE((*raw)->Read(5s, /*skip_heartbeats=*/false).ok());
  }
  ExpectRefusedAtHandshake(*server, *handler, "certificate");
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetTlsTest, RefusesASelfSignedCertificate) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", server->port(), pki().Config("self_signed"), 5s);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kPermissionDenied)
      << channel.status().ToString();
  EXPECT_NE(channel.status().message().find("refused the TLS session"), std::string::npos)
      << channel.status().ToString();
  ExpectRefusedAtHandshake(*server, *handler, "self-signed");
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetTlsTest, RefusesACertificateFromAnotherCa) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", server->port(), pki().Config("other_client"), 5s);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kPermissionDenied)
      << channel.status().ToString();
  ExpectRefusedAtHandshake(*server, *handler, "unable to get local issuer certificate");
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetTlsTest, RefusesPlaintext) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  Result<std::unique_ptr<RawTcpClient>> raw = RawTcpClient::Connect(server->port());
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  // A FedSlice frame without TLS around it.
  std::string frame;
  ASSERT_TRUE(net::EncodeFrame(Stamp(MakeHello("client-0"), 1), 1 << 20, &frame).ok());
  ASSERT_TRUE(
      (*raw)->Write(std::span(reinterpret_cast<const uint8_t*>(frame.data()), frame.size())).ok());
  EXPECT_TRUE((*raw)->WaitForClose().ok());
  ExpectRefusedAtHandshake(*server, *handler, "TLS");
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetTlsTest, RefusesTls12WhenTls13IsRequired) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);

  RawTlsOptions options;
  options.ca_file = pki().ca();
  options.cert_file = pki().cert("client-0");
  options.key_file = pki().key("client-0");
  options.max_tls_version = TLS1_2_VERSION;
  Result<std::unique_ptr<RawTlsClient>> raw = RawTlsClient::Connect(server->port(), options);
  ASSERT_FALSE(raw.ok());
  EXPECT_NE(raw.status().message().find("protocol version"), std::string::npos)
      << raw.status().ToString();
  ExpectRefusedAtHandshake(*server, *handler, "unsupported protocol");
  ExpectServesGoodClient(*server, *handler);
}

TEST_F(NetTlsTest, AcceptsTls12OnlyWithTheExplicitFlag) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig config = pki().ServerConfig();
  config.allow_tls12 = true;
  auto server = StartServer(handler, config);
  ASSERT_NE(server, nullptr);

  RawTlsOptions options;
  options.ca_file = pki().ca();
  options.cert_file = pki().cert("client-0");
  options.key_file = pki().key("client-0");
  options.max_tls_version = TLS1_2_VERSION;
  Result<std::unique_ptr<RawTlsClient>> raw = RawTlsClient::Connect(server->port(), options);
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  EXPECT_EQ((*raw)->tls_version(), "TLSv1.2");
  Result<proto::Envelope> greeting = (*raw)->Read(5s, /*skip_heartbeats=*/false);
  ASSERT_TRUE(greeting.ok()) << greeting.status().ToString();
  EXPECT_TRUE(greeting->has_heartbeat());
  std::optional<net::SessionPtr> session = handler->WaitOpen();
  ASSERT_TRUE(session.has_value());
  EXPECT_EQ((*session)->tls_version(), "TLSv1.2");
  EXPECT_EQ((*session)->peer_identity(), "client-0");
}

TEST_F(NetTlsTest, ClientRefusesAServerFromAnotherCa) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig config = pki().Config("other_client");  // other CA's cert, SAN 127.0.0.1
  auto server = StartServer(handler, config);
  ASSERT_NE(server, nullptr);

  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", server->port(), pki().Config("client-0"), 5s);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kPermissionDenied);
  EXPECT_NE(channel.status().message().find("unable to get local issuer certificate"),
            std::string::npos)
      << channel.status().ToString();
  EXPECT_EQ(handler->opened_count(), 0);
}

TEST_F(NetTlsTest, ClientChecksTheServerNameAndIdentity) {
  auto handler = std::make_shared<RecordingHandler>();
  auto server = StartServer(handler);
  ASSERT_NE(server, nullptr);
  const net::TlsConfig client = pki().Config("client-0");

  net::ConnectOptions wrong_name;
  wrong_name.server_name = "wrong.example";
  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", server->port(), client, 5s, wrong_name);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kPermissionDenied);
  EXPECT_NE(channel.status().message().find("hostname mismatch"), std::string::npos)
      << channel.status().ToString();

  net::ConnectOptions wrong_identity;
  wrong_identity.expected_identity = "client-2";  // e.g. the next pipeline stage
  channel = Channel::Connect("127.0.0.1", server->port(), client, 5s, wrong_identity);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kPermissionDenied);
  EXPECT_NE(channel.status().message().find("expected 'client-2'"), std::string::npos)
      << channel.status().ToString();

  net::ConnectOptions right;
  right.server_name = "coordinator";
  right.expected_identity = "fedslice-coordinator";
  channel = Channel::Connect("127.0.0.1", server->port(), client, 5s, right);
  ASSERT_TRUE(channel.ok()) << channel.status().ToString();
  EXPECT_EQ((*channel)->peer_identity(), "fedslice-coordinator");
}

TEST_F(NetTlsTest, ConnectFailuresAreClear) {
  // Nothing listens on a port we just released.
  boost::asio::io_context io;
  uint16_t port;
  {
    boost::asio::ip::tcp::acceptor released(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
    port = released.local_endpoint().port();
  }
  Result<std::unique_ptr<Channel>> channel =
      Channel::Connect("127.0.0.1", port, pki().Config("client-0"), 5s);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kUnavailable);
  EXPECT_NE(channel.status().message().find("refused"), std::string::npos)
      << channel.status().ToString();

  // A listener that never answers the handshake: the timeout ends the attempt.
  boost::asio::ip::tcp::acceptor silent(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
  net::TlsConfig quick = pki().Config("client-0");
  quick.handshake_timeout = 200ms;
  channel = Channel::Connect("127.0.0.1", silent.local_endpoint().port(), quick, 5s);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), Status::Code::kDeadlineExceeded)
      << channel.status().ToString();
}

TEST_F(NetTlsTest, ConfigurationErrorsNameTheProblem) {
  auto handler = std::make_shared<RecordingHandler>();
  net::TlsConfig missing = pki().ServerConfig();
  missing.key_file = pki().key("nobody");
  auto server = net::Server::Start(io_.io(), missing, {}, handler);
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("nobody.key"), std::string::npos)
      << server.status().ToString();

  net::TlsConfig mismatched = pki().ServerConfig();
  mismatched.key_file = pki().key("client-0");
  server = net::Server::Start(io_.io(), mismatched, {}, handler);
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("does not match certificate"), std::string::npos)
      << server.status().ToString();

  net::TlsConfig bad_timing = pki().ServerConfig();
  bad_timing.heartbeat_interval = bad_timing.idle_timeout;
  EXPECT_EQ(bad_timing.Validate().code(), Status::Code::kInvalidArgument);

  auto first = StartServer(handler);
  ASSERT_NE(first, nullptr);
  net::ServerOptions same_port;
  same_port.port = first->port();
  server = net::Server::Start(io_.io(), pki().ServerConfig(), same_port, handler);
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("in use"), std::string::npos)
      << server.status().ToString();

  Result<std::string> id = net::CertificateIdentity(pki().cert("client-2"));
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  EXPECT_EQ(*id, "client-2");
  EXPECT_EQ(net::CertificateIdentity(pki().cert("nobody")).status().code(),
            Status::Code::kNotFound);
  EXPECT_EQ(net::CertificateIdentity(pki().key("client-0")).status().code(),
            Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace fedslice::testing
