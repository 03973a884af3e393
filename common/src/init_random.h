// Portable random numbers for weight initialisation and shuffling. The standard
// distributions (uniform_real_distribution, shuffle, ...) are implementation-defined, so a
// model initialised from the same seed could differ between standard libraries; these
// transforms of std::mt19937_64's (fully specified) output are identical everywhere.
#pragma once

#include <cstdint>
#include <random>

namespace fedslice::internal {

// Uniform in [0, 1) with 53 random bits.
inline double UniformUnit(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

// Uniform in [-bound, bound).
inline float UniformSymmetric(std::mt19937_64& rng, double bound) {
  return static_cast<float>((2.0 * UniformUnit(rng) - 1.0) * bound);
}

// Uniform integer in [0, n), n >= 1. The modulo bias, at most n / 2^64, is irrelevant for
// shuffling data sets.
inline uint64_t UniformIndex(std::mt19937_64& rng, uint64_t n) { return rng() % n; }

}  // namespace fedslice::internal
