// Shared plumbing of the `fedslice` subcommands: option parsing with --help on every
// subcommand, and one way to report errors (message on stderr, exit code 2 for usage errors,
// 1 for failures).
#pragma once

#include <boost/program_options.hpp>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fedslice::cli {

namespace po = boost::program_options;

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

struct Command {
  std::string name;
  std::string summary;
  // argv[0] is the subcommand name.
  std::function<int(int argc, char** argv)> run;
};

// Every subcommand registers itself here (see commands.cc).
const std::vector<Command>& Commands();

// Parses argv against `options` (plus --help). Returns the parsed map, or the exit code to
// return: kExitOk after printing help, kExitUsage after printing a usage error (unknown flag,
// missing value, bad number).
std::optional<po::variables_map> ParseOrExit(const std::string& command, const std::string& usage,
                                             const po::options_description& options, int argc,
                                             char** argv, int* exit_code,
                                             const po::positional_options_description* positional =
                                                 nullptr);

// Prints "fedslice <command>: <message>" to stderr.
void PrintError(const std::string& command, const std::string& message);

}  // namespace fedslice::cli
