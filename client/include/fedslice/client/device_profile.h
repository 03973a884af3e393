// What an edge device can do, measured once at client start-up and sent in Hello, so that the
// coordinator (and the slicing planner) can tell a phone from a workstation.
//
// Thread-safety: free functions without shared state; the FLOPS measurement
// (slicing::MeasureGemmFlops) uses the engine's worker threads (see threading.h) and must not
// run concurrently with training.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::client {

// MemAvailable from /proc/meminfo, in bytes. kNotFound / kCorruption when the file is missing
// or has no parseable MemAvailable line (non-Linux systems, restricted containers).
Result<uint64_t> AvailableMemoryBytes(const std::string& meminfo_path = "/proc/meminfo");

// CPUs this process may use under a CFS quota (Docker --cpus, Kubernetes limits): quota /
// period from cgroup v2 `<root>/cpu.max` or cgroup v1 `<root>/cpu/cpu.cfs_quota_us` and
// `cpu.cfs_period_us` (also under `cpu,cpuacct/`). kNotFound when there is no quota (no file,
// "max", -1); kCorruption when a file holds something else.
Result<double> CgroupCpuLimit(const std::string& cgroup_root = "/sys/fs/cgroup");

// How much slower than its layer timings this device runs its `threads` engine threads under
// a CPU quota of `cpus` (from CgroupCpuLimit): threads / cpus when that is > 1, else 1. A
// client times its layers in bursts far shorter than the quota's period (100 ms), so the
// timings do not show the quota; a container limited to 0.5 CPU runs a stage at half the speed
// they say. The client reports this factor times its emulation factor as
// DeviceProfile.slowdown, which the planner multiplies its timings by.
double CpuQuotaSlowdown(int threads, double cpus);

struct DeviceProfileOptions {
  // What FedSlice may use; unset: the device's available memory (0 if it cannot be read).
  std::optional<uint64_t> memory_budget_bytes;
  // Emulation factor >= 1 for a client told to behave as a slower device (see EdgeClient).
  double slowdown = 1.0;
  std::string device_name;
  std::chrono::milliseconds flops_budget{150};
};

// Measures FLOPS, reads the memory budget and records the engine's thread count.
proto::DeviceProfile MeasureDeviceProfile(const DeviceProfileOptions& options);

}  // namespace fedslice::client
