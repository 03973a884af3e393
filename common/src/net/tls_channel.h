// TLS over an Asio TCP socket, driven directly through OpenSSL with our own buffers.
//
// Why not asio::ssl::stream: it moves data through a 17 KB BIO pair, so every 16 KB record
// costs two extra copies and a full asynchronous operation on each side. A 1.6 MB
// activation batch became ~100 operations and four extra passes over the data per hop, which
// alone exceeded the per-hop budget of split inference. Here:
//   - sending: OpenSSL encrypts a chunk (up to kWriteChunk, read from the caller's pieces
//     where they are) into out_ through a custom BIO, and one async_write hands it to the
//     kernel; the next chunk is encrypted while the receiver already decrypts the previous
//     one;
//   - receiving: OpenSSL's own read buffer (kSslReadBuffer, with read-ahead) is filled by a
//     non-blocking recv straight from the socket inside the BIO, so one system call brings
//     many records and the ciphertext is not copied on its way in; when the socket is empty
//     the channel waits for it asynchronously (a one-byte MSG_PEEK receive, which unlike
//     async_wait cannot miss a readiness edge that came before it was armed).
//
// Contract: every method runs on the socket's strand. At most one read-side operation
// (handshake, AsyncRead, AsyncDrain) and one write-side operation (AsyncWrite,
// AsyncCloseNotify) are outstanding at a time; they may overlap with each other. Handlers are
// never called from inside the initiating call (always via the executor), so callers may
// loop without recursion. OpenSSL errors are reported as boost::system::error_code in
// asio's ssl category (message = OpenSSL's reason string); a clean close_notify as
// asio::error::eof, a connection cut without one as asio::ssl::error::stream_truncated.
#pragma once

#include <openssl/ssl.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "fedslice/common/status.h"

namespace fedslice::net::internal {

class TlsChannel {
 public:
  using Handler = std::function<void(const boost::system::error_code&)>;

  // Plaintext bytes encrypted per async_write; big enough to amortise the system call, small
  // enough that the receiver starts decrypting early.
  static constexpr size_t kWriteChunk = size_t{128} << 10;
  // Ciphertext read from the socket per system call, at most: OpenSSL's read buffer.
  static constexpr size_t kSslReadBuffer = size_t{128} << 10;

  // `socket` is owned by the caller and must outlive this object.
  explicit TlsChannel(boost::asio::ip::tcp::socket& socket);
  ~TlsChannel();
  TlsChannel(const TlsChannel&) = delete;
  TlsChannel& operator=(const TlsChannel&) = delete;

  // Creates the SSL object from `ctx`. Must succeed before any other call.
  Status Init(SSL_CTX* ctx);
  SSL* ssl() const { return ssl_; }
  // Internal continuations hold a strong reference to `owner` so that the object owning this
  // channel outlives every operation in flight.
  void set_owner(std::weak_ptr<void> owner) { owner_ = std::move(owner); }

  void AsyncHandshake(bool server, Handler done);
  // Reads exactly n plaintext bytes into data.
  void AsyncRead(uint8_t* data, size_t n, Handler done);
  // Encrypts the pieces, in order, as one stream of bytes and hands them to the kernel. The
  // bytes they point to must stay valid until `done`. Pieces let a frame be written from
  // where its parts already are (a small serialized head, a megabyte payload in a message)
  // instead of being gathered into one buffer first.
  void AsyncWrite(std::vector<std::span<const uint8_t>> pieces, Handler done);
  // Sends our close_notify (flushed when `done` runs).
  void AsyncCloseNotify(Handler done);
  // Reads and discards until the peer's close_notify (done(OK)) or an error.
  void AsyncDrain(Handler done);

 private:
  struct BioAccess;  // the custom BIO's callbacks

  void HandshakeStep(Handler done);
  void ReadStep(uint8_t* data, size_t n, Handler done);
  void WriteStep(Handler done);
  void DrainStep(Handler done);
  // Waits until the socket has ciphertext (or its end) for the BIO to read, then calls `next`
  // (with the socket's error, if any; end of stream is left for OpenSSL to see).
  void FillInput(Handler next);
  // Calls `done` once everything OpenSSL produced so far is handed to the kernel.
  void Flush(Handler done);
  void StartFlush();
  // Error for a failed SSL call (reads the thread's OpenSSL error queue: call right away).
  boost::system::error_code SslError(int ret);
  void Post(Handler done, boost::system::error_code ec);
  std::shared_ptr<void> Keep() const { return owner_.lock(); }

  boost::asio::ip::tcp::socket& socket_;
  SSL* ssl_ = nullptr;
  std::weak_ptr<void> owner_;

  // Input side of the BIO: the socket reached its end, or failed (reported instead of
  // OpenSSL's generic "syscall" error).
  bool in_eof_ = false;
  boost::system::error_code read_error_;
  uint8_t peek_byte_ = 0;  // target of the readiness probe; never consumed

  // Plaintext of the write in progress: write_pieces_[write_index_] from write_offset_ on.
  std::vector<std::span<const uint8_t>> write_pieces_;
  size_t write_index_ = 0;
  size_t write_offset_ = 0;

  // Ciphertext produced by OpenSSL (out_) and the batch being written (sending_).
  std::vector<uint8_t> out_;
  std::vector<uint8_t> sending_;
  bool flushing_ = false;
  std::vector<Handler> flush_waiters_;  // satisfied when the next batch is written
  boost::system::error_code write_error_;
};

}  // namespace fedslice::net::internal
