#include "fedslice/coordinator/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

namespace fedslice::coordinator {
namespace {

TEST(SamplerTest, NumClientsRespectsFractionAndMinFit) {
  struct Case {
    size_t n;
    double c;
    size_t min_fit;
    size_t expected;
  } cases[] = {
      {100, 0.1, 0, 10},  {100, 0.1, 2, 10}, {100, 0.1, 15, 15},
      {100, 1.0, 0, 100}, {30, 0.1, 0, 3},  // 0.1 * 30 = 3.0000000000000004
      {100, 0.29, 0, 29},                   // 0.29 * 100 = 28.999999999999996
      {10, 0.05, 0, 1},                     // never zero clients
      {10, 0.05, 3, 3},   {10, 0.5, 10, 10}, {7, 0.5, 1, 3},
  };
  for (const Case& c : cases) {
    Result<size_t> k = NumClientsToSample(c.n, c.c, c.min_fit);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    EXPECT_EQ(*k, c.expected) << c.n << " " << c.c << " " << c.min_fit;
  }
}

TEST(SamplerTest, RejectsBadArguments) {
  EXPECT_EQ(NumClientsToSample(10, 0.0, 1).status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(NumClientsToSample(10, 1.5, 1).status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(NumClientsToSample(10, -0.1, 1).status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(NumClientsToSample(10, std::nan(""), 1).status().code(),
            Status::Code::kInvalidArgument);
  Status few = NumClientsToSample(4, 0.5, 5).status();
  EXPECT_EQ(few.code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(few.message().find("at least 5"), std::string::npos) << few.message();
  EXPECT_EQ(NumClientsToSample(0, 0.5, 0).status().code(), Status::Code::kFailedPrecondition);
  EXPECT_EQ(SamplePositions(4, 0.5, 5, 1, 42).status().code(), Status::Code::kFailedPrecondition);
}

TEST(SamplerTest, DeterministicBySeedRoundAndAttempt) {
  const auto sample = [](uint64_t round, uint64_t seed, uint64_t attempt) {
    Result<std::vector<size_t>> s = SamplePositions(100, 0.1, 2, round, seed, attempt);
    EXPECT_TRUE(s.ok());
    return *s;
  };
  EXPECT_EQ(sample(7, 42, 0), sample(7, 42, 0));
  std::set<std::vector<size_t>> distinct;
  for (uint64_t round = 1; round <= 20; ++round) distinct.insert(sample(round, 42, 0));
  EXPECT_EQ(distinct.size(), 20u);  // C(100, 10) choices: rounds do not repeat
  EXPECT_NE(sample(7, 42, 0), sample(7, 43, 0));
  EXPECT_NE(sample(7, 42, 0), sample(7, 42, 1));
  EXPECT_NE(sample(7, 42, 1), sample(7, 42, 2));
}

// Pins the sequence: changing it would make a coordinator resumed by a newer build (or a
// simulator built from another version) pick different clients than the original run.
TEST(SamplerTest, SequenceIsPinned) {
  Result<std::vector<size_t>> s = SamplePositions(100, 0.1, 2, 1, 42);
  ASSERT_TRUE(s.ok());
  const std::vector<size_t> expected = {3, 4, 24, 32, 45, 55, 62, 73, 88, 96};
  EXPECT_EQ(*s, expected);
  EXPECT_EQ(DeriveSeed(42, 1, 2), 17592914093553962002ULL);
}

TEST(SamplerTest, SampleIsSortedDistinctAndInRange) {
  for (uint64_t round = 0; round < 200; ++round) {
    for (size_t n : {1, 2, 10, 33, 100}) {
      Result<std::vector<size_t>> s = SamplePositions(n, 0.3, 1, round, 9);
      ASSERT_TRUE(s.ok());
      const size_t k = *NumClientsToSample(n, 0.3, 1);
      ASSERT_EQ(s->size(), k);
      for (size_t i = 0; i < s->size(); ++i) {
        ASSERT_LT((*s)[i], n);
        if (i > 0) {
          ASSERT_LT((*s)[i - 1], (*s)[i]);  // ascending, hence no duplicates
        }
      }
    }
  }
}

TEST(SamplerTest, EveryClientIsChosenAboutEquallyOften) {
  const size_t n = 50;
  std::vector<int> counts(n, 0);
  const int rounds = 4000;
  for (int r = 0; r < rounds; ++r) {
    const Result<std::vector<size_t>> s = SamplePositions(n, 0.1, 1, static_cast<uint64_t>(r), 123);
    ASSERT_TRUE(s.ok());
    for (size_t p : *s) ++counts[p];
  }
  const double expected = rounds * 5.0 / n;  // 400; binomial sd ~ 19
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(counts[i], expected, 0.25 * expected) << "client " << i;
  }
}

TEST(SamplerTest, UniformBelowIsUnbiasedOverSmallRanges) {
  std::mt19937_64 engine(5);
  EXPECT_EQ(UniformBelow(engine, 1), 0u);
  int counts[3] = {0, 0, 0};
  for (int i = 0; i < 30000; ++i) ++counts[UniformBelow(engine, 3)];
  for (int c : counts) EXPECT_NEAR(c, 10000, 500);
  // Near 2^64 the rejected tail is almost half the range; results must still be in range.
  const uint64_t big = (uint64_t{1} << 63) + 1;
  for (int i = 0; i < 100; ++i) EXPECT_LT(UniformBelow(engine, big), big);
}

TEST(SamplerTest, SampleClientsMapsPositionsToIds) {
  const std::vector<std::string> ids = {"client-00", "client-01", "client-02", "client-03",
                                        "client-04", "client-05", "client-06", "client-07"};
  Result<std::vector<std::string>> chosen =
      SampleClients(std::span<const std::string>(ids), 0.5, 1, 3, 77);
  ASSERT_TRUE(chosen.ok());
  const std::vector<size_t> positions = *SamplePositions(ids.size(), 0.5, 1, 3, 77);
  ASSERT_EQ(chosen->size(), positions.size());
  for (size_t i = 0; i < positions.size(); ++i) EXPECT_EQ((*chosen)[i], ids[positions[i]]);

  // The simulator's integer ids sample the same positions.
  std::vector<int> ints = {0, 1, 2, 3, 4, 5, 6, 7};
  Result<std::vector<int>> chosen_ints = SampleClients(std::span<const int>(ints), 0.5, 1, 3, 77);
  ASSERT_TRUE(chosen_ints.ok());
  for (size_t i = 0; i < positions.size(); ++i) {
    EXPECT_EQ(static_cast<size_t>((*chosen_ints)[i]), positions[i]);
  }

  const std::vector<std::string> unsorted = {"b", "a", "c"};
  EXPECT_EQ(SampleClients(std::span<const std::string>(unsorted), 0.5, 1, 1, 1).status().code(),
            Status::Code::kInvalidArgument);
  const std::vector<std::string> dup = {"a", "b", "b"};
  EXPECT_EQ(SampleClients(std::span<const std::string>(dup), 0.5, 1, 1, 1).status().code(),
            Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace fedslice::coordinator
