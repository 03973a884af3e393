#include "fedslice/common/net/server.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "net/session_impl.h"
#include "net/tls_internal.h"

namespace fedslice::net {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;
using internal::SessionImpl;

struct Server::Impl final : internal::SessionOwner, std::enable_shared_from_this<Server::Impl> {
  Impl(asio::io_context& io_context, const TlsConfig& tls_config, ServerOptions server_options,
       std::shared_ptr<asio::ssl::context> tls_context, std::shared_ptr<SessionHandler> h)
      : io(io_context),
        tls(tls_config),
        options(std::move(server_options)),
        ctx(std::move(tls_context)),
        handler(std::move(h)),
        acceptor(asio::make_strand(io_context)),
        retry_timer(acceptor.get_executor()) {}

  Status Listen() {
    error_code ec;
    const auto address = asio::ip::make_address(options.bind_address, ec);
    if (ec) {
      return Status::InvalidArgument("bind address '" + options.bind_address +
                                     "' is not an IP address: " + ec.message());
    }
    const tcp::endpoint endpoint(address, options.port);
    const std::string where = options.bind_address + ":" + std::to_string(options.port);
    if (acceptor.open(endpoint.protocol(), ec); ec) {
      return Status::IoError("opening a socket for " + where + ": " + ec.message());
    }
    // Lets a restarted coordinator bind again while old connections sit in TIME_WAIT.
    acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    if (acceptor.bind(endpoint, ec); ec) {
      return Status::IoError("binding " + where + ": " + ec.message());
    }
    if (acceptor.listen(asio::socket_base::max_listen_connections, ec); ec) {
      return Status::IoError("listening on " + where + ": " + ec.message());
    }
    bound_port = acceptor.local_endpoint(ec).port();
    return Status::Ok();
  }

  void Accept() {
    acceptor.async_accept(asio::make_strand(io),
                          [self = shared_from_this()](const error_code& ec, tcp::socket socket) {
                            self->OnAccept(ec, std::move(socket));
                          });
  }

  void OnAccept(const error_code& ec, tcp::socket socket) {
    if (stopping.load() || ec == asio::error::operation_aborted) return;
    if (ec) {
      // Typically EMFILE: back off instead of spinning on a failing accept.
      spdlog::warn("net: accept on port {} failed: {}; retrying in 100 ms", bound_port,
                   ec.message());
      retry_timer.expires_after(std::chrono::milliseconds(100));
      retry_timer.async_wait([self = shared_from_this()](const error_code& wait_ec) {
        if (!wait_ec && !self->stopping.load()) self->Accept();
      });
      return;
    }
    accepted.fetch_add(1);
    std::shared_ptr<SessionImpl> session;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (all.size() >= options.max_connections) {
        error_code ignored;
        spdlog::warn("net: refusing a connection from {}: {} connections already",
                     socket.remote_endpoint(ignored).address().to_string(), all.size());
        rejected.fetch_add(1);
        socket.close(ignored);
      } else {
        session =
            std::make_shared<SessionImpl>(std::move(socket), ctx, tls, handler, weak_from_this());
        all.emplace(session->id(), session);
      }
    }
    if (session) session->StartServer();
    Accept();
  }

  Status Register(const std::shared_ptr<SessionImpl>& session,
                  proto::RejectReason* reason) override {
    std::shared_ptr<SessionImpl> replaced;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (stopping.load()) {
        *reason = proto::REJECT_SHUTTING_DOWN;
        return Status::Unavailable("server is shutting down");
      }
      auto it = by_identity.find(session->peer_identity());
      std::shared_ptr<SessionImpl> existing = it == by_identity.end() ? nullptr : it->second.lock();
      if (existing) {
        if (options.duplicate_policy == DuplicatePolicy::kRejectNew) {
          *reason = proto::REJECT_DUPLICATE_IDENTITY;
          return Status::PermissionDenied("identity '" + session->peer_identity() +
                                          "' already holds session " +
                                          std::to_string(existing->id()));
        }
        replaced = std::move(existing);
      }
      by_identity[session->peer_identity()] = session;
    }
    if (replaced) {
      spdlog::info("net: session {} of '{}' replaced by session {}", replaced->id(),
                   session->peer_identity(), session->id());
      replaced->CloseWith(Status::Aborted("replaced by a newer session of the same identity"),
                          proto::BYE_REPLACED);
    }
    return Status::Ok();
  }

  void Finished(const SessionImpl& session, bool handshake_ok, bool opened) override {
    {
      std::lock_guard<std::mutex> lock(mu);
      all.erase(session.id());
      if (handshake_ok) {
        auto it = by_identity.find(session.peer_identity());
        if (it != by_identity.end()) {
          auto current = it->second.lock();
          if (!current || current.get() == &session) by_identity.erase(it);
        }
      }
    }
    if (!handshake_ok) {
      handshake_failures.fetch_add(1);
    } else if (!opened) {
      rejected.fetch_add(1);
    } else {
      closed.fetch_add(1);
    }
  }

  void Opened(const SessionImpl&) override { opened_count.fetch_add(1); }

  void Stop(const Status& reason) {
    if (stopping.exchange(true)) return;
    asio::post(acceptor.get_executor(), [self = shared_from_this()] {
      error_code ignored;
      self->acceptor.close(ignored);
      self->retry_timer.cancel();
    });
    std::vector<std::shared_ptr<SessionImpl>> sessions;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& [id, weak] : all) {
        if (auto s = weak.lock()) sessions.push_back(std::move(s));
      }
    }
    for (auto& s : sessions) s->CloseWith(reason, proto::BYE_SHUTTING_DOWN);
  }

  asio::io_context& io;
  const TlsConfig tls;
  const ServerOptions options;
  std::shared_ptr<asio::ssl::context> ctx;
  std::shared_ptr<SessionHandler> handler;
  tcp::acceptor acceptor;  // used on its own strand only
  asio::steady_timer retry_timer;
  uint16_t bound_port = 0;
  std::atomic<bool> stopping{false};

  mutable std::mutex mu;
  std::unordered_map<uint64_t, std::weak_ptr<SessionImpl>> all;  // handshaking or open
  std::unordered_map<std::string, std::weak_ptr<SessionImpl>> by_identity;

  std::atomic<uint64_t> accepted{0}, handshake_failures{0}, rejected{0}, opened_count{0}, closed{0};
};

Result<std::unique_ptr<Server>> Server::Start(asio::io_context& io, const TlsConfig& tls,
                                              ServerOptions options,
                                              std::shared_ptr<SessionHandler> handler) {
  if (!handler) return Status::InvalidArgument("Server::Start: no session handler");
  FEDSLICE_ASSIGN_OR_RETURN(auto ctx, internal::MakeTlsContext(tls, /*server=*/true));
  std::shared_ptr<Impl> impl;
  try {
    impl = std::make_shared<Impl>(io, tls, std::move(options), std::move(ctx), std::move(handler));
  } catch (const std::exception& e) {
    return Status::Internal(std::string("creating the server: ") + e.what());
  }
  FEDSLICE_RETURN_IF_ERROR(impl->Listen());
  spdlog::info("net: listening on {}:{} ({})", impl->options.bind_address, impl->bound_port,
               tls.allow_tls12 ? "TLS 1.2+" : "TLS 1.3");
  asio::post(impl->acceptor.get_executor(), [impl] { impl->Accept(); });
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Stop(); }

uint16_t Server::port() const { return impl_->bound_port; }

void Server::Stop(const Status& reason) { impl_->Stop(reason); }

SessionPtr Server::Find(std::string_view identity) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->by_identity.find(std::string(identity));
  if (it == impl_->by_identity.end()) return nullptr;
  auto s = it->second.lock();
  return s && s->is_open() ? s : nullptr;
}

std::vector<SessionPtr> Server::Sessions() const {
  std::vector<SessionPtr> out;
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto& [identity, weak] : impl_->by_identity) {
    if (auto s = weak.lock(); s && s->is_open()) out.push_back(std::move(s));
  }
  return out;
}

ServerStats Server::stats() const {
  ServerStats s;
  s.accepted = impl_->accepted.load();
  s.handshake_failures = impl_->handshake_failures.load();
  s.rejected = impl_->rejected.load();
  s.opened = impl_->opened_count.load();
  s.closed = impl_->closed.load();
  return s;
}

}  // namespace fedslice::net
