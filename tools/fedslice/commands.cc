#include "commands.h"

#include "cli.h"

namespace fedslice::cli {

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"train", "train a built-in model centrally on IDX data (MNIST layout)", RunTrain},
      {"eval", "evaluate a saved model file on the test split of IDX data", RunEval},
      {"sim", "simulate a federation of N virtual clients in one process", RunSim},
      {"plan", "split a model over a chain of devices to maximise pipeline throughput", RunPlan},
      {"infer", "classify a data set by split inference over a coordinator's clients", RunInfer},
  };
  return commands;
}

}  // namespace fedslice::cli
