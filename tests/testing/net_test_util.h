// Test helpers for the mutual-TLS transport: a throw-away PKI, an io_context on threads, a
// handler that records session events, and raw clients that can say anything (no
// certificate, another CA, TLS 1.2, plaintext, malformed frames) to test what the server does
// with peers that do not follow the protocol.
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "fedslice/common/net/session.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::testing {

using namespace std::chrono_literals;

// Certificates for one test process, in `dir`:
//   - ca.pem, coordinator.{pem,key}, client-<i>.{pem,key}: made by scripts/make_certs.sh;
//   - other_ca.pem and other_client.{pem,key}: CN=client-0 signed by a second, unrelated CA
//     (serverAuth + clientAuth, SAN localhost/127.0.0.1, so it can also pose as a server);
//   - self_signed.{pem,key}: a self-signed CN=client-0 certificate.
struct TestPki {
  std::filesystem::path dir;

  static Result<TestPki> Create(const std::filesystem::path& dir, int num_clients);

  std::string ca() const { return (dir / "ca.pem").string(); }
  std::string cert(const std::string& name) const { return (dir / (name + ".pem")).string(); }
  std::string key(const std::string& name) const { return (dir / (name + ".key")).string(); }

  // Fast timeouts for tests (seconds rather than minutes), CA = ca.pem.
  net::TlsConfig Config(const std::string& name) const;
  net::TlsConfig ServerConfig() const { return Config("coordinator"); }
};

// Runs shell `command`; error with its output when it fails.
Status RunCommand(const std::string& command);

// An io_context run by `threads` threads until Stop() (or destruction).
class IoThreads {
 public:
  explicit IoThreads(int threads = 1);
  ~IoThreads();
  boost::asio::io_context& io() { return io_; }
  // Lets the io_context run out of work and joins; true if it did within `timeout` (else it
  // is stopped by force and false is returned).
  bool Stop(std::chrono::milliseconds timeout = 10s);

 private:
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  int running_ = 0;
};

// Records every callback; Wait* block (bounded) until the event arrives.
class RecordingHandler : public net::SessionHandler {
 public:
  struct Closed {
    net::SessionPtr session;
    Status reason;
  };
  struct Message {
    net::SessionPtr session;
    proto::Envelope envelope;
  };
  struct Rejected {
    std::string remote;
    Status reason;
  };

  void OnOpen(const net::SessionPtr& session) override;
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override;
  void OnClosed(const net::SessionPtr& session, const Status& reason) override;
  void OnRejected(const std::string& remote, const Status& reason) override;

  std::optional<net::SessionPtr> WaitOpen(std::chrono::milliseconds timeout = 5s);
  std::optional<Message> WaitMessage(std::chrono::milliseconds timeout = 5s);
  std::optional<Closed> WaitClosed(std::chrono::milliseconds timeout = 5s);
  std::optional<Rejected> WaitRejected(std::chrono::milliseconds timeout = 5s);

  // When set, every received message is echoed back (same body) on its session.
  void set_echo(bool echo);
  int opened_count();

 private:
  template <typename T>
  std::optional<T> Pop(std::deque<T>& q, std::chrono::milliseconds timeout);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<net::SessionPtr> opened_;
  std::deque<Message> messages_;
  std::deque<Closed> closed_;
  std::deque<Rejected> rejected_;
  int opened_total_ = 0;
  bool echo_ = false;
};

// A TLS client under the test's full control, bypassing net::Session: it can omit its
// certificate, cap the protocol version, and write arbitrary bytes.
struct RawTlsOptions {
  std::string ca_file;    // empty: do not verify the server
  std::string cert_file;  // empty: present no certificate
  std::string key_file;
  int max_tls_version = 0;  // e.g. TLS1_2_VERSION; 0 = library default
};

class RawTlsClient {
 public:
  ~RawTlsClient();
  // TCP connect to 127.0.0.1:port and TLS handshake. Note that with TLS 1.3 the client's
  // handshake completes before the server has checked the client certificate: a refusal
  // then shows up on the first read.
  static Result<std::unique_ptr<RawTlsClient>> Connect(uint16_t port, const RawTlsOptions& options,
                                                       std::chrono::milliseconds timeout = 5s);

  Status Write(std::span<const uint8_t> bytes, std::chrono::milliseconds timeout = 5s);
  // Frames `envelope` as is (no version or seq filled in, no validation).
  Status WriteEnvelope(const proto::Envelope& envelope, std::chrono::milliseconds timeout = 5s);
  // Next whole frame, parsed without validation; Heartbeats skipped if `skip_heartbeats`.
  Result<proto::Envelope> Read(std::chrono::milliseconds timeout = 5s, bool skip_heartbeats = true);
  // OK once the server has closed the connection (after any frames it sent first, which are
  // discarded), kDeadlineExceeded if it is still open after `timeout`.
  Status WaitForClose(std::chrono::milliseconds timeout = 5s);
  std::string tls_version() const;

  struct Impl;

 private:
  explicit RawTlsClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A plaintext TCP client: writes bytes and waits for the server to hang up.
class RawTcpClient {
 public:
  ~RawTcpClient();
  static Result<std::unique_ptr<RawTcpClient>> Connect(uint16_t port);
  Status Write(std::span<const uint8_t> bytes);
  // OK once the peer closed the connection, kDeadlineExceeded otherwise.
  Status WaitForClose(std::chrono::milliseconds timeout = 5s);

  struct Impl;

 private:
  explicit RawTcpClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Envelope with version and seq set, e.g. Stamp(MakeHello("client-0"), 1).
proto::Envelope Stamp(proto::Envelope envelope, uint64_t seq);
proto::Envelope MakeHello(const std::string& client_id);

}  // namespace fedslice::testing
