// Flags shared by every program that runs federated rounds (`fedslice sim` and
// `fedslice-coordinator`): the model, the round settings, the strategy and the codecs. One
// definition keeps their names, defaults and checks identical.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <string>

#include "fedslice/common/status.h"
#include "fedslice/coordinator/federation.h"

namespace fedslice::cli {

// The flags' values as parsed text; ApplyFederationFlags turns them into the config.
struct FederationFlags {
  std::string model = "mlp";
  std::string strategy = "fedavg";
  std::string codec = "fp32";
  std::string downlink_codec = "fp32";
  std::string error_feedback = "default";
  uint32_t codec_block_size = 0;
  std::string sparse_refit = "default";
  float sparse_refit_lr_scale = 0;
  uint64_t seed = 1;
  std::string out_dir;
};

// Defaults that differ between the simulator (research set-up) and the coordinator.
struct FederationDefaults {
  uint32_t local_epochs = 1;
  size_t min_fit = 2;
};

// Adds --model --rounds --fraction --min-fit --epochs --batch --lr --momentum --weight-decay
// --strategy --codec --codec-block-size --error-feedback --sparse-refit
// --sparse-refit-lr-scale --downlink-codec --seed --out-dir,
// storing into `config` and `flags` (both must outlive the parse).
void AddFederationFlags(boost::program_options::options_description& options,
                        coordinator::FederationConfig* config, FederationFlags* flags,
                        const FederationDefaults& defaults);

// Completes `config` from the parsed flags: model spec (seeded), strategy, codecs, seed,
// out_dir; then validates the whole config. InvalidArgument with a message for the user.
Status ApplyFederationFlags(const FederationFlags& flags, coordinator::FederationConfig* config);

}  // namespace fedslice::cli
