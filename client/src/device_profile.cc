#include "fedslice/client/device_profile.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "fedslice/common/threading.h"
#include "fedslice/slicing/cost.h"

namespace fedslice::client {

Result<uint64_t> AvailableMemoryBytes(const std::string& meminfo_path) {
  std::ifstream in(meminfo_path);
  if (!in) return Status::NotFound("cannot read " + meminfo_path);
  std::string line;
  while (std::getline(in, line)) {
    // "MemAvailable:   12345678 kB"
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    uint64_t value = 0;
    std::string unit;
    if (!(fields >> value >> unit) || unit != "kB") {
      return Status::Corruption(meminfo_path + ": cannot parse '" + line + "'");
    }
    return value * 1024;
  }
  return Status::Corruption(meminfo_path + " has no MemAvailable line");
}

namespace {

// The first line of `path`, or kNotFound.
Result<std::string> FirstLine(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read " + path);
  std::string line;
  std::getline(in, line);
  return line;
}

Result<double> ParsePositive(const std::string& text, const std::string& what) {
  std::istringstream fields(text);
  double value = 0;
  std::string rest;
  if (!(fields >> value) || (fields >> rest) || !std::isfinite(value) || value <= 0) {
    return Status::Corruption(what + ": cannot parse '" + text.substr(0, 64) + "'");
  }
  return value;
}

}  // namespace

Result<double> CgroupCpuLimit(const std::string& cgroup_root) {
  // cgroup v2: "max 100000" (no limit) or "50000 100000".
  if (auto v2 = FirstLine(cgroup_root + "/cpu.max"); v2.ok()) {
    std::istringstream fields(*v2);
    std::string quota, period;
    if (!(fields >> quota >> period)) {
      return Status::Corruption(cgroup_root + "/cpu.max: cannot parse '" + v2->substr(0, 64) + "'");
    }
    if (quota == "max") return Status::NotFound("no CPU quota (cpu.max: max)");
    FEDSLICE_ASSIGN_OR_RETURN(double q, ParsePositive(quota, cgroup_root + "/cpu.max quota"));
    FEDSLICE_ASSIGN_OR_RETURN(double p, ParsePositive(period, cgroup_root + "/cpu.max period"));
    return q / p;
  }
  // cgroup v1: cfs_quota_us is -1 without a limit.
  for (const char* dir : {"/cpu", "/cpu,cpuacct", "/cpuacct,cpu"}) {
    const std::string base = cgroup_root + dir;
    auto quota = FirstLine(base + "/cpu.cfs_quota_us");
    if (!quota.ok()) continue;
    if (quota->rfind("-1", 0) == 0) return Status::NotFound("no CPU quota (cfs_quota_us: -1)");
    FEDSLICE_ASSIGN_OR_RETURN(double q, ParsePositive(*quota, base + "/cpu.cfs_quota_us"));
    FEDSLICE_ASSIGN_OR_RETURN(std::string period_line, FirstLine(base + "/cpu.cfs_period_us"));
    FEDSLICE_ASSIGN_OR_RETURN(double p, ParsePositive(period_line, base + "/cpu.cfs_period_us"));
    return q / p;
  }
  return Status::NotFound("no cgroup CPU controller under " + cgroup_root);
}

double CpuQuotaSlowdown(int threads, double cpus) {
  if (!std::isfinite(cpus) || cpus <= 0 || threads < 1) return 1.0;
  return std::max(1.0, static_cast<double>(threads) / cpus);
}

proto::DeviceProfile MeasureDeviceProfile(const DeviceProfileOptions& options) {
  proto::DeviceProfile profile;
  profile.set_flops(slicing::MeasureGemmFlops(options.flops_budget));
  if (options.memory_budget_bytes) {
    profile.set_memory_budget_bytes(*options.memory_budget_bytes);
  } else if (auto available = AvailableMemoryBytes(); available.ok()) {
    profile.set_memory_budget_bytes(*available);
  }
  profile.set_num_threads(static_cast<uint32_t>(NumThreads()));
  profile.set_slowdown(options.slowdown);
  profile.set_device_name(options.device_name);
  return profile;
}

}  // namespace fedslice::client
