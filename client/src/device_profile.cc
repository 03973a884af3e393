#include "fedslice/client/device_profile.h"

#include <algorithm>
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
