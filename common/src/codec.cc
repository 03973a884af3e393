#include "fedslice/common/codec.h"

#include <Eigen/Core>
#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fedslice/common/net/encoded_tensor.h"
#include "simd.h"

namespace fedslice::codec {
namespace {

// The layouts are little-endian and written with memcpy; every platform FedSlice targets
// (x86-64, AArch64) is little-endian, so no byte swapping is compiled in.
static_assert(std::endian::native == std::endian::little,
              "the codec byte layouts assume a little-endian host");
static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559);

constexpr std::string_view kValidNames =
    "fp32, fp16, int8, int4, qsgd:<levels 1..32767>, sign, topk:<fraction in (0,1]>[:layer]";

using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

uint32_t Bits(float x) { return std::bit_cast<uint32_t>(x); }

float LoadF32(const char* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
void StoreF32(char* p, float v) { std::memcpy(p, &v, 4); }
uint32_t LoadU32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
void StoreU32(char* p, uint32_t v) { std::memcpy(p, &v, 4); }

bool IsFinite(float x) { return (Bits(x) & 0x7f800000u) != 0x7f800000u; }

// Largest |x| bit pattern in `values` (a branch-free integer max the compiler vectorises).
// Non-finite values exist iff the result is >= 0x7f800000; otherwise bit_cast<float>(result)
// is max |x|.
uint32_t MaxAbsBits(const float* values, size_t n) {
  uint32_t m = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, values + i, 4);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

Status CheckCount(std::span<const float> values) {
  if (values.size() > net::kMaxTensorValues) {
    return Status::InvalidArgument("cannot encode " + std::to_string(values.size()) +
                                   " values, limit " + std::to_string(net::kMaxTensorValues));
  }
  return Status::Ok();
}

// The error for `values`, which hold a non-finite value.
Status NonFiniteError(std::span<const float> values) {
  const size_t bad = net::FindNonFinite(values);
  return Status::InvalidArgument("cannot encode a non-finite value (" +
                                 std::to_string(values[bad]) + " at index " + std::to_string(bad) +
                                 ")");
}

Status CheckEncodable(std::span<const float> values) {
  FEDSLICE_RETURN_IF_ERROR(CheckCount(values));
  if (MaxAbsBits(values.data(), values.size()) >= 0x7f800000u) return NonFiniteError(values);
  return Status::Ok();
}

uint64_t NumBlocks(uint64_t n, uint64_t block) { return block == 0 ? 0 : (n + block - 1) / block; }

uint32_t QsgdWidth(uint32_t levels) { return static_cast<uint32_t>(std::bit_width(levels)) + 1; }

// ---------------------------------------------------------------------------------------------
// fp16 (IEEE binary16), round to nearest even, saturating.

constexpr float kHalfMax = 65504.0f;

// F. Giesen's float_to_half_fast3_rtne for finite inputs, saturating instead of overflowing.
uint16_t FloatToHalf(float f) {
  uint32_t x = Bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t h;
  if (x >= 0x47800000u) {  // >= 65536: beyond the largest half
    h = 0x7bffu;
  } else if (x < 0x38800000u) {  // below 2^-14: subnormal half or zero
    const float denorm_magic = std::bit_cast<float>(uint32_t{((127 - 15) + (23 - 10) + 1) << 23});
    h = Bits(std::bit_cast<float>(x) + denorm_magic) - Bits(denorm_magic);
  } else {
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += (uint32_t{15} - 127) * (uint32_t{1} << 23) + 0xfffu;
    x += mant_odd;
    h = x >> 13;
    if (h >= 0x7c00u) h = 0x7bffu;  // rounded up past 65504
  }
  return static_cast<uint16_t>(h | sign);
}

// For halves whose exponent is not 31 (checked by the caller).
float HalfToFloat(uint16_t h) {
  const float magic = std::bit_cast<float>(uint32_t{113} << 23);
  uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = o & (0x7c00u << 13);
  o += (uint32_t{127} - 15) << 23;
  if (exp == 0) {  // zero or subnormal: renormalise through a float subtraction
    o += uint32_t{1} << 23;
    o = Bits(std::bit_cast<float>(o) - magic);
  }
  return std::bit_cast<float>(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

void EncodeFp16(std::span<const float> v, char* out) {
  size_t i = 0;
#if defined(__F16C__)
  const __m256 hi = _mm256_set1_ps(kHalfMax);
  const __m256 lo = _mm256_set1_ps(-kHalfMax);
  for (; i + 8 <= v.size(); i += 8) {
    __m256 x = _mm256_loadu_ps(v.data() + i);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < v.size(); ++i) {
    const uint16_t h = FloatToHalf(v[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

Status DecodeFp16(const char* in, std::span<float> out) {
  const size_t n = out.size();
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    bad |= static_cast<uint32_t>((h & 0x7c00u) == 0x7c00u);
  }
  if (bad != 0) {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, in + 2 * i, 2);
      if ((h & 0x7c00u) == 0x7c00u) {
        return Status::InvalidArgument("fp16 tensor holds a non-finite value at index " +
                                       std::to_string(i));
      }
    }
  }
  size_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    _mm256_storeu_ps(out.data() + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    out[i] = HalfToFloat(h);
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// int8 / int4: per block {min, scale}, codes q in [0, levels - 1].

// One pass over a block: its min, its max and whether every value is finite (min and max are
// meaningless otherwise). One pass instead of three (a finiteness check, Eigen's minCoeff and
// maxCoeff): the int8 encoding of a 3.4 MB activation batch spent most of its time in those.
struct BlockStats {
  float lo, hi;
  bool finite;
};

BlockStats ScanBlock(const float* p, size_t len) {
  using namespace fedslice::internal;  // simd.h
  size_t i = 0;
  float lo = p[0], hi = p[0];
  // x * 0 is 0 for finite x and NaN for Inf or NaN, and a NaN survives every sum.
  float poison = 0.0f;
  if (len >= static_cast<size_t>(kLanes)) {
    Packet vlo = ploadu<Packet>(p), vhi = vlo, vpoison = pset1<Packet>(0.0f);
    const Packet zero = pset1<Packet>(0.0f);
    for (; i + kLanes <= len; i += kLanes) {
      const Packet x = ploadu<Packet>(p + i);
      vlo = pmin(vlo, x);
      vhi = pmax(vhi, x);
      vpoison = padd(vpoison, pmul(x, zero));
    }
    lo = predux_min(vlo);
    hi = predux_max(vhi);
    poison = predux(vpoison);
  }
  for (; i < len; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
    poison += p[i] * 0.0f;
  }
  return {lo, hi, poison == 0.0f};
}

// Quantises one block of finite values with min `lo` and max `hi` to codes (one per byte).
// Returns {min, scale}. The vector and scalar paths compute the same IEEE operations in the
// same order (x * 0.5 is exact), so the codes do not depend on the ISA.
template <int kLevels>
std::pair<float, float> QuantizeBlock(const float* p, size_t len, float lo, float hi, uint8_t* q) {
  // The range in double: hi - lo overflows float for blocks spanning +-3e38.
  const double range = static_cast<double>(hi) - static_cast<double>(lo);
  float scale = static_cast<float>(range / (kLevels - 1));
  if (!(scale >= std::numeric_limits<float>::min())) {
    // Zero range, or one so small that 1/scale would overflow: every value decodes to min
    // (error below (levels - 1) * FLT_MIN).
    std::memset(q, 0, len);
    return {lo, 0.0f};
  }
  // Halving both operands keeps x - min finite for any finite x, min; the factor 2 is folded
  // into the inverse scale (exact except for subnormals, far below scale / 2).
  const float inv2 = static_cast<float>(2.0 * (kLevels - 1) / range);
  const float half_lo = lo * 0.5f;
  size_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  using namespace fedslice::internal;  // simd.h
  const Packet vhalf_lo = pset1<Packet>(half_lo), vinv2 = pset1<Packet>(inv2);
  const Packet zero = pset1<Packet>(0.0f), top = pset1<Packet>(float{kLevels - 1});
  const Packet half = pset1<Packet>(0.5f);
  // The scalar loop's steps, kLanes codes at a time, as int32 before narrowing.
  auto codes = [&](const float* x) {
    const Packet v = pmul(psub(pmul(ploadu<Packet>(x), half), vhalf_lo), vinv2);
    return padd(pmin(pmax(v, zero), top), half);
  };
#if defined(__AVX512F__)
  for (; i + 16 <= len; i += 16) {
    // Codes are in [0, levels - 1]: the truncating narrowing keeps them whole.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(codes(p + i))));
  }
#else
  // packs interleave 128-bit lanes; the permutation puts the 32 codes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto ints = [&](const float* x) { return _mm256_cvttps_epi32(codes(x)); };
  for (; i + 32 <= len; i += 32) {
    const __m256i ab = _mm256_packus_epi32(ints(p + i), ints(p + i + 8));
    const __m256i cd = _mm256_packus_epi32(ints(p + i + 16), ints(p + i + 24));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), bytes);
  }
#endif
#endif
  for (; i < len; ++i) {
    float v = (p[i] * 0.5f - half_lo) * inv2;
    v = v < 0.0f ? 0.0f : v;
    v = v > float{kLevels - 1} ? float{kLevels - 1} : v;
    q[i] = static_cast<uint8_t>(static_cast<int>(v + 0.5f));
  }
  return {lo, scale};
}

// Writes nb headers and the codes (one byte per value) for the whole vector. Returns false,
// with the output partly written, at the first block holding a non-finite value: checking
// each block as it is quantised, while it is in L1, instead of the whole vector first saves a
// pass over memory (a 3.4 MB activation batch: ~20% of an int8 hop's CPU).
template <int kLevels>
bool QuantizeAll(std::span<const float> v, uint32_t block, char* headers, uint8_t* codes) {
  const size_t n = v.size();
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const BlockStats stats = ScanBlock(v.data() + start, len);
    if (!stats.finite) return false;
    const auto [lo, scale] =
        QuantizeBlock<kLevels>(v.data() + start, len, stats.lo, stats.hi, codes + start);
    StoreF32(headers + 8 * b, lo);
    StoreF32(headers + 8 * b + 4, scale);
  }
  return true;
}

// Checks the {min, scale} headers: finite, scale >= 0, and min + (levels - 1) * scale finite.
// Decoded values lie between min and that endpoint (rounding is monotone), so all are finite.
Status CheckAffineHeaders(std::string_view codec, const char* headers, uint64_t nb, int levels) {
  for (uint64_t b = 0; b < nb; ++b) {
    const float lo = LoadF32(headers + 8 * b);
    const float scale = LoadF32(headers + 8 * b + 4);
    if (!IsFinite(lo) || !IsFinite(scale) || !(scale >= 0.0f) ||
        !IsFinite(lo + scale * static_cast<float>(levels - 1))) {
      return Status::InvalidArgument(std::string(codec) + " tensor block " + std::to_string(b) +
                                     " has an invalid min/scale (" + std::to_string(lo) + ", " +
                                     std::to_string(scale) + ")");
    }
  }
  return Status::Ok();
}

void DequantizeInt8(const char* headers, const uint8_t* codes, uint32_t block,
                    std::span<float> out) {
  const size_t n = out.size();
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const float lo = LoadF32(headers + 8 * b);
    const float scale = LoadF32(headers + 8 * b + 4);
    const uint8_t* q = codes + start;
    float* o = out.data() + start;
    for (size_t i = 0; i < len; ++i) o[i] = lo + scale * static_cast<float>(q[i]);
  }
}

void DequantizeInt4(const char* headers, const uint8_t* packed, uint32_t block,
                    std::span<float> out) {
  const size_t n = out.size();
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const float lo = LoadF32(headers + 8 * b);
    const float scale = LoadF32(headers + 8 * b + 4);
    float* o = out.data() + start;
    for (size_t i = 0; i < len; ++i) {
      const size_t g = start + i;
      const unsigned q = (packed[g >> 1] >> ((g & 1) * 4)) & 0xfu;
      o[i] = lo + scale * static_cast<float>(q);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sign

void EncodeSign(std::span<const float> v, uint32_t block, char* headers, uint8_t* bits) {
  const size_t n = v.size();
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    // Mean |x| in double: the float sum of a block of huge values could overflow.
    const double sum = ConstArrayMap(v.data() + start, static_cast<Eigen::Index>(len))
                           .cast<double>()
                           .abs()
                           .sum();
    StoreF32(headers + 4 * b, static_cast<float>(sum / static_cast<double>(len)));
  }
  const size_t full = n / 8;
  for (size_t j = 0; j < full; ++j) {
    const float* p = v.data() + 8 * j;
    unsigned byte = 0;
    for (int t = 0; t < 8; ++t) byte |= static_cast<unsigned>(p[t] < 0.0f) << t;
    bits[j] = static_cast<uint8_t>(byte);
  }
  if (n % 8 != 0) {
    unsigned byte = 0;
    for (size_t t = 0; t < n % 8; ++t) byte |= static_cast<unsigned>(v[8 * full + t] < 0.0f) << t;
    bits[full] = static_cast<uint8_t>(byte);
  }
}

void DecodeSign(const char* headers, const uint8_t* bits, uint32_t block, std::span<float> out) {
  const size_t n = out.size();
  // Two passes that vectorise, rather than one that extracts bit g of the stream per value:
  // first each value's sign bit (as the float +0 or -0), then the block's scale OR-ed in. The
  // scales were checked to be >= 0, so their sign bit is clear and OR sets -s or s.
  auto sign_of = [](uint32_t byte, size_t t) {
    return std::bit_cast<float>(((byte >> t) & 1u) << 31);
  };
  const size_t full = n / 8;
  for (size_t j = 0; j < full; ++j) {
    const uint32_t byte = bits[j];
    for (size_t t = 0; t < 8; ++t) out[8 * j + t] = sign_of(byte, t);
  }
  for (size_t t = 0; t < n % 8; ++t) out[8 * full + t] = sign_of(bits[full], t);
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const uint32_t scale = std::bit_cast<uint32_t>(LoadF32(headers + 4 * b));
    for (size_t i = start; i < start + len; ++i) {
      out[i] = std::bit_cast<float>(std::bit_cast<uint32_t>(out[i]) | scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// qsgd

// splitmix64 finaliser of (seed, index): a counter-based generator, so that the random number
// used for value i does not depend on how the vector is split into blocks or threads.
uint64_t Mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Appends `width`-bit codes LSB-first to a byte stream.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}
  // width <= 32. Whole 32-bit words are stored once they fill, not a byte per code.
  void Put(uint32_t code, uint32_t width) {
    acc_ |= static_cast<uint64_t>(code) << used_;
    used_ += width;
    if (used_ >= 32) {
      const auto word = static_cast<uint32_t>(acc_);
      std::memcpy(out_, &word, 4);
      out_ += 4;
      acc_ >>= 32;
      used_ -= 32;
    }
  }
  void Flush() {
    while (used_ > 0) {
      *out_++ = static_cast<uint8_t>(acc_);
      acc_ >>= 8;
      used_ = used_ > 8 ? used_ - 8 : 0;
    }
    acc_ = 0;
  }

 private:
  uint8_t* out_;
  uint64_t acc_ = 0;
  uint32_t used_ = 0;
};

void EncodeQsgd(std::span<const float> v, uint32_t block, uint32_t levels, uint64_t seed,
                char* headers, uint8_t* stream) {
  const size_t n = v.size();
  const uint32_t width = QsgdWidth(levels);
  const float s = static_cast<float>(levels);
  BitWriter writer(stream);
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const float m = std::bit_cast<float>(MaxAbsBits(v.data() + start, len));
    StoreF32(headers + 4 * b, m);
    for (size_t i = 0; i < len; ++i) {
      const float x = v[start + i];
      uint32_t code = 0;
      if (m > 0.0f) {
        // |x| / m in [0, 1] even when m is subnormal (no 1/m that could overflow).
        const float r = std::fabs(x) / m * s;
        const float fl = std::floor(r);
        const float frac = r - fl;
        // 24 random bits as a float in [0, 1): P(u < frac) = frac to within 2^-24.
        const float u =
            static_cast<float>(Mix(seed, start + i) >> 40) * (1.0f / 16777216.0f);
        uint32_t l = static_cast<uint32_t>(fl) + (u < frac ? 1u : 0u);
        l = std::min(l, levels);
        code = 2 * l + ((x < 0.0f && l > 0) ? 1u : 0u);
      }
      writer.Put(code, width);
    }
  }
  writer.Flush();
}

// Code i occupies bits [i * width, (i + 1) * width) of the stream, LSB first. Each is read on
// its own from an 8-byte window at its first byte (no bit reader carrying state from one code
// to the next), so that the loop pipelines; the last few codes, whose window would pass the end
// of the stream, are read a byte at a time.
Status DecodeQsgd(const char* headers, const uint8_t* stream, size_t stream_bytes,
                  uint32_t block, uint32_t levels, std::span<float> out) {
  const size_t n = out.size();
  const uint32_t width = QsgdWidth(levels);
  const uint64_t mask = (uint64_t{1} << width) - 1;
  // Codes whose 8-byte window lies inside the stream: bit offset / 8 + 8 <= stream_bytes.
  const size_t windowed =
      stream_bytes >= 8 ? std::min<size_t>(n, (stream_bytes - 8) * 8 / width + 1) : 0;
  auto code_at = [&](size_t i) -> uint32_t {
    const uint64_t bit = static_cast<uint64_t>(i) * width;
    uint64_t window = 0;
    if (i < windowed) {
      std::memcpy(&window, stream + bit / 8, 8);
    } else {
      for (size_t b = bit / 8, shift = 0; b < stream_bytes && shift < 64; ++b, shift += 8) {
        window |= static_cast<uint64_t>(stream[b]) << shift;
      }
    }
    return static_cast<uint32_t>((window >> (bit % 8)) & mask);
  };
  // A code is 2 * level + sign: the level at most `levels`, and no "-0".
  auto invalid = [levels](uint32_t code) { return (code >> 1) > levels || code == 1; };
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    const size_t len = std::min<size_t>(block, n - start);
    const float m = LoadF32(headers + 4 * b);
    if (!IsFinite(m) || !(m >= 0.0f)) {
      return Status::InvalidArgument("qsgd tensor block " + std::to_string(b) +
                                     " has an invalid norm " + std::to_string(m));
    }
    // m * l / s in double, then rounded: at most m, so finite.
    const double step = static_cast<double>(m) / levels;
    bool any_invalid = false;
    for (size_t i = start; i < start + len; ++i) {
      const uint32_t code = code_at(i);
      any_invalid |= invalid(code);
      // The sign OR-ed in rather than chosen by a branch: signs are random, a branch
      // mispredicts on half the values.
      const auto mag = std::bit_cast<uint32_t>(static_cast<float>(step * (code >> 1)));
      out[i] = std::bit_cast<float>(mag | ((code & 1u) << 31));
    }
    if (any_invalid) {  // rare: find the first bad code for the message
      for (size_t i = start; i < start + len; ++i) {
        const uint32_t code = code_at(i);
        if (invalid(code)) {
          return Status::InvalidArgument("qsgd tensor has an invalid code " + std::to_string(code) +
                                         " at index " + std::to_string(i));
        }
      }
    }
  }
  // The stream is exactly ceil(n * width / 8) bytes (checked by the caller); the bits after
  // the last code must be zero.
  const uint64_t used_bits = static_cast<uint64_t>(n) * width;
  if (used_bits % 8 != 0 && (stream[used_bits / 8] >> (used_bits % 8)) != 0) {
    return Status::InvalidArgument("qsgd tensor has non-zero padding bits");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// topk

// The k-th largest (1 <= k <= n) of the n non-negative scores score(0..n-1), found without
// sorting: non-negative floats order as their bit patterns do, so one pass counts the scores
// per bucket of their 11 highest bits (the sign bit is 0), and nth_element then runs only over
// the bucket the k-th largest falls in. For an update-like input that bucket holds well under
// 1% of the values, so selection costs three light passes instead of an O(n) nth_element
// over a copy of every score (encode about 5x faster; codec_bench, BENCHMARKS.md).
struct KthLargest {
  float value = 0;
  uint64_t above = 0;  // scores strictly greater than `value`
};
template <typename ScoreFn>
Result<KthLargest> KthLargestScore(size_t n, uint64_t k, ScoreFn score) {
  constexpr int kShift = 20;
  constexpr size_t kBuckets = size_t{1} << (31 - kShift);
  std::vector<uint64_t> count;
  std::vector<float> bucket;
  try {
    count.assign(kBuckets, 0);
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("topk scratch: ") + e.what());
  }
  for (size_t i = 0; i < n; ++i) ++count[std::bit_cast<uint32_t>(score(i)) >> kShift];
  uint64_t above = 0;  // scores in the buckets above the one holding the k-th largest
  size_t b = kBuckets - 1;
  while (above + count[b] < k) above += count[b--];  // stops: the counts add up to n >= k
  try {
    bucket.reserve(count[b]);
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("topk scratch: ") + e.what());
  }
  for (size_t i = 0; i < n; ++i) {
    const float x = score(i);
    if ((std::bit_cast<uint32_t>(x) >> kShift) == b) bucket.push_back(x);
  }
  // The (k - above)-th largest of the bucket.
  const auto nth = bucket.end() - static_cast<std::ptrdiff_t>(k - above);
  std::nth_element(bucket.begin(), nth, bucket.end());
  KthLargest kth{*nth, above};
  for (auto it = nth + 1; it != bucket.end(); ++it) kth.above += *it > kth.value ? 1 : 0;
  return kth;
}

// The k values of largest score, indices ascending, into `out` (k indices, then k values).
// The score is |x|, or with `segments` (sizes of consecutive segments of v, adding up to its
// size) |x| / RMS of x over its segment (a segment of zeros scores 0). Every score above the
// k-th largest is kept, and then the first ties with it in index order, so the choice is
// deterministic. v is finite (checked by the caller).
// Calls keep(j, i) for the j-th (0-based, in index order) of the k values top-k keeps, i
// being its index: the k largest scores, where a score is |v[i]|, or with `segments`
// |v[i]| / RMS of v over i's segment. Ties at the k-th score go to the lowest indices.
template <typename Keep>
Status ForEachTopK(std::span<const float> v, uint64_t k, std::span<const uint64_t> segments,
                   Keep keep) {
  const size_t n = v.size();
  if (k >= n) {
    for (size_t i = 0; i < n; ++i) keep(i, i);
    return Status::Ok();
  }
  if (k == 0) return Status::Ok();
  auto emit = [&](auto score) -> Status {
    FEDSLICE_ASSIGN_OR_RETURN(const KthLargest kth, KthLargestScore(n, k, score));
    const float threshold = kth.value;
    uint64_t ties = k - kth.above;
    uint64_t j = 0;
    for (size_t i = 0; i < n && j < k; ++i) {
      const float x = score(i);
      bool kept = x > threshold;
      if (!kept && x == threshold && ties > 0) {
        kept = true;
        --ties;
      }
      if (kept) keep(j++, i);
    }
    return Status::Ok();
  };
  // |x| without the sign bit, so that -0.0 scores +0.0 and orders below every other score.
  if (segments.empty()) return emit([v](size_t i) { return std::fabs(v[i]); });

  std::vector<float> scores;
  try {
    scores.resize(n);
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("topk scratch: ") + e.what());
  }
  size_t at = 0;
  for (const uint64_t size : segments) {
    double squares = 0;
    for (size_t i = at; i < at + size; ++i) squares += double{v[i]} * double{v[i]};
    const double rms = size > 0 ? std::sqrt(squares / static_cast<double>(size)) : 0.0;
    const float inverse = rms > 0 ? static_cast<float>(1.0 / rms) : 0.0f;
    if (std::isfinite(inverse)) {
      for (size_t i = at; i < at + size; ++i) scores[i] = std::fabs(v[i]) * inverse;
    } else {
      // A subnormal RMS: 1/RMS overflows, and |x| * inf would make 0 a NaN. |x| / RMS is at
      // most sqrt(size), so dividing in double stays finite.
      for (size_t i = at; i < at + size; ++i) {
        scores[i] = static_cast<float>(std::fabs(double{v[i]}) / rms);
      }
    }
    at += size;
  }
  return emit([&scores](size_t i) { return scores[i]; });
}

Status EncodeTopK(std::span<const float> v, uint64_t k, std::span<const uint64_t> segments,
                  char* out) {
  char* idx = out;
  char* val = out + 4 * k;
  return ForEachTopK(v, k, segments, [&](uint64_t j, size_t i) {
    StoreU32(idx + 4 * j, static_cast<uint32_t>(i));
    StoreF32(val + 4 * j, v[i]);
  });
}

Status DecodeTopK(const char* in, uint64_t k, std::span<float> out) {
  const char* idx = in;
  const char* val = in + 4 * k;
  std::fill(out.begin(), out.end(), 0.0f);
  int64_t prev = -1;
  for (uint64_t j = 0; j < k; ++j) {
    const uint32_t i = LoadU32(idx + 4 * j);
    if (i >= out.size()) {
      return Status::InvalidArgument("topk tensor index " + std::to_string(i) + " (entry " +
                                     std::to_string(j) + ") out of range for " +
                                     std::to_string(out.size()) + " values");
    }
    if (static_cast<int64_t>(i) <= prev) {
      return Status::InvalidArgument("topk tensor indices not strictly increasing at entry " +
                                     std::to_string(j) + " (" + std::to_string(i) + " after " +
                                     std::to_string(prev) + ")");
    }
    prev = i;
    const float x = LoadF32(val + 4 * j);
    if (!IsFinite(x)) {
      return Status::InvalidArgument("topk tensor holds a non-finite value at index " +
                                     std::to_string(i));
    }
    out[i] = x;
  }
  return Status::Ok();
}

Status Allocate(std::string* payload, uint64_t bytes) {
  try {
    payload->resize(bytes);
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("allocating a codec payload: ") + e.what());
  }
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Result<CodecSpec> ParseCodec(std::string_view name, uint32_t block_size) {
  CodecSpec spec;
  if (block_size > kMaxBlockSize) {
    return Status::InvalidArgument("codec block size " + std::to_string(block_size) +
                                   " above the limit " + std::to_string(kMaxBlockSize));
  }
  const uint32_t block = block_size == 0 ? kDefaultBlockSize : block_size;
  const std::string shown(name.substr(0, 64));
  if (name.empty() || name == "fp32") {
    spec.kind = CodecKind::kFp32;
    spec.name = "fp32";
    return spec;
  }
  spec.name = std::string(name);
  if (name == "fp16") {
    spec.kind = CodecKind::kFp16;
    return spec;
  }
  if (name == "int8" || name == "int4" || name == "sign") {
    spec.kind = name == "int8" ? CodecKind::kInt8
                : name == "int4" ? CodecKind::kInt4
                                 : CodecKind::kSign;
    spec.block_size = block;
    return spec;
  }
  if (name.starts_with("qsgd:")) {
    const std::string_view arg = name.substr(5);
    uint32_t levels = 0;
    const auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), levels);
    if (arg.empty() || ec != std::errc() || end != arg.data() + arg.size() || levels < 1 ||
        levels > kMaxQsgdLevels) {
      return Status::InvalidArgument("codec \"" + shown +
                                     "\": qsgd levels s must be an integer in [1, " +
                                     std::to_string(kMaxQsgdLevels) + "]");
    }
    spec.kind = CodecKind::kQsgd;
    spec.levels = levels;
    spec.name = "qsgd:" + std::to_string(levels);
    spec.block_size = block;
    return spec;
  }
  if (name.starts_with("topk:")) {
    std::string_view arg = name.substr(5);
    constexpr std::string_view kPerLayer = ":layer";
    const bool per_layer = arg.ends_with(kPerLayer);
    if (per_layer) arg.remove_suffix(kPerLayer.size());
    double f = 0;
    const auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), f,
                                           std::chars_format::fixed);
    if (arg.empty() || ec != std::errc() || end != arg.data() + arg.size() || !(f > 0.0) ||
        !(f <= 1.0)) {
      return Status::InvalidArgument("codec \"" + shown +
                                     "\": topk fraction f must be a decimal number in (0, 1]");
    }
    spec.kind = CodecKind::kTopK;
    spec.fraction = f;
    spec.per_segment_scale = per_layer;
    return spec;
  }
  return Status::InvalidArgument("unknown codec \"" + shown + "\"; valid codecs: " +
                                 std::string(kValidNames));
}

Result<CodecSpec> ParseCodec(const proto::CodecConfig& config) {
  return ParseCodec(config.name(), config.block_size());
}

Result<SparseRefit> ParseSparseRefit(const proto::CodecConfig& config) {
  FEDSLICE_ASSIGN_OR_RETURN(const CodecSpec spec, ParseCodec(config));
  const bool topk = spec.kind == CodecKind::kTopK;
  SparseRefit refit;
  if (config.has_sparse_refit()) {
    const float share = config.sparse_refit();
    if (!(share >= 0.0f && share < 1.0f)) {
      return Status::InvalidArgument("sparse refit share must be in [0, 1), got " +
                                     std::to_string(share));
    }
    if (share > 0.0f && !topk) {
      return Status::InvalidArgument("sparse refit applies to topk codecs only, not " + spec.name);
    }
    refit.share = share;
  } else if (topk) {
    refit.share = kDefaultSparseRefit;
  }
  const float scale = config.sparse_refit_lr_scale();
  if (!(scale >= 0.0f && scale <= kMaxSparseRefitLrScale)) {
    return Status::InvalidArgument("sparse refit learning-rate scale must be in [0, " +
                                   std::to_string(static_cast<int>(kMaxSparseRefitLrScale)) +
                                   "] (0 = default), got " + std::to_string(scale));
  }
  if (scale > 0.0f) refit.lr_scale = scale;
  return refit;
}

bool WantsErrorFeedback(const CodecSpec& spec, const proto::CodecConfig& config) {
  return spec.lossy() && (config.error_feedback() || spec.default_error_feedback());
}

uint64_t TopKCount(double fraction, uint64_t n) {
  if (n == 0) return 0;
  const double want = std::ceil(fraction * static_cast<double>(n));
  if (!(want >= 1.0)) return 1;
  if (want >= static_cast<double>(n)) return n;
  return static_cast<uint64_t>(want);
}

uint64_t PayloadBytes(const CodecSpec& spec, uint64_t n) {
  const uint64_t nb = NumBlocks(n, spec.block_size);
  switch (spec.kind) {
    case CodecKind::kFp32:
      return 4 * n;
    case CodecKind::kFp16:
      return 2 * n;
    case CodecKind::kInt8:
      return 8 * nb + n;
    case CodecKind::kInt4:
      return 8 * nb + (n + 1) / 2;
    case CodecKind::kSign:
      return 4 * nb + (n + 7) / 8;
    case CodecKind::kQsgd:
      return 4 * nb + (n * QsgdWidth(spec.levels) + 7) / 8;
    case CodecKind::kTopK:
      return 8 * TopKCount(spec.fraction, n);
  }
  return 0;
}

namespace {

// topk:f:layer's segments (empty otherwise, or when the caller set none: one segment),
// checked to cover the n values.
Result<std::span<const uint64_t>> TopKSegments(const CodecSpec& spec, uint64_t n) {
  if (!spec.per_segment_scale) return std::span<const uint64_t>();
  uint64_t total = 0;
  for (const uint64_t size : spec.segments) total += size;
  if (!spec.segments.empty() && total != n) {
    return Status::InvalidArgument(spec.name + ": its segments hold " + std::to_string(total) +
                                   " values, encoding " + std::to_string(n));
  }
  return std::span<const uint64_t>(spec.segments);
}

}  // namespace

Result<std::vector<uint32_t>> SelectTopK(const CodecSpec& spec, std::span<const float> values) {
  if (spec.kind != CodecKind::kTopK) {
    return Status::InvalidArgument("SelectTopK needs a topk codec, got " + spec.name);
  }
  FEDSLICE_RETURN_IF_ERROR(CheckEncodable(values));
  FEDSLICE_ASSIGN_OR_RETURN(const std::span<const uint64_t> segments,
                            TopKSegments(spec, values.size()));
  std::vector<uint32_t> indices;
  try {
    indices.resize(TopKCount(spec.fraction, values.size()));
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("topk indices: ") + e.what());
  }
  FEDSLICE_RETURN_IF_ERROR(ForEachTopK(values, indices.size(), segments, [&](uint64_t j, size_t i) {
    indices[j] = static_cast<uint32_t>(i);
  }));
  return indices;
}

Status Encode(const CodecSpec& spec, std::span<const float> values, proto::EncodedTensor* out,
              uint64_t seed) {
  if (spec.kind == CodecKind::kFp32) return net::EncodeFp32(values, out);
  // int8 and int4 check finiteness block by block as they quantise (QuantizeAll).
  const bool checked_per_block = spec.kind == CodecKind::kInt8 || spec.kind == CodecKind::kInt4;
  FEDSLICE_RETURN_IF_ERROR(checked_per_block ? CheckCount(values) : CheckEncodable(values));
  if (spec.block_wise() && (spec.block_size == 0 || spec.block_size > kMaxBlockSize)) {
    return Status::InvalidArgument("codec " + spec.name + " needs a block size in [1, " +
                                   std::to_string(kMaxBlockSize) + "], has " +
                                   std::to_string(spec.block_size));
  }
  const uint64_t n = values.size();
  FEDSLICE_ASSIGN_OR_RETURN(const std::span<const uint64_t> segments, TopKSegments(spec, n));
  const uint64_t nb = spec.block_wise() ? NumBlocks(n, spec.block_size) : 0;
  out->Clear();
  out->set_codec(spec.name);
  out->set_num_values(n);
  if (spec.block_wise()) {
    out->set_block_size(spec.block_size);
    out->set_num_blocks(nb);
  }
  std::string* payload = out->mutable_payload();
  FEDSLICE_RETURN_IF_ERROR(Allocate(payload, PayloadBytes(spec, n)));
  char* p = payload->data();
  auto* bytes = reinterpret_cast<uint8_t*>(p);
  switch (spec.kind) {
    case CodecKind::kFp32:
      break;
    case CodecKind::kFp16:
      EncodeFp16(values, p);
      break;
    case CodecKind::kInt8:
      if (!QuantizeAll<256>(values, spec.block_size, p, bytes + 8 * nb)) {
        out->Clear();
        return NonFiniteError(values);
      }
      break;
    case CodecKind::kInt4: {
      // One code per byte into a scratch, then two per byte into the payload.
      std::vector<uint8_t> codes;
      try {
        codes.resize(n + 1);
      } catch (const std::exception& e) {
        return Status::ResourceExhausted(std::string("int4 scratch: ") + e.what());
      }
      if (!QuantizeAll<16>(values, spec.block_size, p, codes.data())) {
        out->Clear();
        return NonFiniteError(values);
      }
      codes[n] = 0;
      uint8_t* packed = bytes + 8 * nb;
      for (uint64_t j = 0; j < (n + 1) / 2; ++j) {
        packed[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
      }
      break;
    }
    case CodecKind::kSign:
      EncodeSign(values, spec.block_size, p, bytes + 4 * nb);
      break;
    case CodecKind::kQsgd:
      out->set_seed(seed);
      EncodeQsgd(values, spec.block_size, spec.levels, seed, p, bytes + 4 * nb);
      break;
    case CodecKind::kTopK: {
      const uint64_t k = TopKCount(spec.fraction, n);
      out->set_k(k);
      FEDSLICE_RETURN_IF_ERROR(EncodeTopK(values, k, segments, p));
      break;
    }
  }
  return Status::Ok();
}

Status Decode(const proto::EncodedTensor& tensor, std::span<float> out) {
  if (tensor.num_values() != out.size()) {
    return Status::InvalidArgument("encoded tensor has " + std::to_string(tensor.num_values()) +
                                   " values, expected " + std::to_string(out.size()));
  }
  FEDSLICE_RETURN_IF_ERROR(net::ValidateEncodedTensor(tensor, out.size()));
  if (tensor.codec() == "fp32") {
    if (tensor.block_size() != 0 || tensor.num_blocks() != 0 || tensor.k() != 0) {
      return Status::InvalidArgument("fp32 tensor must not set block_size, num_blocks or k");
    }
    return net::DecodeFp32(tensor, out);
  }
  FEDSLICE_ASSIGN_OR_RETURN(CodecSpec spec, ParseCodec(tensor.codec(), 0));
  const uint64_t n = out.size();
  const std::string& codec = tensor.codec();
  if (spec.block_wise()) {
    if (tensor.block_size() == 0 || tensor.block_size() > kMaxBlockSize) {
      return Status::InvalidArgument(codec + " tensor has block_size " +
                                     std::to_string(tensor.block_size()) + ", must be in [1, " +
                                     std::to_string(kMaxBlockSize) + "]");
    }
    spec.block_size = tensor.block_size();
    const uint64_t nb = NumBlocks(n, spec.block_size);
    if (tensor.num_blocks() != nb) {
      return Status::InvalidArgument(codec + " tensor has num_blocks " +
                                     std::to_string(tensor.num_blocks()) + ", " +
                                     std::to_string(n) + " values in blocks of " +
                                     std::to_string(spec.block_size) + " need " +
                                     std::to_string(nb));
    }
  } else if (tensor.block_size() != 0 || tensor.num_blocks() != 0) {
    return Status::InvalidArgument(codec + " tensor must not set block_size or num_blocks");
  }
  const uint64_t want_k = spec.kind == CodecKind::kTopK ? TopKCount(spec.fraction, n) : 0;
  if (tensor.k() != want_k) {
    return Status::InvalidArgument(codec + " tensor has k = " + std::to_string(tensor.k()) +
                                   ", " + std::to_string(n) + " values need k = " +
                                   std::to_string(want_k));
  }
  const uint64_t want_bytes = PayloadBytes(spec, n);
  if (tensor.payload().size() != want_bytes) {
    return Status::InvalidArgument(codec + " tensor of " + std::to_string(n) + " values needs " +
                                   std::to_string(want_bytes) + " payload bytes, has " +
                                   std::to_string(tensor.payload().size()));
  }
  const char* p = tensor.payload().data();
  const auto* bytes = reinterpret_cast<const uint8_t*>(p);
  const uint64_t nb = tensor.num_blocks();
  switch (spec.kind) {
    case CodecKind::kFp32:
      return Status::Internal("fp32 handled above");
    case CodecKind::kFp16:
      return DecodeFp16(p, out);
    case CodecKind::kInt8:
      FEDSLICE_RETURN_IF_ERROR(CheckAffineHeaders(codec, p, nb, 256));
      DequantizeInt8(p, bytes + 8 * nb, spec.block_size, out);
      return Status::Ok();
    case CodecKind::kInt4:
      FEDSLICE_RETURN_IF_ERROR(CheckAffineHeaders(codec, p, nb, 16));
      if (n % 2 == 1 && (bytes[8 * nb + n / 2] >> 4) != 0) {
        return Status::InvalidArgument("int4 tensor has a non-zero padding nibble");
      }
      DequantizeInt4(p, bytes + 8 * nb, spec.block_size, out);
      return Status::Ok();
    case CodecKind::kSign: {
      for (uint64_t b = 0; b < nb; ++b) {
        const float s = LoadF32(p + 4 * b);
        if (!IsFinite(s) || !(s >= 0.0f)) {
          return Status::InvalidArgument("sign tensor block " + std::to_string(b) +
                                         " has an invalid scale " + std::to_string(s));
        }
      }
      if (n % 8 != 0 && (bytes[4 * nb + n / 8] >> (n % 8)) != 0) {
        return Status::InvalidArgument("sign tensor has non-zero padding bits");
      }
      DecodeSign(p, bytes + 4 * nb, spec.block_size, out);
      return Status::Ok();
    }
    case CodecKind::kQsgd:
      return DecodeQsgd(p, bytes + 4 * nb, want_bytes - 4 * nb, spec.block_size, spec.levels,
                        out);
    case CodecKind::kTopK:
      return DecodeTopK(p, want_k, out);
  }
  return Status::Internal("unhandled codec kind");
}

// ---------------------------------------------------------------------------------------------

Status ErrorFeedback::Apply(std::span<float> update) {
  if (residual_.empty() && !update.empty()) {
    try {
      residual_.assign(update.size(), 0.0f);
    } catch (const std::exception& e) {
      return Status::ResourceExhausted(std::string("error feedback residual: ") + e.what());
    }
    return Status::Ok();
  }
  if (residual_.size() != update.size()) {
    return Status::InvalidArgument("error feedback: update has " + std::to_string(update.size()) +
                                   " values, residual " + std::to_string(residual_.size()));
  }
  for (size_t i = 0; i < update.size(); ++i) update[i] += residual_[i];
  return Status::Ok();
}

Status ErrorFeedback::Update(std::span<const float> intended, std::span<const float> decoded) {
  if (intended.size() != decoded.size() ||
      (!residual_.empty() && residual_.size() != intended.size())) {
    return Status::InvalidArgument("error feedback: sizes differ (intended " +
                                   std::to_string(intended.size()) + ", decoded " +
                                   std::to_string(decoded.size()) + ", residual " +
                                   std::to_string(residual_.size()) + ")");
  }
  try {
    residual_.resize(intended.size());
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("error feedback residual: ") + e.what());
  }
  for (size_t i = 0; i < intended.size(); ++i) residual_[i] = intended[i] - decoded[i];
  if (const size_t bad = net::FindNonFinite(residual_); bad != residual_.size()) {
    residual_.assign(residual_.size(), 0.0f);
    return Status::InvalidArgument("error feedback: residual not finite at index " +
                                   std::to_string(bad) + "; residual reset");
  }
  return Status::Ok();
}

Status ErrorFeedback::Encode(const CodecSpec& spec, std::span<const float> update,
                             proto::EncodedTensor* out, uint64_t seed) {
  if (!residual_.empty() && residual_.size() != update.size()) {
    return Status::InvalidArgument("error feedback: update has " + std::to_string(update.size()) +
                                   " values, residual " + std::to_string(residual_.size()));
  }
  try {
    scratch_.assign(update.begin(), update.end());
    decoded_.resize(update.size());
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("error feedback scratch: ") + e.what());
  }
  if (!residual_.empty()) {
    for (size_t i = 0; i < scratch_.size(); ++i) scratch_[i] += residual_[i];
  }
  // Encode rejects a non-finite update + residual; the residual is then left as it was.
  FEDSLICE_RETURN_IF_ERROR(codec::Encode(spec, scratch_, out, seed));
  FEDSLICE_RETURN_IF_ERROR(Decode(*out, decoded_));
  return Update(scratch_, decoded_);
}

}  // namespace fedslice::codec
