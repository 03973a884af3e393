#include "fedslice/client/device_profile.h"

#include <Eigen/Core>
#include <algorithm>
#include <fstream>
#include <sstream>

#include "fedslice/common/threading.h"

namespace fedslice::client {

double MeasureGemmFlops(std::chrono::milliseconds budget) {
  using Clock = std::chrono::steady_clock;
  // 256 x 256 is the size class of the MLP's hidden layers times a batch: large enough to
  // reach the kernel's sustained rate, small enough that one product takes a millisecond.
  constexpr int kN = 256;
  Eigen::MatrixXf a = Eigen::MatrixXf::Constant(kN, kN, 0.5f);
  Eigen::MatrixXf b = Eigen::MatrixXf::Constant(kN, kN, 0.25f);
  Eigen::MatrixXf c(kN, kN);
  c.noalias() = a * b;  // warm-up: page faults, thread pool start
  int64_t products = 0;
  const auto start = Clock::now();
  auto elapsed = Clock::duration::zero();
  do {
    c.noalias() = a * b;
    ++products;
    elapsed = Clock::now() - start;
  } while (elapsed < budget);
  // Keeps the compiler from proving the products unused.
  volatile float sink = c(0, 0);
  (void)sink;
  const double seconds = std::max(1e-9, std::chrono::duration<double>(elapsed).count());
  return 2.0 * kN * kN * kN * static_cast<double>(products) / seconds;
}

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
  profile.set_flops(MeasureGemmFlops(options.flops_budget));
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
