#include "net/tls_channel.h"

#include <openssl/bio.h>
#include <openssl/err.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/write.hpp>
#include <exception>
#include <utility>

namespace fedslice::net::internal {

namespace asio = boost::asio;
using boost::system::error_code;

// The custom BIO: writes append to out_, reads are non-blocking receives from the socket into
// OpenSSL's buffer. It never blocks; waiting is done by the channel, asynchronously.
struct TlsChannel::BioAccess {
  static TlsChannel* Self(BIO* b) { return static_cast<TlsChannel*>(BIO_get_data(b)); }

  static int Write(BIO* b, const char* data, size_t len, size_t* written) {
    BIO_clear_retry_flags(b);
    TlsChannel* self = Self(b);
    try {
      self->out_.insert(self->out_.end(), reinterpret_cast<const uint8_t*>(data),
                        reinterpret_cast<const uint8_t*>(data) + len);
    } catch (const std::exception&) {
      *written = 0;
      return 0;
    }
    *written = len;
    return 1;
  }

  static int Read(BIO* b, char* data, size_t len, size_t* read) {
    BIO_clear_retry_flags(b);
    TlsChannel* self = Self(b);
    *read = 0;
    if (self->in_eof_ || self->read_error_) return 0;  // no retry: OpenSSL sees the end
    error_code ec;
    if (!self->socket_.non_blocking()) self->socket_.non_blocking(true, ec);
    size_t n = 0;
    if (!ec) n = self->socket_.read_some(asio::buffer(data, len), ec);
    if (!ec) {
      *read = n;
      return 1;
    }
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      BIO_set_retry_read(b);
    } else if (ec == asio::error::eof) {
      self->in_eof_ = true;  // OpenSSL decides if that was clean
    } else {
      self->read_error_ = ec;
    }
    return 0;
  }

  static long Ctrl(BIO* b, int cmd, long, void*) {
    switch (cmd) {
      case BIO_CTRL_FLUSH:
        return 1;
      case BIO_CTRL_PENDING:   // nothing buffered here: OpenSSL holds what was read
      case BIO_CTRL_WPENDING:  // and out_ is the channel's, flushed by it
        return 0;
      case BIO_CTRL_EOF: {
        TlsChannel* self = Self(b);
        return self->in_eof_ ? 1 : 0;
      }
      default:
        return 0;
    }
  }

  static BIO_METHOD* Method() {
    static BIO_METHOD* method = [] {
      BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "fedslice-tls");
      if (m != nullptr) {
        BIO_meth_set_write_ex(m, &Write);
        BIO_meth_set_read_ex(m, &Read);
        BIO_meth_set_ctrl(m, &Ctrl);
      }
      return m;
    }();
    return method;
  }
};

TlsChannel::TlsChannel(asio::ip::tcp::socket& socket) : socket_(socket) {}

TlsChannel::~TlsChannel() {
  if (ssl_ != nullptr) SSL_free(ssl_);  // frees the BIO too
}

Status TlsChannel::Init(SSL_CTX* ctx) {
  BIO_METHOD* method = BioAccess::Method();
  if (method == nullptr) return Status::Internal("TLS: cannot create the BIO method");
  ssl_ = SSL_new(ctx);
  if (ssl_ == nullptr) return Status::Internal("TLS: SSL_new failed");
  BIO* bio = BIO_new(method);
  if (bio == nullptr) return Status::Internal("TLS: BIO_new failed");
  BIO_set_data(bio, this);
  BIO_set_init(bio, 1);
  SSL_set_bio(ssl_, bio, bio);  // one BIO both ways: the SSL takes the one reference
  SSL_set_options(ssl_, SSL_OP_NO_RENEGOTIATION);
  // Read-ahead lets OpenSSL take many records per BIO call; the buffer bounds it.
  SSL_set_read_ahead(ssl_, 1);
  SSL_set_default_read_buffer_len(ssl_, kSslReadBuffer);
  return Status::Ok();
}

error_code TlsChannel::SslError(int ret) {
  const int err = SSL_get_error(ssl_, ret);
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  switch (err) {
    case SSL_ERROR_ZERO_RETURN:
      return asio::error::eof;
    case SSL_ERROR_SYSCALL:
      // The socket failed under the BIO, or ended without close_notify.
      if (e == 0) return read_error_ ? read_error_ : asio::ssl::error::stream_truncated;
      break;
    default:
      break;
  }
  if (e == 0) return asio::error::fault;
  if (ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
    return asio::ssl::error::stream_truncated;
  }
  return error_code(static_cast<int>(e), asio::error::get_ssl_category());
}

void TlsChannel::Post(Handler done, error_code ec) {
  asio::post(socket_.get_executor(), [done = std::move(done), ec, keep = Keep()] {
    if (done) done(ec);
  });
}

// ---------------------------------------------------------------------------------------------
// Output

void TlsChannel::Flush(Handler done) {
  if (write_error_) {
    Post(std::move(done), write_error_);
    return;
  }
  if (out_.empty() && !flushing_) {
    Post(std::move(done), {});
    return;
  }
  if (done) flush_waiters_.push_back(std::move(done));
  if (!flushing_) StartFlush();
}

void TlsChannel::StartFlush() {
  std::vector<Handler> waiters = std::move(flush_waiters_);
  flush_waiters_.clear();
  if (out_.empty()) {
    flushing_ = false;
    for (Handler& w : waiters) w({});
    return;
  }
  flushing_ = true;
  sending_.swap(out_);
  out_.clear();
  // Everything the waiters were waiting for is in this batch.
  asio::async_write(
      socket_, asio::buffer(sending_),
      [this, keep = Keep(), waiters = std::move(waiters)](const error_code& ec, size_t) mutable {
        sending_.clear();
        if (ec) {
          write_error_ = ec;
          flushing_ = false;
          std::vector<Handler> rest = std::move(flush_waiters_);
          flush_waiters_.clear();
          for (Handler& w : waiters) w(ec);
          for (Handler& w : rest) w(ec);
          return;
        }
        StartFlush();  // what OpenSSL produced meanwhile, if anything
        for (Handler& w : waiters) w({});
      });
}

// ---------------------------------------------------------------------------------------------
// Input

void TlsChannel::FillInput(Handler next) {
  // A peek, not async_wait: Asio arms a wait without first checking readiness, so an edge that
  // arrived before it was armed (another thread running the reactor) would be missed. The
  // receive is tried at once, and again on every edge, and consumes nothing.
  socket_.async_receive(
      asio::buffer(&peek_byte_, 1), asio::socket_base::message_peek,
      [this, keep = Keep(), next = std::move(next)](const error_code& ec, size_t) {
        if (ec == asio::error::eof) {
          in_eof_ = true;  // OpenSSL decides if that was clean
          next({});
          return;
        }
        next(ec);
      });
}

// ---------------------------------------------------------------------------------------------
// Operations

void TlsChannel::AsyncHandshake(bool server, Handler done) {
  if (server) {
    SSL_set_accept_state(ssl_);
  } else {
    SSL_set_connect_state(ssl_);
  }
  HandshakeStep(std::move(done));
}

void TlsChannel::HandshakeStep(Handler done) {
  ERR_clear_error();
  const int r = SSL_do_handshake(ssl_);
  if (r == 1) {
    Flush(std::move(done));  // our last flight must leave before we call it done
    return;
  }
  if (SSL_get_error(ssl_, r) == SSL_ERROR_WANT_READ) {
    ERR_clear_error();
    Flush([this, done = std::move(done)](const error_code& ec) mutable {
      if (ec) {
        done(ec);
        return;
      }
      FillInput([this, done = std::move(done)](const error_code& ec) mutable {
        if (ec) {
          done(ec);
        } else {
          HandshakeStep(std::move(done));
        }
      });
    });
    return;
  }
  const error_code ec = SslError(r);
  // Deliver our alert (e.g. "unknown ca") so that the peer learns why.
  Flush([done = std::move(done), ec](const error_code&) { done(ec); });
}

void TlsChannel::AsyncRead(uint8_t* data, size_t n, Handler done) {
  ReadStep(data, n, std::move(done));
}

void TlsChannel::ReadStep(uint8_t* data, size_t n, Handler done) {
  while (n > 0) {
    ERR_clear_error();
    size_t got = 0;
    const int r = SSL_read_ex(ssl_, data, n, &got);
    if (r == 1) {
      data += got;
      n -= got;
      continue;
    }
    const bool want_read = SSL_get_error(ssl_, r) == SSL_ERROR_WANT_READ;
    const error_code ec = want_read ? error_code() : SslError(r);
    // Reading can produce output (an alert, a KeyUpdate answer): send it along.
    if (!out_.empty()) Flush(nullptr);
    if (!want_read) {
      Post(std::move(done), ec);
      return;
    }
    FillInput([this, data, n, done = std::move(done)](const error_code& ec) mutable {
      if (ec) {
        done(ec);
      } else {
        ReadStep(data, n, std::move(done));
      }
    });
    return;
  }
  Post(std::move(done), {});
}

void TlsChannel::AsyncWrite(std::vector<std::span<const uint8_t>> pieces, Handler done) {
  write_pieces_ = std::move(pieces);
  write_index_ = 0;
  write_offset_ = 0;
  WriteStep(std::move(done));
}

void TlsChannel::WriteStep(Handler done) {
  // Up to kWriteChunk of plaintext per flush, across pieces: a small piece between two
  // payloads (the next field's head) does not cost a system call of its own.
  size_t budget = kWriteChunk;
  while (budget > 0 && write_index_ < write_pieces_.size()) {
    const std::span<const uint8_t> piece = write_pieces_[write_index_];
    const size_t chunk = std::min(piece.size() - write_offset_, budget);
    size_t written = 0;
    if (chunk > 0) {
      ERR_clear_error();
      const int r = SSL_write_ex(ssl_, piece.data() + write_offset_, chunk, &written);
      if (r != 1) {
        const error_code ec = SslError(r);
        write_pieces_.clear();
        Flush([done = std::move(done), ec](const error_code&) { done(ec); });
        return;
      }
    }
    write_offset_ += written;
    budget -= written;
    if (write_offset_ == piece.size()) {
      ++write_index_;
      write_offset_ = 0;
    }
  }
  const bool finished = write_index_ == write_pieces_.size();
  if (finished) write_pieces_.clear();
  Flush([this, finished, done = std::move(done)](const error_code& ec) mutable {
    if (ec || finished) {
      done(ec);
    } else {
      WriteStep(std::move(done));
    }
  });
}

void TlsChannel::AsyncCloseNotify(Handler done) {
  ERR_clear_error();
  const int r = SSL_shutdown(ssl_);  // 0: ours queued; 1: both sides done
  if (r < 0) {
    const error_code ec = SslError(r);
    Flush([done = std::move(done), ec](const error_code&) { done(ec); });
    return;
  }
  Flush(std::move(done));
}

void TlsChannel::AsyncDrain(Handler done) { DrainStep(std::move(done)); }

void TlsChannel::DrainStep(Handler done) {
  uint8_t scratch[16 << 10];
  for (;;) {
    ERR_clear_error();
    size_t got = 0;
    const int r = SSL_read_ex(ssl_, scratch, sizeof(scratch), &got);
    if (r == 1) continue;  // data sent before the peer saw our close_notify: discarded
    const int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_ZERO_RETURN) {
      ERR_clear_error();
      Post(std::move(done), {});
      return;
    }
    if (err == SSL_ERROR_WANT_READ) {
      ERR_clear_error();
      FillInput([this, done = std::move(done)](const error_code& ec) mutable {
        if (ec) {
          done(ec);
        } else {
          DrainStep(std::move(done));
        }
      });
      return;
    }
    Post(std::move(done), SslError(r));
    return;
  }
}

}  // namespace fedslice::net::internal
