// One authenticated mutual-TLS connection carrying framed Envelopes, and the callbacks through
// which the layers above (coordinator, client, pipeline stages) see it.
//
// Life of a session (server and client side alike):
//
//   TCP connect -> TLS handshake (both certificates verified against the CA) -> identity
//   -> server: registration (one session per identity) -> greeting: the server sends one
//      Heartbeat (accepted) or a Reject (then closes), so a client knows where it stands
//      before it sends anything
//   -> open: OnOpen, then OnMessage for every valid non-Heartbeat message
//   -> close (either side, a timeout, or a protocol error): queued frames flushed, Bye sent
//      (when we close), TLS close_notify exchanged, socket closed -> OnClosed(reason).
//
// What the transport does by itself:
//   - validates every frame and envelope (wire.h); a malformed but framed message is answered
//     with an Error (in_reply_to_seq set when known) and dropped; after
//     TlsConfig::max_bad_messages of them, or on a framing error, the session is closed;
//   - rejects a seq that does not grow;
//   - sends a Heartbeat when nothing was sent for heartbeat_interval and drops a peer silent
//     for idle_timeout; Heartbeats are consumed here, never passed to OnMessage;
//   - puts a deadline on every handshake, read, write and on the close.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::net {

struct SessionStats {
  uint64_t bytes_sent = 0;  // frame bytes (header + payload), TLS overhead excluded
  uint64_t bytes_received = 0;
  uint64_t frames_sent = 0;
  uint64_t frames_received = 0;
  uint64_t bad_messages = 0;  // received frames answered with an Error
};

// A connection. Obtained from SessionHandler::OnOpen (server side) or AsyncConnect (client
// side); shared ownership keeps the object valid, not the connection. All methods are
// thread-safe and never block.
class Session {
 public:
  // Called once per Send that returned OK: OK when the frame was handed to TLS, else why it
  // was dropped (session closed, write failed or timed out). Runs on the session's strand.
  using SendCallback = std::function<void(const Status&)>;

  virtual ~Session() = default;

  // Process-unique id, for logs and maps.
  virtual uint64_t id() const = 0;
  // The authenticated peer's identity (certificate CN, else first DNS SAN). Set before OnOpen,
  // constant afterwards.
  virtual const std::string& peer_identity() const = 0;
  // "ip:port" of the peer.
  virtual const std::string& remote_address() const = 0;
  // Negotiated protocol, e.g. "TLSv1.3" (empty before the handshake).
  virtual std::string tls_version() const = 0;

  // Queues `envelope` for sending. The transport sets protocol_major/minor and seq, checks the
  // envelope (ValidateEnvelope) and serializes it right away, except its bytes fields of more
  // than a few KB (activations, weights): those are encrypted from the envelope itself when
  // the frame is written, which the session keeps until then. Moving a large message in
  // therefore copies its payload nowhere before TLS.
  // Errors: kUnavailable (closing or closed), kInvalidArgument (invalid envelope),
  // kResourceExhausted (larger than max_frame_bytes, or the send queue is full).
  virtual Status Send(proto::Envelope envelope, SendCallback on_sent = nullptr) = 0;

  // Starts a graceful close: stop accepting Sends, flush what is queued, send Bye (reason:
  // OK -> BYE_NORMAL, kUnavailable -> BYE_SHUTTING_DOWN, kDeadlineExceeded -> BYE_IDLE_TIMEOUT,
  // kInvalidArgument/kCorruption/kFailedPrecondition -> BYE_PROTOCOL_ERROR, else BYE_ERROR),
  // exchange close_notify, close the socket. Bounded by write_timeout + shutdown_timeout.
  // OnClosed then receives `reason`. Idempotent: later calls do nothing.
  virtual void Close(const Status& reason = Status::Ok()) = 0;

  // Flow control: stop / resume reading from the peer (TCP then pushes back on its sends).
  // While paused the idle timeout does not run. Used by consumers that queue messages.
  // Called from this session's OnMessage, the pause takes effect before the next frame is
  // read, so a consumer that pauses when its queue reaches a bound never exceeds it.
  virtual void PauseReading() = 0;
  virtual void ResumeReading() = 0;

  // True between OnOpen and the start of the close.
  virtual bool is_open() const = 0;
  virtual SessionStats stats() const = 0;
};

using SessionPtr = std::shared_ptr<Session>;

// Receives a session's events. All calls for one session are serialized on that session's
// strand (never two at once for one session; different sessions may call concurrently when
// several threads run the io_context). Callbacks must not block for long: the session does
// not read while its callback runs. An exception escaping a callback is logged and closes the
// session with kInternal.
class SessionHandler {
 public:
  virtual ~SessionHandler() = default;
  // Once per session, after authentication and (server side) registration.
  virtual void OnOpen(const SessionPtr& session) = 0;
  // Each valid message other than Heartbeat, in order. Bye and Error are delivered too.
  virtual void OnMessage(const SessionPtr& session, proto::Envelope envelope) = 0;
  // Exactly once for every session that got OnOpen, after its socket is closed. `reason` is
  // OK for a normal close by either side, else why it ended (timeout, peer gone, protocol
  // error...).
  virtual void OnClosed(const SessionPtr& session, const Status& reason) = 0;
  // Server side: a connection that never became a session (TLS refused, handshake timeout,
  // registration refused). For logs and metrics; default does nothing.
  virtual void OnRejected(const std::string& remote_address, const Status& reason) {
    (void)remote_address;
    (void)reason;
  }
};

}  // namespace fedslice::net
