// Client side of the mutual-TLS transport: an asynchronous connect for code that already runs
// an io_context (pipeline stages connecting to the next stage), and a blocking Channel for
// sequential code (edge clients, the inference requester). Both apply the same TlsConfig
// timeouts, heartbeats and frame limit as the server.
#pragma once

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "fedslice/common/net/session.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"

namespace fedslice::net {

struct ConnectOptions {
  // Name the server certificate must carry (DNS SAN, or IP SAN for an address; CN only when
  // the certificate has no SAN). Empty: the host given to connect.
  std::string server_name;
  // When set, the server's identity (CN, else first DNS SAN) must equal this, e.g. the client
  // id of the next pipeline stage, so that a stage cannot be impersonated by another client
  // holding a certificate of the same CA.
  std::string expected_identity;
};

using ConnectCallback = std::function<void(Result<SessionPtr>)>;

// Connects to host:port, runs the TLS handshake (verifying the server against the CA and the
// server name), checks the server's identity, and waits for the server's greeting.
// Returns the session at once (not yet open; Close() on it aborts the attempt) or an immediate
// error (bad TlsConfig, unreadable certificate files: then `done` is never called).
// Otherwise `done` is called exactly once, on the session's strand: with the open session
// (after handler->OnOpen), or with the error —
//   kUnavailable: resolve / connect / TLS failure ("connection refused", "wrong version
//     number"...),
//   kDeadlineExceeded: connect_timeout or handshake_timeout (greeting included) passed,
//   kPermissionDenied: the server's certificate failed verification (other CA, name
//     mismatch), its identity is not expected_identity, the server refused our certificate
//     (TLS alert), or it greeted us with a Reject (reason and message in the status).
Result<SessionPtr> AsyncConnect(boost::asio::io_context& io, const std::string& host, uint16_t port,
                                const TlsConfig& tls, const ConnectOptions& options,
                                std::shared_ptr<SessionHandler> handler, ConnectCallback done);

// A blocking, sequential connection with its own I/O thread (which also keeps heartbeats
// flowing while the caller computes for minutes). One thread may Send while another Receives;
// Close may be called from any thread.
class Channel {
 public:
  // Connects as AsyncConnect does; `timeout` bounds the whole connect (it also caps
  // tls.connect_timeout and tls.handshake_timeout). Errors as AsyncConnect, plus the
  // TlsConfig / certificate file errors.
  static Result<std::unique_ptr<Channel>> Connect(const std::string& host, uint16_t port,
                                                  const TlsConfig& tls,
                                                  std::chrono::milliseconds timeout,
                                                  const ConnectOptions& options = {});

  // Closes gracefully (bounded by write_timeout + shutdown_timeout) and joins the I/O thread.
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Sends and waits until the frame is handed to TLS (at most write_timeout).
  // Errors: as Session::Send, or why the write failed.
  Status Send(proto::Envelope envelope);

  // The next message (Heartbeats excluded), waiting at most `timeout`. Messages that arrived
  // before the session closed are still delivered; after them, the close reason is returned
  // (kUnavailable "session closed: ..." for a normal close). kDeadlineExceeded on timeout.
  // At most a few messages are buffered; beyond that reading pauses until Receive is called.
  Result<proto::Envelope> Receive(std::chrono::milliseconds timeout);

  // Graceful close with `reason` (see Session::Close); waits until the session is closed.
  // Idempotent.
  void Close(const Status& reason = Status::Ok());

  // False once the session is closing or closed (by either side).
  bool is_open() const;
  const std::string& peer_identity() const;
  SessionStats stats() const;

  struct State;

 private:
  explicit Channel(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace fedslice::net
