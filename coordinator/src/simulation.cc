#include "fedslice/coordinator/simulation.h"

#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>

#include "fedslice/client/local_trainer.h"
#include "fedslice/common/threading.h"

namespace fedslice::coordinator {

std::string SimulatedClientId(int index) { return "client-" + std::to_string(index); }

Result<std::vector<proto::RoundMetrics>> RunSimulation(
    const SimulationConfig& config, const data::Dataset& train,
    std::optional<data::Dataset> test,
    const std::function<void(const proto::RoundMetrics&)>& on_round,
    std::vector<float>* final_weights) {
  if (config.num_clients < 1) return Status::InvalidArgument("num_clients must be >= 1");
  if (config.parallelism < 0) return Status::InvalidArgument("parallelism must be >= 0");
  FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Federation> federation,
                            Federation::Create(config.federation, std::move(test)));

  // Every virtual client computes its own share from (labels, scheme, seed, index, count),
  // exactly as a networked client does.
  std::map<std::string, client::LocalTrainer> clients;
  std::vector<std::string> ids;
  for (int i = 0; i < config.num_clients; ++i) {
    FEDSLICE_ASSIGN_OR_RETURN(
        std::vector<int64_t> indices,
        data::PartitionIndices(train.labels, config.partition, config.partition_seed, i,
                               config.num_clients));
    const std::string id = SimulatedClientId(i);
    auto [it, inserted] =
        clients.try_emplace(id, data::Subset(train, indices), std::nullopt);
    FEDSLICE_RETURN_IF_ERROR(
        it->second.SetModel(config.federation.model).WithContext("client " + id));
    ids.push_back(id);
  }
  const int workers = config.parallelism > 0 ? config.parallelism : NumThreads();

  std::vector<proto::RoundMetrics> ran;
  uint32_t attempt = 0;
  while (!federation->finished()) {
    FEDSLICE_ASSIGN_OR_RETURN(RoundPlan plan, federation->BeginRound(ids, attempt));
    std::vector<Result<proto::FitResult>> results(plan.assignments.size(),
                                                  Status::Aborted("not run"));
    // Nested engine parallelism is off inside this region, so every client trains
    // single-threaded and its result does not depend on `workers`.
#pragma omp parallel for schedule(dynamic, 1) num_threads(workers)
    for (size_t k = 0; k < plan.assignments.size(); ++k) {
      const Assignment& a = plan.assignments[k];
      results[k] = clients.at(a.client_id).Fit(a.task);
    }
    uint64_t bytes_up = 0;
    uint64_t bytes_down = 0;
    for (size_t k = 0; k < plan.assignments.size(); ++k) {
      const Assignment& a = plan.assignments[k];
      bytes_down += a.task.ByteSizeLong();
      if (!results[k].ok()) {
        spdlog::warn("sim: {} failed round {}: {}", a.client_id, plan.round,
                     results[k].status().ToString());
        federation->MarkDropped(a.client_id);
        continue;
      }
      bytes_up += results[k]->ByteSizeLong();
      if (Status s = federation->AcceptFitResult(a.client_id, *results[k]); !s.ok()) {
        spdlog::warn("sim: update of {} rejected: {}", a.client_id, s.ToString());
      }
    }
    auto metrics = federation->FinishRound({bytes_up, bytes_down});
    if (!metrics.ok()) {
      if (metrics.status().code() == Status::Code::kUnavailable && attempt < 10) {
        ++attempt;
        continue;
      }
      return metrics.status();
    }
    attempt = 0;
    FEDSLICE_RETURN_IF_ERROR(federation->CommitRound(*metrics));
    if (on_round) on_round(*metrics);
    ran.push_back(std::move(metrics).value());
  }
  if (final_weights != nullptr) {
    const auto params = federation->global_model().params();
    final_weights->assign(params.begin(), params.end());
  }
  return ran;
}

}  // namespace fedslice::coordinator
