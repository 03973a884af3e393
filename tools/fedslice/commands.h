// Entry points of the `fedslice` subcommands; each returns the process exit code.
#pragma once

namespace fedslice::cli {

int RunTrain(int argc, char** argv);
int RunEval(int argc, char** argv);
int RunSim(int argc, char** argv);

}  // namespace fedslice::cli
