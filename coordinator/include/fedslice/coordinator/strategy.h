// Server-side aggregation strategies: FedAvg, FedProx, FedAvgM and FedAdam behind one
// interface that folds client updates in as they arrive.
//
// Memory is O(model), never O(clients x model): a round keeps one double-precision running
// sum of the sample-weighted deltas, plus the optimiser state of FedAvgM / FedAdam. Sums are
// kept in double so that the order in which updates arrive (network arrival order vs. the
// simulator's client order) changes the resulting float32 weights by at most an ulp or so.
//
// Usage, once per round:
//   FEDSLICE_ASSIGN_OR_RETURN(auto config, StrategyConfig::Parse("fedadam:lr=0.01"));
//   FEDSLICE_ASSIGN_OR_RETURN(auto strategy, MakeStrategy(config, weights.size()));
//   strategy->BeginRound(weights);
//   for (each FitResult as it arrives) strategy->Accumulate(delta, num_samples);  // may fail
//   FEDSLICE_RETURN_IF_ERROR(strategy->FinishRound(weights));
//
// Thread safety: a Strategy is not thread-safe; callers serialise all calls on one object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "fedslice/common/status.h"
#include "fedslice/coordinator.pb.h"

namespace fedslice::coordinator {

// A strategy and its hyper-parameters, e.g. parsed from "fedavgm:lr=1,momentum=0.9".
struct StrategyConfig {
  enum class Kind { kFedAvg, kFedProx, kFedAvgM, kFedAdam };

  Kind kind = Kind::kFedAvg;
  // FedProx: weight of the proximal term (mu/2)||w - w_global||^2 the clients add.
  double mu = 0.01;
  // FedAvgM / FedAdam: server learning rate eta. Defaults() / Parse() set the kind's
  // default (1.0 for FedAvgM, 0.01 for FedAdam).
  double lr = 1.0;
  double momentum = 0.9;  // FedAvgM: server momentum beta
  double beta1 = 0.9;     // FedAdam
  double beta2 = 0.99;    // FedAdam
  double tau = 1e-3;      // FedAdam: adaptivity / epsilon

  // Parses "<name>[:key=value[,key=value]...]". Names and keys:
  //   fedavg                      (no options)
  //   fedprox:mu=M                mu >= 0                          (default 0.01)
  //   fedavgm:lr=E,momentum=B     lr > 0, 0 <= momentum < 1        (defaults 1, 0.9)
  //   fedadam:lr=E,beta1=B1,beta2=B2,tau=T
  //                               lr > 0, 0 <= beta < 1, tau > 0   (defaults 0.01, 0.9,
  //                                                                  0.99, 0.001)
  // Omitted keys keep their defaults. Unknown names or keys, repeated keys, empty or
  // non-numeric values and out-of-range values are InvalidArgument with a message that
  // names the offending part and the accepted alternatives.
  static Result<StrategyConfig> Parse(std::string_view text);

  // The kind's defaults (the values Parse uses for omitted keys).
  static StrategyConfig Defaults(Kind kind);

  // InvalidArgument unless the options the kind uses are finite and in range (see Parse).
  Status Validate() const;

  // Canonical form with every option spelled out, e.g.
  // "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001". Parse(ToString()) gives back an equal
  // config (numbers are printed in shortest round-trip form).
  std::string ToString() const;

  // "fedavg" | "fedprox" | "fedavgm" | "fedadam".
  static std::string_view KindName(Kind kind);

  bool operator==(const StrategyConfig&) const = default;
};

// Largest sample count one update may claim. No edge client holds a billion samples; a
// larger claim is a bug or an attempt to dominate the weighted average.
inline constexpr uint64_t kMaxSamplesPerUpdate = uint64_t{1} << 30;

class Strategy {
 public:
  virtual ~Strategy() = default;

  // "fedavg" | "fedprox" | "fedavgm" | "fedadam".
  virtual std::string_view name() const = 0;
  // The configuration this strategy was made from.
  virtual const StrategyConfig& config() const = 0;
  // Number of model parameters this strategy aggregates (fixed at construction).
  virtual size_t num_params() const = 0;
  // FedProx's mu, sent to the clients in each FitTask; 0 for the others.
  virtual float proximal_mu() const { return 0; }

  // Starts aggregating a round whose global weights are `global`, discarding whatever an
  // earlier unfinished round had accumulated (a retried round starts afresh).
  // InvalidArgument if global.size() != num_params(); the strategy is then idle.
  virtual Status BeginRound(std::span<const float> global) = 0;

  // Folds in one client's update: delta = client weights - global weights (num_params()
  // floats), weighted by `num_samples`, the number of samples it trained on.
  // FailedPrecondition outside a round; InvalidArgument for a wrong size, num_samples == 0
  // or > kMaxSamplesPerUpdate, or a NaN / Inf value. On error the round's aggregate is
  // unchanged, so the caller can drop that update and go on with the others.
  virtual Status Accumulate(std::span<const float> delta, uint64_t num_samples) = 0;

  // Updates folded in since BeginRound.
  virtual size_t num_accumulated() const = 0;
  // Sum of their sample counts.
  virtual uint64_t total_samples() const = 0;

  // Writes the next global weights into `global` (in/out; it must hold the weights given to
  // BeginRound) and advances the optimiser state; the strategy is then idle.
  // FailedPrecondition if no round is open or nothing was accumulated; InvalidArgument for a
  // wrong size; OutOfRange if the new weights or state would not be finite in float32.
  // On error neither `global` nor the state changes and the round stays open.
  virtual Status FinishRound(std::span<float> global) = 0;

  // Server optimiser state (momentum, Adam moments, step count) for checkpoints. Whatever
  // a round has accumulated so far is not part of it: checkpoints are taken between rounds.
  virtual proto::StrategyState SaveState() const = 0;
  // Restores SaveState() output of a strategy with the same config and num_params. Fails
  // (InvalidArgument, state unchanged) on another kind, another config, wrong vector sizes
  // or non-finite / negative-variance values. Any open round is discarded.
  virtual Status LoadState(const proto::StrategyState& state) = 0;
};

// Creates the strategy `config` describes for a model of `num_params` parameters.
// InvalidArgument if num_params is 0 or the config is out of range (see Parse).
Result<std::unique_ptr<Strategy>> MakeStrategy(const StrategyConfig& config, size_t num_params);

}  // namespace fedslice::coordinator
