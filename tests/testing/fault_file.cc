#include "testing/fault_file.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <fstream>
#include <iterator>

namespace fedslice::testing {

std::string ReadBytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot open " << path;
    return {};
  }
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) ADD_FAILURE() << "cannot write " << path;
}

void WriteTruncatedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                        size_t size) {
  const std::string bytes = ReadBytes(src);
  WriteBytes(dst, std::string_view(bytes).substr(0, size));
}

void WriteFlippedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                      size_t offset, uint8_t mask) {
  std::string bytes = ReadBytes(src);
  if (offset >= bytes.size() || mask == 0) {
    ADD_FAILURE() << "cannot flip byte " << offset << " of " << src << " (" << bytes.size()
                  << " bytes) with mask " << int{mask};
    return;
  }
  bytes[offset] = static_cast<char>(static_cast<uint8_t>(bytes[offset]) ^ mask);
  WriteBytes(dst, bytes);
}

void WriteAppendedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                       std::string_view extra) {
  WriteBytes(dst, ReadBytes(src) + std::string(extra));
}

std::string Gzip(std::string_view bytes) {
  z_stream zs{};
  // 16 + MAX_WBITS: gzip wrapper; deflateInit2 writes a zero time stamp unless told otherwise.
  if (deflateInit2(&zs, Z_BEST_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    ADD_FAILURE() << "deflateInit2 failed";
    return {};
  }
  std::string out(deflateBound(&zs, static_cast<uLong>(bytes.size())) + 32, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  zs.avail_in = static_cast<uInt>(bytes.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&zs, Z_FINISH);
  if (rc != Z_STREAM_END) ADD_FAILURE() << "deflate failed: " << rc;
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

}  // namespace fedslice::testing
