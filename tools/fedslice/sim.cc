// `fedslice sim`: a federation of N virtual clients in one process (no sockets).
#include <chrono>
#include <cstdio>
#include <string>

#include "cli.h"
#include "federation_flags.h"
#include "commands.h"
#include "fedslice/common/idx.h"
#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/coordinator/simulation.h"

namespace fedslice::cli {

int RunSim(int argc, char** argv) {
  const std::string command = "sim";
  std::string data_dir;
  std::string partition = "iid";
  std::string save_model;
  coordinator::SimulationConfig config;
  coordinator::FederationConfig& fed = config.federation;
  int eval_every = 1;
  po::options_description options;
  options.add_options()
      ("data", po::value(&data_dir)->required(), "MNIST-layout IDX directory")
      ("clients", po::value(&config.num_clients)->default_value(100), "virtual clients N")
      ("partition", po::value(&partition)->default_value("iid"),
       "iid | shards[:K] | dirichlet:ALPHA")
      ("partition-seed", po::value(&config.partition_seed)->default_value(1), "partition seed")
      ("threads", po::value(&config.parallelism)->default_value(0),
       "clients trained at once (0 = all cores)")
      ("eval-every", po::value(&eval_every)->default_value(1),
       "print a progress line every N rounds")
      ("save-model", po::value(&save_model), "write the final global model to this file");
  FederationFlags federation_flags;
  AddFederationFlags(options, &fed, &federation_flags, {.local_epochs = 5, .min_fit = 1});
  int exit_code = kExitOk;
  auto vm = ParseOrExit(command,
                        "--model mlp|cnn --data DIR [--clients N] [--partition P] [--rounds R] "
                        "[--fraction C] [--epochs E] [--batch B] [--lr X]",
                        options, argc, argv, &exit_code);
  if (!vm) return exit_code;
  if (eval_every < 1) {
    PrintError(command, "--eval-every must be >= 1");
    return kExitUsage;
  }
  auto scheme = data::ParsePartitionScheme(partition);
  if (!scheme.ok()) {
    PrintError(command, scheme.status().message());
    return kExitUsage;
  }
  config.partition = *scheme;
  if (Status applied = ApplyFederationFlags(federation_flags, &fed); !applied.ok()) {
    PrintError(command, applied.message());
    return kExitUsage;
  }

  auto train = data::LoadMnist(data_dir, data::Split::kTrain);
  if (!train.ok()) {
    PrintError(command, train.status().ToString());
    return kExitFailure;
  }
  auto test = data::LoadMnist(data_dir, data::Split::kTest);
  if (!test.ok()) {
    PrintError(command, test.status().ToString());
    return kExitFailure;
  }
  // ApplyFederationFlags has validated the codec config.
  const codec::SparseRefit refit = *codec::ParseSparseRefit(fed.codec);
  char refit_note[96] = "";
  if (refit.on()) {
    std::snprintf(refit_note, sizeof refit_note, " (sparse refit: last %g%% of steps at %gx lr)",
                  100 * refit.share, refit.lr_scale);
  }
  std::printf("sim: %s, %d clients (%s), %u rounds, C=%g, E=%u, B=%u, lr=%g, %s, codec %s%s\n",
              federation_flags.model.c_str(), config.num_clients,
              data::ToString(config.partition).c_str(), fed.rounds, fed.fraction, fed.local_epochs,
              fed.batch_size, static_cast<double>(fed.learning_rate),
              fed.strategy.ToString().c_str(), federation_flags.codec.c_str(), refit_note);
  std::fflush(stdout);
  const auto started = std::chrono::steady_clock::now();
  std::vector<float> final_weights;
  auto metrics = coordinator::RunSimulation(
      config, *train, std::move(test).value(),
      [&](const proto::RoundMetrics& m) {
        if (m.round() % static_cast<uint64_t>(eval_every) == 0 || m.round() == fed.rounds) {
          std::printf("round %4llu  accuracy %6.2f%%  loss %.4f  train_loss %.4f  clients %u/%u"
                      "  up %.2f MB  %.2fs\n",
                      static_cast<unsigned long long>(m.round()), 100.0 * m.accuracy(), m.loss(),
                      m.train_loss(), m.clients_answered(), m.clients_asked(),
                      static_cast<double>(m.bytes_up()) / 1e6, m.seconds());
          std::fflush(stdout);
        }
      },
      &final_weights);
  if (!metrics.ok()) {
    PrintError(command, metrics.status().ToString());
    return kExitFailure;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  double tail_sum = 0;
  int tail_count = 0;
  for (const auto& m : *metrics) {
    if (m.round() + 10 > fed.rounds) {
      tail_sum += m.accuracy();
      ++tail_count;
    }
  }
  std::printf("sim: %zu rounds in %.1fs (%.1f rounds/min)", metrics->size(), seconds,
              seconds > 0 ? 60.0 * static_cast<double>(metrics->size()) / seconds : 0.0);
  if (tail_count > 0) {
    std::printf("; mean accuracy over the last %d rounds %.2f%%", tail_count,
                100.0 * tail_sum / tail_count);
  }
  std::printf("\n");
  if (!save_model.empty()) {
    auto model = Model::Create(fed.model);
    if (!model.ok() || !model->SetParams(final_weights).ok()) {
      PrintError(command, "could not rebuild the final model");
      return kExitFailure;
    }
    if (Status saved = SaveModel(*model, save_model, {{"trained_by", "fedslice sim"}});
        !saved.ok()) {
      PrintError(command, saved.ToString());
      return kExitFailure;
    }
    std::printf("saved %s\n", save_model.c_str());
  }
  return kExitOk;
}

}  // namespace fedslice::cli
