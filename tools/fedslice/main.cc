// fedslice: the command-line front end (train, eval, and more as the project grows).
#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "cli.h"
#include "commands.h"

namespace {

void PrintTopLevelHelp(std::ostream& out) {
  out << "Usage: fedslice <command> [options]\n\n"
         "FedSlice: federated learning and model slicing for edge devices.\n\n"
         "Commands:\n";
  for (const auto& command : fedslice::cli::Commands()) {
    out << "  " << command.name << std::string(10 - std::min<size_t>(9, command.name.size()), ' ')
        << command.summary << "\n";
  }
  out << "\nRun 'fedslice <command> --help' for the options of a command.\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    PrintTopLevelHelp(argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? fedslice::cli::kExitUsage : fedslice::cli::kExitOk;
  }
  const std::string name = argv[1];
  for (const auto& command : fedslice::cli::Commands()) {
    if (command.name == name) {
      try {
        return command.run(argc - 1, argv + 1);
      } catch (const std::exception& e) {
        // Subcommands report errors through Status; this is the last line of defence.
        fedslice::cli::PrintError(name, std::string("unexpected error: ") + e.what());
        return fedslice::cli::kExitFailure;
      }
    }
  }
  std::cerr << "fedslice: unknown command '" << name << "'\n\n";
  PrintTopLevelHelp(std::cerr);
  return fedslice::cli::kExitUsage;
}
