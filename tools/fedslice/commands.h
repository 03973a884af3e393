// Entry points of the `fedslice` subcommands; each returns the process exit code.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace fedslice::cli {

struct Command {
  std::string name;
  std::string summary;
  // argv[0] is the subcommand name.
  std::function<int(int argc, char** argv)> run;
};

// Every subcommand registers itself here (see commands.cc).
const std::vector<Command>& Commands();

int RunTrain(int argc, char** argv);
int RunEval(int argc, char** argv);
int RunSim(int argc, char** argv);
int RunPlan(int argc, char** argv);
int RunInfer(int argc, char** argv);

}  // namespace fedslice::cli
