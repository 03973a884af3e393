#include "fedslice/common/partition.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <new>
#include <numeric>
#include <string>
#include <utility>

#include "fedslice/common/portable_random.h"

namespace fedslice::data {
namespace {

// Stream ids: the same user seed drives unrelated random sequences in different schemes.
constexpr uint64_t kIidStream = 1;
constexpr uint64_t kShardsStream = 2;
constexpr uint64_t kDirichletStream = 3;

// Smallest alpha accepted: below it, every class already goes to a single client, and the
// log-space gamma sampler would start to produce infinities.
constexpr double kMinAlpha = 1e-6;

constexpr std::string_view kForms =
    "expected iid, shards, shards:K (K >= 1 shards per client), dirichlet or dirichlet:ALPHA "
    "(ALPHA > 0)";

std::vector<int64_t> Iota(size_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

// [index * n / count, (index + 1) * n / count): near-equal contiguous chunks.
std::pair<int64_t, int64_t> Chunk(int64_t n, int64_t index, int64_t count) {
  return {index * n / count, (index + 1) * n / count};
}

std::vector<int64_t> Iid(int64_t n, uint64_t seed, int index, int count) {
  std::vector<int64_t> perm = Iota(n);
  PortableRng rng(seed, kIidStream);
  rng.Shuffle(std::span<int64_t>(perm));
  const auto [begin, end] = Chunk(n, index, count);
  std::vector<int64_t> out(perm.begin() + begin, perm.begin() + end);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int64_t> Shards(std::span<const int32_t> labels, int shards_per_client, uint64_t seed,
                            int index, int count) {
  const int64_t n = static_cast<int64_t>(labels.size());
  PortableRng rng(seed, kShardsStream);
  // Sort by label; a seeded shuffle first makes the order within a label random (the stable
  // sort then keeps it), so a shard is a random sample of its label(s).
  std::vector<int64_t> order = Iota(n);
  rng.Shuffle(std::span<int64_t>(order));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  const int64_t num_shards = int64_t{shards_per_client} * count;
  std::vector<int64_t> shard_ids = Iota(num_shards);
  rng.Shuffle(std::span<int64_t>(shard_ids));
  std::vector<int64_t> out;
  for (int64_t k = 0; k < shards_per_client; ++k) {
    const int64_t shard = shard_ids[int64_t{index} * shards_per_client + k];
    const auto [begin, end] = Chunk(n, shard, num_shards);
    out.insert(out.end(), order.begin() + begin, order.begin() + end);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int64_t> Dirichlet(std::span<const int32_t> labels, double alpha, uint64_t seed,
                               int index, int count) {
  const int64_t n = static_cast<int64_t>(labels.size());
  PortableRng rng(seed, kDirichletStream);
  // Samples grouped by class (ascending label), ascending index within a class.
  std::vector<int64_t> by_class = Iota(n);
  std::stable_sort(by_class.begin(), by_class.end(),
                   [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  std::vector<int> owner(n);
  std::vector<double> log_gamma(count);
  std::vector<double> weight(count);
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin;
    while (end < n && labels[by_class[end]] == labels[by_class[begin]]) ++end;
    const std::span<int64_t> members(by_class.data() + begin, end - begin);
    rng.Shuffle(members);
    // Dirichlet(alpha, ..., alpha) = normalised independent Gamma(alpha) draws, normalised in
    // log space because small alphas give gamma samples far below the double range.
    for (int j = 0; j < count; ++j) log_gamma[j] = rng.LogGamma(alpha);
    const double max_log = *std::max_element(log_gamma.begin(), log_gamma.end());
    double sum = 0;
    for (int j = 0; j < count; ++j) {
      weight[j] = PortableExp(log_gamma[j] - max_log);
      sum += weight[j];
    }
    // Client j takes members [cut_{j-1}, cut_j), cut_j = floor(m * cumulative proportion).
    const int64_t m = end - begin;
    double cumulative = 0;
    int64_t from = 0;
    for (int j = 0; j < count; ++j) {
      cumulative += weight[j] / sum;
      const int64_t to =
          j == count - 1 ? m : std::min(m, static_cast<int64_t>(std::floor(cumulative * m)));
      for (int64_t k = from; k < to; ++k) owner[members[k]] = j;
      from = std::max(from, to);
    }
    begin = end;
  }
  // A client without data cannot train: each empty client takes the highest-indexed sample of
  // the currently largest client (lowest client index on ties). Deterministic, and it moves at
  // most count - 1 samples.
  std::vector<int64_t> sizes(count, 0);
  for (int o : owner) ++sizes[o];
  for (int e = 0; e < count; ++e) {
    if (sizes[e] > 0) continue;
    const int largest =
        static_cast<int>(std::max_element(sizes.begin(), sizes.end()) - sizes.begin());
    int64_t i = n - 1;
    while (owner[i] != largest) --i;
    owner[i] = e;
    --sizes[largest];
    ++sizes[e];
  }
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    if (owner[i] == index) out.push_back(i);
  }
  return out;
}

}  // namespace

Result<PartitionScheme> ParsePartitionScheme(std::string_view text) {
  const size_t colon = text.find(':');
  const std::string_view name = text.substr(0, colon);
  const bool has_arg = colon != std::string_view::npos;
  const std::string_view arg = has_arg ? text.substr(colon + 1) : std::string_view();
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument("bad partition scheme '" + std::string(text) +
                                   "': " + std::string(why) + "; " + std::string(kForms));
  };
  PartitionScheme scheme;
  if (name == "iid") {
    if (has_arg) return bad("iid takes no parameter");
    scheme.kind = PartitionScheme::kIid;
    return scheme;
  }
  if (name == "shards") {
    scheme.kind = PartitionScheme::kShards;
    if (!has_arg) return scheme;
    int k = 0;
    const auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), k);
    if (ec != std::errc() || end != arg.data() + arg.size() || k < 1) {
      return bad("shards per client must be an integer >= 1");
    }
    scheme.shards_per_client = k;
    return scheme;
  }
  if (name == "dirichlet") {
    scheme.kind = PartitionScheme::kDirichlet;
    if (!has_arg) return scheme;
    double alpha = 0;
    const auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), alpha);
    if (ec != std::errc() || end != arg.data() + arg.size() || !std::isfinite(alpha) ||
        alpha < kMinAlpha) {
      return bad("alpha must be a finite number >= 1e-06");
    }
    scheme.alpha = alpha;
    return scheme;
  }
  return bad("unknown scheme");
}

std::string ToString(const PartitionScheme& scheme) {
  switch (scheme.kind) {
    case PartitionScheme::kIid:
      return "iid";
    case PartitionScheme::kShards:
      return "shards:" + std::to_string(scheme.shards_per_client);
    case PartitionScheme::kDirichlet: {
      // Shortest text that parses back to the same double.
      char buf[64];
      const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, scheme.alpha);
      return "dirichlet:" + std::string(buf, ec == std::errc() ? end : buf);
    }
  }
  return "unknown";
}

Result<std::vector<int64_t>> PartitionIndices(std::span<const int32_t> labels,
                                              const PartitionScheme& scheme, uint64_t seed,
                                              int index, int count) {
  const int64_t n = static_cast<int64_t>(labels.size());
  if (count < 1) {
    return Status::InvalidArgument("partition: client count must be >= 1, got " +
                                   std::to_string(count));
  }
  if (index < 0 || index >= count) {
    return Status::InvalidArgument("partition: client index " + std::to_string(index) +
                                   " is outside [0, " + std::to_string(count) + ")");
  }
  if (count > n) {
    return Status::InvalidArgument("partition: " + std::to_string(count) + " clients but only " +
                                   std::to_string(n) + " samples; every client needs at least one");
  }
  try {
    switch (scheme.kind) {
      case PartitionScheme::kIid:
        return Iid(n, seed, index, count);
      case PartitionScheme::kShards: {
        if (scheme.shards_per_client < 1) {
          return Status::InvalidArgument("partition: shards_per_client must be >= 1, got " +
                                         std::to_string(scheme.shards_per_client));
        }
        const int64_t num_shards = int64_t{scheme.shards_per_client} * count;
        if (num_shards > n) {
          return Status::InvalidArgument(
              "partition: " + std::to_string(count) + " clients x " +
              std::to_string(scheme.shards_per_client) + " shards = " + std::to_string(num_shards) +
              " shards but only " + std::to_string(n) + " samples; every shard needs at least one");
        }
        return Shards(labels, scheme.shards_per_client, seed, index, count);
      }
      case PartitionScheme::kDirichlet:
        if (!std::isfinite(scheme.alpha) || scheme.alpha < kMinAlpha) {
          return Status::InvalidArgument("partition: dirichlet alpha must be finite and >= 1e-06");
        }
        return Dirichlet(labels, scheme.alpha, seed, index, count);
    }
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("partition: out of memory for " + std::to_string(n) +
                                     " samples");
  }
  return Status::InvalidArgument("partition: unknown scheme kind " +
                                 std::to_string(static_cast<int>(scheme.kind)));
}

}  // namespace fedslice::data
