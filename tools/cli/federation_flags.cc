#include "federation_flags.h"

#include <charconv>
#include <system_error>

#include "fedslice/common/model_zoo.h"

namespace fedslice::cli {

namespace po = boost::program_options;

void AddFederationFlags(po::options_description& options, coordinator::FederationConfig* config,
                        FederationFlags* flags, const FederationDefaults& defaults) {
  // One flag per line reads better than the formatter's call chain.
  // clang-format off
  options.add_options()
      ("model", po::value(&flags->model)->default_value("mlp"), "built-in model: mlp | cnn")
      ("rounds", po::value(&config->rounds)->default_value(10), "total federated rounds")
      ("fraction", po::value(&config->fraction)->default_value(0.1, "0.1"),
       "C: fraction of the clients asked per round")
      ("min-fit", po::value(&config->min_fit)->default_value(defaults.min_fit),
       "results a round needs (else it is retried with another sample)")
      ("epochs", po::value(&config->local_epochs)->default_value(defaults.local_epochs),
       "E: local epochs per round")
      ("batch", po::value(&config->batch_size)->default_value(10), "B: local batch size")
      ("lr", po::value(&config->learning_rate)->default_value(0.05f, "0.05"),
       "client learning rate")
      ("momentum", po::value(&config->momentum)->default_value(0.0f, "0"), "client SGD momentum")
      ("weight-decay", po::value(&config->weight_decay)->default_value(0.0f, "0"),
       "client weight decay")
      ("strategy", po::value(&flags->strategy)->default_value("fedavg"),
       "fedavg | fedprox:mu=X | fedavgm:lr=X,momentum=Y | fedadam:lr=X,beta1=..,beta2=..,tau=..")
      ("codec", po::value(&flags->codec)->default_value("fp32"),
       "update codec: fp32 | fp16 | int8 | int4 | qsgd:S | sign | topk:F")
      ("codec-block-size", po::value(&flags->codec_block_size)->default_value(0),
       "values per block for int8/int4/qsgd/sign (0 = 256)")
      ("error-feedback", po::value(&flags->error_feedback)->default_value("default"),
       "on | default (on for sign and topk): keep what a lossy codec did not send and add "
       "it to the next update")
      ("sparse-refit", po::value(&flags->sparse_refit)->default_value("default"),
       "topk: share of the local steps, at the end, that train only the values top-k will "
       "send, in [0, 1); 0 = off; default = 0.6 with topk")
      ("sparse-refit-lr-scale",
       po::value(&flags->sparse_refit_lr_scale)->default_value(0.0f, "0"),
       "learning rate of those steps as a multiple of --lr (0 = 4)")
      ("downlink-codec", po::value(&flags->downlink_codec)->default_value("fp32"),
       "codec of the global weights sent to clients")
      ("seed", po::value(&flags->seed)->default_value(1),
       "run seed: model init, sampling, shuffling")
      ("out-dir", po::value(&flags->out_dir),
       "checkpoints and metrics.{csv,jsonl} go here; a run started again on the same "
       "directory resumes");
  // clang-format on
}

Status ApplyFederationFlags(const FederationFlags& flags, coordinator::FederationConfig* config) {
  FEDSLICE_ASSIGN_OR_RETURN(config->strategy, coordinator::StrategyConfig::Parse(flags.strategy));
  if (flags.error_feedback != "on" && flags.error_feedback != "default") {
    return Status::InvalidArgument("--error-feedback must be 'on' or 'default'");
  }
  config->codec.set_name(flags.codec);
  config->codec.set_block_size(flags.codec_block_size);
  config->codec.set_error_feedback(flags.error_feedback == "on");
  if (flags.sparse_refit == "default") {
    config->codec.clear_sparse_refit();
  } else {
    float share = 0;
    const char* end = flags.sparse_refit.data() + flags.sparse_refit.size();
    const auto [at, error] = std::from_chars(flags.sparse_refit.data(), end, share);
    if (error != std::errc() || at != end) {
      return Status::InvalidArgument(
          "--sparse-refit must be 'default' or a number in [0, 1), got '" + flags.sparse_refit +
          "'");
    }
    config->codec.set_sparse_refit(share);
  }
  config->codec.set_sparse_refit_lr_scale(flags.sparse_refit_lr_scale);
  config->downlink_codec.set_name(flags.downlink_codec);
  config->seed = flags.seed;
  config->out_dir = flags.out_dir;
  FEDSLICE_ASSIGN_OR_RETURN(config->model, BuiltinSpec(flags.model, flags.seed));
  return config->Validate();
}

}  // namespace fedslice::cli
