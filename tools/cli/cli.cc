#include "cli.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <fstream>
#include <iostream>

namespace fedslice::cli {

std::optional<po::variables_map> ParseOrExit(const std::string& command, const std::string& usage,
                                             const po::options_description& options, int argc,
                                             char** argv, int* exit_code,
                                             const po::positional_options_description* positional,
                                             const std::string& program) {
  const std::string display = program.empty() ? "fedslice " + command : program;
  po::options_description all("Options");
  all.add_options()("help,h", "show this help and exit");
  all.add(options);
  po::variables_map vm;
  // The parser keeps a pointer to the positional description, so it must outlive run().
  const po::positional_options_description no_positional;  // stray arguments are errors
  try {
    po::store(po::command_line_parser(argc, argv)  // skips argv[0], the subcommand
                  .options(all)
                  .positional(positional != nullptr ? *positional : no_positional)
                  .run(),
              vm);
    if (vm.count("help") != 0U) {
      std::cout << "Usage: " << display << " " << usage << "\n\n" << all << "\n";
      *exit_code = kExitOk;
      return std::nullopt;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << display << ": " << e.what() << " (see '" << display << " --help')\n";
    *exit_code = kExitUsage;
    return std::nullopt;
  }
  return vm;
}

void PrintError(const std::string& command, const std::string& message) {
  std::cerr << "fedslice " << command << ": " << message << "\n";
}

std::string MergeConfigFile(const std::string& path, const po::options_description& options,
                            po::variables_map* vm) {
  std::ifstream in(path);
  if (!in) return "cannot read config file " + path;
  try {
    po::store(po::parse_config_file(in, options), *vm);
    po::notify(*vm);
  } catch (const po::error& e) {
    return path + ": " + e.what();
  }
  return "";
}

std::string SetUpLogging(const std::string& program, const std::string& level) {
  const auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    return "unknown --log-level '" + level + "' (trace | debug | info | warn | error | off)";
  }
  auto logger = spdlog::get(program);
  if (!logger) logger = spdlog::stderr_color_mt(program);
  spdlog::set_default_logger(logger);
  spdlog::set_level(parsed);
  return "";
}

}  // namespace fedslice::cli
