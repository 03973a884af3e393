#include "fedslice/common/portable_random.h"

#include <cmath>
#include <limits>

namespace fedslice {
namespace {

// SplitMix64 finaliser: spreads nearby seeds (0, 1, 2, ...) over the engine's state space.
uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// ln 2 split so that k * kLn2Hi is exact for |k| < 2^20 (Cody-Waite range reduction).
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kInvLn2 = 1.44269504088896338700e+00;

}  // namespace

double PortableLog(double x) {
  if (!(x > 0))
    return x == 0 ? -std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(x)) return x;
  int e = 0;
  double m = std::frexp(x, &e);  // x = m * 2^e, m in [0.5, 1); exact.
  if (m < 0.70710678118654752440) {
    m *= 2;  // exact
    --e;
  }
  // log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, s^2 <= 0.0295: the series
  // 2 s (1 + s^2/3 + s^4/5 + ...) converges below 1e-17 after 12 terms.
  const double s = (m - 1) / (m + 1);
  const double s2 = s * s;
  double poly = 1.0 / 25;
  for (int k = 11; k >= 0; --k) poly = 1.0 / (2 * k + 1) + s2 * poly;
  return 2 * s * poly + e * kLn2Lo + e * kLn2Hi;
}

double PortableExp(double x) {
  if (std::isnan(x)) return x;
  if (x < -746) return 0;                                      // Below half the smallest subnormal.
  if (x > 0) return std::numeric_limits<double>::quiet_NaN();  // Out of contract.
  // x = k ln2 + r, |r| <= ln2 / 2; e^r by its Taylor series (degree 14: error < 1e-18).
  const double k = std::floor(x * kInvLn2 + 0.5);
  const double r = (x - k * kLn2Hi) - k * kLn2Lo;
  double poly = 1;
  for (int n = 14; n >= 1; --n) poly = 1 + r * poly / n;
  return std::ldexp(poly, static_cast<int>(k));
}

PortableRng::PortableRng(uint64_t seed, uint64_t stream) : engine_(Mix(seed ^ Mix(stream))) {}

uint64_t PortableRng::Below(uint64_t n) {
  // Reject the lowest (2^64 mod n) values so that every residue is equally likely.
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const uint64_t x = engine_();
    if (x >= threshold) return x % n;
  }
}

double PortableRng::Uniform() {
  // Centre of one of 2^53 equal cells: never exactly 0 or 1, so log(Uniform()) is finite.
  return (static_cast<double>(engine_() >> 11) + 0.5) * 0x1.0p-53;
}

double PortableRng::Normal() {
  for (;;) {
    const double u = 2 * Uniform() - 1;
    const double v = 2 * Uniform() - 1;
    const double s = u * u + v * v;
    if (s < 1 && s > 0) return u * std::sqrt(-2 * PortableLog(s) / s);
  }
}

double PortableRng::LogGamma(double shape) {
  if (shape < 1) {
    // Gamma(a) = Gamma(a + 1) * U^(1/a); in logs, so that tiny shapes do not underflow.
    const double boost = PortableLog(Uniform()) / shape;
    return LogGamma(shape + 1) + boost;
  }
  const double d = shape - 1.0 / 3;
  const double c = 1 / std::sqrt(9 * d);
  for (;;) {
    double x;
    double v;
    do {
      x = Normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = Uniform();
    const double x2 = x * x;
    if (u < 1 - 0.0331 * x2 * x2) return PortableLog(d) + PortableLog(v);
    const double log_v = PortableLog(v);
    if (PortableLog(u) < 0.5 * x2 + d * (1 - v + log_v)) return PortableLog(d) + log_v;
  }
}

}  // namespace fedslice
