// A mutual-TLS server: accepts connections, authenticates them, keeps at most one session per
// identity, and hands sessions to a SessionHandler. Used by the coordinator and by every
// pipeline stage.
//
// Threading: the server runs on a caller-owned io_context; any number of threads may run it
// (each session has its own strand). Public methods are thread-safe.
#pragma once

#include <boost/asio/io_context.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fedslice/common/net/session.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"

namespace fedslice::net {

// What happens when a peer authenticates with an identity that already holds a session.
enum class DuplicatePolicy {
  // The newcomer gets Reject{REJECT_DUPLICATE_IDENTITY} and is closed; the existing session
  // is untouched. The safe default: a stolen or copied key cannot kick out the real client.
  // Cost: after a client dies without closing its connection (power loss), its reconnects are
  // refused until the idle timeout drops the stale session; clients retry with backoff.
  kRejectNew,
  // The existing session is closed (Bye BYE_REPLACED, OnClosed with kAborted) and the
  // newcomer takes over. Its OnClosed may arrive after the newcomer's OnOpen, so handlers
  // must compare session pointers, not identities.
  kReplaceExisting,
};

struct ServerOptions {
  // Address to listen on: tests and single-host runs use "127.0.0.1"; "0.0.0.0" or "::"
  // only when peers are on other hosts.
  std::string bind_address = "127.0.0.1";
  uint16_t port = 0;  // 0 = ephemeral; read the bound port with Server::port()
  DuplicatePolicy duplicate_policy = DuplicatePolicy::kRejectNew;
  // Connections (handshaking or open) beyond which new TCP connections are closed at once.
  size_t max_connections = 1024;
};

struct ServerStats {
  uint64_t accepted = 0;            // TCP connections accepted
  uint64_t handshake_failures = 0;  // TLS refused or timed out: never became sessions
  uint64_t rejected = 0;            // authenticated but refused (duplicate, over capacity)
  uint64_t opened = 0;              // OnOpen calls
  uint64_t closed = 0;              // OnClosed calls
};

class Server {
 public:
  // Builds the TLS context (loading CA, certificate and key), binds, listens and starts
  // accepting. Errors: the TlsConfig problem or file that failed, or the bind error
  // ("127.0.0.1:5000: Address already in use").
  static Result<std::unique_ptr<Server>> Start(boost::asio::io_context& io, const TlsConfig& tls,
                                               ServerOptions options,
                                               std::shared_ptr<SessionHandler> handler);

  // Stop()s. The io_context must outlive the Server: destroy the Server first.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The bound port (useful with port 0).
  uint16_t port() const;

  // Stops accepting and closes every session gracefully (Bye BYE_SHUTTING_DOWN, OnClosed
  // with `reason`). Asynchronous: the closes run on the io_context, which runs out of work
  // once they are done. Idempotent.
  void Stop(const Status& reason = Status::Unavailable("server shutting down"));

  // The open session holding `identity`, or nullptr.
  SessionPtr Find(std::string_view identity) const;
  // Open sessions, in no particular order.
  std::vector<SessionPtr> Sessions() const;
  ServerStats stats() const;

  struct Impl;

 private:
  explicit Server(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace fedslice::net
