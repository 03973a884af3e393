// Random sampling whose results are bit-identical on every IEEE-754 machine, for decisions
// that independent processes must agree on without talking (e.g. every federated client
// computing the same global data partition from a shared seed).
//
// Why not <random>: std::mt19937_64's output is fixed by the standard, but std::shuffle and
// the std:: distributions are not (libstdc++, libc++ and MSVC give different values), and
// std::log / std::exp may differ in the last bit between libm builds and CPU-specific code
// paths. Everything here uses the engine's raw 64-bit output plus +, -, *, /, sqrt, floor,
// frexp and ldexp, which IEEE-754 defines exactly. (The file using these must be compiled
// without floating-point contraction into FMA; common/CMakeLists.txt sets -ffp-contract=off
// for the sources that need it.)
//
// Thread-safety: PortableRng is a value type without shared state; one instance per thread.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>

namespace fedslice {

// Natural logarithm for finite x > 0, relative error below 1e-15; deterministic everywhere.
double PortableLog(double x);
// e^x for x <= 0 (0 below the subnormal range), relative error below 1e-15; deterministic.
double PortableExp(double x);

class PortableRng {
 public:
  // `stream` separates independent uses of the same user seed (e.g. one per partition scheme)
  // so that they do not share a random sequence.
  explicit PortableRng(uint64_t seed, uint64_t stream = 0);

  uint64_t Next() { return engine_(); }
  // Uniform integer in [0, n), unbiased (rejection sampling); n >= 1.
  uint64_t Below(uint64_t n);
  // Uniform double in the open interval (0, 1), 53 random bits.
  double Uniform();
  // Standard normal (Marsaglia's polar method, one value per accepted pair).
  double Normal();
  // log of a Gamma(shape, 1) sample, shape > 0 (Marsaglia & Tsang 2000; for shape < 1 the
  // boost Gamma(shape) = Gamma(shape + 1) * U^(1/shape)). Returned as a logarithm because for
  // small shapes the sample itself underflows to 0.
  double LogGamma(double shape);

  // Fisher-Yates shuffle.
  template <typename T>
  void Shuffle(std::span<T> items) {
    for (size_t i = items.size(); i > 1; --i) {
      using std::swap;
      swap(items[i - 1], items[Below(i)]);
    }
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace fedslice
