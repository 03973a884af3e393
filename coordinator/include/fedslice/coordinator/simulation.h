// In-process simulation of a federation (`fedslice sim`): N virtual clients, no sockets, the
// same Federation round logic and the same LocalTrainer as a networked run, so that with the
// same seeds both produce the same global model (up to float rounding of the aggregation
// order). Clients of a round train in parallel over cores, each single-threaded.
#pragma once

#include <functional>
#include <optional>
#include <vector>

#include "fedslice/common/dataset.h"
#include "fedslice/common/partition.h"
#include "fedslice/common/status.h"
#include "fedslice/coordinator.pb.h"
#include "fedslice/coordinator/federation.h"

namespace fedslice::coordinator {

struct SimulationConfig {
  FederationConfig federation;
  int num_clients = 100;
  data::PartitionScheme partition;  // how the training set is split among clients
  uint64_t partition_seed = 1;
  // Clients trained at once (0 = all cores). Each trains single-threaded, so the result does
  // not depend on this number.
  int parallelism = 0;
};

// The id of virtual client `index`: "client-<index>", the CN scripts/make_certs.sh gives the
// certificate of networked client `index`, so both runs sample the same clients.
std::string SimulatedClientId(int index);

// Runs the rounds left in config.federation (resuming from its out_dir if it holds a
// checkpoint). `on_round` is called after every completed round. Returns the metrics of the
// rounds this call ran.
Result<std::vector<proto::RoundMetrics>> RunSimulation(
    const SimulationConfig& config, const data::Dataset& train,
    std::optional<data::Dataset> test,
    const std::function<void(const proto::RoundMetrics&)>& on_round = {},
    std::vector<float>* final_weights = nullptr);

}  // namespace fedslice::coordinator
