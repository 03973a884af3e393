// SIMD helpers shared by the engine's hand-written kernels: Eigen's packet for float on this
// build's ISA (16 lanes with AVX-512, 8 with AVX2, 4 with SSE) and partial loads/stores for
// the elements past the last full packet, so that tails go through the same arithmetic as
// the rest (results then do not depend on where a range is split).
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fedslice::internal {

using Packet = Eigen::internal::packet_traits<float>::type;
inline constexpr int kLanes = static_cast<int>(sizeof(Packet) / sizeof(float));

using Eigen::internal::padd;
using Eigen::internal::pload;
using Eigen::internal::ploadu;
using Eigen::internal::pmadd;
using Eigen::internal::pmax;
using Eigen::internal::pmin;
using Eigen::internal::pmul;
using Eigen::internal::predux;
using Eigen::internal::predux_max;
using Eigen::internal::predux_min;
using Eigen::internal::pset1;
using Eigen::internal::pstore;
using Eigen::internal::pstoreu;
using Eigen::internal::psub;

// The first n < kLanes floats at p, zero-padded / stored from a packet. Masked loads and
// stores where the ISA has them (no store-forwarding stall); a bounce buffer otherwise.
#if defined(EIGEN_VECTORIZE_AVX512)
inline Packet PartialLoad(const float* p, size_t n) {
  return ploadu<Packet>(p, static_cast<uint16_t>((1u << n) - 1));
}
inline void PartialStore(float* p, const Packet& v, size_t n) {
  pstoreu(p, v, static_cast<uint16_t>((1u << n) - 1));
}
#elif defined(EIGEN_VECTORIZE_AVX)
inline Packet PartialLoad(const float* p, size_t n) {
  return ploadu<Packet>(p, static_cast<uint8_t>((1u << n) - 1));
}
inline void PartialStore(float* p, const Packet& v, size_t n) {
  pstoreu(p, v, static_cast<uint8_t>((1u << n) - 1));
}
#else
inline Packet PartialLoad(const float* p, size_t n) {
  alignas(64) float tmp[kLanes] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return pload<Packet>(tmp);
}
inline void PartialStore(float* p, const Packet& v, size_t n) {
  alignas(64) float tmp[kLanes];
  pstore(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}
#endif

}  // namespace fedslice::internal
