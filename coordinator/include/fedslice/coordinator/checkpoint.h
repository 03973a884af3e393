// Checkpoints: the coordinator's whole state after a round (proto::Checkpoint), one file per
// round in a directory, so that a coordinator killed at any moment resumes at the next round.
//
// File format (all integers little-endian):
//
//   +----------+-------------------+------------------------+---------------------------+
//   | magic    | payload length n  | SHA-256 of the payload | payload: proto::Checkpoint |
//   | 8 bytes  | uint64            | 32 bytes               | n bytes                   |
//   +----------+-------------------+------------------------+---------------------------+
//   magic = "FSCKPT01"
//
// Protobuf alone would accept many truncated or bit-flipped payloads as valid messages, so
// the length and digest decide whether a file is intact before it is parsed.
//
// Files are named round-<round, 9+ digits>.ckpt and written atomically (temporary file,
// fsync, rename, fsync of the directory). The newest `keep` (default 2) are kept, so when
// the newest one is unreadable LoadLatest falls back to the one before, with a warning.
//
// Thread-safety: the functions share no state; one process writes a directory at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "fedslice/common/status.h"
#include "fedslice/coordinator.pb.h"
#include "fedslice/coordinator/strategy.h"
#include "fedslice/model.pb.h"

namespace fedslice::coordinator {

inline constexpr uint32_t kCheckpointFormatVersion = 1;

// What a checkpoint must agree with to be resumed: e.g. {"strategy": "fedadam:lr=0.01,...",
// "codec": "fp32", "fraction": "0.1", "min_fit": "2", "seed": "42"}. The model spec is
// compared separately (CheckResume), so it need not be in here.
using RunConfig = std::map<std::string, std::string>;

// A checkpoint message for the state after `round`: `model` (e.g. fedslice::ToModelFile of
// the global model), the strategy's SaveState(), `run_config` and the run's root `seed`.
proto::Checkpoint MakeCheckpoint(uint64_t round, proto::ModelFile model, const Strategy& strategy,
                                 const RunConfig& run_config, uint64_t seed);

// Structural checks of a decoded checkpoint: format version, param_count agreeing with the
// stored weights and with the strategy state, finite weights. (The ModelFile's spec and crc
// are checked by fedslice::FromModelFile when the model is rebuilt.)
Status ValidateCheckpoint(const proto::Checkpoint& checkpoint);

// Refuses to resume `checkpoint` in a run with another model spec or run configuration:
// FailedPrecondition naming every difference ("strategy: 'fedavg' in the checkpoint,
// 'fedadam:...' now") and advising a fresh checkpoint directory.
Status CheckResume(const proto::Checkpoint& checkpoint, const proto::ModelSpec& spec,
                   const RunConfig& run_config);

// Encodes / decodes the file format above. DecodeCheckpointFile returns Corruption for a
// wrong magic, a length that disagrees with the file size, a digest mismatch, a payload that
// does not parse, or a checkpoint that fails ValidateCheckpoint.
// EncodeCheckpointFile fails (InvalidArgument) only for a message over protobuf's 2 GiB limit.
Result<std::string> EncodeCheckpointFile(const proto::Checkpoint& checkpoint);
Result<proto::Checkpoint> DecodeCheckpointFile(std::string_view bytes);

class CheckpointStore {
 public:
  // Uses `dir`, creating it (and its parents) if needed, and removes temporary files a
  // crashed writer left behind. keep >= 1 is how many checkpoint files Save retains.
  static Result<CheckpointStore> Open(std::filesystem::path dir, size_t keep = 2);

  // Writes `checkpoint` as round-<round>.ckpt atomically, then deletes files of later rounds
  // (left over from the run before a resume, which re-runs those rounds) and all but the
  // newest `keep`. InvalidArgument if ValidateCheckpoint fails; IoError if it cannot be made
  // durable, in which case the previous checkpoints are untouched.
  Status Save(const proto::Checkpoint& checkpoint) const;

  // The newest intact checkpoint, or nullopt if the directory holds none. An unreadable or
  // corrupt file is skipped with a logged warning and the next older one is tried;
  // Corruption, listing every file's problem, if files exist but none is usable.
  Result<std::optional<proto::Checkpoint>> LoadLatest() const;

  const std::filesystem::path& dir() const { return dir_; }

  // "round-000000012.ckpt"
  static std::string FileName(uint64_t round);

 private:
  CheckpointStore(std::filesystem::path dir, size_t keep) : dir_(std::move(dir)), keep_(keep) {}

  std::filesystem::path dir_;
  size_t keep_;
};

// CheckpointStore::LoadLatest on `dir` without creating it: nullopt if `dir` does not exist.
Result<std::optional<proto::Checkpoint>> LoadLatestCheckpoint(const std::filesystem::path& dir);

}  // namespace fedslice::coordinator
