// Fault injection on files, for tests of readers that must reject damaged input (IDX data,
// model files, certificates): copies of a file cut short, with a flipped byte or with bytes
// appended, plus deterministic gzip so tests can build compressed inputs without zlib.
//
// Every function reports I/O problems through gtest (ADD_FAILURE) rather than by return
// value, so a broken fixture fails the test that uses it instead of passing vacuously.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace fedslice::testing {

// The whole file as bytes ("" and a test failure if it cannot be read).
std::string ReadBytes(const std::filesystem::path& path);

// Creates or replaces `path` with exactly `bytes`.
void WriteBytes(const std::filesystem::path& path, std::string_view bytes);

// Writes to `dst` the first `size` bytes of `src` (all of it if `size` is larger).
void WriteTruncatedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                        size_t size);

// Writes to `dst` a copy of `src` whose byte at `offset` is XOR-ed with `mask` (non-zero, so
// the byte really changes). `offset` must lie inside the file.
void WriteFlippedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                      size_t offset, uint8_t mask = 0xff);

// Writes to `dst` a copy of `src` followed by `extra`.
void WriteAppendedCopy(const std::filesystem::path& src, const std::filesystem::path& dst,
                       std::string_view extra);

// One gzip member (RFC 1952) holding `bytes`, with a zero time stamp so the output depends on
// the input alone.
std::string Gzip(std::string_view bytes);

}  // namespace fedslice::testing
