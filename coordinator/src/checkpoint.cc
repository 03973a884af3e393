#include "fedslice/coordinator/checkpoint.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <openssl/evp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <system_error>
#include <utility>
#include <vector>

#include "file_util.h"

namespace fedslice::coordinator {
namespace {

constexpr char kMagic[8] = {'F', 'S', 'C', 'K', 'P', 'T', '0', '1'};
constexpr size_t kDigestSize = 32;
constexpr size_t kHeaderSize = sizeof(kMagic) + 8 + kDigestSize;
constexpr std::string_view kPrefix = "round-";
constexpr std::string_view kSuffix = ".ckpt";
constexpr std::string_view kTmpSuffix = ".ckpt.tmp";

using Digest = std::array<unsigned char, kDigestSize>;

Digest Sha256(std::string_view data) {
  Digest out{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr);
  return out;
}

void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t GetU64(std::string_view in) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(in[i]);
  return v;
}

// Round number of a checkpoint file name, or nullopt for any other file.
std::optional<uint64_t> RoundOfFileName(std::string_view name) {
  if (name.size() <= kPrefix.size() + kSuffix.size() || name.substr(0, kPrefix.size()) != kPrefix ||
      name.substr(name.size() - kSuffix.size()) != kSuffix) {
    return std::nullopt;
  }
  const std::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  uint64_t round = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), round);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return round;
}

struct CheckpointFile {
  uint64_t round;
  std::filesystem::path path;
};

// Checkpoint files in `dir`, newest round first.
Result<std::vector<CheckpointFile>> ListCheckpoints(const std::filesystem::path& dir) {
  std::vector<CheckpointFile> files;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (auto round = RoundOfFileName(it->path().filename().string())) {
      files.push_back({*round, it->path()});
    }
  }
  if (ec)
    return Status::IoError("listing checkpoint directory " + dir.string() + ": " + ec.message());
  std::sort(files.begin(), files.end(),
            [](const CheckpointFile& a, const CheckpointFile& b) { return a.round > b.round; });
  return files;
}

std::string DescribeSpec(const proto::ModelSpec& spec) {
  return "'" + spec.name() + "' (" + std::to_string(spec.layers_size()) + " layers)";
}

Result<std::optional<proto::Checkpoint>> LoadLatestIn(const std::filesystem::path& dir) {
  FEDSLICE_ASSIGN_OR_RETURN(std::vector<CheckpointFile> files, ListCheckpoints(dir));
  std::string problems;
  for (const CheckpointFile& file : files) {
    Status problem;
    Result<std::string> bytes = internal::ReadWholeFile(file.path);
    if (!bytes.ok()) {
      problem = bytes.status();
    } else {
      Result<proto::Checkpoint> checkpoint = DecodeCheckpointFile(*bytes);
      if (!checkpoint.ok()) {
        problem = checkpoint.status();
      } else if (checkpoint->round() != file.round) {
        problem = Status::Corruption("holds round " + std::to_string(checkpoint->round()) +
                                     ", its name says round " + std::to_string(file.round));
      } else {
        if (!problems.empty()) {
          spdlog::warn("checkpoint: resuming from the older {} (round {}) instead",
                       file.path.string(), file.round);
        }
        return std::optional<proto::Checkpoint>(std::move(checkpoint).value());
      }
    }
    spdlog::warn("checkpoint: {} is unusable: {}", file.path.string(), problem.ToString());
    if (!problems.empty()) problems += "; ";
    problems += file.path.filename().string() + ": " + problem.message();
  }
  if (!problems.empty()) {
    return Status::Corruption("no usable checkpoint in " + dir.string() + " (" + problems +
                              "); move the directory away to start a fresh run");
  }
  return std::optional<proto::Checkpoint>();
}

}  // namespace

proto::Checkpoint MakeCheckpoint(uint64_t round, proto::ModelFile model, const Strategy& strategy,
                                 const RunConfig& run_config, uint64_t seed) {
  proto::Checkpoint c;
  c.set_format_version(kCheckpointFormatVersion);
  c.set_round(round);
  *c.mutable_model() = std::move(model);
  *c.mutable_strategy_state() = strategy.SaveState();
  for (const auto& [key, value] : run_config) (*c.mutable_run_config())[key] = value;
  c.set_seed(seed);
  c.set_created_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count());
  return c;
}

Status ValidateCheckpoint(const proto::Checkpoint& c) {
  if (c.format_version() != kCheckpointFormatVersion) {
    return Status::InvalidArgument("unsupported checkpoint format_version " +
                                   std::to_string(c.format_version()) + " (this build reads " +
                                   std::to_string(kCheckpointFormatVersion) + ")");
  }
  if (!c.has_model()) return Status::InvalidArgument("checkpoint holds no model");
  const proto::ModelFile& model = c.model();
  if (model.param_count() == 0 ||
      model.param_count() != static_cast<uint64_t>(model.weights_size())) {
    return Status::InvalidArgument("checkpoint model declares " +
                                   std::to_string(model.param_count()) + " parameters but holds " +
                                   std::to_string(model.weights_size()) + " weights");
  }
  for (int i = 0; i < model.weights_size(); ++i) {
    if (!std::isfinite(model.weights(i))) {
      return Status::InvalidArgument("checkpoint model weight " + std::to_string(i) +
                                     " is not finite");
    }
  }
  const proto::StrategyState& state = c.strategy_state();
  if (state.kind().empty()) return Status::InvalidArgument("checkpoint holds no strategy state");
  if (state.num_params() != model.param_count()) {
    return Status::InvalidArgument(
        "checkpoint strategy state is for " + std::to_string(state.num_params()) +
        " parameters, the model has " + std::to_string(model.param_count()));
  }
  return Status::Ok();
}

Status CheckResume(const proto::Checkpoint& checkpoint, const proto::ModelSpec& spec,
                   const RunConfig& run_config) {
  std::vector<std::string> differences;
  std::string saved_spec;
  std::string current_spec;
  {
    google::protobuf::io::StringOutputStream a(&saved_spec);
    google::protobuf::io::CodedOutputStream ca(&a);
    ca.SetSerializationDeterministic(true);
    checkpoint.model().spec().SerializeToCodedStream(&ca);
  }
  {
    google::protobuf::io::StringOutputStream b(&current_spec);
    google::protobuf::io::CodedOutputStream cb(&b);
    cb.SetSerializationDeterministic(true);
    spec.SerializeToCodedStream(&cb);
  }
  if (saved_spec != current_spec) {
    differences.push_back("model: " + DescribeSpec(checkpoint.model().spec()) +
                          " in the checkpoint, " + DescribeSpec(spec) + " now" +
                          (checkpoint.model().spec().name() == spec.name()
                               ? " (same name, different layers, shapes or init seed)"
                               : ""));
  }
  const auto& saved = checkpoint.run_config();
  for (const auto& [key, value] : run_config) {
    auto it = saved.find(key);
    if (it == saved.end()) {
      differences.push_back(key + ": not set in the checkpoint, '" + value + "' now");
    } else if (it->second != value) {
      differences.push_back(key + ": '" + it->second + "' in the checkpoint, '" + value + "' now");
    }
  }
  std::vector<std::string> missing;
  for (const auto& [key, value] : saved) {
    if (run_config.find(key) == run_config.end()) {
      missing.push_back(key + ": '" + value + "' in the checkpoint, not set now");
    }
  }
  std::sort(missing.begin(), missing.end());  // map iteration order is unspecified
  differences.insert(differences.end(), missing.begin(), missing.end());
  if (differences.empty()) return Status::Ok();
  std::string message = "the checkpoint (round " + std::to_string(checkpoint.round()) +
                        ") was written by a run with different settings: ";
  for (size_t i = 0; i < differences.size(); ++i) {
    if (i > 0) message += "; ";
    message += differences[i];
  }
  message += ". Resume with the same settings, or use a new checkpoint directory";
  return Status::FailedPrecondition(message);
}

Result<std::string> EncodeCheckpointFile(const proto::Checkpoint& checkpoint) {
  const size_t size = checkpoint.ByteSizeLong();
  if (size > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return Status::InvalidArgument("checkpoint of " + std::to_string(size) +
                                   " bytes exceeds protobuf's 2 GiB message limit");
  }
  std::string payload;
  {
    google::protobuf::io::StringOutputStream stream(&payload);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);  // same state, same bytes
    checkpoint.SerializeWithCachedSizes(&coded);
    if (coded.HadError()) return Status::Internal("serialising the checkpoint failed");
  }
  std::string out;
  out.reserve(kHeaderSize + payload.size());
  out.append(kMagic, sizeof(kMagic));
  PutU64(out, payload.size());
  const Digest digest = Sha256(payload);
  out.append(reinterpret_cast<const char*>(digest.data()), digest.size());
  out += payload;
  return out;
}

Result<proto::Checkpoint> DecodeCheckpointFile(std::string_view bytes) {
  if (bytes.size() < kHeaderSize) {
    return Status::Corruption("truncated: " + std::to_string(bytes.size()) +
                              " bytes, shorter than the " + std::to_string(kHeaderSize) +
                              "-byte header");
  }
  if (std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return Status::Corruption("not a FedSlice checkpoint (bad magic)");
  }
  const uint64_t length = GetU64(bytes.substr(sizeof(kMagic), 8));
  const std::string_view payload = bytes.substr(kHeaderSize);
  if (length != payload.size()) {
    return Status::Corruption("the header announces " + std::to_string(length) +
                              " payload bytes, the file holds " + std::to_string(payload.size()) +
                              (payload.size() < length ? " (truncated)" : ""));
  }
  const Digest digest = Sha256(payload);
  if (std::memcmp(digest.data(), bytes.data() + sizeof(kMagic) + 8, kDigestSize) != 0) {
    return Status::Corruption("SHA-256 mismatch: the content is damaged");
  }
  proto::Checkpoint checkpoint;
  if (payload.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      !checkpoint.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    return Status::Corruption("the payload is not a Checkpoint message");
  }
  Status valid = ValidateCheckpoint(checkpoint);
  if (!valid.ok()) return Status::Corruption(valid.message());
  return checkpoint;
}

Result<CheckpointStore> CheckpointStore::Open(std::filesystem::path dir, size_t keep) {
  if (keep == 0) return Status::InvalidArgument("a checkpoint store must keep at least 1 file");
  if (dir.empty()) return Status::InvalidArgument("checkpoint directory path is empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir, ec)) {
    return Status::IoError("cannot use " + dir.string() + " as checkpoint directory" +
                           (ec ? ": " + ec.message() : ": not a directory"));
  }
  // A writer killed between creating and renaming its temporary file leaves it behind.
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > kTmpSuffix.size() &&
        name.compare(name.size() - kTmpSuffix.size(), kTmpSuffix.size(), kTmpSuffix) == 0) {
      std::error_code rm;
      std::filesystem::remove(it->path(), rm);
    }
  }
  if (ec)
    return Status::IoError("listing checkpoint directory " + dir.string() + ": " + ec.message());
  return CheckpointStore(std::move(dir), keep);
}

std::string CheckpointStore::FileName(uint64_t round) {
  std::string digits = std::to_string(round);
  if (digits.size() < 9) digits.insert(0, 9 - digits.size(), '0');
  return std::string(kPrefix) + digits + std::string(kSuffix);
}

Status CheckpointStore::Save(const proto::Checkpoint& checkpoint) const {
  FEDSLICE_RETURN_IF_ERROR(ValidateCheckpoint(checkpoint).WithContext("refusing to save"));
  FEDSLICE_ASSIGN_OR_RETURN(const std::string bytes, EncodeCheckpointFile(checkpoint));
  const std::filesystem::path path = dir_ / FileName(checkpoint.round());
  FEDSLICE_RETURN_IF_ERROR(internal::AtomicWriteFile(path, bytes));

  // The new checkpoint is durable; pruning is best effort.
  Result<std::vector<CheckpointFile>> files = ListCheckpoints(dir_);
  if (!files.ok()) {
    spdlog::warn("checkpoint: not pruning old files: {}", files.status().ToString());
    return Status::Ok();
  }
  size_t kept = 0;
  bool removed = false;
  for (const CheckpointFile& file : *files) {
    // Later rounds belong to the timeline before a resume and would shadow this one.
    const bool stale = file.round > checkpoint.round();
    if (!stale && kept < keep_) {
      ++kept;
      continue;
    }
    std::error_code ec;
    std::filesystem::remove(file.path, ec);
    if (ec) {
      spdlog::warn("checkpoint: cannot remove {}: {}", file.path.string(), ec.message());
    } else {
      removed = true;
    }
  }
  if (removed) {
    Status synced = internal::SyncDirectory(dir_);
    if (!synced.ok()) spdlog::warn("checkpoint: {}", synced.ToString());
  }
  return Status::Ok();
}

Result<std::optional<proto::Checkpoint>> CheckpointStore::LoadLatest() const {
  return LoadLatestIn(dir_);
}

Result<std::optional<proto::Checkpoint>> LoadLatestCheckpoint(const std::filesystem::path& dir) {
  std::error_code ec;
  const bool exists = std::filesystem::exists(dir, ec);
  if (ec) return Status::IoError("checking " + dir.string() + ": " + ec.message());
  if (!exists) return std::optional<proto::Checkpoint>();
  if (!std::filesystem::is_directory(dir, ec)) {
    return Status::InvalidArgument(dir.string() + " is not a directory");
  }
  return LoadLatestIn(dir);
}

}  // namespace fedslice::coordinator
