// Child processes for multi-process tests (a coordinator and its clients on loopback):
// start a built FedSlice program with its output in a log file, signal it, wait for it with a
// timeout, and never leak it — the destructor SIGKILLs and reaps a child that is still
// running, and the child gets SIGKILL by itself if the test process dies first
// (PR_SET_PDEATHSIG), so a failing or crashing test cannot leave processes behind.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fedslice/common/status.h"

namespace fedslice::testing {

// How a child ended.
struct ExitStatus {
  bool exited = false;  // true: exit(code); false: killed by `signal`
  int code = 0;
  int signal = 0;

  bool success() const { return exited && code == 0; }
  // "exit code 0", "killed by signal 9 (Killed)".
  std::string ToString() const;
};

class Subprocess {
 public:
  // Starts `program` with `args` (argv[1..]) and the test's environment plus `env` (entries
  // override variables of the same name). stdout and stderr go to `log_file` (appended, so a
  // restarted program can share one log). Errors: the program is missing or not executable
  // (the exec error is reported here, not as a child that exits 127), the log cannot be opened.
  static Result<std::unique_ptr<Subprocess>> Start(
      const std::filesystem::path& program, const std::vector<std::string>& args,
      const std::filesystem::path& log_file,
      const std::vector<std::pair<std::string, std::string>>& env = {});

  // SIGKILL and reap if still running.
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  pid_t pid() const { return pid_; }
  const std::filesystem::path& log_file() const { return log_file_; }

  // Sends `signal`. kFailedPrecondition once the child has been reaped.
  Status Kill(int signal);

  // The exit status once the child has ended, waiting at most `timeout`; nullopt if it is
  // still running then. After it returned a status, later calls return the same status.
  std::optional<ExitStatus> Wait(std::chrono::milliseconds timeout);

  // True until the child has ended (reaps it if it just did).
  bool Running();

  // Everything the child wrote so far ("" if the log cannot be read).
  std::string ReadLog() const;

  // Waits until the log contains `text` `occurrences` times; false after `timeout`, or at once
  // when the child ended without writing it.
  bool WaitForLog(std::string_view text, std::chrono::milliseconds timeout, int occurrences = 1);

 private:
  Subprocess(pid_t pid, std::filesystem::path log_file) : pid_(pid), log_file_(std::move(log_file)) {}

  pid_t pid_;
  std::filesystem::path log_file_;
  std::optional<ExitStatus> status_;
};

// How a program run to its end ended, and everything it wrote (stdout and stderr).
struct Finished {
  ExitStatus status;
  std::string output;
};

// Runs `program` with `args` to its end, its output logged to `log_file`. Errors: Start's;
// kDeadlineExceeded when it is still running after `timeout` (it is then killed).
Result<Finished> RunToEnd(const std::filesystem::path& program,
                          const std::vector<std::string>& args,
                          const std::filesystem::path& log_file, std::chrono::milliseconds timeout);

// A built program of this build tree: looks in $FEDSLICE_BINARY_DIR (set by CTest; else the
// build directory derived from this test binary's location) and its client/, coordinator/
// and tools/ subdirectories. kNotFound naming the places searched.
Result<std::filesystem::path> BinaryPath(const std::string& name);

// Waits until `path` exists; false after `timeout`.
bool WaitForFile(const std::filesystem::path& path, std::chrono::milliseconds timeout);

// Waits for a port file (a decimal port and a newline, written atomically) and parses it.
// kDeadlineExceeded after `timeout`; kCorruption if the content is not a port.
Result<uint16_t> ReadPortFile(const std::filesystem::path& path, std::chrono::milliseconds timeout);

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed). For tests
// that must restart a server on the same port.
Result<uint16_t> PickFreePort();

}  // namespace fedslice::testing
