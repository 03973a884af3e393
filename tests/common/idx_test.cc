#include "fedslice/common/idx.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "testing/fault_file.h"
#include "testing/test_util.h"

namespace fedslice::data {
namespace {

namespace fs = std::filesystem;
using ::fedslice::testing::Gzip;
using ::fedslice::testing::ReadBytes;
using ::fedslice::testing::TempDir;
using ::fedslice::testing::WriteAppendedCopy;
using ::fedslice::testing::WriteBytes;
using ::fedslice::testing::WriteFlippedCopy;
using ::fedslice::testing::WriteTruncatedCopy;
using ::testing::AllOf;
using ::testing::HasSubstr;

// The bytes of an IDX file: magic 00 00 <type> <rank>, big-endian dims, then `data`.
std::string Idx(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data,
                uint8_t type = 0x08) {
  std::string out = {0, 0, static_cast<char>(type), static_cast<char>(dims.size())};
  for (uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>(d >> shift));
  }
  out.append(data.begin(), data.end());
  return out;
}

// Three 2x3 images with distinctive pixels (including 0 and 255) and labels 7, 0, 9.
const std::vector<uint8_t> kPixels = {0,  1,  2,  3,   4,   5,   10, 20, 30,
                                      40, 50, 60, 255, 128, 127, 64, 32, 16};
const std::vector<uint8_t> kLabels = {7, 0, 9};

class IdxTest : public ::testing::Test {
 protected:
  fs::path Write(const std::string& name, std::string_view bytes) {
    const fs::path path = dir_.path() / name;
    WriteBytes(path, bytes);
    return path;
  }
  fs::path Images() { return Write("images", Idx({3, 2, 3}, kPixels)); }
  fs::path Labels() { return Write("labels", Idx({3}, kLabels)); }

  // Expects `r` to fail with `code` and a message naming `file` and containing `what`.
  template <typename T>
  static void ExpectError(const Result<T>& r, Status::Code code, const fs::path& file,
                          const std::string& what) {
    ASSERT_FALSE(r.ok()) << "expected an error mentioning '" << what << "'";
    EXPECT_EQ(r.status().code(), code) << r.status().ToString();
    EXPECT_THAT(r.status().message(), AllOf(HasSubstr(file.string()), HasSubstr(what)));
  }

  TempDir dir_;
};

void ExpectSyntheticDataset(const Result<Dataset>& r) {
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->sample_shape, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(r->num_classes, 10);
  EXPECT_EQ(r->size(), 3);
  ASSERT_EQ(r->features.size(), kPixels.size());
  for (size_t i = 0; i < kPixels.size(); ++i) {
    EXPECT_EQ(r->features[i], static_cast<float>(kPixels[i]) / 255.0f) << "pixel " << i;
  }
  EXPECT_EQ(r->labels, (std::vector<int32_t>{7, 0, 9}));
  EXPECT_EQ(r->sample(2)[0], 1.0f);
}

TEST_F(IdxTest, ReadIdxReturnsDimsAndBytes) {
  const Result<IdxArray> r = ReadIdx(Images());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->dims, (std::vector<uint32_t>{3, 2, 3}));
  EXPECT_EQ(r->data, kPixels);
}

TEST_F(IdxTest, LoadsRawFiles) { ExpectSyntheticDataset(LoadIdx(Images(), Labels())); }

TEST_F(IdxTest, LoadsGzipFiles) {
  const fs::path images = Write("images.gz", Gzip(Idx({3, 2, 3}, kPixels)));
  const fs::path labels = Write("labels.gz", Gzip(Idx({3}, kLabels)));
  ExpectSyntheticDataset(LoadIdx(images, labels));
  // Mixed raw and compressed.
  ExpectSyntheticDataset(LoadIdx(images, Labels()));
}

TEST_F(IdxTest, DetectsGzipByContentNotByName) {
  // A compressed file without ".gz", and a raw file named ".gz".
  const fs::path images = Write("images-no-suffix", Gzip(Idx({3, 2, 3}, kPixels)));
  const fs::path labels = Write("labels-raw.gz", Idx({3}, kLabels));
  ExpectSyntheticDataset(LoadIdx(images, labels));
}

TEST_F(IdxTest, ReadsMultiMemberGzip) {
  // `cat a.gz b.gz` is a valid gzip file whose content is the concatenation (RFC 1952).
  const std::string raw = Idx({3, 2, 3}, kPixels);
  const fs::path images =
      Write("images.gz", Gzip(raw.substr(0, 7)) + Gzip("") + Gzip(raw.substr(7)));
  ExpectSyntheticDataset(LoadIdx(images, Labels()));
}

TEST_F(IdxTest, ReadsLargeGzipAcrossChunkBoundaries) {
  // 300 images of 28x28: the compressed and decompressed streams span many read chunks.
  std::vector<uint8_t> pixels(300 * 28 * 28);
  for (size_t i = 0; i < pixels.size(); ++i)
    pixels[i] = static_cast<uint8_t>(i * 2654435761u >> 24);
  const fs::path images = Write("big.gz", Gzip(Idx({300, 28, 28}, pixels)));
  const Result<IdxArray> r = ReadIdx(images);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->data, pixels);
}

TEST_F(IdxTest, RejectsMissingFileAndDirectory) {
  ExpectError(ReadIdx(dir_.path() / "nope"), Status::Code::kNotFound, dir_.path() / "nope",
              "no such file");
  ExpectError(LoadIdx(Images(), dir_.path() / "nope"), Status::Code::kNotFound,
              dir_.path() / "nope", "no such file");
  ExpectError(ReadIdx(dir_.path()), Status::Code::kInvalidArgument, dir_.path(), "is a directory");
}

TEST_F(IdxTest, RejectsBadMagic) {
  std::string bytes = Idx({3, 2, 3}, kPixels);
  bytes[0] = 0x12;
  bytes[1] = 0x34;
  const fs::path images = Write("images", bytes);
  ExpectError(LoadIdx(images, Labels()), Status::Code::kCorruption, images, "bad magic 0x12340803");
  // The same in a gzip file: the magic is checked after decompression.
  const fs::path gz = Write("images.gz", Gzip(bytes));
  ExpectError(ReadIdx(gz), Status::Code::kCorruption, gz, "bad magic");
  // An empty file has no magic at all.
  const fs::path empty = Write("empty", "");
  ExpectError(ReadIdx(empty), Status::Code::kCorruption, empty, "truncated");
}

TEST_F(IdxTest, RejectsUnsupportedAndUnknownTypeCodes) {
  const fs::path floats = Write("floats", Idx({1}, {0, 0, 0, 0}, 0x0D));
  ExpectError(ReadIdx(floats), Status::Code::kInvalidArgument, floats,
              "unsupported IDX type code 0x0d (float32)");
  const fs::path unknown = Write("unknown", Idx({1}, {0}, 0x42));
  ExpectError(ReadIdx(unknown), Status::Code::kCorruption, unknown, "unknown IDX type code 0x42");
  const fs::path rank0 = Write("rank0", Idx({}, {}));
  ExpectError(ReadIdx(rank0), Status::Code::kCorruption, rank0, "rank 0");
}

TEST_F(IdxTest, RejectsTruncatedHeader) {
  const fs::path images = Images();
  // Cut inside the magic number, right after it, and inside each dimension.
  for (size_t size : {1, 3, 4, 6, 8, 15}) {
    const fs::path cut = dir_.path() / ("cut" + std::to_string(size));
    WriteTruncatedCopy(images, cut, size);
    SCOPED_TRACE(size);
    ExpectError(ReadIdx(cut), Status::Code::kCorruption, cut, "truncated");
    ExpectError(ReadIdx(Write("cut.gz", Gzip(ReadBytes(cut)))), Status::Code::kCorruption,
                dir_.path() / "cut.gz", "truncated");
  }
}

TEST_F(IdxTest, RejectsTruncatedData) {
  const fs::path images = Images();
  const size_t full = ReadBytes(images).size();
  for (size_t size : {size_t{16}, size_t{17}, full - 1}) {
    const fs::path cut = dir_.path() / "cut";
    WriteTruncatedCopy(images, cut, size);
    SCOPED_TRACE(size);
    ExpectError(LoadIdx(cut, Labels()), Status::Code::kCorruption, cut, "truncated");
    // The decompressed stream is short, the gzip stream itself is intact.
    const fs::path gz = Write("cut.gz", Gzip(ReadBytes(cut)));
    ExpectError(LoadIdx(gz, Labels()), Status::Code::kCorruption, gz, "truncated");
  }
}

TEST_F(IdxTest, RejectsTrailingBytes) {
  const fs::path long_file = dir_.path() / "long";
  WriteAppendedCopy(Labels(), long_file, std::string(1, '\0'));
  ExpectError(LoadIdx(Images(), long_file), Status::Code::kCorruption, long_file, "trailing");
  // Decompressed payload longer than the header says.
  const fs::path long_gz = Write("long.gz", Gzip(Idx({3}, kLabels) + "x"));
  ExpectError(ReadIdx(long_gz), Status::Code::kCorruption, long_gz, "trailing");
  // Garbage after a complete gzip stream.
  const fs::path garbage = Write("garbage.gz", Gzip(Idx({3}, kLabels)) + "junk");
  ExpectError(ReadIdx(garbage), Status::Code::kCorruption, garbage, "trailing garbage");
  const fs::path one_byte = Write("one.gz", Gzip(Idx({3}, kLabels)) + std::string(1, '\x1f'));
  ExpectError(ReadIdx(one_byte), Status::Code::kCorruption, one_byte, "trailing garbage");
}

TEST_F(IdxTest, RejectsEveryTruncationOfAGzipFile) {
  const fs::path gz = Write("images.gz", Gzip(Idx({3, 2, 3}, kPixels)));
  const size_t full = ReadBytes(gz).size();
  // Every cut, including ones inside the gzip header and inside the CRC/length trailer.
  for (size_t size = 2; size < full; ++size) {
    const fs::path cut = dir_.path() / "cut.gz";
    WriteTruncatedCopy(gz, cut, size);
    SCOPED_TRACE(size);
    ExpectError(ReadIdx(cut), Status::Code::kCorruption, cut, "");
  }
}

TEST_F(IdxTest, RejectsCorruptGzip) {
  const fs::path gz = Write("images.gz", Gzip(Idx({3, 2, 3}, kPixels)));
  const size_t full = ReadBytes(gz).size();
  // Bytes 4-9 of a gzip header (time stamp, flags, OS) may change freely; every byte of the
  // deflate data and of the CRC-32/length trailer is protected.
  for (size_t offset = 10; offset < full; ++offset) {
    const fs::path bad = dir_.path() / "bad.gz";
    WriteFlippedCopy(gz, bad, offset);
    SCOPED_TRACE(offset);
    const Result<IdxArray> r = ReadIdx(bad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kCorruption) << r.status().ToString();
    EXPECT_THAT(r.status().message(), HasSubstr(bad.string()));
  }
  // The trailer check specifically: flip a bit of the stored CRC-32.
  const fs::path bad_crc = dir_.path() / "bad-crc.gz";
  WriteFlippedCopy(gz, bad_crc, full - 8, 0x01);
  ExpectError(ReadIdx(bad_crc), Status::Code::kCorruption, bad_crc, "corrupt gzip data");
}

TEST_F(IdxTest, BoundsAllocationByHeaderAndFileSize) {
  // A 1000x1000x1000 header over 10 bytes of payload: rejected before allocating 1 GB.
  const fs::path raw = Write("bomb", Idx({1000, 1000, 1000}, std::vector<uint8_t>(10)));
  ExpectError(ReadIdx(raw), Status::Code::kCorruption, raw, "can hold at most");
  // Same header, gzip: more than the compressed size could inflate to.
  const fs::path gz = Write("bomb.gz", Gzip(Idx({1000, 1000, 1000}, std::vector<uint8_t>(10))));
  ExpectError(ReadIdx(gz), Status::Code::kCorruption, gz, "can hold at most");
  // Dimensions whose product overflows 64 bits.
  const fs::path huge =
      Write("huge", Idx({0xffffffffu, 0xffffffffu, 0xffffffffu}, std::vector<uint8_t>(10)));
  ExpectError(ReadIdx(huge), Status::Code::kCorruption, huge, "over 2^64 bytes");
  // An explicit limit below a valid file's payload.
  const fs::path images = Images();
  ExpectError(ReadIdx(images, /*max_bytes=*/17), Status::Code::kResourceExhausted, images,
              "17-byte limit");
  EXPECT_TRUE(ReadIdx(images, /*max_bytes=*/18).ok());
  // A real gzip bomb: 16 MB of zeros compress to ~16 KB, but the header declares 1 KB.
  std::string zeros = Idx({1024}, std::vector<uint8_t>(1024));
  zeros.append(16 << 20, '\0');
  const fs::path zip_bomb = Write("zip-bomb.gz", Gzip(zeros));
  ExpectError(ReadIdx(zip_bomb), Status::Code::kCorruption, zip_bomb, "trailing");
}

TEST_F(IdxTest, RejectsCountMismatch) {
  const fs::path labels = Write("labels4", Idx({4}, {1, 2, 3, 4}));
  const fs::path images = Images();
  const Result<Dataset> r = LoadIdx(images, labels);
  ExpectError(r, Status::Code::kInvalidArgument, images, "count mismatch");
  EXPECT_THAT(r.status().message(),
              AllOf(HasSubstr(labels.string()), HasSubstr("3 images"), HasSubstr("4 labels")));
}

TEST_F(IdxTest, RejectsWrongDimensions) {
  const fs::path images = Images();
  const fs::path labels = Labels();
  // Swapped arguments: the labels file has one dimension.
  ExpectError(LoadIdx(labels, images), Status::Code::kInvalidArgument, labels,
              "images need 3 dimensions (count, rows, cols), got 1");
  const fs::path labels2d = Write("labels2d", Idx({3, 1}, kLabels));
  ExpectError(LoadIdx(images, labels2d), Status::Code::kInvalidArgument, labels2d,
              "labels need 1 dimension (count), got 2");
  const fs::path flat = Write("flat", Idx({3, 6}, kPixels));
  ExpectError(LoadIdx(flat, labels), Status::Code::kInvalidArgument, flat, "got 2");
  const fs::path none = Write("none", Idx({0, 28, 28}, {}));
  const fs::path no_labels = Write("nolabels", Idx({0}, {}));
  ExpectError(LoadIdx(none, no_labels), Status::Code::kInvalidArgument, none, "no images");
  const fs::path zero_rows = Write("zerorows", Idx({3, 0, 28}, {}));
  ExpectError(LoadIdx(zero_rows, labels), Status::Code::kInvalidArgument, zero_rows,
              "empty image size 0x28");
}

TEST_F(IdxTest, RejectsLabelsOutOfRange) {
  const fs::path images = Images();
  const fs::path labels = Write("labels", Idx({3}, {1, 64, 2}));
  ExpectError(LoadIdx(images, labels), Status::Code::kInvalidArgument, labels,
              "label 64 of sample 1 is out of range [0, 64)");
  const fs::path eleven = Write("eleven", Idx({3}, {1, 12, 2}));
  ExpectError(LoadIdx(images, eleven, /*max_classes=*/10), Status::Code::kInvalidArgument, eleven,
              "label 12 of sample 1 is out of range [0, 10)");
  // Within the default bound, the class count grows to fit (EMNIST-style label sets).
  const Result<Dataset> r = LoadIdx(images, eleven);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->num_classes, 13);
  // A binary label set still gets at least 10 classes unless the caller bounds it lower.
  const fs::path binary = Write("binary", Idx({3}, {1, 0, 1}));
  EXPECT_EQ(LoadIdx(images, binary)->num_classes, 10);
  EXPECT_EQ(LoadIdx(images, binary, /*max_classes=*/2)->num_classes, 2);
  EXPECT_FALSE(LoadIdx(images, binary, /*max_classes=*/0).ok());
}

TEST_F(IdxTest, LoadMnistFindsRawGzipAndT10kNames) {
  WriteBytes(dir_.path() / "train-images-idx3-ubyte.gz", Gzip(Idx({3, 2, 3}, kPixels)));
  WriteBytes(dir_.path() / "train-labels-idx1-ubyte", Idx({3}, kLabels));
  ExpectSyntheticDataset(LoadMnist(dir_.path(), Split::kTrain));

  const Result<Dataset> missing = LoadMnist(dir_.path(), Split::kTest);
  ExpectError(missing, Status::Code::kNotFound, dir_.path(), "test-images-idx3-ubyte[.gz]");
  EXPECT_THAT(missing.status().message(), HasSubstr("scripts/fetch_mnist.sh"));

  // The original MNIST distribution names its test files t10k-*.
  WriteBytes(dir_.path() / "t10k-images-idx3-ubyte", Idx({3, 2, 3}, kPixels));
  ExpectError(LoadMnist(dir_.path(), Split::kTest), Status::Code::kNotFound, dir_.path(),
              "no t10k-labels-idx1-ubyte");
  WriteBytes(dir_.path() / "t10k-labels-idx1-ubyte.gz", Gzip(Idx({3}, kLabels)));
  ExpectSyntheticDataset(LoadMnist(dir_.path(), Split::kTest));

  // MNIST labels are digits: 10 is out of range even though LoadIdx would accept it.
  WriteBytes(dir_.path() / "train-labels-idx1-ubyte", Idx({3}, {1, 10, 2}));
  ExpectError(LoadMnist(dir_.path(), Split::kTrain), Status::Code::kInvalidArgument,
              dir_.path() / "train-labels-idx1-ubyte", "out of range [0, 10)");
}

}  // namespace
}  // namespace fedslice::data
