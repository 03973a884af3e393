#include "fedslice/common/partition.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "fedslice/common/portable_random.h"

namespace fedslice::data {
namespace {

using ::testing::HasSubstr;

// MNIST-10k's class sizes, labels in a shuffled order (like the real files).
std::vector<int32_t> MnistLikeLabels() {
  const int counts[10] = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};
  std::vector<int32_t> labels;
  for (int c = 0; c < 10; ++c) labels.insert(labels.end(), counts[c], c);
  PortableRng rng(123);
  rng.Shuffle(std::span<int32_t>(labels));
  return labels;
}

std::vector<std::vector<int64_t>> AllClients(std::span<const int32_t> labels,
                                             const PartitionScheme& scheme, uint64_t seed,
                                             int count) {
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < count; ++i) {
    Result<std::vector<int64_t>> r = PartitionIndices(labels, scheme, seed, i, count);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    out.push_back(r.ok() ? *r : std::vector<int64_t>{});
  }
  return out;
}

// Disjoint, covering [0, n), every client non-empty and ascending.
void ExpectValidPartition(const std::vector<std::vector<int64_t>>& parts, size_t n) {
  std::vector<int> seen(n, 0);
  for (size_t c = 0; c < parts.size(); ++c) {
    EXPECT_FALSE(parts[c].empty()) << "client " << c;
    EXPECT_TRUE(std::is_sorted(parts[c].begin(), parts[c].end())) << "client " << c;
    for (int64_t i : parts[c]) {
      ASSERT_GE(i, 0);
      ASSERT_LT(i, static_cast<int64_t>(n));
      ++seen[i];
    }
  }
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "sample " << i;
}

std::map<int32_t, int64_t> LabelCounts(std::span<const int32_t> labels,
                                       const std::vector<int64_t>& part) {
  std::map<int32_t, int64_t> counts;
  for (int64_t i : part) ++counts[labels[i]];
  return counts;
}

const PartitionScheme kIid{PartitionScheme::kIid};
const PartitionScheme kShards2{PartitionScheme::kShards, 0.5, 2};

PartitionScheme Dirichlet(double alpha) { return {PartitionScheme::kDirichlet, alpha, 2}; }

TEST(ParsePartitionSchemeTest, AcceptsEveryForm) {
  auto parse = [](std::string_view text) {
    Result<PartitionScheme> r = ParsePartitionScheme(text);
    EXPECT_TRUE(r.ok()) << text << ": " << r.status().ToString();
    return r.ok() ? *r : PartitionScheme{};
  };
  EXPECT_EQ(parse("iid").kind, PartitionScheme::kIid);
  EXPECT_EQ(parse("shards").kind, PartitionScheme::kShards);
  EXPECT_EQ(parse("shards").shards_per_client, 2);
  EXPECT_EQ(parse("shards:5").shards_per_client, 5);
  EXPECT_EQ(parse("dirichlet").kind, PartitionScheme::kDirichlet);
  EXPECT_EQ(parse("dirichlet").alpha, 0.5);
  EXPECT_EQ(parse("dirichlet:0.1").alpha, 0.1);
  EXPECT_EQ(parse("dirichlet:100").alpha, 100.0);
  EXPECT_EQ(parse("dirichlet:1e-3").alpha, 1e-3);
  for (const char* text :
       {"iid", "shards:2", "shards:7", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:1000"}) {
    EXPECT_EQ(ToString(parse(text)), text);
  }
}

TEST(ParsePartitionSchemeTest, RejectsBadText) {
  for (const char* text :
       {"", "IID", "iid:3", "shard", "shards:", "shards:0", "shards:-1", "shards:x", "shards:2x",
        "shards: 2", "dirichlet:", "dirichlet:0", "dirichlet:-0.5", "dirichlet:nan",
        "dirichlet:inf", "dirichlet:1e-9", "dirichlet:0.5:1", "random"}) {
    const Result<PartitionScheme> r = ParsePartitionScheme(text);
    ASSERT_FALSE(r.ok()) << "accepted '" << text << "'";
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
    EXPECT_THAT(r.status().message(),
                HasSubstr("bad partition scheme '" + std::string(text) + "'"));
    EXPECT_THAT(r.status().message(), HasSubstr("expected iid, shards"));
  }
}

TEST(PartitionTest, EverySchemeIsDisjointCoveringAndNonEmpty) {
  const std::vector<int32_t> labels = MnistLikeLabels();
  for (const PartitionScheme& scheme :
       {kIid, kShards2, PartitionScheme{PartitionScheme::kShards, 0.5, 3}, Dirichlet(0.1),
        Dirichlet(0.5), Dirichlet(100)}) {
    for (int count : {1, 2, 7, 10, 100}) {
      SCOPED_TRACE(ToString(scheme) + " x " + std::to_string(count));
      ExpectValidPartition(AllClients(labels, scheme, 42, count), labels.size());
    }
  }
}

TEST(PartitionTest, SameSeedSameResultOtherSeedDifferent) {
  const std::vector<int32_t> labels = MnistLikeLabels();
  for (const PartitionScheme& scheme : {kIid, kShards2, Dirichlet(0.5)}) {
    SCOPED_TRACE(ToString(scheme));
    const auto a = AllClients(labels, scheme, 7, 10);
    EXPECT_EQ(AllClients(labels, scheme, 7, 10), a);
    const auto b = AllClients(labels, scheme, 8, 10);
    ExpectValidPartition(b, labels.size());
    for (int c = 0; c < 10; ++c) EXPECT_NE(a[c], b[c]) << "client " << c;
  }
}

// The assignment is a contract between processes (every client computes it independently,
// possibly on different machines and FedSlice builds): these exact values must not change.
TEST(PartitionTest, ResultsArePinned) {
  std::vector<int32_t> labels(24);
  for (int i = 0; i < 24; ++i) labels[i] = i % 3;
  auto part = [&](const PartitionScheme& s, int index) {
    return *PartitionIndices(labels, s, 2026, index, 3);
  };
  EXPECT_EQ(part(kIid, 0), (std::vector<int64_t>{1, 5, 6, 8, 9, 10, 20, 21}));
  EXPECT_EQ(part(kShards2, 1), (std::vector<int64_t>{1, 4, 7, 10, 13, 16, 19, 22}));
  EXPECT_EQ(part(Dirichlet(0.5), 2), (std::vector<int64_t>{3, 4, 7, 16, 19, 23}));

  // Dirichlet at scale goes through thousands of gamma draws and floating-point cuts: pin
  // every client's size and a fingerprint of the whole assignment.
  const std::vector<int32_t> mnist = MnistLikeLabels();
  const auto parts = AllClients(mnist, Dirichlet(0.3), 2026, 10);
  std::vector<size_t> sizes;
  uint64_t fingerprint = 1469598103934665603ull;  // FNV-1a over (client, index) pairs.
  for (size_t c = 0; c < parts.size(); ++c) {
    sizes.push_back(parts[c].size());
    for (int64_t i : parts[c]) {
      fingerprint = (fingerprint ^ (c * 1000003 + static_cast<uint64_t>(i))) * 1099511628211ull;
    }
  }
  EXPECT_EQ(sizes, (std::vector<size_t>{1457, 2101, 1077, 931, 573, 797, 322, 365, 1573, 804}));
  EXPECT_EQ(fingerprint, 12136953853558725567ull);
}

TEST(PartitionTest, IidChunksAreNearEqualAndRepresentative) {
  const std::vector<int32_t> labels = MnistLikeLabels();
  const auto parts = AllClients(labels, kIid, 1, 7);
  for (const auto& p : parts) {
    EXPECT_GE(p.size(), 10000u / 7);
    EXPECT_LE(p.size(), 10000u / 7 + 1);
    // 1,428 samples: every class present at roughly its global share (~10%).
    for (const auto& [label, n] : LabelCounts(labels, p)) {
      EXPECT_GT(n, 90) << "label " << label;
      EXPECT_LT(n, 200) << "label " << label;
    }
  }
}

TEST(PartitionTest, ShardsOfBalancedClassesGiveTwoLabelsPerClient) {
  // 10 classes x 60 samples, 10 clients x 2 shards of 30: every shard is single-label, so each
  // client holds exactly 60 samples from at most 2 labels, in multiples of 30.
  std::vector<int32_t> labels;
  for (int i = 0; i < 600; ++i) labels.push_back(i % 10);
  const auto parts = AllClients(labels, kShards2, 3, 10);
  ExpectValidPartition(parts, labels.size());
  int two_label_clients = 0;
  for (const auto& p : parts) {
    EXPECT_EQ(p.size(), 60u);
    const auto counts = LabelCounts(labels, p);
    EXPECT_LE(counts.size(), 2u);
    two_label_clients += counts.size() == 2;
    for (const auto& [label, n] : counts) EXPECT_EQ(n % 30, 0) << "label " << label;
  }
  // Shard ids are shuffled: clients do not just get consecutive shards of one label.
  EXPECT_GE(two_label_clients, 5);
}

TEST(PartitionTest, ShardsFollowLabelOrder) {
  // MNIST-10k, McMahan's set-up scaled: 100 clients x 2 shards of 50. A shard is a contiguous
  // run of the label-sorted data, shorter than any class, so it spans at most two adjacent
  // labels; a client's labels are therefore covered by 2 windows of 2 adjacent labels.
  const std::vector<int32_t> labels = MnistLikeLabels();
  const auto parts = AllClients(labels, kShards2, 11, 100);
  ExpectValidPartition(parts, labels.size());
  size_t total_labels = 0;
  for (const auto& p : parts) {
    EXPECT_EQ(p.size(), 100u);
    const auto counts = LabelCounts(labels, p);
    total_labels += counts.size();
    int windows = 0;
    int covered_to = -1;
    for (const auto& [label, n] : counts) {
      if (label > covered_to) {
        ++windows;
        covered_to = label + 1;
      }
    }
    EXPECT_LE(windows, 2);
  }
  // Most clients see two digits, few see more (a shard crossing a class boundary).
  EXPECT_LE(total_labels, 100u * 5 / 2);
  EXPECT_GE(total_labels, 100u * 3 / 2);
}

TEST(PartitionTest, DirichletSmallAlphaIsSkewedLargeAlphaIsNearUniform) {
  const std::vector<int32_t> labels = MnistLikeLabels();
  auto dominant_share = [&](const std::vector<std::vector<int64_t>>& parts) {
    double total = 0;
    for (const auto& p : parts) {
      int64_t top = 0;
      for (const auto& [label, n] : LabelCounts(labels, p)) top = std::max(top, n);
      total += static_cast<double>(top) / static_cast<double>(p.size());
    }
    return total / static_cast<double>(parts.size());
  };
  const auto skewed = AllClients(labels, Dirichlet(0.1), 5, 10);
  const auto uniform = AllClients(labels, Dirichlet(1000), 5, 10);
  // With alpha 0.1 a client's largest class is most of its data; IID would give ~11%.
  EXPECT_GT(dominant_share(skewed), 0.5);
  EXPECT_LT(dominant_share(uniform), 0.15);
  for (const auto& p : uniform) {
    // ~1,000 samples per client, each class near its global share.
    EXPECT_NEAR(static_cast<double>(p.size()), 1000.0, 100.0);
    for (const auto& [label, n] : LabelCounts(labels, p)) {
      EXPECT_NEAR(static_cast<double>(n) / static_cast<double>(p.size()), 0.1, 0.03);
    }
  }
  // Small alpha also makes sizes unequal.
  size_t smallest = labels.size();
  size_t largest = 0;
  for (const auto& p : skewed) {
    smallest = std::min(smallest, p.size());
    largest = std::max(largest, p.size());
  }
  EXPECT_GT(largest, 2 * smallest);
}

TEST(PartitionTest, DirichletGivesEveryClientData) {
  // Tiny alpha, many clients, few samples: most clients draw nothing and must be topped up.
  std::vector<int32_t> labels;
  for (int i = 0; i < 60; ++i) labels.push_back(i % 3);
  const auto parts = AllClients(labels, Dirichlet(0.001), 9, 60);
  ExpectValidPartition(parts, labels.size());
  for (const auto& p : parts) EXPECT_EQ(p.size(), 1u);
}

TEST(PartitionTest, AcceptsArbitraryLabelValues) {
  const std::vector<int32_t> labels = {-5, 1000, -5, 7, 7, 1000, 3, -5};
  for (const PartitionScheme& scheme : {kIid, kShards2, Dirichlet(0.5)}) {
    ExpectValidPartition(AllClients(labels, scheme, 1, 3), labels.size());
  }
}

TEST(PartitionTest, RejectsBadArguments) {
  const std::vector<int32_t> labels(10, 0);
  auto error = [&](const PartitionScheme& s, int index, int count) {
    const Result<std::vector<int64_t>> r = PartitionIndices(labels, s, 1, index, count);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
    return r.status().message();
  };
  EXPECT_THAT(error(kIid, 0, 0), HasSubstr("client count must be >= 1, got 0"));
  EXPECT_THAT(error(kIid, -1, 3), HasSubstr("client index -1 is outside [0, 3)"));
  EXPECT_THAT(error(kIid, 3, 3), HasSubstr("client index 3 is outside [0, 3)"));
  EXPECT_THAT(error(kIid, 0, 11), HasSubstr("11 clients but only 10 samples"));
  EXPECT_THAT(error(Dirichlet(0.5), 0, 11), HasSubstr("11 clients but only 10 samples"));
  EXPECT_THAT(error(kShards2, 0, 6), HasSubstr("6 clients x 2 shards = 12 shards"));
  EXPECT_THAT(error({PartitionScheme::kShards, 0.5, 0}, 0, 2),
              HasSubstr("shards_per_client must be >= 1"));
  EXPECT_THAT(error(Dirichlet(0), 0, 2), HasSubstr("alpha"));
  EXPECT_THAT(error(Dirichlet(std::nan("")), 0, 2), HasSubstr("alpha"));
  EXPECT_THAT(error(Dirichlet(INFINITY), 0, 2), HasSubstr("alpha"));
  // 3 is the largest value the enum can hold without undefined behaviour.
  EXPECT_THAT(error({static_cast<PartitionScheme::Kind>(3)}, 0, 2), HasSubstr("unknown"));
  const Result<std::vector<int64_t>> empty = PartitionIndices({}, kIid, 1, 0, 1);
  EXPECT_FALSE(empty.ok());
  // Exactly as many clients as samples (or shards) is fine.
  EXPECT_EQ(PartitionIndices(labels, kIid, 1, 9, 10)->size(), 1u);
  EXPECT_EQ(PartitionIndices(labels, kShards2, 1, 4, 5)->size(), 2u);
}

TEST(PortableRandomTest, LogAndExpMatchTheStandardLibrary) {
  for (double x : {1e-300, 1e-20, 0.001, 0.5, 0.70710678, 0.7071068, 0.999999, 1.0, 1.000001, 1.5,
                   2.0, 10.0, 12345.678, 1e100, 1.7e308}) {
    EXPECT_NEAR(PortableLog(x), std::log(x), 2e-15 * std::max(1.0, std::abs(std::log(x)))) << x;
  }
  EXPECT_EQ(PortableLog(1.0), 0.0);
  EXPECT_EQ(PortableLog(0.0), -INFINITY);
  EXPECT_TRUE(std::isnan(PortableLog(-1.0)));
  for (double x : {0.0, -1e-10, -0.3, -0.35, -1.0, -10.0, -100.0, -700.0, -740.0}) {
    EXPECT_NEAR(PortableExp(x), std::exp(x), 2e-15 * std::exp(x)) << x;
  }
  EXPECT_EQ(PortableExp(0.0), 1.0);
  EXPECT_EQ(PortableExp(-1000.0), 0.0);
}

TEST(PortableRandomTest, SamplersHaveTheRightMoments) {
  PortableRng rng(99);
  constexpr int kN = 200000;
  auto moments = [&](auto draw) {
    double sum = 0;
    double sum2 = 0;
    for (int i = 0; i < kN; ++i) {
      const double x = draw();
      sum += x;
      sum2 += x * x;
    }
    const double mean = sum / kN;
    return std::pair{mean, sum2 / kN - mean * mean};
  };
  const auto [u_mean, u_var] = moments([&] { return rng.Uniform(); });
  EXPECT_NEAR(u_mean, 0.5, 0.003);
  EXPECT_NEAR(u_var, 1.0 / 12, 0.002);
  const auto [n_mean, n_var] = moments([&] { return rng.Normal(); });
  EXPECT_NEAR(n_mean, 0.0, 0.01);
  EXPECT_NEAR(n_var, 1.0, 0.01);
  // Gamma(k, 1) has mean k and variance k; covers both branches of the sampler.
  for (double shape : {0.1, 0.5, 1.0, 3.0, 50.0}) {
    const auto [g_mean, g_var] = moments([&] { return std::exp(rng.LogGamma(shape)); });
    EXPECT_NEAR(g_mean, shape, 0.02 * std::max(1.0, shape)) << shape;
    EXPECT_NEAR(g_var, shape, 0.06 * std::max(1.0, shape)) << shape;
  }
  // Below(n) is uniform over [0, n).
  std::vector<int> hist(7, 0);
  for (int i = 0; i < 70000; ++i) ++hist[rng.Below(7)];
  for (int h : hist) EXPECT_NEAR(h, 10000, 400);
}

TEST(PortableRandomTest, UsesTheStandardsMersenneTwister) {
  // C++ [rand.predef]: the 10000th output of a default-constructed mt19937_64.
  std::mt19937_64 engine;
  engine.discard(9999);
  EXPECT_EQ(engine(), 9981545732273789042ull);
  // Streams of one seed differ; equal (seed, stream) pairs agree.
  PortableRng a(5, 1), b(5, 1), c(5, 2), d(6, 1);
  const uint64_t first = a.Next();
  EXPECT_EQ(first, b.Next());
  EXPECT_NE(first, c.Next());
  EXPECT_NE(first, d.Next());
}

}  // namespace
}  // namespace fedslice::data
