#include "testing/test_util.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <system_error>

namespace fedslice::testing {

std::filesystem::path SourceDir() {
  if (const char* dir = std::getenv("FEDSLICE_SOURCE_DIR")) return dir;
  return std::filesystem::current_path();
}

void PrintLogTails(const std::vector<std::filesystem::path>& logs, size_t max_bytes) {
  for (const std::filesystem::path& log : logs) {
    std::ifstream in(log);
    std::stringstream text;
    text << in.rdbuf();
    std::string s = text.str();
    if (s.size() > max_bytes) s = "...\n" + s.substr(s.size() - max_bytes);
    std::printf("----- %s -----\n%s\n", log.filename().c_str(), s.c_str());
  }
}

std::optional<std::filesystem::path> MnistDir() {
  std::filesystem::path dir;
  if (const char* env = std::getenv("FEDSLICE_MNIST_DIR")) {
    dir = env;
  } else {
    dir = SourceDir() / "data" / "mnist-10k";
  }
  for (const char* name : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                           "test-images-idx3-ubyte", "test-labels-idx1-ubyte"}) {
    if (!std::filesystem::exists(dir / name) &&
        !std::filesystem::exists(dir / (std::string(name) + ".gz"))) {
      return std::nullopt;
    }
  }
  return dir;
}

TempDir::TempDir() {
  std::random_device rd;
  for (;;) {
    path_ = std::filesystem::temp_directory_path() /
            ("fedslice-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::error_code ec;
    if (std::filesystem::create_directory(path_, ec)) break;
  }
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace fedslice::testing
