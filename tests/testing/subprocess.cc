#include "testing/subprocess.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

extern char** environ;

namespace fedslice::testing {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kPoll{10};

std::string ErrnoText(int err) { return std::strerror(err); }

ExitStatus FromWaitStatus(int status) {
  ExitStatus s;
  if (WIFEXITED(status)) {
    s.exited = true;
    s.code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    s.signal = WTERMSIG(status);
  }
  return s;
}

}  // namespace

std::string ExitStatus::ToString() const {
  if (exited) return "exit code " + std::to_string(code);
  return "killed by signal " + std::to_string(signal) + " (" + strsignal(signal) + ")";
}

Result<std::unique_ptr<Subprocess>> Subprocess::Start(
    const std::filesystem::path& program, const std::vector<std::string>& args,
    const std::filesystem::path& log_file,
    const std::vector<std::pair<std::string, std::string>>& env) {
  // Everything the child needs is prepared before fork: between fork and exec only
  // async-signal-safe calls are allowed (the test process has other threads).
  std::vector<std::string> argv_storage;
  argv_storage.push_back(program.string());
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::map<std::string, std::string> variables;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const size_t eq = entry.find('=');
    if (eq != std::string::npos) variables[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  for (const auto& [name, value] : env) variables[name] = value;
  std::vector<std::string> env_storage;
  for (const auto& [name, value] : variables) env_storage.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  const int log_fd = ::open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return Status::IoError("cannot open log " + log_file.string() + ": " + ErrnoText(errno));
  }
  // The exec error, if any, comes back through this pipe; a successful exec closes it.
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) {
    const int err = errno;
    ::close(log_fd);
    return Status::IoError("pipe2: " + ErrnoText(err));
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(log_fd);
    ::close(report[0]);
    ::close(report[1]);
    return Status::IoError("fork: " + ErrnoText(err));
  }
  if (pid == 0) {
    // Child. Dies with the test process even if that one is SIGKILLed (ctest timeout).
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    // Own process group: a Ctrl-C meant for the test runner reaches the children only
    // through the test (destructors), in order.
    ::setpgid(0, 0);
    const int in = ::open("/dev/null", O_RDONLY);
    if (in >= 0) ::dup2(in, STDIN_FILENO);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    ::execve(argv[0], argv.data(), envp.data());
    const int err = errno;
    ssize_t written = ::write(report[1], &err, sizeof(err));
    (void)written;
    ::_exit(127);
  }
  ::close(log_fd);
  ::close(report[1]);
  int child_errno = 0;
  ssize_t got;
  do {
    got = ::read(report[0], &child_errno, sizeof(child_errno));
  } while (got < 0 && errno == EINTR);
  ::close(report[0]);
  if (got == static_cast<ssize_t>(sizeof(child_errno))) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    return Status::NotFound("cannot execute " + program.string() + ": " +
                            ErrnoText(child_errno));
  }
  return std::unique_ptr<Subprocess>(new Subprocess(pid, log_file));
}

Subprocess::~Subprocess() {
  if (status_) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
}

Status Subprocess::Kill(int signal) {
  if (status_) {
    return Status::FailedPrecondition("process " + std::to_string(pid_) + " already ended (" +
                                      status_->ToString() + ")");
  }
  if (::kill(pid_, signal) != 0) return Status::IoError("kill: " + ErrnoText(errno));
  return Status::Ok();
}

std::optional<ExitStatus> Subprocess::Wait(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!status_) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      status_ = FromWaitStatus(status);
      break;
    }
    if (r < 0 && errno != EINTR) {
      // Not our child any more (cannot happen unless someone else reaped it).
      status_ = ExitStatus{};
      break;
    }
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(kPoll);
  }
  return status_;
}

bool Subprocess::Running() { return !Wait(std::chrono::milliseconds(0)).has_value(); }

std::string Subprocess::ReadLog() const {
  std::ifstream in(log_file_, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

bool Subprocess::WaitForLog(std::string_view text, std::chrono::milliseconds timeout,
                            int occurrences) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const bool ended = !Running();  // checked before reading: a last line is not missed
    const std::string log = ReadLog();
    int found = 0;
    for (size_t at = log.find(text); at != std::string::npos; at = log.find(text, at + 1)) {
      if (++found >= occurrences) return true;
    }
    if (ended || Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(kPoll * 5);
  }
}

Result<Finished> RunToEnd(const std::filesystem::path& program,
                          const std::vector<std::string>& args,
                          const std::filesystem::path& log_file,
                          std::chrono::milliseconds timeout) {
  FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<Subprocess> process,
                            Subprocess::Start(program, args, log_file));
  const std::optional<ExitStatus> status = process->Wait(timeout);
  if (!status) {
    return Status::DeadlineExceeded(program.filename().string() + " still running after " +
                                    std::to_string(timeout.count()) + " ms; killed\n" +
                                    process->ReadLog());
  }
  return Finished{*status, process->ReadLog()};
}

Result<std::filesystem::path> BinaryPath(const std::string& name) {
  std::filesystem::path root;
  if (const char* dir = std::getenv("FEDSLICE_BINARY_DIR")) {
    root = dir;
  } else {
    // <build>/tests/<suite>/<test binary>
    std::error_code ec;
    const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) root = self.parent_path().parent_path().parent_path();
  }
  std::string searched;
  for (const char* sub : {"", "client", "coordinator", "tools"}) {
    const auto candidate = root / sub / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    searched.append(" ").append(candidate.string());
  }
  return Status::NotFound("program " + name + " is not built (looked at" + searched + ")");
}

bool WaitForFile(const std::filesystem::path& path, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    std::error_code ec;
    if (std::filesystem::exists(path, ec)) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(kPoll * 2);
  }
}

Result<uint16_t> ReadPortFile(const std::filesystem::path& path,
                              std::chrono::milliseconds timeout) {
  if (!WaitForFile(path, timeout)) {
    return Status::DeadlineExceeded("no port file " + path.string() + " after " +
                                    std::to_string(timeout.count()) + " ms");
  }
  std::ifstream in(path);
  long port = 0;
  if (!(in >> port) || port < 1 || port > 65535) {
    return Status::Corruption("port file " + path.string() + " does not hold a port");
  }
  return static_cast<uint16_t>(port);
}

Result<uint16_t> PickFreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::IoError("socket: " + ErrnoText(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::IoError("binding 127.0.0.1:0: " + ErrnoText(err));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace fedslice::testing
