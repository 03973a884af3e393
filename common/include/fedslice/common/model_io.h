// Model files: a model's spec and weights in one Protobuf message (proto::ModelFile), with a
// crc32 over the weights. Files are written atomically (temporary file + rename), so a
// crash never leaves a half-written model under the target name.
//
// Every error names the file and the problem: empty or truncated file, not a model file,
// unsupported format_version, a spec that does not validate, param_count disagreeing with
// the spec or with the number of weights stored, crc mismatch, non-finite weights.
// Thread-safety: the functions share no state; concurrent writes to one path are last-wins.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "fedslice/common/model.h"
#include "fedslice/common/status.h"
#include "fedslice/model.pb.h"

namespace fedslice {

inline constexpr uint32_t kModelFormatVersion = 1;

using Metadata = std::map<std::string, std::string>;

// zlib crc32 of the little-endian float32 bytes of `weights` (the ModelFile checksum).
uint32_t WeightsCrc32(std::span<const float> weights);

// The ModelFile message for `model` (current format version, weights and their crc).
proto::ModelFile ToModelFile(const Model& model, const Metadata& metadata = {});

// Checks `file` (version, spec, param_count, weights count, crc, finiteness) and builds the
// model it describes. `source` names where it came from, for error messages.
Result<Model> FromModelFile(const proto::ModelFile& file, std::string_view source = "model file");

// Serialises `file` to `path` atomically. The parent directory must exist.
Status WriteModelFile(const proto::ModelFile& file, const std::filesystem::path& path);

// Reads and parses `path`, checking only that it is a ModelFile of a supported version;
// FromModelFile does the rest.
Result<proto::ModelFile> ReadModelFile(const std::filesystem::path& path);

// ToModelFile + WriteModelFile.
Status SaveModel(const Model& model, const std::filesystem::path& path,
                 const Metadata& metadata = {});

// ReadModelFile + FromModelFile.
Result<Model> LoadModel(const std::filesystem::path& path);

}  // namespace fedslice
