// Reader for IDX files (the format of MNIST, Fashion-MNIST, KMNIST, EMNIST), raw or
// gzip-compressed, and loaders that turn an images/labels pair into a Dataset.
//
// IDX layout (all integers big-endian): two zero bytes, a type code byte, a dimension-count
// byte, one uint32 per dimension, then the elements in row-major order. Only the unsigned-byte
// type (0x08) is supported: every standard image/label IDX file uses it.
//
// Gzip is detected by its magic bytes (1f 8b), not by the file name. Every malformed input
// (bad magic, unsupported type, truncated header or data, trailing bytes, corrupt gzip,
// mismatched counts, out-of-range labels) gives a non-OK Status whose message names the file;
// nothing is thrown and no partial result is returned.
//
// Thread-safety: all functions are free functions without shared state; safe to call
// concurrently.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "fedslice/common/dataset.h"
#include "fedslice/common/status.h"

namespace fedslice::data {

// An IDX file's contents: its dimensions and its elements (unsigned bytes, row-major).
struct IdxArray {
  std::vector<uint32_t> dims;  // e.g. {60000, 28, 28} for MNIST training images.
  std::vector<uint8_t> data;   // product(dims) bytes.
};

// Upper bound on the payload ReadIdx accepts by default: 2 GiB, well above the largest
// standard IDX set (EMNIST ByClass images, 547 MB). It keeps a corrupt or hostile header
// (or a gzip bomb) from making the reader allocate unbounded memory.
inline constexpr uint64_t kDefaultMaxIdxBytes = uint64_t{2} << 30;

// Largest number of classes LoadIdx accepts by default. EMNIST ByClass, the largest standard
// IDX label set, has 62.
inline constexpr int kDefaultMaxClasses = 64;

// Reads one IDX file, raw or gzip. The payload size is taken from the header and must match
// the (decompressed) file exactly: fewer bytes is "truncated", more is "trailing bytes".
// A header declaring more than `max_bytes` of payload is rejected before anything is
// allocated; so is a gzip file whose header declares more than its compressed size could
// possibly inflate to.
// Errors: kNotFound (no such file), kIoError (cannot read), kCorruption (malformed content),
// kResourceExhausted (payload above max_bytes).
Result<IdxArray> ReadIdx(const std::filesystem::path& path,
                         uint64_t max_bytes = kDefaultMaxIdxBytes);

// Loads an images file (3 dimensions: count, rows, cols) and a labels file (1 dimension:
// count) into a Dataset with sample_shape {1, rows, cols}, features = byte / 255.0f and
// num_classes = max(10, largest label + 1). Counts must match and be non-zero, and every
// label must be below `max_classes`; otherwise an error naming the offending file.
Result<Dataset> LoadIdx(const std::filesystem::path& images, const std::filesystem::path& labels,
                        int max_classes = kDefaultMaxClasses);

enum class Split { kTrain, kTest };

// Loads the MNIST-layout pair `<split>-images-idx3-ubyte` / `<split>-labels-idx1-ubyte` from
// `dir`, with split = "train" or "test"; for the test split the original MNIST names
// `t10k-...` are accepted too, so the full MNIST as distributed loads unchanged. Each file may
// be raw or have a `.gz` suffix (the raw file wins if both exist). Labels must be digits 0-9.
// Errors: kNotFound naming the missing file (and the fetch script), else as LoadIdx.
Result<Dataset> LoadMnist(const std::filesystem::path& dir, Split split);

}  // namespace fedslice::data
