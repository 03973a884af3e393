// GoogleTest fixture for transport tests: a PKI made once per test process (make_certs.sh plus
// a foreign CA and a self-signed certificate), an io_context on two threads, and helpers to
// start a server and to prove it still serves a well-behaved client.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "fedslice/common/net/client.h"
#include "fedslice/common/net/server.h"
#include "testing/net_test_util.h"
#include "testing/test_util.h"

namespace fedslice::testing {

class NetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    Result<TestPki> pki = TestPki::Create(dir_->path(), 3);
    if (pki.ok()) {
      pki_ = new TestPki(*pki);
    } else {
      pki_error_ = new Status(pki.status());
    }
  }
  static void TearDownTestSuite() {
    delete pki_;
    delete pki_error_;
    delete dir_;
    pki_ = nullptr;
    pki_error_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override {
    ASSERT_EQ(pki_error_, nullptr) << "creating test certificates: " << pki_error_->ToString();
  }

  static const TestPki& pki() { return *pki_; }

  std::unique_ptr<net::Server> StartServer(std::shared_ptr<net::SessionHandler> handler,
                                           const net::TlsConfig& config,
                                           net::ServerOptions options = {}) {
    Result<std::unique_ptr<net::Server>> server =
        net::Server::Start(io_.io(), config, options, std::move(handler));
    EXPECT_TRUE(server.ok()) << server.status().ToString();
    if (!server.ok()) return nullptr;
    EXPECT_NE((*server)->port(), 0);
    return std::move(*server);
  }
  std::unique_ptr<net::Server> StartServer(std::shared_ptr<net::SessionHandler> handler) {
    return StartServer(std::move(handler), pki().ServerConfig());
  }

  // A well-behaved client connects as `name`, sends a Hello the server receives, and closes;
  // the server sees the identity and a normal close. Consumes exactly those three events.
  void ExpectServesGoodClient(net::Server& server, RecordingHandler& handler,
                              const std::string& name = "client-1") {
    SCOPED_TRACE("a good client after the bad one");
    Result<std::unique_ptr<net::Channel>> channel =
        net::Channel::Connect("127.0.0.1", server.port(), pki().Config(name), 5s);
    ASSERT_TRUE(channel.ok()) << channel.status().ToString();
    std::optional<net::SessionPtr> open = handler.WaitOpen();
    ASSERT_TRUE(open.has_value());
    EXPECT_EQ((*open)->peer_identity(), name);
    ASSERT_TRUE((*channel)->Send(MakeHello(name)).ok());
    std::optional<RecordingHandler::Message> message = handler.WaitMessage();
    ASSERT_TRUE(message.has_value());
    EXPECT_EQ(message->envelope.hello().client_id(), name);
    (*channel)->Close();
    std::optional<RecordingHandler::Closed> closed = handler.WaitClosed();
    ASSERT_TRUE(closed.has_value());
    EXPECT_EQ(closed->session, *open);
    EXPECT_TRUE(closed->reason.ok()) << closed->reason.ToString();
  }

  IoThreads io_{2};

 private:
  static inline TempDir* dir_ = nullptr;
  static inline TestPki* pki_ = nullptr;
  static inline Status* pki_error_ = nullptr;
};

}  // namespace fedslice::testing
