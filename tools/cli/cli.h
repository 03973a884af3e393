// Shared command-line plumbing of the FedSlice programs (`fedslice` and its subcommands,
// `fedslice-client`, `fedslice-coordinator`): option parsing with --help everywhere, and one
// way to report errors (message on stderr, exit code 2 for usage errors, 1 for failures).
// Built as the internal static library `fedslice_cli`.
#pragma once

#include <boost/program_options.hpp>
#include <optional>
#include <string>
#include <vector>

namespace fedslice::cli {

namespace po = boost::program_options;

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// Parses argv against `options` (plus --help). Returns the parsed map, or the exit code to
// return: kExitOk after printing help, kExitUsage after printing a usage error (unknown flag,
// missing value, bad number). argv[0] is skipped (the subcommand or program name).
//
// Messages name the program as "fedslice <command>" for subcommands of `fedslice`; a
// standalone binary passes its own name as `program` (e.g. "fedslice-client"), which is then
// used alone.
std::optional<po::variables_map> ParseOrExit(const std::string& command, const std::string& usage,
                                             const po::options_description& options, int argc,
                                             char** argv, int* exit_code,
                                             const po::positional_options_description* positional =
                                                 nullptr,
                                             const std::string& program = "");

// Prints "fedslice <command>: <message>" to stderr.
void PrintError(const std::string& command, const std::string& message);

// Adds the options set in the INI-style file `path` (`name = value`, names without "--") to
// `vm`; options already in `vm` (given on the command line) win. Returns an empty string on
// success, else the message for the user (unreadable file, unknown option, bad value).
std::string MergeConfigFile(const std::string& path, const po::options_description& options,
                            po::variables_map* vm);

// Sends `program`'s logs to stderr (stdout stays free for results) at `level` (trace | debug |
// info | warn | error | off). Returns an empty string on success, else the message.
std::string SetUpLogging(const std::string& program, const std::string& level);

}  // namespace fedslice::cli
