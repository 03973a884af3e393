// Networked federations as separate processes on loopback: fedslice-coordinator and
// fedslice-client binaries over mutual TLS (certificates from scripts/make_certs.sh), MNIST-10k,
// the 2NN. Every wait is bounded and every child is SIGKILLed by its Subprocess destructor,
// so a failing test neither hangs nor leaks processes; on failure the logs are printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fedslice/common/idx.h"
#include "fedslice/common/model.h"
#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/coordinator/checkpoint.h"
#include "fedslice/coordinator/simulation.h"
#include "testing/net_test_util.h"
#include "testing/subprocess.h"
#include "testing/test_util.h"

namespace fedslice {
namespace {

using namespace std::chrono_literals;
using testing::Subprocess;
namespace fs = std::filesystem;

constexpr int kNumCerts = 10;
// Bounds for a whole run; far above what a healthy run needs (seconds), so that only a hang
// trips them.
constexpr auto kRunTimeout = 120s;
constexpr auto kStartTimeout = 30s;

// One metrics.csv row, by column name.
using MetricsRow = std::map<std::string, std::string>;

std::vector<std::string> SplitCsvLine(const std::string& line) {
  std::vector<std::string> cells(1);
  bool quoted = false;
  for (char c : line) {
    if (c == '"') {
      quoted = !quoted;
    } else if (c == ',' && !quoted) {
      cells.emplace_back();
    } else {
      cells.back() += c;
    }
  }
  return cells;
}

std::vector<MetricsRow> ReadMetricsCsv(const fs::path& path) {
  std::ifstream in(path);
  std::string line;
  std::vector<MetricsRow> rows;
  if (!std::getline(in, line)) return rows;
  const std::vector<std::string> header = SplitCsvLine(line);
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const std::vector<std::string> cells = SplitCsvLine(line);
    MetricsRow row;
    for (size_t i = 0; i < header.size() && i < cells.size(); ++i) row[header[i]] = cells[i];
    rows.push_back(std::move(row));
  }
  return rows;
}

std::vector<std::string> ReadLines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

double Number(const MetricsRow& row, const std::string& column) {
  auto it = row.find(column);
  if (it == row.end() || it->second.empty()) return std::nan("");
  return std::stod(it->second);
}

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

struct CoordinatorFlags {
  int rounds = 3;
  double fraction = 1.0;
  int min_fit = 2;
  int min_available = 2;
  uint64_t seed = 1;
  int deadline_ms = 30'000;
  uint16_t port = 0;  // 0: ephemeral, read from the port file
  std::vector<std::string> extra;
};

class FederationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    certs_ = new testing::TempDir();
    auto pki = testing::TestPki::Create(certs_->path(), kNumCerts);
    if (!pki.ok()) pki_error_ = new Status(pki.status());
  }
  static void TearDownTestSuite() {
    delete pki_error_;
    delete certs_;
    pki_error_ = nullptr;
    certs_ = nullptr;
  }

  void SetUp() override {
    ASSERT_EQ(pki_error_, nullptr) << "creating certificates: " << pki_error_->ToString();
    auto mnist = testing::MnistDir();
    ASSERT_TRUE(mnist.has_value()) << "MNIST-10k not found: run scripts/fetch_mnist.sh";
    mnist_ = *mnist;
    auto coordinator = testing::BinaryPath("fedslice-coordinator");
    ASSERT_TRUE(coordinator.ok()) << coordinator.status().ToString();
    auto client = testing::BinaryPath("fedslice-client");
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    coordinator_bin_ = *coordinator;
    client_bin_ = *client;
  }

  void TearDown() override {
    if (HasFailure()) testing::PrintLogTails(logs_, 6000);
  }

  fs::path Cert(const std::string& name, const char* ext) const {
    return certs_->path() / (name + ext);
  }

  // Starts fedslice-coordinator writing into `out_dir`; `*port` receives the port it listens on.
  std::unique_ptr<Subprocess> StartCoordinator(const fs::path& out_dir, const CoordinatorFlags& f,
                                               const std::string& log_name, uint16_t* port) {
    const fs::path port_file = work_.path() / (log_name + ".port");
    std::vector<std::string> args = {"--ca",
                                     Cert("ca", ".pem"),
                                     "--cert",
                                     Cert("coordinator", ".pem"),
                                     "--key",
                                     Cert("coordinator", ".key"),
                                     "--bind",
                                     "127.0.0.1",
                                     "--port",
                                     std::to_string(f.port),
                                     "--port-file",
                                     port_file.string(),
                                     "--model",
                                     "mlp",
                                     "--data",
                                     mnist_.string(),
                                     "--rounds",
                                     std::to_string(f.rounds),
                                     "--fraction",
                                     std::to_string(f.fraction),
                                     "--min-fit",
                                     std::to_string(f.min_fit),
                                     "--min-available",
                                     std::to_string(f.min_available),
                                     "--epochs",
                                     "1",
                                     "--batch",
                                     "10",
                                     "--lr",
                                     "0.05",
                                     "--seed",
                                     std::to_string(f.seed),
                                     "--round-deadline-ms",
                                     std::to_string(f.deadline_ms),
                                     "--out-dir",
                                     out_dir.string(),
                                     "--threads",
                                     "1",
                                     "--heartbeat-ms",
                                     "1000",
                                     "--idle-timeout-ms",
                                     "10000"};
    args.insert(args.end(), f.extra.begin(), f.extra.end());
    const fs::path log = work_.path() / (log_name + ".log");
    logs_.push_back(log);
    auto process = Subprocess::Start(coordinator_bin_, args, log);
    EXPECT_TRUE(process.ok()) << process.status().ToString();
    if (!process.ok()) return nullptr;
    // Polls the port file while the coordinator lives: a refused flag fails at once.
    Result<uint16_t> bound = Status::DeadlineExceeded("no port file");
    for (auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
         std::chrono::steady_clock::now() < deadline;) {
      bound = testing::ReadPortFile(port_file, 100ms);
      if (bound.ok() || !(*process)->Running()) break;
    }
    EXPECT_TRUE(bound.ok()) << log_name << " did not start: " << bound.status().ToString();
    if (!bound.ok()) return nullptr;
    *port = *bound;
    return std::move(*process);
  }

  // Starts client `index` of `count`, holding its iid share of MNIST-10k.
  std::unique_ptr<Subprocess> StartClient(int index, int count, uint16_t port,
                                          const std::vector<std::string>& extra = {}) {
    const std::string name = coordinator::SimulatedClientId(index);
    std::vector<std::string> args = {
        "--coordinator", "127.0.0.1:" + std::to_string(port), "--ca", Cert("ca", ".pem"), "--cert",
        Cert(name, ".pem"), "--key", Cert(name, ".key"), "--data", mnist_.string(), "--partition",
        "iid", "--partition-seed", "7", "--index", std::to_string(index), "--count",
        std::to_string(count), "--threads", "1", "--heartbeat-ms", "1000", "--idle-timeout-ms",
        "10000", "--backoff-initial-ms", "100", "--backoff-max-ms", "1000",
        // Bounds a broken test: a client never waits for a coordinator longer than this.
        "--give-up-after-s", "90"};
    args.insert(args.end(), extra.begin(), extra.end());
    const fs::path log = work_.path() / (name + ".log");
    logs_.push_back(log);
    auto process = Subprocess::Start(client_bin_, args, log);
    EXPECT_TRUE(process.ok()) << process.status().ToString();
    return process.ok() ? std::move(*process) : nullptr;
  }

  void ExpectExitsOk(Subprocess& process, const std::string& what,
                     std::chrono::milliseconds timeout = kRunTimeout) {
    auto status = process.Wait(timeout);
    ASSERT_TRUE(status.has_value()) << what << " still running after " << timeout.count() << " ms";
    EXPECT_TRUE(status->success()) << what << ": " << status->ToString();
  }

  static inline testing::TempDir* certs_ = nullptr;
  static inline Status* pki_error_ = nullptr;
  testing::TempDir work_;
  fs::path mnist_, coordinator_bin_, client_bin_;
  std::vector<fs::path> logs_;
};

TEST_F(FederationTest, TenClientProcessesOverMutualTlsLearn) {
  const fs::path out = work_.path() / "run";
  CoordinatorFlags flags;
  flags.rounds = 3;
  flags.fraction = 0.5;  // 5 of 10 clients per round
  flags.min_fit = 3;
  flags.min_available = 10;  // all registered before round 1
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  std::vector<std::unique_ptr<Subprocess>> clients;
  for (int i = 0; i < 10; ++i) {
    clients.push_back(StartClient(i, 10, port));
    ASSERT_NE(clients.back(), nullptr);
  }
  ExpectExitsOk(*coordinator, "coordinator");
  for (int i = 0; i < 10; ++i) ExpectExitsOk(*clients[i], "client " + std::to_string(i), 30s);

  const auto rows = ReadMetricsCsv(out / "metrics.csv");
  ASSERT_EQ(rows.size(), 3U);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(Number(rows[r], "round"), r + 1);
    EXPECT_EQ(Number(rows[r], "clients_asked"), 5);
    EXPECT_EQ(Number(rows[r], "clients_answered"), 5);
    EXPECT_EQ(Number(rows[r], "clients_dropped"), 0);
    EXPECT_GT(Number(rows[r], "bytes_up"), 5 * 4 * 199'210);  // five fp32 updates at least
  }
  const double first = Number(rows[0], "accuracy");
  const double last = Number(rows[2], "accuracy");
  std::printf("accuracy: round 1 %.4f, round 3 %.4f\n", first, last);
  EXPECT_GT(last, first);
  EXPECT_GT(last, 0.8);
  const auto jsonl = ReadLines(out / "metrics.jsonl");
  ASSERT_EQ(jsonl.size(), 3U);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(jsonl[r].rfind("{\"round\":" + std::to_string(r + 1) + ",", 0), 0U) << jsonl[r];
  }
  // Every task a client got, it answered: 5 per round, 15 in all.
  int answered = 0;
  for (auto& client : clients) answered += Count(client->ReadLog(), ": trained on ");
  EXPECT_EQ(answered, 15);
}

TEST_F(FederationTest, ClientKilledMidRoundIsDroppedAndTheRoundCompletes) {
  const fs::path out = work_.path() / "run";
  CoordinatorFlags flags;
  flags.rounds = 2;
  flags.fraction = 1.0;  // the victim is surely asked
  flags.min_fit = 3;
  flags.min_available = 4;
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  // The victim registers first (so it is in round 1) and trains slowly (so it is still busy
  // when killed).
  auto victim = StartClient(4, 5, port, {"--slowdown", "50"});
  ASSERT_NE(victim, nullptr);
  ASSERT_TRUE(victim->WaitForLog("registered as", kStartTimeout));
  std::vector<std::unique_ptr<Subprocess>> clients;
  for (int i = 0; i < 4; ++i) {
    clients.push_back(StartClient(i, 5, port));
    ASSERT_NE(clients.back(), nullptr);
  }
  ASSERT_TRUE(victim->WaitForLog("round 1: fit task", kStartTimeout));
  ASSERT_TRUE(victim->Kill(SIGKILL).ok());
  auto killed = victim->Wait(10s);
  ASSERT_TRUE(killed.has_value());
  EXPECT_EQ(killed->signal, SIGKILL) << killed->ToString();

  ExpectExitsOk(*coordinator, "coordinator");
  for (int i = 0; i < 4; ++i) ExpectExitsOk(*clients[i], "client " + std::to_string(i), 30s);
  const auto rows = ReadMetricsCsv(out / "metrics.csv");
  ASSERT_EQ(rows.size(), 2U);
  EXPECT_EQ(Number(rows[0], "round"), 1);
  EXPECT_GE(Number(rows[0], "clients_dropped"), 1);
  EXPECT_GE(Number(rows[0], "clients_answered"), flags.min_fit);
  EXPECT_EQ(Number(rows[0], "clients_answered") + Number(rows[0], "clients_dropped") +
                Number(rows[0], "clients_rejected"),
            Number(rows[0], "clients_asked"));
  EXPECT_NE(victim->ReadLog().find("round 1: fit task"), std::string::npos);
  // The victim never answered.
  EXPECT_EQ(victim->ReadLog().find("round 1: trained"), std::string::npos);
  EXPECT_EQ(Number(rows[1], "round"), 2);
  EXPECT_EQ(Number(rows[1], "clients_dropped"), 0);
}

TEST_F(FederationTest, CoordinatorKilledAndRestartedResumesAndClientsReconnect) {
  const fs::path out = work_.path() / "run";
  auto free_port = testing::PickFreePort();
  ASSERT_TRUE(free_port.ok()) << free_port.status().ToString();
  CoordinatorFlags flags;
  flags.rounds = 4;
  flags.fraction = 1.0;
  flags.min_fit = 3;
  flags.min_available = 5;
  flags.port = *free_port;  // the restarted coordinator must be found where the old one was
  uint16_t port = 0;
  auto first = StartCoordinator(out, flags, "coordinator-1", &port);
  ASSERT_NE(first, nullptr);
  ASSERT_EQ(port, *free_port);
  std::vector<std::unique_ptr<Subprocess>> clients;
  for (int i = 0; i < 5; ++i) {
    // Slower clients stretch a round to about a second, so the kill lands mid-run.
    clients.push_back(StartClient(i, 5, port, {"--slowdown", "4"}));
    ASSERT_NE(clients.back(), nullptr);
  }
  ASSERT_TRUE(first->WaitForLog("round 1 done", kRunTimeout));
  ASSERT_TRUE(first->Kill(SIGKILL).ok());
  auto killed = first->Wait(10s);
  ASSERT_TRUE(killed.has_value());
  ASSERT_EQ(killed->signal, SIGKILL)
      << "the coordinator ended before the kill: " << killed->ToString();
  const size_t rows_before = ReadMetricsCsv(out / "metrics.csv").size();
  ASSERT_GE(rows_before, 1U);
  ASSERT_LT(rows_before, 4U);
  // Clients notice and keep trying while nobody listens.
  for (auto& client : clients) {
    EXPECT_TRUE(client->WaitForLog("retrying in", 20s)) << "a client did not notice the kill";
  }

  auto second = StartCoordinator(out, flags, "coordinator-2", &port);
  ASSERT_NE(second, nullptr);
  ExpectExitsOk(*second, "restarted coordinator");
  for (int i = 0; i < 5; ++i) ExpectExitsOk(*clients[i], "client " + std::to_string(i), 30s);

  const std::string log = second->ReadLog();
  const size_t at = log.find("resuming after round ");
  ASSERT_NE(at, std::string::npos) << "the restarted coordinator does not say where it resumes";
  const int resumed_after = std::stoi(log.substr(at + 21));
  EXPECT_GE(resumed_after, 1);
  EXPECT_EQ(Count(log, "round 1 (attempt"), 0) << "round 1 was run again";
  // Every round exactly once, in order, across both coordinators.
  const auto rows = ReadMetricsCsv(out / "metrics.csv");
  ASSERT_EQ(rows.size(), 4U);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(Number(rows[r], "round"), r + 1);
  const auto jsonl = ReadLines(out / "metrics.jsonl");
  ASSERT_EQ(jsonl.size(), 4U);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(jsonl[r].rfind("{\"round\":" + std::to_string(r + 1) + ",", 0), 0U) << jsonl[r];
  }
  // Each client registered with both coordinators, by itself.
  for (int i = 0; i < 5; ++i) {
    EXPECT_GE(Count(clients[i]->ReadLog(), "registered as"), 2) << "client " << i;
  }
  auto checkpoint = coordinator::LoadLatestCheckpoint(out / "checkpoints");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().ToString();
  ASSERT_TRUE(checkpoint->has_value());
  EXPECT_EQ((*checkpoint)->round(), 4U);
}

TEST_F(FederationTest, NetworkedRunMatchesTheSimulationWithTheSameSeeds) {
  constexpr uint64_t kSeed = 11;
  constexpr int kClients = 3;
  constexpr int kRounds = 2;
  // Simulation: same model init, partition, sampling and shuffling seeds.
  auto train = data::LoadMnist(mnist_, data::Split::kTrain);
  ASSERT_TRUE(train.ok()) << train.status().ToString();
  coordinator::SimulationConfig sim;
  sim.num_clients = kClients;
  sim.partition.kind = data::PartitionScheme::kIid;
  sim.partition_seed = 7;  // as StartClient
  sim.parallelism = 1;
  sim.federation.model = MlpSpec(kSeed);  // the coordinator builds BuiltinSpec(model, seed)
  sim.federation.rounds = kRounds;
  sim.federation.fraction = 1.0;
  sim.federation.min_fit = kClients;
  sim.federation.local_epochs = 1;
  sim.federation.batch_size = 10;
  sim.federation.learning_rate = 0.05f;
  sim.federation.seed = kSeed;
  std::vector<float> simulated;
  auto ran = coordinator::RunSimulation(sim, *train, std::nullopt, {}, &simulated);
  ASSERT_TRUE(ran.ok()) << ran.status().ToString();
  ASSERT_EQ(ran->size(), static_cast<size_t>(kRounds));

  const fs::path out = work_.path() / "run";
  const fs::path saved = work_.path() / "final.fsm";
  CoordinatorFlags flags;
  flags.rounds = kRounds;
  flags.fraction = 1.0;
  flags.min_fit = kClients;
  flags.min_available = kClients;
  flags.seed = kSeed;
  flags.extra = {"--save-model", saved.string()};
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  std::vector<std::unique_ptr<Subprocess>> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(StartClient(i, kClients, port));
    ASSERT_NE(clients.back(), nullptr);
  }
  ExpectExitsOk(*coordinator, "coordinator");
  for (int i = 0; i < kClients; ++i) ExpectExitsOk(*clients[i], "client " + std::to_string(i), 30s);

  auto checkpoint = coordinator::LoadLatestCheckpoint(out / "checkpoints");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().ToString();
  ASSERT_TRUE(checkpoint->has_value());
  EXPECT_EQ((*checkpoint)->round(), static_cast<uint64_t>(kRounds));
  auto from_checkpoint = FromModelFile((*checkpoint)->model(), "checkpoint");
  ASSERT_TRUE(from_checkpoint.ok()) << from_checkpoint.status().ToString();
  auto from_file = LoadModel(saved);
  ASSERT_TRUE(from_file.ok()) << from_file.status().ToString();

  auto initial = Model::Create(MlpSpec(kSeed));
  ASSERT_TRUE(initial.ok());
  ASSERT_EQ(simulated.size(), static_cast<size_t>(initial->param_count()));
  for (const Model* networked : {&*from_checkpoint, &*from_file}) {
    const auto params = networked->params();
    ASSERT_EQ(params.size(), simulated.size());
    double max_diff = 0, max_moved = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      max_diff = std::max(max_diff, std::abs(static_cast<double>(params[i]) - simulated[i]));
      max_moved =
          std::max(max_moved, std::abs(static_cast<double>(params[i]) - initial->params()[i]));
    }
    std::printf("networked vs simulated: max |diff| %.3g (weights moved by up to %.3g)\n", max_diff,
                max_moved);
    EXPECT_LE(max_diff, 1e-5);
    EXPECT_GT(max_moved, 1e-3);  // training happened: equality is not trivial
  }
}

// Federated evaluation: clients holding their share of the test split evaluate the global
// model when asked; the sample-weighted result lands in the metrics.
TEST_F(FederationTest, ClientsEvaluateTheGlobalModelWhenAsked) {
  const fs::path out = work_.path() / "run";
  CoordinatorFlags flags;
  flags.rounds = 1;
  flags.min_fit = 3;
  flags.min_available = 3;
  flags.deadline_ms = 20'000;
  flags.extra = {"--fed-eval-every", "1"};
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  std::vector<std::unique_ptr<Subprocess>> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(StartClient(i, 3, port, {"--test-split"}));
    ASSERT_NE(clients.back(), nullptr);
  }
  ExpectExitsOk(*coordinator, "coordinator");
  for (int i = 0; i < 3; ++i) ExpectExitsOk(*clients[i], "client " + std::to_string(i), 30s);
  int evaluated = 0;
  for (auto& client : clients) evaluated += Count(client->ReadLog(), "evaluated on ");
  EXPECT_EQ(evaluated, 3);
  const auto rows = ReadMetricsCsv(out / "metrics.csv");
  ASSERT_EQ(rows.size(), 1U);
  const double federated = Number(rows[0], "federated_accuracy");
  // The clients' shares partition the test split, so the weighted federated accuracy is the
  // accuracy on the whole split, which the coordinator measures itself.
  EXPECT_NEAR(federated, Number(rows[0], "accuracy"), 1e-9);
}

// fedslice-client's command line: usage errors exit 2, failures exit 1 with a message naming
// the problem, SIGTERM leaves cleanly (exit 130) and tells the coordinator.
class ClientCliTest : public FederationTest {
 protected:
  // Runs fedslice-client with `args` to its end; returns its exit status and log.
  std::pair<testing::ExitStatus, std::string> RunClient(const std::vector<std::string>& args,
                                                        const std::string& name) {
    const fs::path log = work_.path() / (name + ".log");
    logs_.push_back(log);
    auto process = Subprocess::Start(client_bin_, args, log);
    EXPECT_TRUE(process.ok()) << process.status().ToString();
    if (!process.ok()) return {};
    auto status = (*process)->Wait(30s);
    EXPECT_TRUE(status.has_value()) << name << " did not exit";
    return {status.value_or(testing::ExitStatus{}), (*process)->ReadLog()};
  }

  std::vector<std::string> Identity(const std::string& name) const {
    return {"--ca",  Cert("ca", ".pem").string(), "--cert", Cert(name, ".pem").string(),
            "--key", Cert(name, ".key").string()};
  }
  std::vector<std::string> Data(int index, int count) const {
    return {"--data",  mnist_.string(),      "--index", std::to_string(index),
            "--count", std::to_string(count)};
  }
  static std::vector<std::string> Join(std::vector<std::string> a,
                                       const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }
};

TEST_F(ClientCliTest, UsageErrorsExitTwoWithAMessage) {
  auto [help, help_log] = RunClient({"--help"}, "help");
  EXPECT_TRUE(help.success()) << help.ToString();
  for (const char* flag : {"--coordinator", "--partition", "--index", "--train-images",
                           "--test-split", "--max-retries", "--threads", "--profile-seconds"}) {
    EXPECT_NE(help_log.find(flag), std::string::npos) << flag;
  }
  const auto endpoint = std::vector<std::string>{"--coordinator", "127.0.0.1:7400"};
  struct Case {
    std::vector<std::string> args;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {Join(endpoint, Data(0, 2)), "--ca, --cert and --key are required"},
      {Join(Join(endpoint, Identity("client-0")), {"--data", mnist_.string()}), "--count"},
      {Join(Join(endpoint, Identity("client-0")), Data(2, 2)), "--index must be in [0, --count)"},
      {Join(Join({"--coordinator", "localhost"}, Identity("client-0")), Data(0, 2)),
       "not HOST:PORT"},
      {Join(Join(endpoint, Identity("client-0")), {"--index", "0"}), "either as --data"},
      {Join(Join(endpoint, Identity("client-0")), Join(Data(0, 2), {"--bogus"})), "bogus"},
      {Join(Join(endpoint, Identity("client-0")), Join(Data(0, 2), {"--threads", "x"})), "threads"},
      {Join(Join(endpoint, Identity("client-0")), Join(Data(0, 2), {"--profile-seconds", "0"})),
       "--profile-seconds must be in (0, 60]"},
      {Join(Join(endpoint, Identity("client-0")), Join(Data(0, 2), {"--profile-seconds", "nan"})),
       "--profile-seconds must be in (0, 60]"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    auto [status, log] = RunClient(cases[i].args, "usage-" + std::to_string(i));
    EXPECT_TRUE(status.exited && status.code == 2) << i << ": " << status.ToString() << "\n" << log;
    EXPECT_NE(log.find(cases[i].expected), std::string::npos) << i << ": " << log;
  }
}

TEST_F(ClientCliTest, UnreadableDataOrCertificateExitsOneNamingIt) {
  const auto endpoint = std::vector<std::string>{"--coordinator", "127.0.0.1:7400"};
  const fs::path no_data = work_.path() / "no-such-dir";
  auto [data_status, data_log] =
      RunClient(Join(Join(endpoint, Identity("client-0")),
                     {"--data", no_data.string(), "--index", "0", "--count", "2"}),
                "no-data");
  EXPECT_TRUE(data_status.exited && data_status.code == 1) << data_status.ToString();
  EXPECT_NE(data_log.find(no_data.string()), std::string::npos) << data_log;

  const fs::path garbage = work_.path() / "garbage.pem";
  std::ofstream(garbage) << "not a certificate\n";
  auto [cert_status, cert_log] =
      RunClient(Join(Join(endpoint, {"--ca", Cert("ca", ".pem").string(), "--cert",
                                     garbage.string(), "--key", Cert("client-0", ".key").string()}),
                     Data(0, 2)),
                "bad-cert");
  EXPECT_TRUE(cert_status.exited && cert_status.code == 1) << cert_status.ToString();
  EXPECT_NE(cert_log.find("garbage.pem"), std::string::npos) << cert_log;
}

TEST_F(ClientCliTest, ForeignCertificateIsRefusedAndTheCoordinatorServesOthers) {
  const fs::path out = work_.path() / "run";
  CoordinatorFlags flags;
  flags.rounds = 1;
  flags.min_fit = 1;
  flags.min_available = 1;
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  const std::vector<std::string> endpoint = {"--coordinator", "127.0.0.1:" + std::to_string(port)};
  // CN=client-0, but signed by another CA.
  auto [status, log] =
      RunClient(Join(Join(endpoint, Identity("other_client")), Data(0, 2)), "foreign");
  EXPECT_TRUE(status.exited && status.code == 1) << status.ToString() << "\n" << log;
  EXPECT_NE(log.find("refused the TLS session"), std::string::npos) << log;
  EXPECT_TRUE(coordinator->Running());
  auto good = StartClient(1, 2, port);
  ASSERT_NE(good, nullptr);
  ExpectExitsOk(*coordinator, "coordinator");
  ExpectExitsOk(*good, "client 1", 30s);
}

TEST_F(ClientCliTest, SigtermLeavesCleanlyAndTellsTheCoordinator) {
  const fs::path out = work_.path() / "run";
  CoordinatorFlags flags;
  flags.min_available = 2;  // nobody trains: the client waits, registered
  uint16_t port = 0;
  auto coordinator = StartCoordinator(out, flags, "coordinator", &port);
  ASSERT_NE(coordinator, nullptr);
  auto client = StartClient(0, 2, port);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->WaitForLog("registered as", kStartTimeout));
  ASSERT_TRUE(client->Kill(SIGTERM).ok());
  auto status = client->Wait(30s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(status->exited && status->code == 130) << status->ToString();
  EXPECT_TRUE(coordinator->WaitForLog("client client-0 left", 10s));
  EXPECT_TRUE(coordinator->Running());
}

}  // namespace
}  // namespace fedslice
