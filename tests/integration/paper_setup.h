// The non-IID set-up of McMahan et al. that the accuracy tests share: 100 clients holding 2
// label shards each, C = 0.1, E = 5, B = 10, lr 0.05, the 2NN, 100 rounds, seeds 1.
#pragma once

#include "fedslice/common/model_zoo.h"
#include "fedslice/coordinator/simulation.h"

namespace fedslice::testing {

inline coordinator::SimulationConfig PaperShardsSimulation() {
  coordinator::SimulationConfig config;
  config.num_clients = 100;
  config.partition.kind = data::PartitionScheme::kShards;
  config.partition.shards_per_client = 2;
  config.partition_seed = 1;
  config.federation.model = MlpSpec(1);
  config.federation.rounds = 100;
  config.federation.fraction = 0.1;
  config.federation.min_fit = 1;
  config.federation.local_epochs = 5;
  config.federation.batch_size = 10;
  config.federation.learning_rate = 0.05f;
  config.federation.seed = 1;
  return config;
}

}  // namespace fedslice::testing
