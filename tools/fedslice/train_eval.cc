// `fedslice train` and `fedslice eval`: centralised training and evaluation on IDX data.
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "cli.h"
#include "commands.h"
#include "fedslice/common/idx.h"
#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"
#include "fedslice/common/trainer.h"

namespace fedslice::cli {
namespace {

// Reads the train or test split of an MNIST-layout directory and reports errors in CLI form.
std::optional<data::Dataset> LoadSplitOrReport(const std::string& command,
                                               const std::filesystem::path& dir,
                                               data::Split split) {
  auto dataset = data::LoadMnist(dir, split);
  if (!dataset.ok()) {
    PrintError(command, dataset.status().ToString());
    return std::nullopt;
  }
  return std::move(dataset).value();
}

bool ApplyThreads(const std::string& command, int threads) {
  if (threads < 0) {
    PrintError(command, "--threads must be >= 0 (0 = all cores)");
    return false;
  }
  if (threads > 0) SetNumThreads(threads);
  return true;
}

}  // namespace

int RunTrain(int argc, char** argv) {
  const std::string command = "train";
  std::string model_name;
  std::string data_dir;
  std::string out;
  TrainConfig config;
  int threads = 0;
  const int eval_batch = 256;
  po::options_description options;
  options.add_options()
      ("model", po::value(&model_name)->required(), "built-in model: mlp | cnn")
      ("data", po::value(&data_dir)->required(),
       "directory with {train,test}-{images-idx3,labels-idx1}-ubyte[.gz]")
      ("epochs", po::value(&config.epochs)->default_value(5), "passes over the training set")
      ("batch", po::value(&config.batch_size)->default_value(10), "mini-batch size")
      ("lr", po::value(&config.lr)->default_value(0.05f, "0.05"), "SGD learning rate")
      ("momentum", po::value(&config.momentum)->default_value(0.0f, "0"), "SGD momentum")
      ("weight-decay", po::value(&config.weight_decay)->default_value(0.0f, "0"),
       "L2 weight decay")
      ("seed", po::value(&config.seed)->default_value(1), "shuffling and initialisation seed")
      ("threads", po::value(&threads)->default_value(0), "worker threads (0 = all cores)")
      ("out", po::value(&out), "write the trained model (spec + weights) to this file");
  int exit_code = kExitOk;
  auto vm = ParseOrExit(command,
                        "--model mlp|cnn --data DIR [--epochs N] [--batch B] [--lr X] "
                        "[--threads T] [--out model.pb]",
                        options, argc, argv, &exit_code);
  if (!vm) return exit_code;
  if (!ApplyThreads(command, threads)) return kExitUsage;

  auto spec = BuiltinSpec(model_name, config.seed);
  if (!spec.ok()) {
    PrintError(command, spec.status().message());
    return kExitUsage;
  }
  auto model = Model::Create(*spec);
  if (!model.ok()) {
    PrintError(command, model.status().ToString());
    return kExitFailure;
  }
  auto train = LoadSplitOrReport(command, data_dir, data::Split::kTrain);
  if (!train) return kExitFailure;
  auto test = LoadSplitOrReport(command, data_dir, data::Split::kTest);
  if (!test) return kExitFailure;

  std::printf("model %s: %lld parameters; %lld training and %lld test samples; %d threads\n",
              model_name.c_str(), static_cast<long long>(model->param_count()),
              static_cast<long long>(train->size()), static_cast<long long>(test->size()),
              NumThreads());
  std::printf("%5s %10s %10s %9s %9s %10s\n", "epoch", "train_loss", "test_loss", "test_acc",
              "seconds", "samples/s");
  std::fflush(stdout);

  // Train one epoch at a time so each line can report test accuracy; the shuffling seed
  // varies by epoch, as it would inside one multi-epoch Train() call.
  Sgd optimizer(SgdOptions{.lr = config.lr, .momentum = config.momentum,
                           .weight_decay = config.weight_decay});
  if (Status valid = Sgd::Validate(optimizer.options()); !valid.ok()) {
    PrintError(command, valid.message());
    return kExitUsage;
  }
  const int epochs = config.epochs;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    TrainConfig one = config;
    one.epochs = 1;
    one.seed = config.seed * 1000003ULL + static_cast<uint64_t>(epoch);
    auto stats = Train(*model, *train, one, optimizer);
    if (!stats.ok()) {
      PrintError(command, stats.status().ToString());
      return kExitFailure;
    }
    auto eval = Evaluate(*model, *test, eval_batch);
    if (!eval.ok()) {
      PrintError(command, eval.status().ToString());
      return kExitFailure;
    }
    std::printf("%5d %10.4f %10.4f %8.2f%% %9.2f %10.0f\n", epoch, stats->mean_loss, eval->loss,
                100.0 * eval->accuracy, stats->seconds,
                stats->seconds > 0 ? static_cast<double>(stats->samples_processed) / stats->seconds
                                   : 0.0);
    std::fflush(stdout);
  }
  if (epochs == 0) {
    auto eval = Evaluate(*model, *test, eval_batch);
    if (!eval.ok()) {
      PrintError(command, eval.status().ToString());
      return kExitFailure;
    }
    std::printf("untrained test accuracy %.2f%%\n", 100.0 * eval->accuracy);
  }
  if (!out.empty()) {
    Metadata metadata{{"trained_by", "fedslice train"},
                      {"epochs", std::to_string(epochs)},
                      {"data", data_dir}};
    Status saved = SaveModel(*model, out, metadata);
    if (!saved.ok()) {
      PrintError(command, saved.ToString());
      return kExitFailure;
    }
    std::printf("saved %s\n", out.c_str());
  }
  return kExitOk;
}

int RunEval(int argc, char** argv) {
  const std::string command = "eval";
  std::string model_file;
  std::string data_dir;
  int threads = 0;
  int batch = 256;
  po::options_description options;
  options.add_options()
      ("model-file", po::value(&model_file)->required(), "model file written by train --out")
      ("data", po::value(&data_dir)->required(), "directory with the test split IDX files")
      ("batch", po::value(&batch)->default_value(256), "evaluation batch size")
      ("threads", po::value(&threads)->default_value(0), "worker threads (0 = all cores)");
  int exit_code = kExitOk;
  auto vm = ParseOrExit(command, "--model-file model.pb --data DIR", options, argc, argv,
                        &exit_code);
  if (!vm) return exit_code;
  if (!ApplyThreads(command, threads)) return kExitUsage;
  if (batch < 1) {
    PrintError(command, "--batch must be >= 1");
    return kExitUsage;
  }
  auto model = LoadModel(model_file);
  if (!model.ok()) {
    PrintError(command, model.status().ToString());
    return kExitFailure;
  }
  auto test = LoadSplitOrReport(command, data_dir, data::Split::kTest);
  if (!test) return kExitFailure;
  auto eval = Evaluate(*model, *test, batch);
  if (!eval.ok()) {
    PrintError(command, eval.status().ToString());
    return kExitFailure;
  }
  std::printf("model %s (%lld parameters) on %lld test samples: loss %.4f, accuracy %.2f%%\n",
              model->spec().name().c_str(), static_cast<long long>(model->param_count()),
              static_cast<long long>(eval->count), eval->loss, 100.0 * eval->accuracy);
  return kExitOk;
}

}  // namespace fedslice::cli
