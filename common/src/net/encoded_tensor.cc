#include "fedslice/common/net/encoded_tensor.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <exception>
#include <limits>
#include <string>

namespace fedslice::net {
namespace {

// Largest codec name accepted ("topk:0.01", "qsgd:16", ...).
constexpr size_t kMaxCodecNameBytes = 64;

static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559,
              "the fp32 codec needs IEEE-754 binary32 floats");

// Used only on big-endian hosts (if constexpr below); clang warns it is unused elsewhere.
[[maybe_unused]] uint32_t ByteSwap(uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0x0000ff00u) | ((v << 8) & 0x00ff0000u) | (v << 24);
}

}  // namespace

size_t FindNonFinite(std::span<const float> values) {
  // Exponent bits all ones = Inf or NaN. Testing the bits keeps the test correct even if a
  // build enables -ffinite-math-only. Chunks are tested without an early exit, so that the
  // compiler vectorises the loop (activations of megabytes cross every pipeline hop: the
  // scalar loop with a branch per value was ~6% of a hop), and only a flagged chunk is
  // searched for the first bad index.
  constexpr size_t kChunk = 256;
  const size_t n = values.size();
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t end = std::min(n, begin + kChunk);
    uint32_t flagged = 0;
    for (size_t i = begin; i < end; ++i) {
      const uint32_t bits = std::bit_cast<uint32_t>(values[i]);
      flagged |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (flagged != 0) {
      for (size_t i = begin; i < end; ++i) {
        if ((std::bit_cast<uint32_t>(values[i]) & 0x7f800000u) == 0x7f800000u) return i;
      }
    }
  }
  return n;
}

Status ValidateEncodedTensor(const proto::EncodedTensor& tensor, uint64_t max_values) {
  if (tensor.codec().empty()) return Status::InvalidArgument("encoded tensor has no codec name");
  if (tensor.codec().size() > kMaxCodecNameBytes) {
    return Status::InvalidArgument("encoded tensor codec name is " +
                                   std::to_string(tensor.codec().size()) + " bytes long");
  }
  if (tensor.num_values() > max_values) {
    return Status::InvalidArgument("encoded tensor claims " + std::to_string(tensor.num_values()) +
                                   " values, limit " + std::to_string(max_values));
  }
  if (tensor.shape_size() > 0) {
    bool has_zero = false;
    for (int64_t d : tensor.shape()) {
      if (d < 0) return Status::InvalidArgument("encoded tensor shape has a negative dimension");
      has_zero = has_zero || d == 0;
    }
    // Multiply only while the product cannot pass num_values, so nothing overflows.
    uint64_t product = has_zero ? 0 : 1;
    for (int64_t d : tensor.shape()) {
      if (has_zero) break;
      if (product > tensor.num_values() / static_cast<uint64_t>(d)) {
        return Status::InvalidArgument("encoded tensor shape has more elements than num_values " +
                                       std::to_string(tensor.num_values()));
      }
      product *= static_cast<uint64_t>(d);
    }
    if (product != tensor.num_values()) {
      return Status::InvalidArgument("encoded tensor shape has " + std::to_string(product) +
                                     " elements, num_values is " +
                                     std::to_string(tensor.num_values()));
    }
  }
  if (tensor.codec() == kCodecFp32 && tensor.payload().size() != 4 * tensor.num_values()) {
    return Status::InvalidArgument("fp32 tensor of " + std::to_string(tensor.num_values()) +
                                   " values needs " + std::to_string(4 * tensor.num_values()) +
                                   " payload bytes, has " +
                                   std::to_string(tensor.payload().size()));
  }
  return Status::Ok();
}

Status EncodeFp32(std::span<const float> values, proto::EncodedTensor* out) {
  if (const size_t bad = FindNonFinite(values); bad != values.size()) {
    return Status::InvalidArgument("cannot encode a non-finite value (" +
                                   std::to_string(values[bad]) + " at index " +
                                   std::to_string(bad) + ")");
  }
  out->Clear();
  out->set_codec(std::string(kCodecFp32));
  out->set_num_values(values.size());
  std::string* payload = out->mutable_payload();
  if constexpr (std::endian::native == std::endian::little) {
    // assign, not resize + memcpy: one pass over the megabytes instead of two (resize zeroes).
    try {
      payload->assign(reinterpret_cast<const char*>(values.data()), values.size_bytes());
    } catch (const std::exception& e) {
      return Status::ResourceExhausted(std::string("allocating an fp32 payload: ") + e.what());
    }
  } else {
    try {
      payload->resize(values.size() * sizeof(float));
    } catch (const std::exception& e) {
      return Status::ResourceExhausted(std::string("allocating an fp32 payload: ") + e.what());
    }
    for (size_t i = 0; i < values.size(); ++i) {
      const uint32_t le = ByteSwap(std::bit_cast<uint32_t>(values[i]));
      std::memcpy(payload->data() + 4 * i, &le, 4);
    }
  }
  return Status::Ok();
}

Status DecodeFp32(const proto::EncodedTensor& tensor, std::span<float> out) {
  if (tensor.codec() != kCodecFp32) {
    return Status::InvalidArgument("expected an fp32 tensor, got codec \"" +
                                   tensor.codec().substr(0, kMaxCodecNameBytes) + "\"");
  }
  if (tensor.num_values() != out.size()) {
    return Status::InvalidArgument("fp32 tensor has " + std::to_string(tensor.num_values()) +
                                   " values, expected " + std::to_string(out.size()));
  }
  FEDSLICE_RETURN_IF_ERROR(ValidateEncodedTensor(tensor, out.size()));
  if constexpr (std::endian::native == std::endian::little) {
    if (!out.empty()) std::memcpy(out.data(), tensor.payload().data(), out.size_bytes());
  } else {
    for (size_t i = 0; i < out.size(); ++i) {
      uint32_t le;
      std::memcpy(&le, tensor.payload().data() + 4 * i, 4);
      out[i] = std::bit_cast<float>(ByteSwap(le));
    }
  }
  if (const size_t bad = FindNonFinite(out); bad != out.size()) {
    return Status::InvalidArgument("fp32 tensor holds a non-finite value (" +
                                   std::to_string(out[bad]) + ") at index " + std::to_string(bad));
  }
  return Status::Ok();
}

Result<std::vector<float>> DecodeFp32(const proto::EncodedTensor& tensor, uint64_t max_values) {
  FEDSLICE_RETURN_IF_ERROR(ValidateEncodedTensor(tensor, max_values));
  std::vector<float> values;
  try {
    values.resize(tensor.num_values());
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("allocating a decoded tensor: ") + e.what());
  }
  FEDSLICE_RETURN_IF_ERROR(DecodeFp32(tensor, values));
  return values;
}

}  // namespace fedslice::net
