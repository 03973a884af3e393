#include "fedslice/slicing/pipeline.h"

#include <charconv>

namespace fedslice::slicing {

std::string Endpoint::ToString() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Result<Endpoint> ParseEndpoint(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument("endpoint '" + std::string(text.substr(0, 300)) + "' " +
                                   std::string(why) + " (expected HOST:PORT or [V6]:PORT)");
  };
  Endpoint ep;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("has an unterminated [address]");
    }
    ep.host = std::string(text.substr(1, close - 1));
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("has no port");
    ep.host = std::string(text.substr(0, colon));
    if (ep.host.find(':') != std::string::npos) return bad("needs [] around an IPv6 address");
    port_text = text.substr(colon + 1);
  }
  if (ep.host.empty()) return bad("has no host");
  if (ep.host.size() > 253) return bad("has a host longer than 253 characters");
  unsigned port = 0;
  const auto [end, ec] =
      std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc() || end != port_text.data() + port_text.size() || port < 1 || port > 65535) {
    return bad("has a port outside 1..65535");
  }
  ep.port = static_cast<uint16_t>(port);
  return ep;
}

}  // namespace fedslice::slicing
