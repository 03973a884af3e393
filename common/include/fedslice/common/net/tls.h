// Mutual-TLS settings shared by every FedSlice endpoint (coordinator, clients, pipeline stages,
// inference requesters), and certificate identities.
//
// Security model: every peer presents a certificate signed by the run's CA (ca_file) and
// verifies the other side's chain against that CA only (system trust stores are never used).
// TLS 1.3 is the only protocol version unless allow_tls12 is set explicitly. A peer's identity
// is its certificate's subject CN, or its first DNS subjectAltName when it has no CN.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

#include "fedslice/common/net/wire.h"
#include "fedslice/common/status.h"

namespace fedslice::net {

struct TlsConfig {
  // PEM files: the CA that signs every peer of the run, our certificate (optionally followed by
  // intermediates) and its private key (unencrypted).
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  // TLS 1.3 only by default; 1.2 (ECDHE + AEAD suites only) only when explicitly allowed.
  bool allow_tls12 = false;

  // Every network operation has a deadline (ms):
  std::chrono::milliseconds connect_timeout{10'000};    // name resolution + TCP connect
  std::chrono::milliseconds handshake_timeout{10'000};  // TLS handshake + server greeting
  std::chrono::milliseconds read_timeout{60'000};       // one frame, once its header arrived
  std::chrono::milliseconds write_timeout{60'000};      // one frame
  // A peer from which nothing (not even a heartbeat) arrives for this long is dropped.
  std::chrono::milliseconds idle_timeout{30'000};
  // When nothing was sent for this long, a Heartbeat is sent. Must be below idle_timeout (the
  // peer's!) with room for a round trip; both ends normally share one config.
  std::chrono::milliseconds heartbeat_interval{10'000};
  // Graceful close: flushing queued frames plus the TLS close_notify exchange.
  std::chrono::milliseconds shutdown_timeout{2'000};

  // Largest frame payload accepted or sent (see wire.h).
  size_t max_frame_bytes = kDefaultMaxFrameBytes;
  // Frames still queued for sending beyond which Send() refuses more (backpressure).
  size_t max_send_queue_bytes = size_t{256} << 20;
  // Frame buffers up to this size are kept by a session between frames (one for reading,
  // two for writing) so that steady traffic such as pipeline activations neither allocates
  // nor page-faults per frame; larger ones (whole models) are freed after use, so that many
  // idle sessions do not pin model-sized buffers.
  size_t buffer_keep_bytes = size_t{4} << 20;
  // Well-framed but invalid messages tolerated per session (each answered with an Error);
  // one more closes the session. Framing errors (bad magic, oversized length) close at once.
  int max_bad_messages = 4;

  // Checks paths are set, timeouts positive, heartbeat_interval < idle_timeout, frame limit
  // in [1 KiB, kMaxFrameBytesCeiling]. Does not open files (that happens when a context is
  // built, with errors naming the file).
  Status Validate() const;
};

// Identity (CN, else first DNS SAN) of the certificate in a PEM file. A client uses it to fill
// Hello.client_id; tests use it to know what a server will see.
// Errors: kNotFound / kInvalidArgument naming the file; kInvalidArgument if the certificate has
// neither a CN nor a DNS SAN, or the name holds control characters or exceeds 256 bytes.
Result<std::string> CertificateIdentity(const std::string& pem_file);

}  // namespace fedslice::net
