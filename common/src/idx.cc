#include "fedslice/common/idx.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <system_error>

namespace fedslice::data {
namespace {

namespace fs = std::filesystem;

// Deflate cannot expand input by more than about 1032:1 (RFC 1951: a 258-byte match costs at
// least 2 bits). A header that declares more payload than that is corrupt or truncated, and
// is rejected before the payload buffer is allocated.
constexpr uint64_t kMaxDeflateRatio = 1032;
constexpr size_t kChunkBytes = 64 * 1024;

std::string Hex(uint64_t v, int width) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%0*llx", width, static_cast<unsigned long long>(v));
  return buf;
}

std::string ErrnoText() { return std::generic_category().message(errno); }

// A stream of the file's (decompressed) bytes. Read() hands out exactly the bytes asked for or
// fails; Finish() checks that nothing is left, so short and long files are both caught.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Fills dst[0, n). On a short file: kCorruption "truncated ...".
  virtual Status Read(uint8_t* dst, uint64_t n) = 0;
  // OK if the file holds no more (payload) bytes and, for gzip, every check sum matched.
  virtual Status Finish() = 0;
  // Upper bound on the bytes Read() can still deliver.
  virtual uint64_t MaxRemaining() const = 0;
  uint64_t consumed() const { return consumed_; }

 protected:
  uint64_t consumed_ = 0;
};

class RawSource final : public ByteSource {
 public:
  RawSource(std::ifstream in, uint64_t file_size) : in_(std::move(in)), size_(file_size) {}

  Status Read(uint8_t* dst, uint64_t n) override {
    if (n > size_ - consumed_) {
      return Status::Corruption("truncated: needs " + std::to_string(consumed_ + n) +
                                " bytes, the file has " + std::to_string(size_));
    }
    in_.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n));
    if (static_cast<uint64_t>(in_.gcount()) != n) {
      return Status::IoError("read failed after " + std::to_string(consumed_ + in_.gcount()) +
                             " bytes");
    }
    consumed_ += n;
    return Status::Ok();
  }

  Status Finish() override {
    if (consumed_ != size_) {
      return Status::Corruption(std::to_string(size_ - consumed_) + " trailing bytes after the " +
                                std::to_string(consumed_) + " bytes the header accounts for");
    }
    return Status::Ok();
  }

  uint64_t MaxRemaining() const override { return size_ - consumed_; }

 private:
  std::ifstream in_;
  uint64_t size_;
};

class GzipSource final : public ByteSource {
 public:
  GzipSource(std::ifstream in, uint64_t file_size) : in_(std::move(in)), size_(file_size) {}
  ~GzipSource() override {
    if (initialized_) inflateEnd(&zs_);
  }
  GzipSource(const GzipSource&) = delete;
  GzipSource& operator=(const GzipSource&) = delete;

  Status Init() {
    zs_ = z_stream{};
    // 16 + MAX_WBITS: expect a gzip wrapper (header, CRC-32 and length trailer are checked).
    if (inflateInit2(&zs_, 16 + MAX_WBITS) != Z_OK) {
      return Status::ResourceExhausted("cannot initialise zlib");
    }
    initialized_ = true;
    return Status::Ok();
  }

  Status Read(uint8_t* dst, uint64_t n) override {
    while (n > 0) {
      // avail_out is 32-bit; feed huge reads in pieces.
      const uInt piece = static_cast<uInt>(std::min<uint64_t>(n, uint64_t{1} << 30));
      zs_.next_out = dst;
      zs_.avail_out = piece;
      while (zs_.avail_out > 0) {
        if (member_ended_) {
          FEDSLICE_RETURN_IF_ERROR(StartNextMember());
          if (member_ended_) {
            return Status::Corruption("truncated: the decompressed data ends after " +
                                      std::to_string(consumed_ + (piece - zs_.avail_out)) +
                                      " bytes, needs " + std::to_string(consumed_ + n));
          }
        }
        FEDSLICE_RETURN_IF_ERROR(Inflate());
      }
      consumed_ += piece;
      dst += piece;
      n -= piece;
    }
    return Status::Ok();
  }

  Status Finish() override {
    // Run the stream to its end: this verifies the CRC-32 and length trailers and catches
    // decompressed bytes beyond what the header declared. One byte of room suffices: any
    // output at all is an error.
    for (;;) {
      if (member_ended_) {
        FEDSLICE_RETURN_IF_ERROR(StartNextMember());
        if (member_ended_) return Status::Ok();
      }
      uint8_t extra;
      zs_.next_out = &extra;
      zs_.avail_out = 1;
      FEDSLICE_RETURN_IF_ERROR(Inflate());
      if (zs_.avail_out == 0) {
        return Status::Corruption("trailing bytes: the decompressed data is longer than the " +
                                  std::to_string(consumed_) + " bytes the header accounts for");
      }
    }
  }

  uint64_t MaxRemaining() const override {
    // Generous: every compressed byte at the maximum deflate ratio, plus slack for the
    // stored-block corner cases.
    return size_ * kMaxDeflateRatio + 1024;
  }

 private:
  Status Refill() {
    if (zs_.avail_in > 0 || eof_) return Status::Ok();
    in_.read(reinterpret_cast<char*>(buf_.data()), static_cast<std::streamsize>(buf_.size()));
    const std::streamsize got = in_.gcount();
    if (got <= 0) {
      if (in_.bad()) return Status::IoError("read failed: " + ErrnoText());
      eof_ = true;
      return Status::Ok();
    }
    zs_.next_in = buf_.data();
    zs_.avail_in = static_cast<uInt>(got);
    return Status::Ok();
  }

  // One inflate step into the current output window; sets member_ended_ at a member's end.
  Status Inflate() {
    FEDSLICE_RETURN_IF_ERROR(Refill());
    // Called even without input: zlib may still hold output from an earlier step.
    const int rc = inflate(&zs_, Z_NO_FLUSH);
    switch (rc) {
      case Z_OK:
        return Status::Ok();
      case Z_BUF_ERROR:  // No progress possible without more input.
        if (zs_.avail_in == 0 && eof_) {
          return Status::Corruption(
              "truncated gzip stream: the compressed data ends before the end-of-stream "
              "marker");
        }
        return Status::Ok();
      case Z_STREAM_END:
        member_ended_ = true;
        return Status::Ok();
      case Z_MEM_ERROR:
        return Status::ResourceExhausted("zlib out of memory");
      default:
        return Status::Corruption(
            std::string("corrupt gzip data: ") +
            (zs_.msg != nullptr ? zs_.msg : "inflate error " + std::to_string(rc)));
    }
  }

  // After a member ends, a gzip file may hold another member (RFC 1952); anything else is
  // garbage. Leaves member_ended_ set when the file is exhausted.
  Status StartNextMember() {
    FEDSLICE_RETURN_IF_ERROR(Refill());
    if (zs_.avail_in == 0 && eof_) return Status::Ok();
    // The next member's two magic bytes may straddle a refill boundary.
    if (zs_.avail_in < 2) {
      const uint8_t first = zs_.next_in[0];
      zs_.avail_in = 0;
      FEDSLICE_RETURN_IF_ERROR(Refill());
      if (first != 0x1f || zs_.avail_in == 0 || zs_.next_in[0] != 0x8b) {
        return Status::Corruption("trailing garbage after the gzip stream");
      }
      // Re-feed both magic bytes: inflate needs the whole member header.
      pending_[0] = 0x1f;
      std::memcpy(pending_.data() + 1, zs_.next_in, zs_.avail_in);
      zs_.next_in = pending_.data();
      zs_.avail_in += 1;
    } else if (zs_.next_in[0] != 0x1f || zs_.next_in[1] != 0x8b) {
      return Status::Corruption("trailing garbage after the gzip stream");
    }
    if (inflateReset(&zs_) != Z_OK) return Status::Internal("inflateReset failed");
    member_ended_ = false;
    return Status::Ok();
  }

  std::ifstream in_;
  uint64_t size_;
  z_stream zs_{};
  bool initialized_ = false;
  bool eof_ = false;
  bool member_ended_ = false;
  std::array<uint8_t, kChunkBytes> buf_{};
  std::array<uint8_t, kChunkBytes + 1> pending_{};
};

std::string_view TypeName(uint8_t code) {
  switch (code) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "int16";
    case 0x0C:
      return "int32";
    case 0x0D:
      return "float32";
    case 0x0E:
      return "float64";
    default:
      return "";
  }
}

Result<std::unique_ptr<ByteSource>> OpenSource(const fs::path& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return Status::NotFound("no such file");
  if (fs::is_directory(st)) return Status::InvalidArgument("is a directory, not an IDX file");
  const uint64_t size = fs::file_size(path, ec);
  if (ec) return Status::IoError("cannot get the file size: " + ec.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IoError("cannot open: " + ErrnoText());

  std::array<char, 2> magic{};
  in.read(magic.data(), 2);
  const bool gzip = in.gcount() == 2 && static_cast<uint8_t>(magic[0]) == 0x1f &&
                    static_cast<uint8_t>(magic[1]) == 0x8b;
  in.clear();
  in.seekg(0);
  if (!in) return Status::IoError("cannot rewind: " + ErrnoText());
  if (!gzip) return std::unique_ptr<ByteSource>(new RawSource(std::move(in), size));
  auto source = std::make_unique<GzipSource>(std::move(in), size);
  FEDSLICE_RETURN_IF_ERROR(source->Init());
  return std::unique_ptr<ByteSource>(std::move(source));
}

uint32_t BigEndian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

Result<IdxArray> ReadIdxFrom(ByteSource& src, uint64_t max_bytes) {
  std::array<uint8_t, 4> magic{};
  Status s = src.Read(magic.data(), magic.size());
  if (!s.ok()) return s.WithContext("reading the 4-byte magic number");
  const uint32_t magic_value = BigEndian32(magic.data());
  if (magic[0] != 0 || magic[1] != 0) {
    return Status::Corruption("bad magic " + Hex(magic_value, 8) +
                              ": not an IDX file (expected 0x0000 then type and rank bytes, "
                              "e.g. 0x00000803 for images)");
  }
  const uint8_t type = magic[2];
  const int rank = magic[3];
  if (type != 0x08) {
    const std::string_view name = TypeName(type);
    if (name.empty()) {
      return Status::Corruption("bad magic " + Hex(magic_value, 8) + ": unknown IDX type code " +
                                Hex(type, 2));
    }
    return Status::InvalidArgument("unsupported IDX type code " + Hex(type, 2) + " (" +
                                   std::string(name) + "); only 0x08 (unsigned byte) is supported");
  }
  if (rank == 0) return Status::Corruption("bad magic " + Hex(magic_value, 8) + ": rank 0");

  std::vector<uint8_t> dim_bytes(4 * static_cast<size_t>(rank));
  s = src.Read(dim_bytes.data(), dim_bytes.size());
  if (!s.ok()) {
    return s.WithContext("reading the header (" + std::to_string(rank) + " dimensions)");
  }
  IdxArray out;
  out.dims.resize(rank);
  // Saturating product: the dims of a corrupt header can overflow 64 bits.
  uint64_t total = 1;
  for (int d = 0; d < rank; ++d) {
    out.dims[d] = BigEndian32(dim_bytes.data() + 4 * d);
    if (out.dims[d] != 0 && total > UINT64_MAX / out.dims[d]) {
      total = UINT64_MAX;
    } else {
      total *= out.dims[d];
    }
  }
  if (std::find(out.dims.begin(), out.dims.end(), 0u) != out.dims.end()) total = 0;
  auto dims_text = [&] {
    std::string t;
    for (size_t d = 0; d < out.dims.size(); ++d) {
      if (d > 0) t += 'x';
      t += std::to_string(out.dims[d]);
    }
    return t;
  };
  // A header that promises more than the file can deliver is the likelier diagnosis (a
  // corrupt header or a cut file) than a legitimately huge data set, so it is checked first.
  if (total > src.MaxRemaining()) {
    return Status::Corruption("truncated or corrupt: header declares dimensions " + dims_text() +
                              " (" + (total == UINT64_MAX ? "over 2^64" : std::to_string(total)) +
                              " bytes) but the file can hold at most " +
                              std::to_string(src.MaxRemaining()) + " more");
  }
  if (total > max_bytes) {
    return Status::ResourceExhausted("header declares dimensions " + dims_text() + " (" +
                                     std::to_string(total) + " bytes), more than the " +
                                     std::to_string(max_bytes) + "-byte limit");
  }
  try {
    out.data.resize(total);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("cannot allocate " + std::to_string(total) + " bytes");
  }
  s = src.Read(out.data.data(), total);
  if (!s.ok()) return s.WithContext("data for dimensions " + dims_text());
  FEDSLICE_RETURN_IF_ERROR(src.Finish());
  return out;
}

}  // namespace

Result<IdxArray> ReadIdx(const fs::path& path, uint64_t max_bytes) {
  const std::string context = "IDX file " + path.string();
  auto source = OpenSource(path);
  if (!source.ok()) return source.status().WithContext(context);
  Result<IdxArray> out = ReadIdxFrom(**source, max_bytes);
  if (!out.ok()) return out.status().WithContext(context);
  return out;
}

Result<Dataset> LoadIdx(const fs::path& images, const fs::path& labels, int max_classes) {
  if (max_classes < 1 || max_classes > 256) {
    return Status::InvalidArgument("max_classes must be in [1, 256], got " +
                                   std::to_string(max_classes));
  }
  FEDSLICE_ASSIGN_OR_RETURN(IdxArray image_array, ReadIdx(images));
  FEDSLICE_ASSIGN_OR_RETURN(IdxArray label_array, ReadIdx(labels));
  if (image_array.dims.size() != 3) {
    return Status::InvalidArgument("IDX file " + images.string() +
                                   ": images need 3 dimensions (count, rows, cols), got " +
                                   std::to_string(image_array.dims.size()));
  }
  if (label_array.dims.size() != 1) {
    return Status::InvalidArgument("IDX file " + labels.string() +
                                   ": labels need 1 dimension (count), got " +
                                   std::to_string(label_array.dims.size()));
  }
  const uint32_t count = image_array.dims[0];
  const uint32_t rows = image_array.dims[1];
  const uint32_t cols = image_array.dims[2];
  if (count == 0) {
    return Status::InvalidArgument("IDX file " + images.string() + ": holds no images");
  }
  if (rows == 0 || cols == 0) {
    return Status::InvalidArgument("IDX file " + images.string() + ": empty image size " +
                                   std::to_string(rows) + "x" + std::to_string(cols));
  }
  if (label_array.dims[0] != count) {
    return Status::InvalidArgument("count mismatch: " + images.string() + " holds " +
                                   std::to_string(count) + " images but " + labels.string() +
                                   " holds " + std::to_string(label_array.dims[0]) + " labels");
  }
  int max_label = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const int label = label_array.data[i];
    if (label >= max_classes) {
      return Status::InvalidArgument("IDX file " + labels.string() + ": label " +
                                     std::to_string(label) + " of sample " + std::to_string(i) +
                                     " is out of range [0, " + std::to_string(max_classes) + ")");
    }
    max_label = std::max(max_label, label);
  }

  Dataset out;
  out.sample_shape = {1, static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
  out.num_classes = std::max(std::min(10, max_classes), max_label + 1);
  // A table keeps the conversion exactly byte / 255.0f while avoiding a division per pixel.
  std::array<float, 256> scale{};
  for (int b = 0; b < 256; ++b) scale[b] = static_cast<float>(b) / 255.0f;
  try {
    out.features.resize(image_array.data.size());
    out.labels.resize(count);
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("cannot allocate " + std::to_string(image_array.data.size()) +
                                     " floats for " + images.string());
  }
  std::transform(image_array.data.begin(), image_array.data.end(), out.features.begin(),
                 [&](uint8_t b) { return scale[b]; });
  std::copy(label_array.data.begin(), label_array.data.end(), out.labels.begin());
  return out;
}

Result<Dataset> LoadMnist(const fs::path& dir, Split split) {
  // The raw file wins over its .gz sibling: a user who unpacked the files meant those.
  auto find = [&](const std::string& name) -> std::optional<fs::path> {
    std::error_code ec;
    const fs::path raw = dir / name;
    if (fs::exists(raw, ec)) return raw;
    const fs::path gz = dir / (name + ".gz");
    if (fs::exists(gz, ec)) return gz;
    return std::nullopt;
  };
  // "t10k" is the original MNIST distribution's name for the test split.
  const std::vector<std::string> prefixes = split == Split::kTrain
                                                ? std::vector<std::string>{"train"}
                                                : std::vector<std::string>{"test", "t10k"};
  for (const std::string& prefix : prefixes) {
    const std::optional<fs::path> images = find(prefix + "-images-idx3-ubyte");
    if (!images) continue;
    const std::string label_name = prefix + "-labels-idx1-ubyte";
    const std::optional<fs::path> labels = find(label_name);
    if (!labels) {
      return Status::NotFound("MNIST directory " + dir.string() + " has " +
                              images->filename().string() + " but no " + label_name +
                              "[.gz]; run scripts/fetch_mnist.sh to fetch MNIST-10k");
    }
    return LoadIdx(*images, *labels, /*max_classes=*/10);
  }
  return Status::NotFound("MNIST directory " + dir.string() + " has no " + prefixes[0] +
                          "-images-idx3-ubyte[.gz]; run scripts/fetch_mnist.sh to fetch "
                          "MNIST-10k");
}

}  // namespace fedslice::data
