#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <exception>
#include <new>
#include <utility>

#include "fedslice/common/net/wire.h"
#include "net/session_impl.h"
#include "net/tls_internal.h"

namespace fedslice::net::internal {
namespace {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;

std::atomic<uint64_t> g_next_session_id{1};

// Frame buffers kept per session for reuse by later sends.
constexpr size_t kSpareFrames = 2;
// First buffer of a frame, at most: with large bytes fields aliased, what is left of any of
// our messages is far smaller.
constexpr size_t kFirstChunkBytes = size_t{64} << 10;

// Serialization target of a frame: the bytes Protobuf writes go into chunks of our own;
// the bytes fields it offers to alias (WriteAliasedRaw: fields longer than the block it was
// handed, so anything above kBlock) are recorded as pieces pointing into the message. The
// message must then outlive the write, which Outgoing ensures.
class FrameStream final : public google::protobuf::io::ZeroCopyOutputStream {
 public:
  // Protobuf aliases a bytes field only when it does not fit in the block at hand, so the
  // block size is the aliasing threshold: smaller fields are cheaper to copy than to
  // write as a piece (and a TLS record) of their own.
  static constexpr size_t kBlock = 8 << 10;

  // `first` holds the frame header in its first `used` bytes.
  FrameStream(FrameBuffer first, size_t used, std::vector<FrameBuffer>* chunks,
              std::vector<std::span<const uint8_t>>* pieces)
      : chunks_(chunks), pieces_(pieces) {
    chunks_->push_back(std::move(first));
    piece_begin_ = chunks_->back().data.get();
    cur_ = piece_begin_ + used;
  }

  bool Next(void** data, int* size) override {
    FrameBuffer& chunk = chunks_->back();
    uint8_t* const end = chunk.data.get() + chunk.capacity;
    if (cur_ == end) {
      ClosePiece();
      FrameBuffer next;
      next.capacity = std::max<size_t>(chunk.capacity * 2, kBlock);
      next.data.reset(new (std::nothrow) uint8_t[next.capacity]);
      if (!next.data) return false;
      chunks_->push_back(std::move(next));
      piece_begin_ = cur_ = chunks_->back().data.get();
      return Next(data, size);
    }
    const size_t n = std::min<size_t>(kBlock, static_cast<size_t>(end - cur_));
    *data = cur_;
    *size = static_cast<int>(n);
    cur_ += n;
    bytes_ += n;
    return true;
  }
  void BackUp(int count) override {
    cur_ -= count;
    bytes_ -= count;
  }
  int64_t ByteCount() const override { return static_cast<int64_t>(bytes_); }
  bool AllowsAliasing() const override { return true; }
  bool WriteAliasedRaw(const void* data, int size) override {
    ClosePiece();
    pieces_->emplace_back(static_cast<const uint8_t*>(data), static_cast<size_t>(size));
    bytes_ += static_cast<size_t>(size);
    return true;
  }
  // After the CodedOutputStream is gone (it backs up what it did not use when destroyed).
  void Finish() { ClosePiece(); }

 private:
  void ClosePiece() {
    if (cur_ > piece_begin_)
      pieces_->emplace_back(piece_begin_, static_cast<size_t>(cur_ - piece_begin_));
    piece_begin_ = cur_;
  }

  std::vector<FrameBuffer>* chunks_;
  std::vector<std::span<const uint8_t>>* pieces_;
  uint8_t* piece_begin_ = nullptr;
  uint8_t* cur_ = nullptr;
  size_t bytes_ = 0;
};

// The session whose OnMessage runs on this thread (on its strand), if any: PauseReading from
// inside that callback takes effect before the next frame is read (see PauseReading).
thread_local const void* t_dispatching = nullptr;

std::string Ms(std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; }

std::string EndpointString(const tcp::endpoint& ep) {
  const auto address = ep.address();
  return (address.is_v6() ? "[" + address.to_string() + "]" : address.to_string()) + ":" +
         std::to_string(ep.port());
}

proto::ByeReason ByeFor(const Status& s) {
  switch (s.code()) {
    case Status::Code::kOk:
      return proto::BYE_NORMAL;
    case Status::Code::kUnavailable:
      return proto::BYE_SHUTTING_DOWN;
    case Status::Code::kDeadlineExceeded:
      return proto::BYE_IDLE_TIMEOUT;
    case Status::Code::kInvalidArgument:
    case Status::Code::kCorruption:
    case Status::Code::kFailedPrecondition:
      return proto::BYE_PROTOCOL_ERROR;
    default:
      return proto::BYE_ERROR;
  }
}

}  // namespace

SessionImpl::SessionImpl(tcp::socket socket, std::shared_ptr<asio::ssl::context> ctx,
                         const TlsConfig& config, std::shared_ptr<SessionHandler> handler,
                         std::weak_ptr<SessionOwner> owner)
    : id_(g_next_session_id.fetch_add(1)),
      role_(Role::kServer),
      config_(config),
      ctx_(std::move(ctx)),
      socket_(std::move(socket)),
      strand_(socket_.get_executor()),
      tls_(socket_),
      read_timer_(strand_),
      write_timer_(strand_),
      heartbeat_timer_(strand_),
      close_timer_(strand_),
      handler_(std::move(handler)),
      owner_(std::move(owner)) {
  init_status_ = tls_.Init(ctx_->native_handle());
  error_code ec;
  const auto ep = socket_.remote_endpoint(ec);
  remote_address_ = ec ? "?" : EndpointString(ep);
}

SessionImpl::SessionImpl(asio::io_context& io, std::shared_ptr<asio::ssl::context> ctx,
                         const TlsConfig& config, std::shared_ptr<SessionHandler> handler)
    : id_(g_next_session_id.fetch_add(1)),
      role_(Role::kClient),
      config_(config),
      ctx_(std::move(ctx)),
      socket_(asio::make_strand(io)),
      strand_(socket_.get_executor()),
      tls_(socket_),
      read_timer_(strand_),
      write_timer_(strand_),
      heartbeat_timer_(strand_),
      close_timer_(strand_),
      handler_(std::move(handler)) {
  init_status_ = tls_.Init(ctx_->native_handle());
}

SessionImpl::~SessionImpl() = default;

std::string SessionImpl::Describe() const {
  std::string who = identity_.empty() ? remote_address_ : identity_ + "@" + remote_address_;
  if (who.empty()) who = target_;
  return "session " + std::to_string(id_) + " (" + who + ")";
}

std::string SessionImpl::tls_version() const { return tls_version_; }

SessionStats SessionImpl::stats() const {
  SessionStats s;
  s.bytes_sent = bytes_sent_.load(std::memory_order_relaxed);
  s.bytes_received = bytes_received_.load(std::memory_order_relaxed);
  s.frames_sent = frames_sent_.load(std::memory_order_relaxed);
  s.frames_received = frames_received_.load(std::memory_order_relaxed);
  s.bad_messages = bad_total_.load(std::memory_order_relaxed);
  return s;
}

template <typename F>
void SessionImpl::Guarded(const char* what, F&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    spdlog::error("net: {}: {} threw: {}", Describe(), what, e.what());
    BeginClose(Status::Internal(std::string(what) + " threw: " + e.what()), proto::BYE_ERROR);
  } catch (...) {
    spdlog::error("net: {}: {} threw a non-standard exception", Describe(), what);
    BeginClose(Status::Internal(std::string(what) + " threw"), proto::BYE_ERROR);
  }
}

// ---------------------------------------------------------------------------------------------
// Sending

Status SessionImpl::Send(proto::Envelope envelope, SendCallback on_sent) {
  if (!open_.load(std::memory_order_acquire)) {
    // Only the id: the other names may still be being written by the connecting strand.
    return Status::Unavailable("session " + std::to_string(id_) + " is not open");
  }
  return Enqueue(std::move(envelope), std::move(on_sent), /*internal=*/false);
}

Status SessionImpl::Enqueue(proto::Envelope envelope, SendCallback on_sent, bool internal) {
  envelope.set_protocol_major(kProtocolMajor);
  envelope.set_protocol_minor(kProtocolMinor);
  bool kick = false;
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    if (finished_ || (send_closed_ && !internal)) {
      return Status::Unavailable(Describe() + " is closing or closed");
    }
    envelope.set_seq(next_seq_);
    // Checking our own messages catches a NaN learning rate or a lying tensor here, where the
    // bug is, instead of as an Error from the peer.
    Status valid = ValidateEnvelope(envelope);
    if (!valid.ok()) return valid.WithContext("refusing to send " + BodyName(envelope));
    const size_t payload = envelope.ByteSizeLong();
    if (payload > config_.max_frame_bytes) {
      return Status::ResourceExhausted(
          BodyName(envelope) + " serializes to " + std::to_string(payload) +
          " bytes, above the frame limit of " + std::to_string(config_.max_frame_bytes) + " bytes");
    }
    const size_t size = kFrameHeaderBytes + payload;
    if (!queue_.empty() && queued_bytes_ + size > config_.max_send_queue_bytes) {
      return Status::ResourceExhausted(Describe() + ": send queue holds " +
                                       std::to_string(queued_bytes_) +
                                       " bytes; the peer is not keeping up");
    }
    Outgoing out;
    FrameBuffer first;
    if (!spare_frames_.empty()) {
      first = std::move(spare_frames_.back());
      spare_frames_.pop_back();
    } else {
      // Enough for everything but aliased fields in most messages; more chunks otherwise.
      first.capacity = std::min(size, kFirstChunkBytes) + FrameStream::kBlock;
      first.data.reset(new (std::nothrow) uint8_t[first.capacity]);
      if (!first.data) {
        return Status::ResourceExhausted("cannot allocate a frame buffer of " +
                                         std::to_string(first.capacity) + " bytes");
      }
    }
    WriteFrameHeader(static_cast<uint32_t>(payload),
                     std::span<uint8_t, kFrameHeaderBytes>(first.data.get(), kFrameHeaderBytes));
    out.envelope = std::move(envelope);
    bool serialized = false;
    {
      FrameStream stream(std::move(first), kFrameHeaderBytes, &out.chunks, &out.pieces);
      {
        google::protobuf::io::CodedOutputStream coded(&stream);
        coded.EnableAliasing(true);
        out.envelope.SerializeWithCachedSizes(&coded);
        serialized = !coded.HadError();
      }
      stream.Finish();
    }
    size_t written = 0;
    for (const auto& piece : out.pieces) written += piece.size();
    if (!serialized || written != size) {
      return Status::Internal("serializing " + BodyName(out.envelope) + " produced " +
                              std::to_string(written) + " of " + std::to_string(size) +
                              " frame bytes");
    }
    out.size = size;
    out.on_sent = std::move(on_sent);
    ++next_seq_;
    queued_bytes_ += size;
    queue_.push_back(std::move(out));
    kick = !writer_active_;
    writer_active_ = true;
  }
  if (kick) asio::post(strand_, [self = shared_from_this()] { self->WriteNext(); });
  return Status::Ok();
}

void SessionImpl::WriteNext() {
  if (state_ == State::kClosed) return;  // Finish() failed what was queued
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    if (queue_.empty()) {
      writer_active_ = false;
    } else {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= current_.size;
    }
  }
  if (current_.pieces.empty()) {
    if (state_ == State::kClosing) ContinueClose();
    return;
  }
  const uint64_t gen = ++write_gen_;
  write_timer_.expires_after(config_.write_timeout);
  write_timer_.async_wait([self = shared_from_this(), gen](const error_code& ec) {
    if (ec || gen != self->write_gen_) return;
    self->Fail(
        Status::DeadlineExceeded("writing a frame of " + std::to_string(self->current_.size) +
                                 " bytes took longer than " + Ms(self->config_.write_timeout)));
  });
  tls_.AsyncWrite(current_.pieces,
                  [self = shared_from_this()](const error_code& ec) { self->OnWrite(ec); });
}

void SessionImpl::OnWrite(const error_code& ec) {
  ++write_gen_;
  write_timer_.cancel();
  Outgoing done = std::move(current_);
  current_ = Outgoing{};
  if (ec) {
    const Status error = Status::Unavailable("writing to " + Describe() + ": " + DescribeError(ec));
    if (done.on_sent) Guarded("send callback", [&] { done.on_sent(error); });
    Fail(error);
    return;
  }
  bytes_sent_.fetch_add(done.size, std::memory_order_relaxed);
  frames_sent_.fetch_add(1, std::memory_order_relaxed);
  last_send_ = Clock::now();
  if (!done.chunks.empty() && done.chunks.front().capacity <= config_.buffer_keep_bytes) {
    std::lock_guard<std::mutex> lock(send_mu_);
    if (spare_frames_.size() < kSpareFrames)
      spare_frames_.push_back(std::move(done.chunks.front()));
  }
  if (done.on_sent) Guarded("send callback", [&] { done.on_sent(Status::Ok()); });
  WriteNext();
}

// ---------------------------------------------------------------------------------------------
// Reading

void SessionImpl::ArmReadTimer(std::chrono::milliseconds timeout, Status on_expiry, bool graceful) {
  const uint64_t gen = ++read_gen_;
  read_timer_.expires_after(timeout);
  read_timer_.async_wait([self = shared_from_this(), gen, on_expiry = std::move(on_expiry),
                          graceful](const error_code& ec) {
    if (ec || gen != self->read_gen_) return;
    spdlog::warn("net: {}: {}", self->Describe(), on_expiry.message());
    if (graceful) {
      self->BeginClose(on_expiry, ByeFor(on_expiry));
    } else {
      self->Fail(on_expiry);
    }
  });
}

void SessionImpl::StartRead() {
  if (reading_ || read_paused_ || (state_ != State::kOpen && state_ != State::kGreeting)) return;
  reading_ = true;
  if (state_ == State::kGreeting) {
    ArmReadTimer(config_.handshake_timeout,
                 Status::DeadlineExceeded("no greeting from the server within " +
                                          Ms(config_.handshake_timeout)),
                 /*graceful=*/false);
  } else {
    ArmReadTimer(
        config_.idle_timeout,
        Status::DeadlineExceeded("nothing heard from the peer for " + Ms(config_.idle_timeout)),
        /*graceful=*/true);
  }
  tls_.AsyncRead(header_.data(), header_.size(),
                 [self = shared_from_this()](const error_code& ec) { self->OnHeader(ec); });
}

void SessionImpl::OnHeader(const error_code& ec) {
  reading_ = false;
  ++read_gen_;
  read_timer_.cancel();
  if (ec) {
    OnReadError(ec);
    return;
  }
  if (state_ != State::kOpen && state_ != State::kGreeting) {
    ContinueClose();
    return;
  }
  proto::ErrorCode code = proto::ERROR_MALFORMED_FRAME;
  Result<FrameHeader> header = ParseFrameHeader(header_, config_.max_frame_bytes, &code);
  if (!header.ok()) {
    // The stream cannot be re-synchronised after a bad header: answer and close.
    ProtocolError(header.status(), code, 0, /*fatal=*/true);
    return;
  }
  body_size_ = header->payload_bytes;
  if (body_capacity_ < body_size_) {
    body_.reset(new (std::nothrow) uint8_t[body_size_]);
    body_capacity_ = body_ ? body_size_ : 0;
    if (!body_) {
      ProtocolError(Status::ResourceExhausted("cannot allocate " + std::to_string(body_size_) +
                                              " bytes for a frame"),
                    proto::ERROR_RESOURCE_EXHAUSTED, 0, /*fatal=*/true);
      return;
    }
  }
  reading_ = true;
  ArmReadTimer(config_.read_timeout,
               Status::DeadlineExceeded("a frame of " + std::to_string(body_size_) +
                                        " bytes did not arrive within " + Ms(config_.read_timeout)),
               /*graceful=*/true);
  tls_.AsyncRead(body_.get(), body_size_,
                 [self = shared_from_this()](const error_code& ec) { self->OnBody(ec); });
}

void SessionImpl::OnBody(const error_code& ec) {
  reading_ = false;
  ++read_gen_;
  read_timer_.cancel();
  if (ec) {
    OnReadError(ec);
    return;
  }
  bytes_received_.fetch_add(kFrameHeaderBytes + body_size_, std::memory_order_relaxed);
  frames_received_.fetch_add(1, std::memory_order_relaxed);
  if (state_ != State::kOpen && state_ != State::kGreeting) {
    ContinueClose();
    return;
  }
  proto::Envelope envelope;
  bool parsed = false;
  try {
    parsed = envelope.ParseFromArray(body_.get(), static_cast<int>(body_size_));
  } catch (const std::exception&) {
    parsed = false;
  }
  if (body_capacity_ > config_.buffer_keep_bytes) {
    body_.reset();
    body_capacity_ = 0;
  }
  if (!parsed) {
    ProtocolError(Status::Corruption("frame payload of " + std::to_string(body_size_) +
                                     " bytes is not a valid Envelope"),
                  proto::ERROR_MALFORMED_FRAME, 0, /*fatal=*/false);
    StartRead();
    return;
  }
  proto::ErrorCode code = proto::ERROR_INVALID_MESSAGE;
  if (Status valid = ValidateEnvelope(envelope, &code); !valid.ok()) {
    // Another major version cannot be talked to at all; other invalid messages are dropped.
    ProtocolError(valid.WithContext(BodyName(envelope)), code, envelope.seq(),
                  /*fatal=*/code == proto::ERROR_UNSUPPORTED_VERSION);
    StartRead();
    return;
  }
  if (envelope.seq() <= last_received_seq_) {
    ProtocolError(
        Status::InvalidArgument("seq " + std::to_string(envelope.seq()) + " does not follow seq " +
                                std::to_string(last_received_seq_)),
        proto::ERROR_INVALID_MESSAGE, envelope.seq(), /*fatal=*/false);
    StartRead();
    return;
  }
  last_received_seq_ = envelope.seq();
  Dispatch(std::move(envelope));
  StartRead();
}

void SessionImpl::OnReadError(const error_code& ec) {
  if (state_ == State::kClosed) return;
  if (state_ == State::kClosing) {
    // The peer's close_notify (eof) or a broken connection: nothing more will come.
    peer_closed_ = true;
    if (ec != asio::error::eof) {
      Finish();
      return;
    }
    ContinueClose();
    return;
  }
  if (ec == asio::error::eof && state_ == State::kOpen) {
    // The peer sent close_notify: answer with ours (nothing more to say, so no Bye).
    peer_closed_ = true;
    BeginClose(bye_status_.value_or(Status::Unavailable("connection closed by the peer")),
               std::nullopt);
    return;
  }
  if (state_ == State::kGreeting && ec.category() == asio::error::get_ssl_category()) {
    // TLS 1.3 completes the client's side of the handshake before the server has checked
    // the client certificate; a refusal arrives here as an alert instead of the greeting.
    Fail(Status::PermissionDenied("server at " + target_ +
                                  " refused the TLS session: " + DescribeError(ec)));
    return;
  }
  Fail(Status::Unavailable("reading from " + Describe() + ": " + DescribeError(ec)));
}

void SessionImpl::Dispatch(proto::Envelope envelope) {
  if (state_ == State::kGreeting) {
    if (envelope.has_reject()) {
      const auto& r = envelope.reject();
      // Not opened: a graceful close without Bye; Finish reports this to the connector.
      state_ = State::kOpen;
      BeginClose(Status::PermissionDenied("server at " + target_ +
                                          " rejected us: " + proto::RejectReason_Name(r.reason()) +
                                          ": " + r.message()),
                 std::nullopt);
      return;
    }
    // The greeting is a Heartbeat; any other first message also means we were admitted.
    Open();
    if (state_ != State::kOpen) return;
  }
  switch (envelope.body_case()) {
    case proto::Envelope::kHeartbeat:
      return;  // its arrival already restarted the idle timeout
    case proto::Envelope::kBye: {
      const auto& bye = envelope.bye();
      bye_status_ =
          bye.reason() == proto::BYE_NORMAL
              ? Status::Ok()
              : Status::Unavailable("peer said bye: " + proto::ByeReason_Name(bye.reason()) + ": " +
                                    bye.message());
      break;
    }
    default:
      break;
  }
  const void* outer = t_dispatching;
  t_dispatching = this;
  Guarded("OnMessage", [&] { handler_->OnMessage(shared_from_this(), std::move(envelope)); });
  t_dispatching = outer;
}

void SessionImpl::ProtocolError(const Status& status, proto::ErrorCode code, uint64_t in_reply_to,
                                bool fatal) {
  bad_total_.fetch_add(1, std::memory_order_relaxed);
  spdlog::warn("net: {}: bad message: {}", Describe(), status.ToString());
  if (state_ == State::kGreeting) {
    Fail(status.WithContext("greeting from " + target_));
    return;
  }
  // Best effort: the error reply may itself fail if the peer is gone.
  Status sent = Enqueue(MakeError(code, status.message(), in_reply_to), nullptr, true);
  (void)sent;
  ++bad_messages_;
  if (fatal) {
    BeginClose(status, proto::BYE_PROTOCOL_ERROR);
  } else if (bad_messages_ > config_.max_bad_messages) {
    BeginClose(Status::InvalidArgument(std::to_string(bad_messages_) +
                                       " invalid messages; last: " + status.message()),
               proto::BYE_PROTOCOL_ERROR);
  }
}

void SessionImpl::PauseReading() {
  if (t_dispatching == this) {
    // On our strand, inside OnMessage: OnBody's StartRead right after it must already see the
    // pause, or one more frame would be read and delivered (a consumer bounding its queue by
    // pausing at the limit would then exceed it by one).
    read_paused_ = true;
    return;
  }
  asio::post(strand_, [self = shared_from_this()] { self->read_paused_ = true; });
}

void SessionImpl::ResumeReading() {
  asio::post(strand_, [self = shared_from_this()] {
    self->read_paused_ = false;
    self->StartRead();
  });
}

// ---------------------------------------------------------------------------------------------
// Opening

namespace {
int SessionExIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}
}  // namespace

int SessionImpl::VerifyTrampoline(int preverified, X509_STORE_CTX* store) {
  SSL* ssl =
      static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = ssl ? static_cast<SessionImpl*>(SSL_get_ex_data(ssl, SessionExIndex())) : nullptr;
  // Runs inside the handshake, on the strand; remembers why verification failed so that the
  // log says "unable to get local issuer certificate", not just "handshake failed".
  if (self != nullptr && !preverified && self->verify_error_.empty()) {
    const int err = X509_STORE_CTX_get_error(store);
    std::string subject = "?";
    if (X509* cert = X509_STORE_CTX_get_current_cert(store)) {
      char buf[256];
      X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof(buf));
      subject = buf;
    }
    self->verify_error_ = std::string(X509_verify_cert_error_string(err)) + " (certificate " +
                          subject + ", depth " +
                          std::to_string(X509_STORE_CTX_get_error_depth(store)) + ")";
  }
  return preverified;
}

void SessionImpl::SetVerifyCallback() {
  SSL* ssl = tls_.ssl();
  SSL_set_ex_data(ssl, SessionExIndex(), this);
  SSL_set_verify(ssl, SSL_get_verify_mode(ssl), &SessionImpl::VerifyTrampoline);
}

void SessionImpl::StartServer() {
  asio::post(strand_, [self = shared_from_this()] {
    if (self->state_ != State::kIdle) return;
    self->state_ = State::kHandshaking;
    if (!self->init_status_.ok()) {
      self->Fail(self->init_status_);
      return;
    }
    self->tls_.set_owner(self->weak_from_this());
    error_code ignored;
    self->socket_.set_option(tcp::no_delay(true), ignored);
    self->SetVerifyCallback();
    self->ArmReadTimer(self->config_.handshake_timeout,
                       Status::DeadlineExceeded("TLS handshake not completed within " +
                                                Ms(self->config_.handshake_timeout)),
                       /*graceful=*/false);
    self->tls_.AsyncHandshake(/*server=*/true,
                              [self](const error_code& ec) { self->OnHandshake(ec); });
  });
}

void SessionImpl::StartClient(const std::string& host, uint16_t port, const ConnectOptions& options,
                              ConnectCallback done) {
  target_ = host + ":" + std::to_string(port);
  connect_options_ = options;
  connect_done_ = std::move(done);
  asio::post(strand_, [self = shared_from_this(), host, port] {
    if (self->state_ != State::kIdle) return;
    self->state_ = State::kConnecting;
    if (!self->init_status_.ok()) {
      self->Fail(self->init_status_);
      return;
    }
    self->tls_.set_owner(self->weak_from_this());
    const std::string& name =
        self->connect_options_.server_name.empty() ? host : self->connect_options_.server_name;
    SSL* ssl = self->tls_.ssl();
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    error_code not_ip;
    asio::ip::make_address(name, not_ip);
    // The name is checked by OpenSSL during chain verification (SAN, CN only without SAN).
    const bool name_ok = not_ip ? SSL_set1_host(ssl, name.c_str()) == 1 &&
                                      SSL_set_tlsext_host_name(ssl, name.c_str()) == 1
                                : X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) == 1;
    if (!name_ok) {
      self->Fail(Status::InvalidArgument("cannot use '" + name + "' as the server name"));
      return;
    }
    self->SetVerifyCallback();
    self->ArmReadTimer(
        self->config_.connect_timeout,
        Status::DeadlineExceeded("connecting to " + self->target_ + " took longer than " +
                                 Ms(self->config_.connect_timeout)),
        /*graceful=*/false);
    self->resolver_.emplace(self->strand_);
    self->resolver_->async_resolve(
        host, std::to_string(port),
        [self](const error_code& ec, const tcp::resolver::results_type& results) {
          if (self->state_ != State::kConnecting) return;
          if (ec) {
            self->Fail(Status::Unavailable("resolving " + self->target_ + ": " + ec.message()));
            return;
          }
          asio::async_connect(
              self->socket_, results, [self](const error_code& ec, const tcp::endpoint& endpoint) {
                if (self->state_ != State::kConnecting) return;
                if (ec) {
                  self->Fail(
                      Status::Unavailable("connecting to " + self->target_ + ": " + ec.message()));
                  return;
                }
                self->remote_address_ = EndpointString(endpoint);
                error_code ignored;
                self->socket_.set_option(tcp::no_delay(true), ignored);
                self->state_ = State::kHandshaking;
                self->ArmReadTimer(self->config_.handshake_timeout,
                                   Status::DeadlineExceeded("TLS handshake with " + self->target_ +
                                                            " not completed within " +
                                                            Ms(self->config_.handshake_timeout)),
                                   /*graceful=*/false);
                self->tls_.AsyncHandshake(
                    /*server=*/false, [self](const error_code& ec) { self->OnHandshake(ec); });
              });
        });
  });
}

void SessionImpl::OnHandshake(const error_code& ec) {
  ++read_gen_;
  read_timer_.cancel();
  if (state_ != State::kHandshaking) return;  // timed out or closed meanwhile
  if (ec) {
    std::string why = DescribeError(ec);
    if (!verify_error_.empty()) why += ": " + verify_error_;
    const std::string what = role_ == Role::kServer ? "TLS handshake with " + remote_address_
                                                    : "TLS handshake with " + target_;
    // A certificate problem is a refusal; anything else (plaintext peer, reset) unavailability.
    Fail(!verify_error_.empty() ? Status::PermissionDenied(what + " refused: " + why)
                                : Status::Unavailable(what + " failed: " + why));
    return;
  }
  handshake_ok_ = true;
  SSL* ssl = tls_.ssl();
  tls_version_ = SSL_get_version(ssl);
  identity_ = IdentityOf(SSL_get0_peer_certificate(ssl));
  if (identity_.empty()) {
    Fail(Status::PermissionDenied("peer certificate of " + remote_address_ +
                                  " has no usable CN or DNS subjectAltName"));
    return;
  }
  if (role_ == Role::kClient) {
    if (!connect_options_.expected_identity.empty() &&
        identity_ != connect_options_.expected_identity) {
      Fail(Status::PermissionDenied("server at " + target_ + " is '" + identity_ + "', expected '" +
                                    connect_options_.expected_identity + "'"));
      return;
    }
    state_ = State::kGreeting;
    StartRead();
    return;
  }
  proto::RejectReason reason = proto::REJECT_UNSPECIFIED;
  Status admitted = Status::Unavailable("server is gone");
  if (auto owner = owner_.lock()) admitted = owner->Register(shared_from_this(), &reason);
  state_ = State::kOpen;
  if (!admitted.ok()) {
    spdlog::warn("net: {}: rejected: {}", Describe(), admitted.ToString());
    Status sent = Enqueue(MakeReject(reason, admitted.message()), nullptr, true);
    (void)sent;
    BeginClose(admitted, std::nullopt);
    return;
  }
  // The greeting tells the client it was admitted before it sends anything.
  Status sent = Enqueue(MakeHeartbeat(), nullptr, true);
  (void)sent;
  Open();
}

void SessionImpl::Open() {
  opened_ = true;
  open_.store(true, std::memory_order_release);
  state_ = State::kOpen;
  last_send_ = Clock::now();
  spdlog::debug("net: {} open ({})", Describe(), tls_version_);
  if (auto owner = owner_.lock()) owner->Opened(*this);
  Guarded("OnOpen", [&] { handler_->OnOpen(shared_from_this()); });
  if (connect_done_) {
    ConnectCallback done = std::move(connect_done_);
    connect_done_ = nullptr;
    SessionPtr self = shared_from_this();
    done(self);
  }
  if (state_ != State::kOpen) return;
  StartRead();
  ArmHeartbeat(config_.heartbeat_interval);
}

// ---------------------------------------------------------------------------------------------
// Heartbeats

void SessionImpl::ArmHeartbeat(Clock::duration delay) {
  const uint64_t gen = ++heartbeat_gen_;
  heartbeat_timer_.expires_after(delay);
  heartbeat_timer_.async_wait([self = shared_from_this(), gen](const error_code& ec) {
    if (ec || gen != self->heartbeat_gen_) return;
    self->OnHeartbeatTimer();
  });
}

void SessionImpl::OnHeartbeatTimer() {
  if (state_ != State::kOpen) return;
  const Clock::duration interval = config_.heartbeat_interval;
  const Clock::duration quiet = Clock::now() - last_send_;
  if (quiet < interval) {
    ArmHeartbeat(interval - quiet);
    return;
  }
  bool busy;
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    busy = writer_active_;
  }
  // A frame being written is as good a sign of life as a heartbeat.
  if (!busy) {
    Status sent = Enqueue(MakeHeartbeat(), nullptr, true);
    (void)sent;
  }
  ArmHeartbeat(interval);
}

// ---------------------------------------------------------------------------------------------
// Closing

void SessionImpl::Close(const Status& reason) { CloseWith(reason, ByeFor(reason)); }

void SessionImpl::CloseWith(const Status& reason, std::optional<proto::ByeReason> bye) {
  // Refuse further Sends right away so that "Send after Close" fails deterministically.
  open_.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    send_closed_ = true;
  }
  asio::post(strand_, [self = shared_from_this(), reason, bye] { self->BeginClose(reason, bye); });
}

void SessionImpl::BeginClose(const Status& reason, std::optional<proto::ByeReason> bye) {
  switch (state_) {
    case State::kClosing:
    case State::kClosed:
      return;
    case State::kIdle:
    case State::kConnecting:
    case State::kHandshaking:
    case State::kGreeting:
      // Nothing to flush and nobody to say goodbye to: abort.
      close_reason_ = reason;
      Finish();
      return;
    case State::kOpen:
      break;
  }
  state_ = State::kClosing;
  close_reason_ = reason;
  open_.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    send_closed_ = true;
  }
  ++heartbeat_gen_;
  heartbeat_timer_.cancel();
  if (bye) {
    Status sent = Enqueue(MakeBye(*bye, reason.ok() ? "" : reason.ToString()), nullptr, true);
    (void)sent;
  }
  if (reason.ok()) {
    spdlog::debug("net: {} closing", Describe());
  } else {
    spdlog::info("net: {} closing: {}", Describe(), reason.ToString());
  }
  close_timer_.expires_after(config_.write_timeout + config_.shutdown_timeout);
  close_timer_.async_wait([self = shared_from_this()](const error_code& ec) {
    if (ec || self->state_ == State::kClosed) return;
    spdlog::info("net: {}: flushing before the close timed out; closing the socket",
                 self->Describe());
    self->Finish();
  });
  ContinueClose();
}

void SessionImpl::ContinueClose() {
  if (state_ != State::kClosing) return;
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    if (writer_active_) return;  // WriteNext calls back here once the queue is drained
  }
  if (!close_notify_started_) {
    close_notify_started_ = true;
    // Waiting for the peer's close_notify (not just sending ours) drains what it still sends:
    // closing a socket with unread data makes the kernel send a RST, which can destroy our
    // last frames (the Error or Bye) before the peer reads them. A peer that never answers
    // costs shutdown_timeout.
    close_timer_.expires_after(config_.shutdown_timeout);
    close_timer_.async_wait([self = shared_from_this()](const error_code& ec) {
      if (ec || self->state_ == State::kClosed) return;
      spdlog::debug("net: {}: no close_notify from the peer; closing the socket", self->Describe());
      self->Finish();
    });
    tls_.AsyncCloseNotify([self = shared_from_this()](const error_code& ec) {
      if (self->state_ == State::kClosed) return;
      if (ec) {
        self->Finish();  // cannot even say goodbye: the connection is gone
        return;
      }
      self->close_notify_done_ = true;
      self->MaybeFinishClose();
    });
  }
  // A frame read still pending sees the peer's close_notify itself; otherwise drain.
  if (!reading_ && !draining_ && !peer_closed_) {
    draining_ = true;
    tls_.AsyncDrain([self = shared_from_this()](const error_code& ec) {
      if (self->state_ == State::kClosed) return;
      if (ec) {
        self->Finish();
        return;
      }
      self->peer_closed_ = true;
      self->MaybeFinishClose();
    });
  }
  MaybeFinishClose();
}

void SessionImpl::MaybeFinishClose() {
  if (state_ == State::kClosing && close_notify_done_ && peer_closed_) Finish();
}

void SessionImpl::Fail(const Status& reason) {
  if (state_ == State::kClosed) return;
  // A failure during a graceful close keeps the reason the close started with.
  if (state_ != State::kClosing) close_reason_ = reason;
  Finish();
}

void SessionImpl::Finish() {
  if (state_ == State::kClosed) return;
  state_ = State::kClosed;
  open_.store(false, std::memory_order_release);
  ++read_gen_;
  ++write_gen_;
  ++heartbeat_gen_;
  read_timer_.cancel();
  write_timer_.cancel();
  heartbeat_timer_.cancel();
  close_timer_.cancel();
  if (resolver_) resolver_->cancel();
  error_code ignored;
  socket_.close(ignored);

  std::deque<Outgoing> dropped;
  {
    std::lock_guard<std::mutex> lock(send_mu_);
    finished_ = true;
    send_closed_ = true;
    dropped.swap(queue_);
    queued_bytes_ = 0;
  }
  const Status not_sent = Status::Unavailable(Describe() + " closed before the frame was sent");
  for (Outgoing& o : dropped) {
    if (o.on_sent) Guarded("send callback", [&] { o.on_sent(not_sent); });
  }
  if (auto owner = owner_.lock()) owner->Finished(*this, handshake_ok_, opened_);

  auto handler = std::move(handler_);  // breaks handler -> session -> handler cycles
  if (opened_) {
    if (close_reason_.ok()) {
      spdlog::debug("net: {} closed", Describe());
    } else {
      spdlog::info("net: {} closed: {}", Describe(), close_reason_.ToString());
    }
    try {
      handler->OnClosed(shared_from_this(), close_reason_);
    } catch (const std::exception& e) {
      spdlog::error("net: {}: OnClosed threw: {}", Describe(), e.what());
    } catch (...) {
      spdlog::error("net: {}: OnClosed threw", Describe());
    }
  } else if (role_ == Role::kServer) {
    spdlog::warn("net: connection from {} refused: {}", remote_address_, close_reason_.ToString());
    try {
      handler->OnRejected(remote_address_, close_reason_);
    } catch (...) {
      spdlog::error("net: OnRejected threw");
    }
  }
  if (connect_done_) {
    ConnectCallback done = std::move(connect_done_);
    connect_done_ = nullptr;
    done(close_reason_.ok()
             ? Status::Aborted("connection to " + target_ + " closed before it opened")
             : close_reason_);
  }
}

}  // namespace fedslice::net::internal
