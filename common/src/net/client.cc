#include "fedslice/common/net/client.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "net/session_impl.h"
#include "net/tls_internal.h"

namespace fedslice::net {

namespace asio = boost::asio;

Result<SessionPtr> AsyncConnect(asio::io_context& io, const std::string& host, uint16_t port,
                                const TlsConfig& tls, const ConnectOptions& options,
                                std::shared_ptr<SessionHandler> handler, ConnectCallback done) {
  if (!handler) return Status::InvalidArgument("AsyncConnect: no session handler");
  if (!done) return Status::InvalidArgument("AsyncConnect: no completion callback");
  if (host.empty()) return Status::InvalidArgument("AsyncConnect: empty host");
  FEDSLICE_ASSIGN_OR_RETURN(auto ctx, internal::MakeTlsContext(tls, /*server=*/false));
  std::shared_ptr<internal::SessionImpl> session;
  try {
    session = std::make_shared<internal::SessionImpl>(io, std::move(ctx), tls, std::move(handler));
  } catch (const std::exception& e) {
    return Status::Internal(std::string("creating a session: ") + e.what());
  }
  session->StartClient(host, port, options, std::move(done));
  return SessionPtr(session);
}

// ---------------------------------------------------------------------------------------------
// Channel

namespace {
// Messages buffered by a Channel before reading pauses; reading resumes at half of it.
constexpr size_t kChannelInbox = 8;
}  // namespace

struct Channel::State final : SessionHandler {
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread thread;
  TlsConfig config;
  SessionPtr session;
  std::string identity;
  std::mutex close_mu;  // serializes Close()
  bool close_done = false;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<proto::Envelope> inbox;
  bool paused = false;
  bool closed = false;
  Status close_reason;

  void OnOpen(const SessionPtr&) override {}
  void OnMessage(const SessionPtr& s, proto::Envelope envelope) override {
    std::lock_guard<std::mutex> lock(mu);
    inbox.push_back(std::move(envelope));
    if (inbox.size() >= kChannelInbox && !paused) {
      paused = true;
      s->PauseReading();
    }
    cv.notify_all();
  }
  void OnClosed(const SessionPtr&, const Status& reason) override {
    std::lock_guard<std::mutex> lock(mu);
    closed = true;
    close_reason = reason;
    cv.notify_all();
  }

  void StartThread() {
    work.emplace(asio::make_work_guard(io));
    thread = std::thread([this] {
      // Handlers catch their own exceptions; this loop only guards against the unexpected.
      for (;;) {
        try {
          io.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("net: channel I/O thread: {}", e.what());
        }
      }
    });
  }

  void StopThread() {
    work.reset();
    if (thread.joinable()) {
      // Everything pending is bounded by timers; stop() only matters if that bound failed.
      if (!WaitClosed(config.write_timeout + config.shutdown_timeout + std::chrono::seconds(1))) {
        io.stop();
      }
      thread.join();
    }
  }

  bool WaitClosed(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [this] { return closed; });
  }
};

Result<std::unique_ptr<Channel>> Channel::Connect(const std::string& host, uint16_t port,
                                                  const TlsConfig& tls,
                                                  std::chrono::milliseconds timeout,
                                                  const ConnectOptions& options) {
  if (timeout <= std::chrono::milliseconds::zero()) {
    return Status::InvalidArgument("Channel::Connect: timeout must be positive");
  }
  auto state = std::make_shared<State>();
  state->config = tls;
  state->config.connect_timeout = std::min(tls.connect_timeout, timeout);
  state->config.handshake_timeout = std::min(tls.handshake_timeout, timeout);

  auto promise = std::make_shared<std::promise<Result<SessionPtr>>>();
  auto future = promise->get_future();
  auto session =
      AsyncConnect(state->io, host, port, state->config, options, state,
                   [promise](Result<SessionPtr> r) { promise->set_value(std::move(r)); });
  if (!session.ok()) return session.status();
  state->session = *session;
  state->StartThread();
  if (future.wait_for(timeout) != std::future_status::ready) {
    // connect_timeout + handshake_timeout may add up to more than `timeout`: abort.
    state->session->Close(Status::DeadlineExceeded("connecting to " + host + ":" +
                                                   std::to_string(port) + " took longer than " +
                                                   std::to_string(timeout.count()) + " ms"));
  }
  Result<SessionPtr> connected = future.get();
  if (!connected.ok()) {
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->closed = true;  // no OnClosed comes for a session that never opened
    }
    state->work.reset();
    state->thread.join();
    return connected.status();
  }
  state->identity = (*connected)->peer_identity();
  return std::unique_ptr<Channel>(new Channel(std::move(state)));
}

Channel::Channel(std::shared_ptr<State> state) : state_(std::move(state)) {}

Channel::~Channel() { Close(); }

Status Channel::Send(proto::Envelope envelope) {
  auto promise = std::make_shared<std::promise<Status>>();
  auto future = promise->get_future();
  FEDSLICE_RETURN_IF_ERROR(state_->session->Send(
      std::move(envelope), [promise](const Status& s) { promise->set_value(s); }));
  // The callback comes within write_timeout, or when the session closes; the bound only
  // guards against an I/O thread that was stopped by force.
  const auto bound =
      state_->config.write_timeout + state_->config.shutdown_timeout + std::chrono::seconds(2);
  if (future.wait_for(bound) != std::future_status::ready) {
    return Status::DeadlineExceeded("send not completed within " + std::to_string(bound.count()) +
                                    " ms");
  }
  return future.get();
}

Result<proto::Envelope> Channel::Receive(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait_for(lock, timeout, [this] { return !state_->inbox.empty() || state_->closed; });
  if (!state_->inbox.empty()) {
    proto::Envelope envelope = std::move(state_->inbox.front());
    state_->inbox.pop_front();
    if (state_->paused && state_->inbox.size() <= kChannelInbox / 2) {
      state_->paused = false;
      state_->session->ResumeReading();
    }
    return envelope;
  }
  if (state_->closed) {
    const Status& r = state_->close_reason;
    return r.ok() ? Status::Unavailable("session closed normally")
                  : Status(r.code(), "session closed: " + r.message());
  }
  return Status::DeadlineExceeded("no message within " + std::to_string(timeout.count()) + " ms");
}

void Channel::Close(const Status& reason) {
  std::lock_guard<std::mutex> lock(state_->close_mu);
  if (state_->close_done) return;
  state_->close_done = true;
  state_->session->Close(reason);
  state_->StopThread();
}

bool Channel::is_open() const { return state_->session->is_open(); }

const std::string& Channel::peer_identity() const { return state_->identity; }

SessionStats Channel::stats() const { return state_->session->stats(); }

}  // namespace fedslice::net
