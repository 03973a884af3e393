// Update codecs: round-trip bounds, qsgd unbiasedness, error feedback, and rejection of every
// kind of malformed payload.
#include "fedslice/common/codec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace fedslice::codec {
namespace {

std::vector<float> RandomVector(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

CodecSpec Spec(std::string_view name, uint32_t block = 0) {
  auto spec = ParseCodec(name, block);
  EXPECT_TRUE(spec.ok()) << spec.status().ToString();
  return spec.ok() ? *spec : CodecSpec{};
}

std::vector<float> RoundTrip(const CodecSpec& spec, const std::vector<float>& v,
                             proto::EncodedTensor* t = nullptr, uint64_t seed = 1) {
  proto::EncodedTensor local;
  if (t == nullptr) t = &local;
  Status s = Encode(spec, v, t, seed);
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(t->payload().size(), PayloadBytes(spec, v.size()));
  std::vector<float> out(v.size(), -7.0f);
  s = Decode(*t, out);
  EXPECT_TRUE(s.ok()) << spec.name << ": " << s.ToString();
  return out;
}

float ReadF32(const std::string& payload, size_t offset) {
  float f;
  std::memcpy(&f, payload.data() + offset, 4);
  return f;
}
void WriteF32(std::string* payload, size_t offset, float f) {
  std::memcpy(payload->data() + offset, &f, 4);
}
void WriteU32(std::string* payload, size_t offset, uint32_t u) {
  std::memcpy(payload->data() + offset, &u, 4);
}

// Decodes `t` into a buffer of `n` values and expects kInvalidArgument mentioning `needle`.
void ExpectRejected(const proto::EncodedTensor& t, size_t n, const std::string& needle) {
  std::vector<float> out(n);
  const Status s = Decode(t, out);
  ASSERT_FALSE(s.ok()) << "accepted a malformed " << t.codec() << " tensor (" << needle << ")";
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find(needle), std::string::npos)
      << "message \"" << s.message() << "\" does not mention \"" << needle << "\"";
}

// ---------------------------------------------------------------------------------------------
// Parsing

TEST(CodecParse, AcceptsEveryCodecAndNormalisesNames) {
  EXPECT_EQ(Spec("").kind, CodecKind::kFp32);
  EXPECT_EQ(Spec("fp16").kind, CodecKind::kFp16);
  EXPECT_EQ(Spec("int8").block_size, kDefaultBlockSize);
  EXPECT_EQ(Spec("int4", 64).block_size, 64u);
  EXPECT_EQ(Spec("qsgd:4").levels, 4u);
  EXPECT_EQ(Spec("qsgd:4").name, "qsgd:4");
  EXPECT_EQ(Spec("sign").kind, CodecKind::kSign);
  EXPECT_DOUBLE_EQ(Spec("topk:0.01").fraction, 0.01);
  EXPECT_DOUBLE_EQ(Spec("topk:1").fraction, 1.0);
  EXPECT_FALSE(Spec("topk:0.01").per_segment_scale);
  EXPECT_TRUE(Spec("topk:0.01:layer").per_segment_scale);
  EXPECT_DOUBLE_EQ(Spec("topk:0.01:layer").fraction, 0.01);
  EXPECT_EQ(Spec("topk:0.01:layer").name, "topk:0.01:layer");
  EXPECT_TRUE(Spec("sign").default_error_feedback());
  EXPECT_TRUE(Spec("topk:0.1").default_error_feedback());
  EXPECT_FALSE(Spec("int8").default_error_feedback());
}

TEST(CodecParse, RejectsBadNamesWithClearErrors) {
  struct Case {
    const char* name;
    const char* needle;
  };
  for (const Case& c :
       {Case{"topk:2", "(0, 1]"}, Case{"topk:0", "(0, 1]"}, Case{"topk:-0.1", "(0, 1]"},
        Case{"topk:nan", "(0, 1]"}, Case{"topk:", "(0, 1]"}, Case{"topk:0.1x", "(0, 1]"},
        Case{"topk::layer", "(0, 1]"}, Case{"topk:0.1:lay", "(0, 1]"},
        Case{"topk:0.1:layer:layer", "(0, 1]"}, Case{"qsgd:0", "[1, 32767]"},
        Case{"qsgd:-1", "[1, 32767]"}, Case{"qsgd:40000", "[1, 32767]"},
        Case{"qsgd:2.5", "[1, 32767]"}, Case{"qsgd:", "[1, 32767]"},
        Case{"int9", "valid codecs: fp32"}, Case{"INT8", "valid codecs"},
        Case{"int8 ", "valid codecs"}}) {
    auto spec = ParseCodec(c.name);
    ASSERT_FALSE(spec.ok()) << c.name;
    EXPECT_EQ(spec.status().code(), Status::Code::kInvalidArgument);
    EXPECT_NE(spec.status().message().find(c.needle), std::string::npos)
        << c.name << ": " << spec.status().message();
  }
  auto big = ParseCodec("int8", kMaxBlockSize + 1);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("block size"), std::string::npos);
}

TEST(CodecParse, ErrorFeedbackFollowsConfigOrDefault) {
  proto::CodecConfig config;
  EXPECT_TRUE(WantsErrorFeedback(Spec("sign"), config));
  EXPECT_FALSE(WantsErrorFeedback(Spec("int8"), config));
  config.set_error_feedback(true);
  EXPECT_TRUE(WantsErrorFeedback(Spec("int8"), config));
  EXPECT_FALSE(WantsErrorFeedback(Spec("fp32"), config));
}

TEST(CodecParse, TopKCount) {
  EXPECT_EQ(TopKCount(0.01, 0), 0u);
  EXPECT_EQ(TopKCount(0.01, 10), 1u);
  EXPECT_EQ(TopKCount(0.01, 199210), 1993u);
  EXPECT_EQ(TopKCount(1.0, 7), 7u);
  EXPECT_EQ(TopKCount(1e-9, 7), 1u);
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(CodecRoundTrip, Fp32IsExact) {
  const auto v = RandomVector(1000, 1);
  EXPECT_EQ(RoundTrip(Spec("fp32"), v), v);
}

TEST(CodecRoundTrip, Fp16WithinHalfPrecisionAndSaturates) {
  auto v = RandomVector(1003, 2);
  v[0] = 1e5f;   // saturates
  v[1] = -1e9f;  // saturates
  v[2] = 1e-6f;  // subnormal half
  v[3] = 0.0f;
  v[4] = 65519.0f;  // rounds to 65504 rather than to infinity
  const auto out = RoundTrip(Spec("fp16"), v);
  EXPECT_EQ(out[0], 65504.0f);
  EXPECT_EQ(out[1], -65504.0f);
  EXPECT_NEAR(out[2], 1e-6f, 6e-8f);  // half subnormal spacing 2^-24
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[4], 65504.0f);
  for (size_t i = 5; i < v.size(); ++i) {
    // Normal halves: relative error <= 2^-11 (half an ulp of an 11-bit significand).
    EXPECT_LE(std::fabs(out[i] - v[i]), std::fabs(v[i]) * 0x1p-11f + 0x1p-25f) << i;
  }
}

// int8 / int4: in every block, |x - decoded| <= scale / 2 (plus float rounding).
void CheckAffineBound(const std::string& name, int levels, const std::vector<float>& v,
                      uint32_t block) {
  const CodecSpec spec = Spec(name, block);
  proto::EncodedTensor t;
  const auto out = RoundTrip(spec, v, &t);
  ASSERT_EQ(t.num_blocks(), (v.size() + block - 1) / block);
  ASSERT_EQ(t.block_size(), block);
  for (size_t b = 0; b < t.num_blocks(); ++b) {
    const float lo = ReadF32(t.payload(), 8 * b);
    const float scale = ReadF32(t.payload(), 8 * b + 4);
    const size_t end = std::min(v.size(), (b + 1) * block);
    float vmin = v[b * block], vmax = v[b * block];
    for (size_t i = b * block; i < end; ++i) {
      vmin = std::min(vmin, v[i]);
      vmax = std::max(vmax, v[i]);
    }
    EXPECT_EQ(lo, vmin);
    EXPECT_NEAR(scale, (static_cast<double>(vmax) - vmin) / (levels - 1), 1e-6 * scale);
    const float mag = std::max(std::fabs(vmin), std::fabs(vmax));
    const float bound = scale * 0.5f * (1 + 1e-4f) + 4 * mag * std::numeric_limits<float>::epsilon();
    for (size_t i = b * block; i < end; ++i) {
      ASSERT_LE(std::fabs(out[i] - v[i]), bound) << name << " block " << b << " index " << i;
    }
  }
}

TEST(CodecRoundTrip, Int8WithinHalfAScalePerBlock) {
  CheckAffineBound("int8", 256, RandomVector(10000, 3), 256);
  CheckAffineBound("int8", 256, RandomVector(1001, 4, 1e-3f), 100);  // short last block
  CheckAffineBound("int8", 256, RandomVector(7, 5), 256);             // one partial block
  CheckAffineBound("int8", 256, RandomVector(300, 6), 1);             // one value per block
}

TEST(CodecRoundTrip, Int4WithinHalfAScalePerBlock) {
  CheckAffineBound("int4", 16, RandomVector(10000, 7), 256);
  CheckAffineBound("int4", 16, RandomVector(1001, 8), 33);  // odd n, odd blocks
  CheckAffineBound("int4", 16, RandomVector(1, 9), 256);
}

TEST(CodecRoundTrip, ConstantBlocksAreExact) {
  std::vector<float> v(600, 0.25f);
  for (size_t i = 256; i < 512; ++i) v[i] = -3.0f;
  for (const char* name : {"int8", "int4"}) {
    EXPECT_EQ(RoundTrip(Spec(name), v), v) << name;
  }
  for (float x : RoundTrip(Spec("qsgd:4"), v)) EXPECT_TRUE(x == 0.25f || x == -3.0f) << x;
  EXPECT_EQ(RoundTrip(Spec("sign"), v), v);
  const std::vector<float> zeros(100, 0.0f);
  for (const char* name : {"fp16", "int8", "int4", "qsgd:2", "sign", "topk:0.1"}) {
    EXPECT_EQ(RoundTrip(Spec(name), zeros), zeros) << name;
  }
}

TEST(CodecRoundTrip, HugeAndTinyValuesStayFinite) {
  const float big = std::numeric_limits<float>::max();
  const std::vector<float> v = {big, -big, big, 0.0f, -big, 1e-45f, 3e38f, -1.0f};
  for (const char* name : {"fp16", "int8", "int4", "qsgd:1", "qsgd:100", "sign", "topk:0.5"}) {
    const auto out = RoundTrip(Spec(name), v);
    for (float x : out) EXPECT_TRUE(std::isfinite(x)) << name;
  }
  // int8 on a block spanning -max..max still meets its bound.
  CheckAffineBound("int8", 256, v, 256);
  const std::vector<float> tiny = {1e-45f, 2e-45f, 0.0f, -1e-45f};
  for (const char* name : {"int8", "int4", "qsgd:3", "sign"}) {
    for (float x : RoundTrip(Spec(name), tiny)) EXPECT_LE(std::fabs(x), 3e-45f) << name;
  }
}

TEST(CodecRoundTrip, EmptyVector) {
  for (const char* name : {"fp32", "fp16", "int8", "int4", "qsgd:4", "sign", "topk:0.01"}) {
    proto::EncodedTensor t;
    const auto out = RoundTrip(Spec(name), {}, &t);
    EXPECT_TRUE(out.empty());
    EXPECT_EQ(t.payload().size(), 0u) << name;
    EXPECT_EQ(t.num_blocks(), 0u) << name;
  }
}

TEST(CodecRoundTrip, SignIsPlusMinusMeanAbsPerBlock) {
  // Blocks that start inside a byte of signs and sizes that end inside one too.
  for (const auto& [n, block] :
       {std::pair<size_t, uint32_t>{1000, 128}, {1003, 13}, {7, 3}, {9, 256}, {17, 8}}) {
    const auto v = RandomVector(n, 10);
    const auto out = RoundTrip(Spec("sign", block), v);
    for (size_t start = 0; start < v.size(); start += block) {
      const size_t end = std::min(v.size(), start + block);
      double mean = 0;
      for (size_t i = start; i < end; ++i) mean += std::fabs(v[i]);
      mean /= static_cast<double>(end - start);
      for (size_t i = start; i < end; ++i) {
        EXPECT_FLOAT_EQ(out[i], v[i] < 0 ? -mean : mean)
            << "n " << n << ", block " << block << ", index " << i;
      }
    }
  }
}

TEST(CodecRoundTrip, TopKKeepsLargestExactlyAndZeroesTheRest) {
  const auto v = RandomVector(1000, 11);
  const auto out = RoundTrip(Spec("topk:0.05"), v);
  std::vector<float> mags;
  for (float x : v) mags.push_back(std::fabs(x));
  std::sort(mags.begin(), mags.end(), std::greater<>());
  const float threshold = mags[49];  // 50 = ceil(0.05 * 1000) kept
  size_t kept = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (std::fabs(v[i]) >= threshold) {
      EXPECT_EQ(out[i], v[i]) << i;
      ++kept;
    } else {
      EXPECT_EQ(out[i], 0.0f) << i;
    }
  }
  EXPECT_EQ(kept, 50u);
  // Ties at the threshold: the first ones in index order are kept, exactly k in all.
  const std::vector<float> ties(10, 1.0f);
  const auto tied = RoundTrip(Spec("topk:0.3"), ties);
  EXPECT_EQ(tied, (std::vector<float>{1, 1, 1, 0, 0, 0, 0, 0, 0, 0}));
}

// The selection (a bucket count over the scores' bits, then nth_element within one bucket)
// must pick exactly what sorting by (|x| descending, index ascending) picks, on inputs that
// stress it: many ties, a spread over every exponent, signed zeros, subnormals, one bucket
// holding everything, and k from 1 to n.
TEST(CodecRoundTrip, TopKPicksWhatAFullSortPicks) {
  std::mt19937 rng(5);
  auto reference = [](const std::vector<float>& v, size_t k) {
    std::vector<size_t> order(v.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&v](size_t a, size_t b) { return std::fabs(v[a]) > std::fabs(v[b]); });
    std::vector<float> out(v.size(), 0.0f);
    for (size_t j = 0; j < k; ++j) out[order[j]] = v[order[j]];
    return out;
  };
  std::vector<std::vector<float>> inputs;
  inputs.push_back(RandomVector(5000, 3));
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> tied(3000);
  for (float& x : tied) x = static_cast<float>(small(rng));  // 7 values, 0 and ties
  inputs.push_back(tied);
  std::uniform_real_distribution<float> exponent(-140.0f, 120.0f);
  std::vector<float> spread(3000);
  for (float& x : spread) x = (rng() % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng));
  inputs.push_back(spread);
  std::vector<float> zeros(1000, 0.0f);
  for (size_t i = 0; i < zeros.size(); i += 3) zeros[i] = -0.0f;
  zeros[500] = std::numeric_limits<float>::denorm_min();
  zeros[700] = -std::numeric_limits<float>::denorm_min();
  inputs.push_back(zeros);
  std::vector<float> one_bucket(2000);  // all within [1, 1.0005): the same 11 high bits
  for (size_t i = 0; i < one_bucket.size(); ++i) one_bucket[i] = 1.0f + 1e-7f * (i % 500);
  inputs.push_back(one_bucket);
  for (size_t c = 0; c < inputs.size(); ++c) {
    const auto& v = inputs[c];
    for (const double f : {1e-4, 0.001, 0.01, 0.1, 0.37, 0.5, 0.99, 1.0}) {
      const CodecSpec spec = Spec("topk:" + std::to_string(f));
      const auto k = static_cast<size_t>(TopKCount(spec.fraction, v.size()));
      const auto out = RoundTrip(spec, v);
      const auto want = reference(v, k);
      ASSERT_EQ(out.size(), want.size());
      for (size_t i = 0; i < out.size(); ++i) {
        // Bit for bit, so that -0.0 kept and 0.0 dropped differ.
        ASSERT_EQ(std::bit_cast<uint32_t>(out[i]), std::bit_cast<uint32_t>(want[i]))
            << "input " << c << ", f " << f << ", index " << i;
      }
    }
  }
}

// topk:f:layer picks by |x| / RMS of x over x's segment: a segment of small values still
// gets its largest ones sent. The payload is plain topk's (decoded without the segments).
TEST(CodecRoundTrip, TopKPerLayerScalesEachSegmentByItsRms) {
  const std::vector<float> v = {100, 90, 80, 70, 0.1f, 0.3f, 0.2f, 0.05f};
  // Plain: the two largest magnitudes, both in the first segment.
  EXPECT_EQ(RoundTrip(Spec("topk:0.25"), v), (std::vector<float>{100, 90, 0, 0, 0, 0, 0, 0}));
  // Per segment: |x| / RMS is 1.17, 1.05, 0.93, 0.82 in the first (RMS 85.7) and 0.53, 1.59,
  // 1.06, 0.26 in the second (RMS 0.189): 0.3 and 100 are kept.
  CodecSpec layer = Spec("topk:0.25:layer");
  layer.segments = {4, 4};
  const auto out = RoundTrip(layer, v);
  EXPECT_EQ(out, (std::vector<float>{100, 0, 0, 0, 0, 0.3f, 0, 0}));
  // Without segments it is plain topk; segments that do not cover the values are refused.
  EXPECT_EQ(RoundTrip(Spec("topk:0.25:layer"), v), RoundTrip(Spec("topk:0.25"), v));
  layer.segments = {4, 3};
  proto::EncodedTensor t;
  const Status s = Encode(layer, v, &t);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("segments hold 7 values, encoding 8"), std::string::npos)
      << s.ToString();
  // A segment of zeros scores 0 and is only picked after every non-zero value.
  layer.segments = {4, 4};
  const std::vector<float> zeros = {0, 0, 0, 0, 1, 2, 3, 4};
  EXPECT_EQ(RoundTrip(layer, zeros), (std::vector<float>{0, 0, 0, 0, 0, 0, 3, 4}));
  // A segment of subnormals: 1 / RMS overflows a float, yet the scores stay |x| / RMS (2d
  // scores 1.79, 4 scores 1.46) and its zeros score 0, not NaN.
  const float d = std::numeric_limits<float>::denorm_min();
  const std::vector<float> tiny = {4, 3, 2, 1, d, 2 * d, 0, 0};
  EXPECT_EQ(RoundTrip(layer, tiny), (std::vector<float>{4, 0, 0, 0, 0, 2 * d, 0, 0}));
}

// SelectTopK names exactly the indices Encode keeps, for plain and per-layer topk.
TEST(CodecSelectTopK, NamesTheIndicesEncodeKeeps) {
  const std::vector<float> v = RandomVector(5000, 21);
  CodecSpec layer = Spec("topk:0.01:layer");
  layer.segments = {4000, 990, 10};
  for (const CodecSpec& spec : {Spec("topk:0.01"), Spec("topk:0.3"), layer}) {
    proto::EncodedTensor t;
    ASSERT_TRUE(Encode(spec, v, &t).ok());
    auto indices = SelectTopK(spec, v);
    ASSERT_TRUE(indices.ok()) << indices.status().ToString();
    ASSERT_EQ(indices->size(), t.k());
    for (size_t j = 0; j < indices->size(); ++j) {
      uint32_t i = 0;
      std::memcpy(&i, t.payload().data() + 4 * j, 4);
      ASSERT_EQ((*indices)[j], i) << spec.name << " entry " << j;
    }
  }
  // Per layer, a spike in a segment of small values gets a slot plain topk would not give it
  // (|x| / RMS = 10 / 3.2 there, against about 2.6 for the 50th score of the others).
  std::vector<float> small = v;
  for (size_t i = 4990; i < 5000; ++i) small[i] = 1e-4f;
  small[4995] = 1e-2f;
  auto per_layer = SelectTopK(layer, small);
  ASSERT_TRUE(per_layer.ok());
  EXPECT_GE(per_layer->back(), 4990u);
  auto plain = SelectTopK(Spec("topk:0.01"), small);
  ASSERT_TRUE(plain.ok());
  EXPECT_LT(plain->back(), 4990u);

  EXPECT_EQ(SelectTopK(Spec("int8"), v).status().code(), Status::Code::kInvalidArgument);
  std::vector<float> bad = v;
  bad[17] = std::nanf("");
  EXPECT_EQ(SelectTopK(Spec("topk:0.01"), bad).status().code(), Status::Code::kInvalidArgument);
  layer.segments = {4000, 990};
  EXPECT_EQ(SelectTopK(layer, v).status().code(), Status::Code::kInvalidArgument);
}

TEST(CodecParse, SparseRefitDefaultsAndLimits) {
  proto::CodecConfig config;
  config.set_name("topk:0.01");
  auto refit = ParseSparseRefit(config);
  ASSERT_TRUE(refit.ok());
  EXPECT_EQ(refit->share, kDefaultSparseRefit);  // unset: on for topk
  EXPECT_EQ(refit->lr_scale, kDefaultSparseRefitLrScale);
  config.set_sparse_refit(0);
  EXPECT_FALSE(ParseSparseRefit(config)->on());  // set to 0: off
  config.set_sparse_refit(0.25f);
  config.set_sparse_refit_lr_scale(2);
  EXPECT_EQ(ParseSparseRefit(config)->share, 0.25f);
  EXPECT_EQ(ParseSparseRefit(config)->lr_scale, 2.0);
  config.set_name("int8");
  config.clear_sparse_refit();
  EXPECT_FALSE(ParseSparseRefit(config)->on());  // unset: off for the other codecs

  auto refused = [](const std::string& codec, float share, float scale) {
    proto::CodecConfig bad;
    bad.set_name(codec);
    bad.set_sparse_refit(share);
    bad.set_sparse_refit_lr_scale(scale);
    const Status s = ParseSparseRefit(bad).status();
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << codec << " " << share << " " << scale;
    return s.message();
  };
  EXPECT_NE(refused("topk:0.01", 1.0f, 0).find("share must be in [0, 1)"), std::string::npos);
  EXPECT_NE(refused("topk:0.01", -0.1f, 0).find("share"), std::string::npos);
  EXPECT_NE(refused("topk:0.01", std::nanf(""), 0).find("share"), std::string::npos);
  EXPECT_NE(refused("topk:0.01", 0.5f, 65).find("scale must be in [0, 64]"), std::string::npos);
  EXPECT_NE(refused("topk:0.01", 0.5f, -1).find("scale"), std::string::npos);
  EXPECT_NE(refused("topk:0.01", 0.5f, std::nanf("")).find("scale"), std::string::npos);
  EXPECT_NE(refused("int8", 0.5f, 0).find("topk codecs only, not int8"), std::string::npos);
}

TEST(CodecRoundTrip, QsgdLevelsAndReproducibility) {
  const auto v = RandomVector(1000, 12);
  const CodecSpec spec = Spec("qsgd:4", 100);
  proto::EncodedTensor a, b, c;
  const auto out = RoundTrip(spec, v, &a, 42);
  RoundTrip(spec, v, &b, 42);
  RoundTrip(spec, v, &c, 43);
  EXPECT_EQ(a.seed(), 42u);
  EXPECT_EQ(a.payload(), b.payload());
  EXPECT_NE(a.payload(), c.payload());
  for (size_t start = 0; start < v.size(); start += 100) {
    float m = 0;
    for (size_t i = start; i < start + 100; ++i) m = std::max(m, std::fabs(v[i]));
    for (size_t i = start; i < start + 100; ++i) {
      // decoded = sign(x) * m * l / 4 with l one of the two levels around 4|x|/m.
      const float l = std::fabs(out[i]) / m * 4;
      EXPECT_NEAR(l, std::round(l), 1e-4f);
      EXPECT_LE(std::fabs(l - std::fabs(v[i]) / m * 4), 1.0f + 1e-4f);
      if (out[i] != 0) {
        EXPECT_EQ(std::signbit(out[i]), std::signbit(v[i]));
      }
    }
  }
}

TEST(CodecRoundTrip, QsgdIsUnbiased) {
  const auto v = RandomVector(512, 13);
  const CodecSpec spec = Spec("qsgd:2", 128);
  const int trials = 4000;
  std::vector<double> mean(v.size(), 0.0);
  std::vector<float> out(v.size());
  proto::EncodedTensor t;
  for (int s = 0; s < trials; ++s) {
    ASSERT_TRUE(Encode(spec, v, &t, 1000 + s).ok());
    ASSERT_TRUE(Decode(t, out).ok());
    for (size_t i = 0; i < v.size(); ++i) mean[i] += out[i];
  }
  double worst = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    mean[i] /= trials;
    worst = std::max(worst, std::fabs(mean[i] - v[i]));
  }
  // Per value the decode takes two levels m/2 apart: std dev <= m/4 ~ 0.8 here, so the mean
  // of 4000 has std dev <= 0.013; 0.07 is above 5 sigma for every one of the 512 values.
  EXPECT_LT(worst, 0.07);
}

TEST(CodecEncode, RejectsNonFiniteInput) {
  auto v = RandomVector(100, 14);
  v[17] = std::numeric_limits<float>::quiet_NaN();
  for (const char* name : {"fp32", "fp16", "int8", "int4", "qsgd:4", "sign", "topk:0.1"}) {
    proto::EncodedTensor t;
    const Status s = Encode(Spec(name), v, &t);
    ASSERT_FALSE(s.ok()) << name;
    EXPECT_NE(s.message().find("index 17"), std::string::npos) << s.message();
  }
  v[17] = std::numeric_limits<float>::infinity();
  proto::EncodedTensor t;
  EXPECT_FALSE(Encode(Spec("int8"), v, &t).ok());

  // int8 and int4 check block by block as they quantise: a bad value in a late block (the
  // earlier blocks already written) is still named, and nothing half-encoded is left behind.
  auto w = RandomVector(1000, 15);
  w[700] = -std::numeric_limits<float>::infinity();
  for (const char* name : {"int8", "int4"}) {
    proto::EncodedTensor u;
    const Status s = Encode(Spec(name), w, &u);
    ASSERT_FALSE(s.ok()) << name;
    EXPECT_NE(s.message().find("index 700"), std::string::npos) << s.message();
    EXPECT_EQ(u.num_values(), 0u) << name;
    EXPECT_TRUE(u.payload().empty()) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Error feedback

void CheckFeedbackTracks(const std::string& name) {
  const CodecSpec spec = Spec(name, 64);
  const size_t n = 2000;
  ErrorFeedback feedback;
  std::vector<double> sum_true(n, 0.0), sum_sent(n, 0.0);
  std::vector<float> decoded(n);
  proto::EncodedTensor t;
  double max_residual = 0;
  for (int round = 0; round < 200; ++round) {
    const auto update = RandomVector(n, 100 + round, 0.1f);
    ASSERT_TRUE(feedback.Encode(spec, update, &t, round).ok());
    ASSERT_TRUE(Decode(t, decoded).ok());
    for (size_t i = 0; i < n; ++i) {
      sum_true[i] += update[i];
      sum_sent[i] += decoded[i];
    }
    double r2 = 0;
    for (float r : feedback.residual()) r2 += static_cast<double>(r) * r;
    max_residual = std::max(max_residual, std::sqrt(r2));
  }
  // sum of true - sum of sent = current residual (telescoping), to float rounding.
  double gap2 = 0, true2 = 0;
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(sum_true[i] - sum_sent[i], feedback.residual()[i], 1e-3) << name << " " << i;
    gap2 += (sum_true[i] - sum_sent[i]) * (sum_true[i] - sum_sent[i]);
    true2 += sum_true[i] * sum_true[i];
  }
  // One update has norm 0.1 * sqrt(2000) ~ 4.5; the residual stays within a few updates while
  // the true sum grows like sqrt(rounds); without feedback the gap would grow with the rounds.
  EXPECT_LT(max_residual, 30.0) << name;
  EXPECT_LT(std::sqrt(gap2), 0.5 * std::sqrt(true2)) << name;
}

TEST(ErrorFeedbackTest, SentSumTracksTrueSumAndResidualStaysBounded) {
  for (const char* name : {"sign", "topk:0.05", "int4", "qsgd:2"}) CheckFeedbackTracks(name);
}

TEST(ErrorFeedbackTest, WithoutFeedbackTopKDrifts) {
  // The control for the test above: topk without feedback never sends the small values, so
  // the gap grows with the rounds.
  const CodecSpec spec = Spec("topk:0.05");
  const size_t n = 2000;
  std::vector<double> gap(n, 0.0);
  std::vector<float> decoded(n);
  proto::EncodedTensor t;
  for (int round = 0; round < 200; ++round) {
    const auto update = RandomVector(n, 100 + round, 0.1f);
    ASSERT_TRUE(Encode(spec, update, &t).ok());
    ASSERT_TRUE(Decode(t, decoded).ok());
    for (size_t i = 0; i < n; ++i) gap[i] += update[i] - decoded[i];
  }
  double gap2 = 0;
  for (double g : gap) gap2 += g * g;
  EXPECT_GT(std::sqrt(gap2), 30.0);
}

TEST(ErrorFeedbackTest, ApplyUpdateAndSizeMismatch) {
  ErrorFeedback feedback;
  std::vector<float> u = {1, 2, 3};
  ASSERT_TRUE(feedback.Apply(u).ok());  // first use: residual zero
  EXPECT_EQ(u, (std::vector<float>{1, 2, 3}));
  ASSERT_TRUE(feedback.Update(u, std::vector<float>{0.5f, 2, 4}).ok());
  EXPECT_EQ(std::vector<float>(feedback.residual().begin(), feedback.residual().end()),
            (std::vector<float>{0.5f, 0, -1}));
  ASSERT_TRUE(feedback.Apply(u).ok());
  EXPECT_EQ(u, (std::vector<float>{1.5f, 2, 2}));
  std::vector<float> wrong(4);
  EXPECT_FALSE(feedback.Apply(wrong).ok());
  proto::EncodedTensor t;
  EXPECT_FALSE(feedback.Encode(Spec("sign"), wrong, &t).ok());
  // A failed encode (NaN) leaves the residual as it was.
  std::vector<float> nan = {std::numeric_limits<float>::quiet_NaN(), 0, 0};
  EXPECT_FALSE(feedback.Encode(Spec("sign"), nan, &t).ok());
  EXPECT_EQ(feedback.residual()[0], 0.5f);
  feedback.Reset();
  EXPECT_TRUE(feedback.residual().empty());
}

// ---------------------------------------------------------------------------------------------
// Malformed payloads

proto::EncodedTensor Encoded(const std::string& name, size_t n, uint32_t block = 0) {
  proto::EncodedTensor t;
  const auto v = RandomVector(n, 20);
  EXPECT_TRUE(Encode(Spec(name, block), v, &t, 5).ok());
  return t;
}

TEST(CodecDecode, RejectsWrongNameAndCountMismatch) {
  auto t = Encoded("int8", 1000);
  auto bad = t;
  bad.set_codec("int9");
  ExpectRejected(bad, 1000, "unknown codec");
  bad.set_codec("");
  ExpectRejected(bad, 1000, "no codec");
  ExpectRejected(t, 999, "expected 999");
  bad = t;
  bad.set_num_values(999);
  ExpectRejected(bad, 999, "payload bytes");  // still 4 blocks, one code byte too many
  bad.set_num_values(1001);
  ExpectRejected(bad, 1001, "payload bytes");
  // A tensor re-labelled as another codec with a payload of the wrong size.
  bad = t;
  bad.set_codec("int4");
  ExpectRejected(bad, 1000, "payload bytes");
  bad.set_codec("sign");
  ExpectRejected(bad, 1000, "payload bytes");
  bad.set_codec("topk:0.01");
  ExpectRejected(bad, 1000, "block_size");
  bad = Encoded("fp32", 10);
  bad.set_block_size(4);
  ExpectRejected(bad, 10, "block_size");
}

TEST(CodecDecode, RejectsLiesAboutLengthBlocksAndK) {
  for (const char* name : {"fp16", "int8", "int4", "qsgd:5", "sign", "topk:0.1"}) {
    const auto t = Encoded(name, 777, 100);
    auto bad = t;
    bad.mutable_payload()->push_back('\0');
    ExpectRejected(bad, 777, "payload bytes");
    bad = t;
    bad.mutable_payload()->pop_back();
    ExpectRejected(bad, 777, "payload bytes");
    bad = t;
    bad.mutable_payload()->clear();
    ExpectRejected(bad, 777, "payload bytes");
    if (t.block_size() != 0) {
      bad = t;
      bad.set_num_blocks(t.num_blocks() + 1);
      ExpectRejected(bad, 777, "num_blocks");
      bad.set_num_blocks(uint64_t{1} << 62);
      ExpectRejected(bad, 777, "num_blocks");
      bad = t;
      bad.set_block_size(0);
      ExpectRejected(bad, 777, "block_size");
      bad.set_block_size(kMaxBlockSize + 1);
      ExpectRejected(bad, 777, "block_size");
      bad.set_block_size(50);  // consistent count for another block size, payload too short
      bad.set_num_blocks(16);
      ExpectRejected(bad, 777, "payload bytes");
    } else {
      bad = t;
      bad.set_num_blocks(1);
      ExpectRejected(bad, 777, "block_size or num_blocks");
    }
    bad = t;
    bad.set_k(t.k() + 1);
    ExpectRejected(bad, 777, "k = ");
    bad.set_k(~uint64_t{0});
    ExpectRejected(bad, 777, "k = ");
  }
  auto huge = Encoded("int8", 10);
  huge.set_num_values(uint64_t{1} << 40);
  ExpectRejected(huge, 10, "expected 10");
}

TEST(CodecDecode, RejectsNonFiniteOrNegativeScales) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const char* name : {"int8", "int4"}) {
    const auto t = Encoded(name, 300, 100);
    for (float bad_value : {inf, -inf, nan}) {
      auto bad = t;
      WriteF32(bad.mutable_payload(), 8, bad_value);  // block 1 min
      ExpectRejected(bad, 300, "invalid min/scale");
      bad = t;
      WriteF32(bad.mutable_payload(), 12, bad_value);  // block 1 scale
      ExpectRejected(bad, 300, "invalid min/scale");
    }
    auto bad = t;
    WriteF32(bad.mutable_payload(), 4, -0.5f);
    ExpectRejected(bad, 300, "invalid min/scale");
    // Finite min and scale whose top level overflows.
    bad = t;
    WriteF32(bad.mutable_payload(), 0, 3e38f);
    WriteF32(bad.mutable_payload(), 4, 1e37f);
    ExpectRejected(bad, 300, "invalid min/scale");
  }
  for (const char* name : {"sign", "qsgd:3"}) {
    const auto t = Encoded(name, 300, 100);
    for (float bad_value : {inf, nan, -1.0f}) {
      auto bad = t;
      WriteF32(bad.mutable_payload(), 4 * 2, bad_value);
      ExpectRejected(bad, 300, std::string(name) == "sign" ? "invalid scale" : "invalid norm");
    }
  }
  auto fp16 = Encoded("fp16", 10);
  (*fp16.mutable_payload())[2 * 3 + 1] = static_cast<char>(0x7c);  // exponent 31
  ExpectRejected(fp16, 10, "non-finite value at index 3");
  auto fp32 = Encoded("fp32", 10);
  WriteF32(fp32.mutable_payload(), 8, nan);
  ExpectRejected(fp32, 10, "non-finite");
}

TEST(CodecDecode, RejectsBadTopKIndicesAndValues) {
  const auto t = Encoded("topk:0.1", 100);  // k = 10
  ASSERT_EQ(t.k(), 10u);
  auto bad = t;
  WriteU32(bad.mutable_payload(), 4 * 3, 100);
  ExpectRejected(bad, 100, "out of range");
  bad = t;
  WriteU32(bad.mutable_payload(), 4 * 9, 0xffffffffu);
  ExpectRejected(bad, 100, "out of range");
  bad = t;
  uint32_t second;
  std::memcpy(&second, t.payload().data() + 4, 4);
  WriteU32(bad.mutable_payload(), 4 * 2, second);  // duplicate
  ExpectRejected(bad, 100, "strictly increasing");
  bad = t;
  uint32_t first;
  std::memcpy(&first, t.payload().data(), 4);
  WriteU32(bad.mutable_payload(), 0, second);  // swap the first two: unsorted
  WriteU32(bad.mutable_payload(), 4, first);
  ExpectRejected(bad, 100, "strictly increasing");
  bad = t;
  WriteF32(bad.mutable_payload(), 4 * 10 + 4 * 5, std::numeric_limits<float>::infinity());
  ExpectRejected(bad, 100, "non-finite");
}

TEST(CodecDecode, RejectsBadCodesAndPadding) {
  // int4 with odd n: the unused high nibble must be zero.
  auto int4 = Encoded("int4", 101);
  int4.mutable_payload()->back() = static_cast<char>(int4.payload().back() | 0x10);
  ExpectRejected(int4, 101, "padding nibble");
  auto sign = Encoded("sign", 13);
  sign.mutable_payload()->back() = static_cast<char>(sign.payload().back() | 0x80);
  ExpectRejected(sign, 13, "padding bits");
  // qsgd:2 codes are 3 bits; 7 = level 3 > s, 1 = "negative zero".
  const auto q = Encoded("qsgd:2", 8);  // 4 bytes norm + 3 bytes of codes
  auto bad = q;
  (*bad.mutable_payload())[4] = static_cast<char>(0x07);
  (*bad.mutable_payload())[5] = 0;
  (*bad.mutable_payload())[6] = 0;
  ExpectRejected(bad, 8, "invalid code 7");
  (*bad.mutable_payload())[4] = static_cast<char>(0x01);
  ExpectRejected(bad, 8, "invalid code 1");
  const auto q3 = Encoded("qsgd:2", 3);  // 9 bits of codes in 2 bytes
  bad = q3;
  bad.mutable_payload()->back() = static_cast<char>(bad.payload().back() | 0x80);
  ExpectRejected(bad, 3, "padding bits");
}

}  // namespace
}  // namespace fedslice::codec
