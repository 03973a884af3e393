// Partitioners that split a labelled data set among simulated federated clients.
//
// A client computes its own share from (labels, scheme, seed, index, count) alone: every client
// runs the same deterministic computation of the global assignment and keeps its part, so the
// coordinator never sends data, only the scheme and seed. Partitions are disjoint and together
// cover every sample.
//
// Determinism across machines: the random streams use std::mt19937_64 (whose output the C++
// standard fixes) with our own shuffling, bounded integers, normal and gamma sampling; the
// std:: distributions and std::shuffle are avoided because their results differ between
// standard libraries. The Dirichlet scheme also calls std::log/std::sqrt/std::exp, which are
// bit-identical on every machine with the same libm (e.g. the same Debian release).
//
// Thread-safety: pure functions; safe to call concurrently.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fedslice/common/status.h"

namespace fedslice::data {

struct PartitionScheme {
  enum Kind {
    // Uniformly shuffled, near-equal contiguous chunks (sizes differ by at most one).
    kIid,
    // McMahan et al. 2017: sort by label, cut into shards_per_client * count equal shards,
    // deal shards_per_client random shards to each client. With 2 shards per client most
    // clients see only two digits.
    kShards,
    // Per class, proportions over clients drawn from Dirichlet(alpha): small alpha (0.1) gives
    // few classes per client and unequal sizes, large alpha (100) approaches IID.
    kDirichlet,
  };
  Kind kind = kIid;
  double alpha = 0.5;         // kDirichlet only; > 0.
  int shards_per_client = 2;  // kShards only; >= 1.
};

// Parses "iid", "shards" (2 per client), "shards:K", "dirichlet" (alpha 0.5) or
// "dirichlet:ALPHA". Errors: kInvalidArgument naming the text and the accepted forms.
Result<PartitionScheme> ParsePartitionScheme(std::string_view text);

// The canonical text of a scheme, which ParsePartitionScheme accepts ("dirichlet:0.1").
std::string ToString(const PartitionScheme& scheme);

// Indices (ascending) of the samples that client `index` of `count` holds under `scheme`,
// with randomness fixed by `seed`. The same arguments give the same result on every call and
// every machine; different clients' results are disjoint and their union is [0, labels.size()).
// Labels may be any int32 values (classes are their distinct values).
//
// Every client gets at least one sample: iid and shards need count <= labels.size() (shards:
// shards_per_client * count <= labels.size()); for dirichlet, a client the draw leaves empty
// takes one sample from the largest client (deterministically), so count <= labels.size()
// suffices there too.
// Errors: kInvalidArgument for index outside [0, count), count < 1, too many clients for the
// data, or a scheme with alpha <= 0 / not finite or shards_per_client < 1.
Result<std::vector<int64_t>> PartitionIndices(std::span<const int32_t> labels,
                                              const PartitionScheme& scheme, uint64_t seed,
                                              int index, int count);

}  // namespace fedslice::data
