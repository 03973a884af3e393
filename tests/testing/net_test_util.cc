#include "testing/net_test_util.h"

#include <openssl/ssl.h>

#include <array>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <cstdio>
#include <fstream>

#include "fedslice/common/net/wire.h"
#include "testing/test_util.h"

namespace fedslice::testing {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;

Status RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return Status::Internal("popen failed for: " + command);
  std::array<char, 512> buf;
  while (std::fgets(buf.data(), buf.size(), pipe) != nullptr) output += buf.data();
  const int rc = ::pclose(pipe);
  if (rc != 0) {
    return Status::Internal("command failed (" + std::to_string(rc) + "): " + command + "\n" +
                            output);
  }
  return Status::Ok();
}

Result<TestPki> TestPki::Create(const std::filesystem::path& dir, int num_clients) {
  TestPki pki{dir};
  const std::string d = "'" + dir.string() + "'";
  const std::string script = (SourceDir() / "scripts" / "make_certs.sh").string();
  FEDSLICE_RETURN_IF_ERROR(
      RunCommand("bash '" + script + "' " + d + " " + std::to_string(num_clients)));
  {
    std::ofstream ext(dir / "leaf.ext");
    ext << "basicConstraints=critical,CA:FALSE\n"
           "keyUsage=critical,digitalSignature\n"
           "extendedKeyUsage=serverAuth,clientAuth\n"
           "subjectAltName=DNS:client-0,DNS:localhost,IP:127.0.0.1\n";
  }
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
  // A second CA, unrelated to the run's, and a client-0 certificate it signed.
  FEDSLICE_RETURN_IF_ERROR(
      RunCommand("cd " + d + " && openssl req -x509 " + ec +
                 " -keyout other_ca.key -out other_ca.pem -days 30 -subj '/CN=Other CA'"
                 " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
                 " && openssl req " +
                 ec +
                 " -keyout other_client.key -out other_client.csr"
                 " -subj '/CN=client-0'"
                 " && openssl x509 -req -in other_client.csr -CA other_ca.pem -CAkey other_ca.key"
                 " -set_serial 7 -days 30 -extfile leaf.ext -out other_client.pem"));
  // A self-signed certificate claiming to be client-0.
  FEDSLICE_RETURN_IF_ERROR(
      RunCommand("cd " + d + " && openssl req -x509 " + ec +
                 " -keyout self_signed.key -out self_signed.pem -days 30 -subj '/CN=client-0'"
                 " -addext subjectAltName=DNS:client-0,DNS:localhost,IP:127.0.0.1"
                 " -addext extendedKeyUsage=serverAuth,clientAuth"));
  return pki;
}

net::TlsConfig TestPki::Config(const std::string& name) const {
  net::TlsConfig c;
  c.ca_file = ca();
  c.cert_file = cert(name);
  c.key_file = key(name);
  c.connect_timeout = 5s;
  c.handshake_timeout = 5s;
  c.read_timeout = 5s;
  c.write_timeout = 5s;
  c.idle_timeout = 10s;
  c.heartbeat_interval = 2s;
  c.shutdown_timeout = 1s;
  return c;
}

// ---------------------------------------------------------------------------------------------

IoThreads::IoThreads(int threads) {
  work_.emplace(asio::make_work_guard(io_));
  running_ = threads;
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this] {
      io_.run();
      std::lock_guard<std::mutex> lock(mu_);
      --running_;
      cv_.notify_all();
    });
  }
}

IoThreads::~IoThreads() { Stop(); }

bool IoThreads::Stop(std::chrono::milliseconds timeout) {
  work_.reset();
  bool drained;
  {
    std::unique_lock<std::mutex> lock(mu_);
    drained = cv_.wait_for(lock, timeout, [this] { return running_ == 0; });
  }
  if (!drained) io_.stop();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  return drained;
}

// ---------------------------------------------------------------------------------------------

void RecordingHandler::OnOpen(const net::SessionPtr& session) {
  std::lock_guard<std::mutex> lock(mu_);
  opened_.push_back(session);
  ++opened_total_;
  cv_.notify_all();
}

void RecordingHandler::OnMessage(const net::SessionPtr& session, proto::Envelope envelope) {
  std::lock_guard<std::mutex> lock(mu_);
  if (echo_) {
    proto::Envelope copy = envelope;
    Status s = session->Send(std::move(copy));
    (void)s;
  }
  messages_.push_back({session, std::move(envelope)});
  cv_.notify_all();
}

void RecordingHandler::OnClosed(const net::SessionPtr& session, const Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  closed_.push_back({session, reason});
  cv_.notify_all();
}

void RecordingHandler::OnRejected(const std::string& remote, const Status& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  rejected_.push_back({remote, reason});
  cv_.notify_all();
}

template <typename T>
std::optional<T> RecordingHandler::Pop(std::deque<T>& q, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !q.empty(); })) return std::nullopt;
  T value = std::move(q.front());
  q.pop_front();
  return value;
}

std::optional<net::SessionPtr> RecordingHandler::WaitOpen(std::chrono::milliseconds timeout) {
  return Pop(opened_, timeout);
}
std::optional<RecordingHandler::Message> RecordingHandler::WaitMessage(
    std::chrono::milliseconds timeout) {
  return Pop(messages_, timeout);
}
std::optional<RecordingHandler::Closed> RecordingHandler::WaitClosed(
    std::chrono::milliseconds timeout) {
  return Pop(closed_, timeout);
}
std::optional<RecordingHandler::Rejected> RecordingHandler::WaitRejected(
    std::chrono::milliseconds timeout) {
  return Pop(rejected_, timeout);
}

void RecordingHandler::set_echo(bool echo) {
  std::lock_guard<std::mutex> lock(mu_);
  echo_ = echo;
}

int RecordingHandler::opened_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return opened_total_;
}

// ---------------------------------------------------------------------------------------------
// Raw clients: synchronous wrappers over async operations, each bounded with run_for.

namespace {

// Runs io until `done` or `timeout`; on timeout cancels `socket` and drains the handlers.
template <typename Socket>
bool RunFor(asio::io_context& io, Socket& socket, std::chrono::milliseconds timeout,
            const bool& done) {
  io.restart();
  io.run_for(timeout);
  if (done) return true;
  error_code ignored;
  socket.cancel(ignored);
  io.restart();
  io.run();
  return false;
}

}  // namespace

struct RawTlsClient::Impl {
  asio::io_context io;
  asio::ssl::context ctx{asio::ssl::context::tls_client};
  std::optional<asio::ssl::stream<tcp::socket>> stream;
  std::vector<uint8_t> pending;  // bytes read beyond the last frame
};

RawTlsClient::RawTlsClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RawTlsClient::~RawTlsClient() = default;

Result<std::unique_ptr<RawTlsClient>> RawTlsClient::Connect(uint16_t port,
                                                            const RawTlsOptions& options,
                                                            std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  error_code ec;
  if (!options.ca_file.empty()) {
    impl->ctx.load_verify_file(options.ca_file, ec);
    if (ec) return Status::Internal("raw client: CA: " + ec.message());
    impl->ctx.set_verify_mode(asio::ssl::verify_peer, ec);
  } else {
    impl->ctx.set_verify_mode(asio::ssl::verify_none, ec);
  }
  if (!options.cert_file.empty()) {
    impl->ctx.use_certificate_chain_file(options.cert_file, ec);
    if (!ec) impl->ctx.use_private_key_file(options.key_file, asio::ssl::context::pem, ec);
    if (ec) return Status::Internal("raw client: certificate: " + ec.message());
  }
  if (options.max_tls_version != 0) {
    SSL_CTX_set_max_proto_version(impl->ctx.native_handle(), options.max_tls_version);
  }
  impl->stream.emplace(impl->io, impl->ctx);
  auto& socket = impl->stream->lowest_layer();
  socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), ec);
  if (ec) return Status::Unavailable("raw client: connect: " + ec.message());
  bool done = false;
  error_code result;
  impl->stream->async_handshake(asio::ssl::stream_base::client, [&](const error_code& e) {
    result = e;
    done = true;
  });
  if (!RunFor(impl->io, socket, timeout, done)) {
    return Status::DeadlineExceeded("raw client: handshake timed out");
  }
  if (result) return Status::PermissionDenied("raw client: handshake: " + result.message());
  return std::unique_ptr<RawTlsClient>(new RawTlsClient(std::move(impl)));
}

Status RawTlsClient::Write(std::span<const uint8_t> bytes, std::chrono::milliseconds timeout) {
  bool done = false;
  error_code result;
  asio::async_write(*impl_->stream, asio::buffer(bytes.data(), bytes.size()),
                    [&](const error_code& e, size_t) {
                      result = e;
                      done = true;
                    });
  if (!RunFor(impl_->io, impl_->stream->lowest_layer(), timeout, done)) {
    return Status::DeadlineExceeded("raw client: write timed out");
  }
  if (result) return Status::Unavailable("raw client: write: " + result.message());
  return Status::Ok();
}

Status RawTlsClient::WriteEnvelope(const proto::Envelope& envelope,
                                   std::chrono::milliseconds timeout) {
  std::string frame;
  FEDSLICE_RETURN_IF_ERROR(net::EncodeFrame(envelope, net::kMaxFrameBytesCeiling, &frame));
  return Write(std::span(reinterpret_cast<const uint8_t*>(frame.data()), frame.size()), timeout);
}

Result<proto::Envelope> RawTlsClient::Read(std::chrono::milliseconds timeout,
                                           bool skip_heartbeats) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    // Whole frame already buffered?
    size_t consumed = 0;
    if (impl_->pending.size() >= net::kFrameHeaderBytes) {
      FEDSLICE_ASSIGN_OR_RETURN(net::FrameHeader header,
                                net::ParseFrameHeader(impl_->pending, net::kMaxFrameBytesCeiling));
      const size_t total = net::kFrameHeaderBytes + header.payload_bytes;
      if (impl_->pending.size() >= total) {
        proto::Envelope envelope;
        if (!envelope.ParseFromArray(impl_->pending.data() + net::kFrameHeaderBytes,
                                     static_cast<int>(header.payload_bytes))) {
          return Status::Corruption("raw client: unparseable frame from server");
        }
        consumed = total;
        impl_->pending.erase(impl_->pending.begin(), impl_->pending.begin() + consumed);
        if (skip_heartbeats && envelope.has_heartbeat()) continue;
        return envelope;
      }
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left <= 0ms) return Status::DeadlineExceeded("raw client: no frame in time");
    std::array<uint8_t, 64 * 1024> buf;
    bool done = false;
    error_code result;
    size_t n = 0;
    impl_->stream->async_read_some(asio::buffer(buf), [&](const error_code& e, size_t got) {
      result = e;
      n = got;
      done = true;
    });
    if (!RunFor(impl_->io, impl_->stream->lowest_layer(), left, done)) {
      return Status::DeadlineExceeded("raw client: no frame in time");
    }
    impl_->pending.insert(impl_->pending.end(), buf.begin(), buf.begin() + n);
    if (result) return Status::Unavailable("raw client: read: " + result.message());
  }
}

Status RawTlsClient::WaitForClose(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left <= 0ms) return Status::DeadlineExceeded("raw client: server kept the connection");
    std::array<uint8_t, 64 * 1024> buf;
    bool done = false;
    error_code result;
    impl_->stream->async_read_some(asio::buffer(buf), [&](const error_code& e, size_t) {
      result = e;
      done = true;
    });
    if (!RunFor(impl_->io, impl_->stream->lowest_layer(), left, done)) {
      return Status::DeadlineExceeded("raw client: server kept the connection");
    }
    if (result) {
      // eof (close_notify), alert or reset: closed either way. Answer a close_notify with
      // ours, as a well-behaved TLS peer does, so the server's shutdown completes.
      if (result == asio::error::eof) {
        bool shut = false;
        impl_->stream->async_shutdown([&](const error_code&) { shut = true; });
        RunFor(impl_->io, impl_->stream->lowest_layer(), 1000ms, shut);
      }
      error_code ignored;
      impl_->stream->lowest_layer().close(ignored);
      return Status::Ok();
    }
  }
}

std::string RawTlsClient::tls_version() const {
  return SSL_get_version(impl_->stream->native_handle());
}

struct RawTcpClient::Impl {
  asio::io_context io;
  tcp::socket socket{io};
};

RawTcpClient::RawTcpClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RawTcpClient::~RawTcpClient() = default;

Result<std::unique_ptr<RawTcpClient>> RawTcpClient::Connect(uint16_t port) {
  auto impl = std::make_unique<Impl>();
  error_code ec;
  impl->socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), ec);
  if (ec) return Status::Unavailable("raw tcp: connect: " + ec.message());
  return std::unique_ptr<RawTcpClient>(new RawTcpClient(std::move(impl)));
}

Status RawTcpClient::Write(std::span<const uint8_t> bytes) {
  error_code ec;
  asio::write(impl_->socket, asio::buffer(bytes.data(), bytes.size()), ec);
  if (ec) return Status::Unavailable("raw tcp: write: " + ec.message());
  return Status::Ok();
}

Status RawTcpClient::WaitForClose(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left <= 0ms) return Status::DeadlineExceeded("raw tcp: server kept the connection");
    std::array<uint8_t, 4096> buf;
    bool done = false;
    error_code result;
    impl_->socket.async_read_some(asio::buffer(buf), [&](const error_code& e, size_t) {
      result = e;
      done = true;
    });
    if (!RunFor(impl_->io, impl_->socket, left, done)) {
      return Status::DeadlineExceeded("raw tcp: server kept the connection");
    }
    if (result) return Status::Ok();
  }
}

proto::Envelope Stamp(proto::Envelope envelope, uint64_t seq) {
  envelope.set_protocol_major(net::kProtocolMajor);
  envelope.set_protocol_minor(net::kProtocolMinor);
  envelope.set_seq(seq);
  return envelope;
}

proto::Envelope MakeHello(const std::string& client_id) {
  proto::Envelope e;
  auto* hello = e.mutable_hello();
  hello->set_client_id(client_id);
  hello->set_protocol_major(net::kProtocolMajor);
  hello->set_protocol_minor(net::kProtocolMinor);
  hello->mutable_profile()->set_flops(1e9);
  hello->mutable_profile()->set_memory_budget_bytes(uint64_t{1} << 30);
  return e;
}

}  // namespace fedslice::testing
