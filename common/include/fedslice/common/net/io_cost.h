// What moving activations between pipeline stages costs a device's CPU, for the slicing
// planner's model of devices whose network work competes with their layers (a container
// under a CPU quota, a device with a core or two).
//
// Thread-safety: a free function without shared state.
#pragma once

#include <chrono>

#include "fedslice/common/status.h"

namespace fedslice::net {

// CPU milliseconds this thread spends per MB (10^6 bytes) of fp32 activations to send them
// or to receive them, the average of the two: encoding, framing (serialize / parse),
// AES-256-GCM as TLS 1.3 seals and opens records, and decoding with its finiteness check,
// on a 4 MB batch, the fastest of the runs that fit in `budget` (at least two). The kernel's
// share (TCP, loopback or veth) is not included: it is not this process's to measure, and
// on loopback it was about a third of a hop's CPU (BENCHMARKS.md, hop_bench).
// Internal on an OpenSSL failure.
Result<double> MeasureActivationIoMsPerMb(
    std::chrono::milliseconds budget = std::chrono::milliseconds(100));

}  // namespace fedslice::net
