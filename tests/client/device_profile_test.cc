#include "fedslice/client/device_profile.h"

#include <gtest/gtest.h>

#include "fedslice/slicing/cost.h"

#include <fstream>

#include "testing/test_util.h"

namespace fedslice::client {
namespace {

TEST(DeviceProfileTest, GemmFlopsArePositive) {
  EXPECT_GT(slicing::MeasureGemmFlops(std::chrono::milliseconds(5)), 0.0);
}

TEST(DeviceProfileTest, ReadsMemAvailableInBytes) {
  testing::TempDir dir;
  const auto path = dir.path() / "meminfo";
  std::ofstream(path) << "MemTotal:       24000000 kB\n"
                         "MemFree:         1000000 kB\n"
                         "MemAvailable:   12345678 kB\n";
  auto bytes = AvailableMemoryBytes(path.string());
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  EXPECT_EQ(*bytes, uint64_t{12345678} * 1024);
}

TEST(DeviceProfileTest, MalformedOrMissingMeminfoIsAnError) {
  testing::TempDir dir;
  const auto no_line = dir.path() / "no_line";
  std::ofstream(no_line) << "MemTotal: 1 kB\n";
  EXPECT_EQ(AvailableMemoryBytes(no_line.string()).status().code(), Status::Code::kCorruption);
  const auto garbage = dir.path() / "garbage";
  std::ofstream(garbage) << "MemAvailable: lots\n";
  EXPECT_EQ(AvailableMemoryBytes(garbage.string()).status().code(), Status::Code::kCorruption);
  EXPECT_EQ(AvailableMemoryBytes((dir.path() / "absent").string()).status().code(),
            Status::Code::kNotFound);
}

TEST(DeviceProfileTest, ProfileCarriesBudgetSlowdownAndName) {
  DeviceProfileOptions options;
  options.memory_budget_bytes = 512 << 20;
  options.slowdown = 3.0;
  options.device_name = "pi-4";
  options.flops_budget = std::chrono::milliseconds(5);
  proto::DeviceProfile profile = MeasureDeviceProfile(options);
  EXPECT_GT(profile.flops(), 0.0);
  EXPECT_EQ(profile.memory_budget_bytes(), uint64_t{512} << 20);
  EXPECT_EQ(profile.slowdown(), 3.0);
  EXPECT_EQ(profile.device_name(), "pi-4");
  EXPECT_GE(profile.num_threads(), 1U);
}

}  // namespace
}  // namespace fedslice::client
