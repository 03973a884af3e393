// MNIST-10k as fetched by scripts/fetch_mnist.sh: the loader sees exactly the documented split.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <set>

#include "fedslice/common/idx.h"
#include "fedslice/common/partition.h"
#include "testing/test_util.h"

namespace fedslice::data {
namespace {

class MnistDataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::optional<std::filesystem::path> dir = testing::MnistDir();
    // Not a skip: the data is part of the test environment, and a silent skip would hide that
    // the training tests did not run either.
    ASSERT_TRUE(dir.has_value())
        << "MNIST-10k not found in $FEDSLICE_MNIST_DIR or <source>/data/mnist-10k; run "
           "scripts/fetch_mnist.sh";
    Result<Dataset> train = LoadMnist(*dir, Split::kTrain);
    ASSERT_TRUE(train.ok()) << train.status().ToString();
    Result<Dataset> test = LoadMnist(*dir, Split::kTest);
    ASSERT_TRUE(test.ok()) << test.status().ToString();
    train_ = std::move(*train);
    test_ = std::move(*test);
  }

  Dataset train_;
  Dataset test_;
};

TEST_F(MnistDataTest, HasTheDocumentedSplitAndClassCounts) {
  EXPECT_EQ(train_.size(), 8000);
  EXPECT_EQ(test_.size(), 2000);
  for (const Dataset* d : {&train_, &test_}) {
    EXPECT_EQ(d->sample_shape, (std::vector<int64_t>{1, 28, 28}));
    EXPECT_EQ(d->num_classes, 10);
    EXPECT_EQ(d->features.size(), static_cast<size_t>(d->size()) * 784);
  }
  std::array<int, 10> counts{};
  for (const Dataset* d : {&train_, &test_}) {
    for (int32_t label : d->labels) {
      ASSERT_GE(label, 0);
      ASSERT_LT(label, 10);
      ++counts[label];
    }
  }
  EXPECT_EQ(counts, (std::array<int, 10>{1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978}));
}

TEST_F(MnistDataTest, PixelsLookLikeMnist) {
  // Scaled to [0, 1] with both ends used; MNIST's mean intensity is about 0.13.
  const auto [lo, hi] = std::minmax_element(train_.features.begin(), train_.features.end());
  EXPECT_EQ(*lo, 0.0f);
  EXPECT_EQ(*hi, 1.0f);
  const double mean = std::accumulate(train_.features.begin(), train_.features.end(), 0.0) /
                      static_cast<double>(train_.features.size());
  EXPECT_GT(mean, 0.11);
  EXPECT_LT(mean, 0.15);
  // Digits are centred: the border rows are (almost) blank, the centre is not.
  double border = 0;
  double centre = 0;
  for (int64_t i = 0; i < train_.size(); ++i) {
    const auto s = train_.sample(i);
    for (int c = 0; c < 28; ++c) border += s[c] + s[27 * 28 + c];
    centre += s[14 * 28 + 14];
  }
  EXPECT_LT(border / static_cast<double>(train_.size()), 0.1);
  EXPECT_GT(centre / static_cast<double>(train_.size()), 0.3);
}

TEST_F(MnistDataTest, McMahanShardsGiveMostClientsTwoDigits) {
  // McMahan et al.'s pathological non-IID set-up on the training split: 100 clients x 2
  // shards of 40 images.
  const PartitionScheme shards{PartitionScheme::kShards, 0.5, 2};
  int at_most_two = 0;
  int64_t total = 0;
  for (int client = 0; client < 100; ++client) {
    Result<std::vector<int64_t>> part = PartitionIndices(train_.labels, shards, 1, client, 100);
    ASSERT_TRUE(part.ok()) << part.status().ToString();
    EXPECT_EQ(part->size(), 80u);
    total += static_cast<int64_t>(part->size());
    std::set<int32_t> digits;
    for (int64_t i : *part) digits.insert(train_.labels[i]);
    EXPECT_LE(digits.size(), 4u);
    at_most_two += digits.size() <= 2;
  }
  EXPECT_EQ(total, 8000);
  EXPECT_GE(at_most_two, 80);
}

}  // namespace
}  // namespace fedslice::data
