#include "fedslice/client/device_profile.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "fedslice/slicing/cost.h"
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

TEST(DeviceProfileTest, ReadsTheCgroupCpuQuota) {
  testing::TempDir v2;
  std::ofstream(v2.path() / "cpu.max") << "50000 100000\n";
  auto cpus = CgroupCpuLimit(v2.path().string());
  ASSERT_TRUE(cpus.ok()) << cpus.status().ToString();
  EXPECT_DOUBLE_EQ(*cpus, 0.5);
  std::ofstream(v2.path() / "cpu.max") << "max 100000\n";
  EXPECT_EQ(CgroupCpuLimit(v2.path().string()).status().code(), Status::Code::kNotFound);
  std::ofstream(v2.path() / "cpu.max") << "half 100000\n";
  EXPECT_EQ(CgroupCpuLimit(v2.path().string()).status().code(), Status::Code::kCorruption);

  testing::TempDir v1;
  std::filesystem::create_directories(v1.path() / "cpu");
  std::ofstream(v1.path() / "cpu" / "cpu.cfs_quota_us") << "150000\n";
  std::ofstream(v1.path() / "cpu" / "cpu.cfs_period_us") << "100000\n";
  cpus = CgroupCpuLimit(v1.path().string());
  ASSERT_TRUE(cpus.ok()) << cpus.status().ToString();
  EXPECT_DOUBLE_EQ(*cpus, 1.5);
  std::ofstream(v1.path() / "cpu" / "cpu.cfs_quota_us") << "-1\n";
  EXPECT_EQ(CgroupCpuLimit(v1.path().string()).status().code(), Status::Code::kNotFound);
  std::ofstream(v1.path() / "cpu" / "cpu.cfs_quota_us") << "100000\n";
  std::ofstream(v1.path() / "cpu" / "cpu.cfs_period_us") << "0\n";
  EXPECT_EQ(CgroupCpuLimit(v1.path().string()).status().code(), Status::Code::kCorruption);

  testing::TempDir none;
  EXPECT_EQ(CgroupCpuLimit(none.path().string()).status().code(), Status::Code::kNotFound);

  EXPECT_DOUBLE_EQ(CpuQuotaSlowdown(1, 0.5), 2.0);
  EXPECT_DOUBLE_EQ(CpuQuotaSlowdown(2, 1.5), 2.0 / 1.5);
  EXPECT_DOUBLE_EQ(CpuQuotaSlowdown(1, 2.0), 1.0);  // more CPUs than threads: full speed
  EXPECT_DOUBLE_EQ(CpuQuotaSlowdown(1, 0.0), 1.0);
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
