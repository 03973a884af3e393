// TLS context construction and certificate helpers shared by the server and the client.
#pragma once

#include <openssl/x509.h>

#include <boost/asio/ssl/context.hpp>
#include <boost/system/error_code.hpp>
#include <memory>
#include <string>

#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"

namespace fedslice::net::internal {

// A context for one role, with CA, certificate and key loaded and checked, the protocol
// floor set (TLS 1.3, or 1.2 if allowed), and peer verification on (server: a client
// certificate is required).
Result<std::shared_ptr<boost::asio::ssl::context>> MakeTlsContext(const TlsConfig& config,
                                                                  bool server);

// CN of `cert`, else its first DNS SAN; empty if neither exists or the name is unusable
// (control characters, longer than 256 bytes).
std::string IdentityOf(X509* cert);

// "what failed: reason" for an Asio/OpenSSL error, with OpenSSL's reason string when there is
// one ("tlsv1 alert unknown ca", "certificate verify failed", "wrong version number").
std::string DescribeError(const boost::system::error_code& ec);

}  // namespace fedslice::net::internal
