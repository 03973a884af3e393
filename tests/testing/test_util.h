// Helpers shared by the test suites.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace fedslice::testing {

// The project's source tree (FEDSLICE_SOURCE_DIR, set by CTest; else the current directory).
std::filesystem::path SourceDir();

// Directory holding the four MNIST-10k IDX files: $FEDSLICE_MNIST_DIR, else
// <source>/data/mnist-10k. Empty when the files are not there.
std::optional<std::filesystem::path> MnistDir();

// Prints the last `max_bytes` of each log to stdout under a "----- name -----" header: what a
// failed multi-process test shows of its processes.
void PrintLogTails(const std::vector<std::filesystem::path>& logs, size_t max_bytes);

// A fresh, empty directory under the system temp dir, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace fedslice::testing
