#include "fedslice/common/net/tls.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <cctype>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>

#include "net/tls_internal.h"

namespace fedslice::net {
namespace {

constexpr size_t kMaxIdentityBytes = 256;

// Drains OpenSSL's thread-local error queue into one line ("" if empty).
std::string OpenSslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

Status CheckReadable(const std::string& path, std::string_view what) {
  if (path.empty()) return Status::InvalidArgument(std::string(what) + " path is empty");
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return Status::NotFound(std::string(what) + " '" + path + "' does not exist or is not a file");
  }
  return Status::Ok();
}

std::string Asn1ToUtf8(const ASN1_STRING* s) {
  unsigned char* utf8 = nullptr;
  const int n = ASN1_STRING_to_UTF8(&utf8, s);
  if (n < 0) return {};
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
  OPENSSL_free(utf8);
  return out;
}

bool UsableIdentity(const std::string& name) {
  if (name.empty() || name.size() > kMaxIdentityBytes) return false;
  for (unsigned char c : name) {
    if (c < 0x20 || c == 0x7f) return false;
  }
  return true;
}

}  // namespace

Status TlsConfig::Validate() const {
  if (ca_file.empty()) return Status::InvalidArgument("TLS: no CA file given");
  if (cert_file.empty()) return Status::InvalidArgument("TLS: no certificate file given");
  if (key_file.empty()) return Status::InvalidArgument("TLS: no private key file given");
  using std::chrono::milliseconds;
  for (auto [value, name] :
       {std::pair{connect_timeout, "connect_timeout"},
        std::pair{handshake_timeout, "handshake_timeout"}, std::pair{read_timeout, "read_timeout"},
        std::pair{write_timeout, "write_timeout"}, std::pair{idle_timeout, "idle_timeout"},
        std::pair{heartbeat_interval, "heartbeat_interval"},
        std::pair{shutdown_timeout, "shutdown_timeout"}}) {
    if (value <= milliseconds::zero()) {
      return Status::InvalidArgument(std::string("TLS: ") + name + " must be positive");
    }
  }
  if (heartbeat_interval >= idle_timeout) {
    return Status::InvalidArgument(
        "TLS: heartbeat_interval (" + std::to_string(heartbeat_interval.count()) +
        " ms) must be below idle_timeout (" + std::to_string(idle_timeout.count()) +
        " ms), else live but idle peers are dropped");
  }
  if (max_frame_bytes < 1024 || max_frame_bytes > kMaxFrameBytesCeiling) {
    return Status::InvalidArgument("TLS: max_frame_bytes " + std::to_string(max_frame_bytes) +
                                   " is outside [1024, " + std::to_string(kMaxFrameBytesCeiling) +
                                   "]");
  }
  if (max_send_queue_bytes < max_frame_bytes) {
    return Status::InvalidArgument("TLS: max_send_queue_bytes must be >= max_frame_bytes");
  }
  if (max_bad_messages < 0) return Status::InvalidArgument("TLS: max_bad_messages is negative");
  return Status::Ok();
}

Result<std::string> CertificateIdentity(const std::string& pem_file) {
  FEDSLICE_RETURN_IF_ERROR(CheckReadable(pem_file, "certificate"));
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(pem_file.c_str(), "r"), &BIO_free);
  if (!bio) return Status::NotFound("cannot open certificate '" + pem_file + "'");
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr), &X509_free);
  if (!cert) {
    return Status::InvalidArgument("'" + pem_file +
                                   "' holds no PEM certificate: " + OpenSslErrors());
  }
  std::string id = internal::IdentityOf(cert.get());
  if (id.empty()) {
    return Status::InvalidArgument("certificate '" + pem_file +
                                   "' has no usable CN or DNS subjectAltName");
  }
  return id;
}

namespace internal {

std::string IdentityOf(X509* cert) {
  if (cert == nullptr) return {};
  if (X509_NAME* subject = X509_get_subject_name(cert)) {
    const int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (i >= 0) {
      std::string cn = Asn1ToUtf8(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i)));
      return UsableIdentity(cn) ? cn : std::string();
    }
  }
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  std::string dns;
  if (names != nullptr) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
      const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
      if (name->type == GEN_DNS) {
        dns = Asn1ToUtf8(name->d.dNSName);
        break;
      }
    }
    GENERAL_NAMES_free(names);
  }
  return UsableIdentity(dns) ? dns : std::string();
}

std::string DescribeError(const boost::system::error_code& ec) {
  if (ec == boost::asio::ssl::error::stream_truncated) {
    return "connection closed without TLS close_notify (stream truncated)";
  }
  if (ec == boost::asio::error::eof) return "connection closed by peer";
  std::string message = ec.message();
  if (ec.category() == boost::asio::error::get_ssl_category()) {
    // OpenSSL's reason strings are terse; say where they come from.
    message = "TLS: " + message;
  }
  return message;
}

Result<std::shared_ptr<boost::asio::ssl::context>> MakeTlsContext(const TlsConfig& config,
                                                                  bool server) {
  FEDSLICE_RETURN_IF_ERROR(config.Validate());
  FEDSLICE_RETURN_IF_ERROR(CheckReadable(config.ca_file, "CA file"));
  FEDSLICE_RETURN_IF_ERROR(CheckReadable(config.cert_file, "certificate file"));
  FEDSLICE_RETURN_IF_ERROR(CheckReadable(config.key_file, "private key file"));
  namespace ssl = boost::asio::ssl;
  std::shared_ptr<ssl::context> ctx;
  try {
    ctx = std::make_shared<ssl::context>(server ? ssl::context::tls_server
                                                : ssl::context::tls_client);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("creating a TLS context: ") + e.what());
  }
  ERR_clear_error();
  SSL_CTX* native = ctx->native_handle();
  boost::system::error_code ec;
  ctx->set_options(ssl::context::default_workarounds | ssl::context::no_compression |
                       ssl::context::single_dh_use,
                   ec);
  if (SSL_CTX_set_min_proto_version(native, config.allow_tls12 ? TLS1_2_VERSION : TLS1_3_VERSION) !=
      1) {
    return Status::Internal("TLS: cannot set the minimum protocol version: " + OpenSslErrors());
  }
  if (config.allow_tls12 &&
      SSL_CTX_set_cipher_list(native, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL") != 1) {
    return Status::Internal("TLS: cannot set TLS 1.2 cipher list: " + OpenSslErrors());
  }
  // AES-128-GCM first: as secure for our purpose and ~30% cheaper per byte than AES-256,
  // which matters for model- and activation-sized frames.
  if (SSL_CTX_set_ciphersuites(native,
                               "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                               "TLS_CHACHA20_POLY1305_SHA256") != 1) {
    return Status::Internal("TLS: cannot set TLS 1.3 cipher suites: " + OpenSslErrors());
  }
  // Only the run's CA is trusted; the system store is never loaded.
  ctx->load_verify_file(config.ca_file, ec);
  if (ec) {
    return Status::InvalidArgument("TLS: loading CA file '" + config.ca_file +
                                   "': " + ec.message() + " " + OpenSslErrors());
  }
  ctx->use_certificate_chain_file(config.cert_file, ec);
  if (ec) {
    return Status::InvalidArgument("TLS: loading certificate '" + config.cert_file +
                                   "': " + ec.message() + " " + OpenSslErrors());
  }
  ctx->use_private_key_file(config.key_file, ssl::context::pem, ec);
  if (ec) {
    const std::string why = ec.message() + " " + OpenSslErrors();
    if (why.find("mismatch") != std::string::npos) {
      return Status::InvalidArgument("TLS: private key '" + config.key_file +
                                     "' does not match certificate '" + config.cert_file + "'");
    }
    return Status::InvalidArgument("TLS: loading private key '" + config.key_file + "': " + why);
  }
  if (SSL_CTX_check_private_key(native) != 1) {
    return Status::InvalidArgument("TLS: private key '" + config.key_file +
                                   "' does not match certificate '" + config.cert_file + "'");
  }
  ctx->set_verify_depth(4, ec);
  if (server) {
    ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
    // Tell clients which CA we accept, so one with several certificates picks the right one.
    if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(config.ca_file.c_str())) {
      SSL_CTX_set_client_CA_list(native, names);
    }
    SSL_CTX_set_options(native, SSL_OP_CIPHER_SERVER_PREFERENCE);
    // Sessions are long-lived and never resumed: no tickets, no cache.
    SSL_CTX_set_num_tickets(native, 0);
    SSL_CTX_set_session_cache_mode(native, SSL_SESS_CACHE_OFF);
  } else {
    ctx->set_verify_mode(ssl::verify_peer, ec);
  }
  if (ec) return Status::Internal("TLS: configuring verification: " + ec.message());
  ERR_clear_error();
  return ctx;
}

}  // namespace internal
}  // namespace fedslice::net
