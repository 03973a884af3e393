// proto::EncodedTensor helpers: structural validation shared by every codec, and the "fp32"
// codec (little-endian IEEE-754 float32, 4 bytes per value, no header).
//
// A received tensor is untrusted: its num_values is compared with what the receiver expects
// (the model spec, or at least a bound) BEFORE anything is allocated, its payload length must
// match exactly, and decoded values must be finite. Lossy codecs (codec issue) build on
// ValidateEncodedTensor and follow the same rules.
//
// All functions are thread-safe and never throw.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::net {

inline constexpr std::string_view kCodecFp32 = "fp32";
// Upper bound on num_values accepted from the wire by default: 256 Mi values (1 GiB as
// fp32), far above any model FedSlice trains, far below what would exhaust memory silently.
inline constexpr uint64_t kMaxTensorValues = uint64_t{1} << 28;

// Checks what every codec has in common: codec name non-empty and short, num_values <=
// max_values, shape (when given) with non-negative dims whose product is num_values, and for
// "fp32" payload.size() == 4 * num_values. Does not look at the values.
// Errors: kInvalidArgument with a message naming the offending field.
Status ValidateEncodedTensor(const proto::EncodedTensor& tensor,
                             uint64_t max_values = kMaxTensorValues);

// Encodes `values` as "fp32" into `*out` (previous contents replaced; the payload buffer's
// capacity is reused). Shape is left empty. Fails with kInvalidArgument on a non-finite value
// (index named) so that a NaN is caught at its source, not at the receiver.
Status EncodeFp32(std::span<const float> values, proto::EncodedTensor* out);

// Decodes an "fp32" tensor into `out`, whose size must equal tensor.num_values (the caller
// states what it expects, so nothing is allocated on the peer's word).
// Errors: kInvalidArgument (codec not fp32, size mismatch with `out`, payload length wrong,
// non-finite value; `out` may then hold partial data).
Status DecodeFp32(const proto::EncodedTensor& tensor, std::span<float> out);

// As above into a new vector; num_values is checked against `max_values` before allocating.
Result<std::vector<float>> DecodeFp32(const proto::EncodedTensor& tensor,
                                      uint64_t max_values = kMaxTensorValues);

// Index of the first non-finite value, or values.size() if all are finite.
size_t FindNonFinite(std::span<const float> values);

}  // namespace fedslice::net
