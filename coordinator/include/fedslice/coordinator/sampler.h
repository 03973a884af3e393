// Client sampling: which clients train in a round. A pure function of (available clients,
// fraction, min_fit, seed, round, attempt), so that the in-process simulator and the networked
// coordinator pick the same clients from the same seed, and a coordinator resumed from a
// checkpoint continues the sequence as if it had never stopped.
//
// Only the engine's raw output is used (std::mt19937_64's sequence is fixed by the standard;
// std::uniform_int_distribution's is not), so the choice is the same with every compiler and
// standard library.
//
// Thread-safety: all functions are pure and may be called concurrently.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "fedslice/common/status.h"

namespace fedslice::coordinator {

// A well-mixed 64-bit seed for one use of `seed` (splitmix64 steps over each part), e.g.
// DeriveSeed(run_seed, round, client_index) for a client's shuffling in that round. Different
// parts give unrelated seeds.
uint64_t DeriveSeed(uint64_t seed, uint64_t a, uint64_t b = 0);

// Uniform integer in [0, n) from the engine's raw output, unbiased (rejection sampling);
// n >= 1.
uint64_t UniformBelow(std::mt19937_64& engine, uint64_t n);

// How many of `num_available` clients a round asks: max(floor(fraction * N), min_fit, 1).
// (A product such as 0.1 * 30 that is an integer up to rounding counts as that integer.)
// InvalidArgument if fraction is not in (0, 1]; FailedPrecondition if fewer than
// max(min_fit, 1) clients are available.
Result<size_t> NumClientsToSample(size_t num_available, double fraction, size_t min_fit);

// NumClientsToSample(...) distinct positions in [0, num_available), ascending, drawn
// uniformly (partial Fisher-Yates) with an engine seeded from (seed, round, attempt).
// `attempt` separates the retries of one round (0 for the first try), so that a retried
// round does not ask exactly the same clients again.
Result<std::vector<size_t>> SamplePositions(size_t num_available, double fraction, size_t min_fit,
                                            uint64_t round, uint64_t seed, uint64_t attempt = 0);

// The clients at SamplePositions(available.size(), ...), ascending. `available` must be sorted
// ascending without duplicates (InvalidArgument otherwise): the order is what makes the choice
// reproducible, e.g. every client's certificate subject, or indices 0..N-1 in the simulator.
template <typename Id>
Result<std::vector<Id>> SampleClients(std::span<const Id> available, double fraction,
                                      size_t min_fit, uint64_t round, uint64_t seed,
                                      uint64_t attempt = 0) {
  if (std::adjacent_find(available.begin(), available.end(),
                         [](const Id& a, const Id& b) { return !(a < b); }) != available.end()) {
    return Status::InvalidArgument(
        "SampleClients: the available client ids must be sorted ascending without duplicates");
  }
  FEDSLICE_ASSIGN_OR_RETURN(
      std::vector<size_t> positions,
      SamplePositions(available.size(), fraction, min_fit, round, seed, attempt));
  std::vector<Id> chosen;
  chosen.reserve(positions.size());
  for (size_t p : positions) chosen.push_back(available[p]);
  return chosen;
}

}  // namespace fedslice::coordinator
