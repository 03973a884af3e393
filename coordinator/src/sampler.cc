#include "fedslice/coordinator/sampler.h"

#include <cmath>
#include <numeric>

namespace fedslice::coordinator {
namespace {

// splitmix64 (Steele, Lea & Flood 2014): one step of a Weyl sequence through a bijective
// mixer, so nearby inputs (round 7 vs round 8) give unrelated outputs.
uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Keeps the sampler's engine apart from any other DeriveSeed(seed, round) use.
constexpr uint64_t kSamplingStream = 0x73616d706c657273ULL;  // "samplers"

}  // namespace

uint64_t DeriveSeed(uint64_t seed, uint64_t a, uint64_t b) {
  return SplitMix64(SplitMix64(SplitMix64(seed) ^ a) ^ b);
}

uint64_t UniformBelow(std::mt19937_64& engine, uint64_t n) {
  // Accept x only below the largest multiple of n that fits in 2^64, so every residue is
  // equally likely. (2^64 - n) % n == 2^64 % n is the size of the rejected tail.
  const uint64_t tail = (0 - n) % n;
  for (;;) {
    const uint64_t x = engine();
    if (x >= tail) return x % n;
  }
}

Result<size_t> NumClientsToSample(size_t num_available, double fraction, size_t min_fit) {
  if (!(fraction > 0 && fraction <= 1)) {
    return Status::InvalidArgument("client fraction must be in (0, 1], got " +
                                   std::to_string(fraction));
  }
  const size_t needed = std::max<size_t>(min_fit, 1);
  if (num_available < needed) {
    return Status::FailedPrecondition("a round needs at least " + std::to_string(needed) +
                                      " clients (min_fit), only " + std::to_string(num_available) +
                                      " available");
  }
  // The small epsilon keeps 0.1 * 30 = 3.0000000000000004 and 0.29 * 100 =
  // 28.999999999999996 at the integers they are meant to be.
  const double product = fraction * static_cast<double>(num_available);
  size_t k = static_cast<size_t>(std::floor(product + 1e-9 * std::max(1.0, product)));
  k = std::clamp<size_t>(k, needed, num_available);
  return k;
}

Result<std::vector<size_t>> SamplePositions(size_t num_available, double fraction, size_t min_fit,
                                            uint64_t round, uint64_t seed, uint64_t attempt) {
  FEDSLICE_ASSIGN_OR_RETURN(const size_t k, NumClientsToSample(num_available, fraction, min_fit));
  std::mt19937_64 engine(DeriveSeed(seed ^ kSamplingStream, round, attempt));
  // Partial Fisher-Yates: the first k entries end up a uniform k-subset.
  std::vector<size_t> positions(num_available);
  std::iota(positions.begin(), positions.end(), size_t{0});
  for (size_t i = 0; i < k; ++i) {
    const size_t j = i + static_cast<size_t>(UniformBelow(engine, num_available - i));
    std::swap(positions[i], positions[j]);
  }
  positions.resize(k);
  std::sort(positions.begin(), positions.end());
  return positions;
}

}  // namespace fedslice::coordinator
