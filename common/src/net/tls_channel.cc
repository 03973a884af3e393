#include "net/tls_channel.h"

#include <openssl/bio.h>
#include <openssl/err.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <exception>
#include <new>
#include <utility>

namespace fedslice::net::internal {

namespace asio = boost::asio;
using boost::system::error_code;

// OpenSSL's read buffer: with read-ahead, records are pulled from in_ in chunks of this size.
constexpr long kSslReadBuffer = 64 << 10;

// The custom BIO: writes append to out_, reads consume in_. It never blocks and never fails
// except for lack of memory; waiting is done by the channel, asynchronously.
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
    const size_t available = self->in_end_ - self->in_pos_;
    if (available > 0) {
      const size_t n = std::min(len, available);
      std::memcpy(data, self->in_.get() + self->in_pos_, n);
      self->in_pos_ += n;
      *read = n;
      return 1;
    }
    *read = 0;
    if (!self->in_eof_) BIO_set_retry_read(b);  // else: end of stream
    return 0;
  }

  static long Ctrl(BIO* b, int cmd, long, void*) {
    switch (cmd) {
      case BIO_CTRL_FLUSH:
        return 1;
      case BIO_CTRL_PENDING: {
        TlsChannel* self = Self(b);
        return static_cast<long>(self->in_end_ - self->in_pos_);
      }
      case BIO_CTRL_WPENDING:
        return 0;
      case BIO_CTRL_EOF: {
        TlsChannel* self = Self(b);
        return self->in_eof_ && self->in_pos_ == self->in_end_ ? 1 : 0;
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
  in_.reset(new (std::nothrow) uint8_t[kInputBytes]);
  if (!in_) return Status::ResourceExhausted("TLS: cannot allocate the input buffer");
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
      // Our BIO has no system errors: this is an end of stream without close_notify.
      if (e == 0) return asio::ssl::error::stream_truncated;
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
  in_pos_ = 0;
  in_end_ = 0;
  socket_.async_read_some(
      asio::buffer(in_.get(), kInputBytes),
      [this, keep = Keep(), next = std::move(next)](const error_code& ec, size_t n) {
        if (ec == asio::error::eof) {
          in_eof_ = true;  // OpenSSL decides if that was clean
          next({});
          return;
        }
        if (ec) {
          next(ec);
          return;
        }
        in_end_ = n;
        next({});
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

void TlsChannel::AsyncWrite(const uint8_t* data, size_t n, Handler done) {
  WriteStep(data, n, std::move(done));
}

void TlsChannel::WriteStep(const uint8_t* data, size_t n, Handler done) {
  const size_t chunk = std::min(n, kWriteChunk);
  ERR_clear_error();
  size_t written = 0;
  const int r = SSL_write_ex(ssl_, data, chunk, &written);
  if (r != 1) {
    const error_code ec = SslError(r);
    Flush([done = std::move(done), ec](const error_code&) { done(ec); });
    return;
  }
  data += written;
  n -= written;
  Flush([this, data, n, done = std::move(done)](const error_code& ec) mutable {
    if (ec || n == 0) {
      done(ec);
    } else {
      WriteStep(data, n, std::move(done));
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
