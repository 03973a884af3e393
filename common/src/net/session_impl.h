// The one Session implementation, shared by server-accepted and client-connected sessions.
//
// Concurrency: everything touching the TLS stream, the timers and the read/close state runs
// on the session's strand (the socket's executor). The send queue is guarded by send_mu_ so
// that Send() can serialize on the caller's thread and keep seq in queue order; only the
// writer chain on the strand pops from it, so at most one async_write is ever outstanding.
#pragma once

#include <array>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "fedslice/common/net/client.h"
#include "fedslice/common/net/session.h"
#include "fedslice/common/net/tls.h"
#include "net/tls_channel.h"

namespace fedslice::net::internal {

class SessionImpl;

// Hooks a server gives its sessions. Called on the session's strand.
class SessionOwner {
 public:
  virtual ~SessionOwner() = default;
  // After authentication: OK admits the session; otherwise `*reason` and the status are sent
  // as a Reject and the session closed.
  virtual Status Register(const std::shared_ptr<SessionImpl>& session,
                          proto::RejectReason* reason) = 0;
  // Right before the handler's OnOpen.
  virtual void Opened(const SessionImpl& session) = 0;
  // Once, when the session is finished (socket closed).
  virtual void Finished(const SessionImpl& session, bool handshake_ok, bool opened) = 0;
};

// Serialized bytes of a frame. Not a std::string: resizing one zero-fills, a wasted pass over
// a buffer that is about to be overwritten.
struct FrameBuffer {
  std::unique_ptr<uint8_t[]> data;
  size_t capacity = 0;
};

class SessionImpl final : public Session, public std::enable_shared_from_this<SessionImpl> {
 public:
  enum class Role { kServer, kClient };

  // Server side: `socket` was accepted on a strand of its own.
  SessionImpl(boost::asio::ip::tcp::socket socket, std::shared_ptr<boost::asio::ssl::context> ctx,
              const TlsConfig& config, std::shared_ptr<SessionHandler> handler,
              std::weak_ptr<SessionOwner> owner);
  // Client side: a fresh socket on a new strand of `io`.
  SessionImpl(boost::asio::io_context& io, std::shared_ptr<boost::asio::ssl::context> ctx,
              const TlsConfig& config, std::shared_ptr<SessionHandler> handler);
  ~SessionImpl() override;

  void StartServer();
  void StartClient(const std::string& host, uint16_t port, const ConnectOptions& options,
                   ConnectCallback done);
  // Close with an explicit Bye reason (nullopt: no Bye). Thread-safe.
  void CloseWith(const Status& reason, std::optional<proto::ByeReason> bye);

  // Session
  uint64_t id() const override { return id_; }
  const std::string& peer_identity() const override { return identity_; }
  const std::string& remote_address() const override { return remote_address_; }
  std::string tls_version() const override;
  Status Send(proto::Envelope envelope, SendCallback on_sent) override;
  void Close(const Status& reason) override;
  void PauseReading() override;
  void ResumeReading() override;
  bool is_open() const override { return open_.load(std::memory_order_acquire); }
  SessionStats stats() const override;

 private:
  enum class State { kIdle, kConnecting, kHandshaking, kGreeting, kOpen, kClosing, kClosed };
  // A queued frame: the header and the envelope's serialized bytes, except that bytes fields
  // of more than a few KB (activations, model weights) are not copied into `chunks` but
  // written from the envelope's own strings (Protobuf's aliasing), so `envelope` is kept
  // until the frame is written. `pieces` lists the frame's bytes in order.
  struct Outgoing {
    proto::Envelope envelope;
    std::vector<FrameBuffer> chunks;
    std::vector<std::span<const uint8_t>> pieces;
    size_t size = 0;  // frame bytes in all
    SendCallback on_sent;
  };
  using Clock = std::chrono::steady_clock;

  // Send side (any thread).
  Status Enqueue(proto::Envelope envelope, SendCallback on_sent, bool internal);
  // Strand-only below.
  void WriteNext();
  void OnWrite(const boost::system::error_code& ec);
  void StartRead();
  void OnHeader(const boost::system::error_code& ec);
  void OnBody(const boost::system::error_code& ec);
  void OnReadError(const boost::system::error_code& ec);
  void Dispatch(proto::Envelope envelope);
  void ProtocolError(const Status& status, proto::ErrorCode code, uint64_t in_reply_to, bool fatal);
  void OnHandshake(const boost::system::error_code& ec);
  void Open();
  void ArmHeartbeat(Clock::duration delay);
  void OnHeartbeatTimer();
  void BeginClose(const Status& reason, std::optional<proto::ByeReason> bye);
  void ContinueClose();
  void Fail(const Status& reason);
  void Finish();
  // Runs a handler callback; an exception closes the session instead of unwinding into Asio.
  template <typename F>
  void Guarded(const char* what, F&& fn);
  void ArmReadTimer(std::chrono::milliseconds timeout, Status on_expiry, bool graceful);
  void MaybeFinishClose();
  void SetVerifyCallback();
  // OpenSSL's verify callback; finds the session through the SSL object's ex data.
  static int VerifyTrampoline(int preverified, X509_STORE_CTX* store);
  std::string Describe() const;

  const uint64_t id_;
  const Role role_;
  const TlsConfig config_;
  std::shared_ptr<boost::asio::ssl::context> ctx_;
  boost::asio::ip::tcp::socket socket_;
  boost::asio::any_io_executor strand_;
  TlsChannel tls_;
  Status init_status_;
  boost::asio::steady_timer read_timer_;
  boost::asio::steady_timer write_timer_;
  boost::asio::steady_timer heartbeat_timer_;
  boost::asio::steady_timer close_timer_;
  std::optional<boost::asio::ip::tcp::resolver> resolver_;
  std::shared_ptr<SessionHandler> handler_;
  std::weak_ptr<SessionOwner> owner_;

  // Written on the strand before the session opens, read-only afterwards.
  std::string identity_;
  std::string remote_address_;
  std::string tls_version_;
  std::string target_;  // "host:port" a client connects to, for messages
  ConnectOptions connect_options_;
  ConnectCallback connect_done_;

  // Strand-only state.
  State state_ = State::kIdle;
  Status close_reason_;
  bool handshake_ok_ = false;
  bool opened_ = false;
  bool reading_ = false;
  bool read_paused_ = false;
  // Graceful close: our close_notify sent (or failed), and the peer's received (or failed).
  bool close_notify_started_ = false;
  bool close_notify_done_ = false;
  bool draining_ = false;
  bool peer_closed_ = false;
  std::string verify_error_;  // why certificate verification failed, if it did
  uint64_t read_gen_ = 0;     // generations make stale timer expiries harmless
  uint64_t write_gen_ = 0;
  uint64_t heartbeat_gen_ = 0;
  std::array<uint8_t, 8> header_{};
  std::unique_ptr<uint8_t[]> body_;
  size_t body_size_ = 0;
  size_t body_capacity_ = 0;
  uint64_t last_received_seq_ = 0;
  int bad_messages_ = 0;
  std::optional<Status> bye_status_;  // set when the peer said Bye
  Outgoing current_;
  Clock::time_point last_send_ = Clock::now();

  // Send queue, guarded by send_mu_.
  std::mutex send_mu_;
  std::deque<Outgoing> queue_;
  size_t queued_bytes_ = 0;
  uint64_t next_seq_ = 1;
  bool writer_active_ = false;  // a WriteNext chain is scheduled or running
  bool send_closed_ = false;    // application Sends refused (closing)
  bool finished_ = false;       // nothing is sent any more
  // Written frames kept for reuse, so that steady traffic (pipeline activations) neither
  // allocates nor page-faults per frame. At most kSpareFrames of at most buffer_keep_bytes.
  std::vector<FrameBuffer> spare_frames_;

  std::atomic<bool> open_{false};
  std::atomic<uint64_t> bytes_sent_{0}, bytes_received_{0}, frames_sent_{0}, frames_received_{0},
      bad_total_{0};
};

}  // namespace fedslice::net::internal
