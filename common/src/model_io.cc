#include "fedslice/common/model_io.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

namespace fedslice {
namespace {

std::string Quoted(const std::filesystem::path& path) {
  // Appended piecewise: GCC 12 warns falsely (-Wrestrict) on "'" + string + "'".
  std::string s = "'";
  s += path.string();
  s += '\'';
  return s;
}

Status Errno(std::string_view what, const std::filesystem::path& path) {
  return Status::IoError(std::string(what) + " " + Quoted(path) + ": " + std::strerror(errno));
}

// Writes all of `bytes` to fd, retrying on short writes and EINTR.
bool WriteAll(int fd, const char* bytes, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, bytes, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    bytes += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

uint32_t WeightsCrc32(std::span<const float> weights) {
  uLong crc = crc32(0L, Z_NULL, 0);
  if constexpr (std::endian::native == std::endian::little) {
    const auto* bytes = reinterpret_cast<const Bytef*>(weights.data());
    size_t left = weights.size_bytes();
    // zlib takes a uInt length; feed it in chunks.
    while (left > 0) {
      const auto chunk = static_cast<uInt>(std::min<size_t>(left, size_t{1} << 30));
      crc = crc32(crc, bytes, chunk);
      bytes += chunk;
      left -= chunk;
    }
  } else {
    for (float w : weights) {
      uint32_t u = std::bit_cast<uint32_t>(w);
      const Bytef le[4] = {static_cast<Bytef>(u), static_cast<Bytef>(u >> 8),
                           static_cast<Bytef>(u >> 16), static_cast<Bytef>(u >> 24)};
      crc = crc32(crc, le, 4);
    }
  }
  return static_cast<uint32_t>(crc);
}

proto::ModelFile ToModelFile(const Model& model, const Metadata& metadata) {
  proto::ModelFile file;
  file.set_format_version(kModelFormatVersion);
  *file.mutable_spec() = model.spec();
  file.set_param_count(static_cast<uint64_t>(model.param_count()));
  const std::span<const float> w = model.params();
  file.mutable_weights()->Reserve(static_cast<int>(w.size()));
  file.mutable_weights()->Add(w.begin(), w.end());
  file.set_weights_crc32(WeightsCrc32(w));
  for (const auto& [k, v] : metadata) (*file.mutable_metadata())[k] = v;
  return file;
}

Result<Model> FromModelFile(const proto::ModelFile& file, std::string_view source) {
  const std::string where(source);
  if (file.format_version() != kModelFormatVersion) {
    return Status::InvalidArgument(where + ": unsupported format_version " +
                                   std::to_string(file.format_version()) + " (this build reads " +
                                   std::to_string(kModelFormatVersion) + ")");
  }
  if (!file.has_spec()) return Status::Corruption(where + ": no model spec");
  Result<Model> model = Model::Create(file.spec());
  if (!model.ok()) return model.status().WithContext(where);
  const auto expected = static_cast<uint64_t>(model->param_count());
  if (file.param_count() != expected) {
    return Status::Corruption(where + ": param_count is " + std::to_string(file.param_count()) +
                              " but the spec has " + std::to_string(expected) + " parameters");
  }
  if (static_cast<uint64_t>(file.weights_size()) != expected) {
    return Status::Corruption(where + ": holds " + std::to_string(file.weights_size()) +
                              " weights but param_count is " + std::to_string(expected) +
                              " (truncated?)");
  }
  const std::span<const float> w(file.weights().data(), static_cast<size_t>(file.weights_size()));
  const uint32_t crc = WeightsCrc32(w);
  if (crc != file.weights_crc32()) {
    return Status::Corruption(where + ": weights checksum mismatch (crc32 " +
                              std::to_string(crc) + ", file says " +
                              std::to_string(file.weights_crc32()) + "): file is corrupted");
  }
  for (size_t i = 0; i < w.size(); ++i) {
    if (!std::isfinite(w[i])) {
      return Status::Corruption(where + ": weight " + std::to_string(i) + " is not finite");
    }
  }
  FEDSLICE_RETURN_IF_ERROR(model->SetParams(w));
  return model;
}

Status WriteModelFile(const proto::ModelFile& file, const std::filesystem::path& path) {
  std::string bytes;
  try {
    if (!file.SerializeToString(&bytes)) {
      return Status::Internal("could not serialise the model for " + Quoted(path));
    }
  } catch (const std::exception& e) {
    return Status::ResourceExhausted("serialising the model for " + Quoted(path) + ": " +
                                     e.what());
  }
  // A unique temporary name in the target directory, so that rename() is atomic.
  std::random_device rd;
  std::filesystem::path tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(rd());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  const bool written = WriteAll(fd, bytes.data(), bytes.size()) && ::fsync(fd) == 0;
  const int saved_errno = errno;
  ::close(fd);
  if (!written) {
    ::unlink(tmp.c_str());
    errno = saved_errno;
    return Errno("cannot write", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const Status s = Errno("cannot rename the temporary file to", path);
    ::unlink(tmp.c_str());
    return s;
  }
  return Status::Ok();
}

Result<proto::ModelFile> ReadModelFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return std::filesystem::exists(path) ? Errno("cannot open model file", path)
                                         : Status::NotFound("model file " + Quoted(path) +
                                                            " does not exist");
  }
  std::string bytes;
  try {
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) return Errno("cannot read model file", path);
    bytes = std::move(ss).str();
  } catch (const std::exception& e) {
    return Status::IoError("reading model file " + Quoted(path) + ": " + e.what());
  }
  const std::string where = "model file " + Quoted(path);
  if (bytes.empty()) return Status::Corruption(where + " is empty");
  proto::ModelFile file;
  if (!file.ParseFromString(bytes)) {
    return Status::Corruption(where + " is not a valid model file (truncated, or not a "
                              "FedSlice model at all)");
  }
  if (file.format_version() == 0 && !file.has_spec()) {
    return Status::Corruption(where + " is not a FedSlice model file (no format version or spec)");
  }
  if (file.format_version() != kModelFormatVersion) {
    return Status::InvalidArgument(where + " has unsupported format_version " +
                                   std::to_string(file.format_version()) + " (this build reads " +
                                   std::to_string(kModelFormatVersion) + ")");
  }
  return file;
}

Status SaveModel(const Model& model, const std::filesystem::path& path, const Metadata& metadata) {
  return WriteModelFile(ToModelFile(model, metadata), path);
}

Result<Model> LoadModel(const std::filesystem::path& path) {
  FEDSLICE_ASSIGN_OR_RETURN(proto::ModelFile file, ReadModelFile(path));
  return FromModelFile(file, "model file " + Quoted(path));
}

}  // namespace fedslice
