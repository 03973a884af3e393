// fedslice-client: an edge device of a networked federation. It loads only its own private
// training data (its own IDX files, or its share of a partitioned data set that it computes
// itself), connects to fedslice-coordinator over mutual TLS and trains as told until the run
// is complete. Raw data never leaves the process; only model updates do.
#include <spdlog/spdlog.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <algorithm>
#include <cmath>
#include <csignal>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <thread>

#include "cli.h"
#include "fedslice/client/device_profile.h"
#include "fedslice/client/edge_client.h"
#include "fedslice/client/local_trainer.h"
#include "fedslice/common/idx.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/partition.h"
#include "fedslice/common/threading.h"

namespace {

using fedslice::Result;
using fedslice::Status;
namespace cli = fedslice::cli;
namespace data = fedslice::data;
namespace po = boost::program_options;

constexpr const char* kCommand = "fedslice-client";
// Exit code after SIGINT / SIGTERM, as fedslice-coordinator (128 + SIGINT).
constexpr int kExitStopped = 130;

int Fail(const std::string& message, int code = cli::kExitFailure) {
  std::cerr << kCommand << ": " << message << "\n";
  return code;
}

// "host:port" or "[v6-address]:port".
Status ParseEndpoint(const std::string& text, std::string* host, uint16_t* port) {
  const auto bad = [&] {
    return Status::InvalidArgument("--coordinator '" + text + "' is not HOST:PORT");
  };
  std::string port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad();
    }
    *host = text.substr(1, close - 1);
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string::npos) return bad();
    *host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
  }
  if (host->empty() || port_text.empty() ||
      port_text.find_first_not_of("0123456789") != std::string::npos || port_text.size() > 5) {
    return bad();
  }
  const int value = std::stoi(port_text);
  if (value < 1 || value > 65535) return bad();
  *port = static_cast<uint16_t>(value);
  return Status::Ok();
}

struct DataFlags {
  std::string dir, partition = "iid", train_images, train_labels, test_images, test_labels;
  uint64_t partition_seed = 1;
  int index = -1, count = 0;
  bool test_split = false;
};

// This client's share of `full` under the partition flags.
Result<data::Dataset> Share(const data::Dataset& full, const data::PartitionScheme& scheme,
                            const DataFlags& flags, const char* what) {
  auto indices =
      data::PartitionIndices(full.labels, scheme, flags.partition_seed, flags.index, flags.count);
  if (!indices.ok()) return indices.status().WithContext(what);
  return data::Subset(full, *indices);
}

// Loads the private training data and the optional local test data the flags name.
Status LoadData(const DataFlags& flags, data::Dataset* train,
                std::optional<data::Dataset>* test) {
  if (!flags.dir.empty()) {
    FEDSLICE_ASSIGN_OR_RETURN(data::PartitionScheme scheme,
                              data::ParsePartitionScheme(flags.partition));
    FEDSLICE_ASSIGN_OR_RETURN(data::Dataset full,
                              data::LoadMnist(flags.dir, data::Split::kTrain));
    FEDSLICE_ASSIGN_OR_RETURN(*train, Share(full, scheme, flags, "training split"));
    spdlog::info("training data: client {} of {} under {} (seed {}) of {}: {} samples",
                 flags.index, flags.count, data::ToString(scheme), flags.partition_seed,
                 flags.dir, train->size());
    if (flags.test_split) {
      FEDSLICE_ASSIGN_OR_RETURN(data::Dataset full_test,
                                data::LoadMnist(flags.dir, data::Split::kTest));
      FEDSLICE_ASSIGN_OR_RETURN(data::Dataset share,
                                Share(full_test, scheme, flags, "test split"));
      spdlog::info("local test data: {} samples of the test split", share.size());
      *test = std::move(share);
    }
  } else {
    FEDSLICE_ASSIGN_OR_RETURN(*train, data::LoadIdx(flags.train_images, flags.train_labels));
    spdlog::info("training data: {} samples from {}", train->size(), flags.train_images);
  }
  if (!flags.test_images.empty()) {
    FEDSLICE_ASSIGN_OR_RETURN(data::Dataset local,
                              data::LoadIdx(flags.test_images, flags.test_labels));
    spdlog::info("local test data: {} samples from {}", local.size(), flags.test_images);
    *test = std::move(local);
  }
  return Status::Ok();
}

// Usage errors the option parser cannot express: which flags go together.
Status CheckDataFlags(const DataFlags& f) {
  const bool from_dir = !f.dir.empty();
  const bool from_files = !f.train_images.empty() || !f.train_labels.empty();
  if (from_dir == from_files) {
    return Status::InvalidArgument(
        "give the training data either as --data DIR (with --index/--count) or as "
        "--train-images FILE --train-labels FILE");
  }
  if (from_files && (f.train_images.empty() || f.train_labels.empty())) {
    return Status::InvalidArgument("--train-images and --train-labels go together");
  }
  if (from_dir) {
    if (f.count < 1) return Status::InvalidArgument("--count must be >= 1 with --data");
    if (f.index < 0 || f.index >= f.count) {
      return Status::InvalidArgument("--index must be in [0, --count) with --data");
    }
  }
  if (f.test_images.empty() != f.test_labels.empty()) {
    return Status::InvalidArgument("--test-images and --test-labels go together");
  }
  if (f.test_split && !from_dir) {
    return Status::InvalidArgument("--test-split needs --data");
  }
  if (f.test_split && !f.test_images.empty()) {
    return Status::InvalidArgument("give local test data by --test-split or --test-images, not both");
  }
  return Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  fedslice::client::EdgeClientOptions options;
  DataFlags data_flags;
  std::string config_file, coordinator, host, log_level = "info", device_name;
  std::string stage_bind = "127.0.0.1", stage_advertise;
  int port = 0, threads = 0, max_retries = 0, stage_port = 0, stage_threads = 0;
  int64_t connect_timeout_ms = 10'000, welcome_timeout_ms = 30'000, backoff_initial_ms = 200,
          backoff_max_ms = 10'000, heartbeat_ms = 10'000, idle_timeout_ms = 30'000,
          give_up_after_s = 0;
  double memory_budget_mb = 0, slowdown = 1.0, profile_seconds = 1.0;
  size_t max_frame_bytes = options.tls.max_frame_bytes;
  bool tls12 = false;

  po::options_description opts;
  opts.add_options()
      ("config", po::value(&config_file),
       "read options from this file (INI style: 'index = 3'); flags given on the command line "
       "win")
      ("coordinator", po::value(&coordinator), "coordinator address HOST:PORT")
      ("host", po::value(&host), "coordinator host (alternative to --coordinator)")
      ("port", po::value(&port), "coordinator port (alternative to --coordinator)")
      ("ca", po::value(&options.tls.ca_file), "CA certificate (PEM) of the run")
      ("cert", po::value(&options.tls.cert_file),
       "this client's certificate (PEM); its CN is the client id")
      ("key", po::value(&options.tls.key_file), "this client's private key (PEM)")
      ("server-name", po::value(&options.server_name),
       "name the coordinator's certificate must carry (default: the host)")
      ("server-identity", po::value(&options.expected_server_identity),
       "when set, the coordinator certificate's CN must equal this")
      ("tls12", po::bool_switch(&tls12), "also allow TLS 1.2 (default: TLS 1.3 only)")
      ("data", po::value(&data_flags.dir),
       "MNIST-layout directory; this client trains on its own share of the train split, "
       "computed from --partition/--partition-seed/--index/--count (nothing is downloaded)")
      ("partition", po::value(&data_flags.partition)->default_value("iid"),
       "iid | shards[:K] | dirichlet[:ALPHA]")
      ("partition-seed", po::value(&data_flags.partition_seed)->default_value(1),
       "seed of the partition; every client of a run uses the same")
      ("index", po::value(&data_flags.index), "this client's index in [0, --count)")
      ("count", po::value(&data_flags.count), "number of clients the data set is split among")
      ("train-images", po::value(&data_flags.train_images),
       "this client's own training images (IDX, raw or .gz) instead of --data")
      ("train-labels", po::value(&data_flags.train_labels), "labels for --train-images")
      ("test-split", po::bool_switch(&data_flags.test_split),
       "hold local test data for federated evaluation: this client's share of the test split "
       "of --data (same partition)")
      ("test-images", po::value(&data_flags.test_images), "own local test images (IDX)")
      ("test-labels", po::value(&data_flags.test_labels), "labels for --test-images")
      ("threads", po::value(&threads)->default_value(0), "training threads (0 = all cores)")
      ("memory-budget-mb", po::value(&memory_budget_mb)->default_value(0, "0"),
       "memory FedSlice may use, reported to the coordinator (0 = MemAvailable)")
      ("slowdown", po::value(&slowdown)->default_value(1.0, "1"),
       "behave as a device this many times slower (waits after training; for tests and demos)")
      ("device-name", po::value(&device_name), "name reported in the device profile")
      ("profile-seconds", po::value(&profile_seconds)->default_value(1.0, "1"),
       "time spent timing the model's layers after registering (the fastest of the runs in "
       "that time is reported); longer rides out bursts of other load on the device")
      ("stage-port", po::value(&stage_port),
       "host pipeline stages (split inference) on this port (0 = any free port); without it "
       "this client hosts none")
      ("stage-bind", po::value(&stage_bind)->default_value("127.0.0.1"),
       "address the stage server listens on (0.0.0.0 when stages run on other hosts)")
      ("stage-advertise", po::value(&stage_advertise),
       "host name other stages reach this one by (default: --stage-bind; in Docker: the "
       "container name)")
      ("stage-threads", po::value(&stage_threads)->default_value(0),
       "engine threads for stage compute (0 = as --threads)")
      ("max-retries", po::value(&max_retries)->default_value(0),
       "consecutive failed connection attempts before giving up (0 = retry forever)")
      ("give-up-after-s", po::value(&give_up_after_s)->default_value(0),
       "give up after this many seconds without a session (0 = never)")
      ("backoff-initial-ms", po::value(&backoff_initial_ms)->default_value(200),
       "first reconnect delay; doubles per failed attempt (with jitter)")
      ("backoff-max-ms", po::value(&backoff_max_ms)->default_value(10'000),
       "largest reconnect delay")
      ("connect-timeout-ms", po::value(&connect_timeout_ms)->default_value(10'000),
       "bound on one connection attempt (TCP + TLS handshake)")
      ("welcome-timeout-ms", po::value(&welcome_timeout_ms)->default_value(30'000),
       "how long to wait for Welcome after Hello")
      ("heartbeat-ms", po::value(&heartbeat_ms)->default_value(10'000),
       "heartbeat interval; must be below the coordinator's --idle-timeout-ms")
      ("idle-timeout-ms", po::value(&idle_timeout_ms)->default_value(30'000),
       "drop the connection when the coordinator is silent this long")
      ("max-frame-bytes", po::value(&max_frame_bytes)->default_value(max_frame_bytes),
       "largest message accepted")
      ("log-level", po::value(&log_level)->default_value("info"),
       "trace | debug | info | warn | error");
  int exit_code = cli::kExitOk;
  auto vm = cli::ParseOrExit(kCommand,
                             "--coordinator HOST:PORT --ca ca.pem --cert client.pem --key "
                             "client.key (--data DIR --index I --count N | --train-images F "
                             "--train-labels F) [options]",
                             opts, argc, argv, &exit_code, nullptr, /*program=*/kCommand);
  if (!vm) return exit_code;
  if (!config_file.empty()) {
    if (std::string error = cli::MergeConfigFile(config_file, opts, &*vm); !error.empty()) {
      return Fail(error, cli::kExitUsage);
    }
  }

  // --- Flags that go together. (Required ones are checked here, after the config file.)
  if (options.tls.ca_file.empty() || options.tls.cert_file.empty() ||
      options.tls.key_file.empty()) {
    return Fail("--ca, --cert and --key are required (see '" + std::string(kCommand) + " --help')",
                cli::kExitUsage);
  }
  if (!coordinator.empty()) {
    if (!host.empty() || port != 0) {
      return Fail("give --coordinator HOST:PORT or --host/--port, not both", cli::kExitUsage);
    }
    if (Status s = ParseEndpoint(coordinator, &options.host, &options.port); !s.ok()) {
      return Fail(s.message(), cli::kExitUsage);
    }
  } else {
    if (host.empty() || port < 1 || port > 65535) {
      return Fail("the coordinator's address is needed: --coordinator HOST:PORT (or --host and "
                  "--port in [1, 65535])",
                  cli::kExitUsage);
    }
    options.host = host;
    options.port = static_cast<uint16_t>(port);
  }
  if (Status s = CheckDataFlags(data_flags); !s.ok()) return Fail(s.message(), cli::kExitUsage);
  if (std::string error = cli::SetUpLogging(kCommand, log_level); !error.empty()) {
    return Fail(error, cli::kExitUsage);
  }
  if (threads < 0) return Fail("--threads must be >= 0", cli::kExitUsage);
  if (memory_budget_mb < 0) return Fail("--memory-budget-mb must be >= 0", cli::kExitUsage);
  if (max_retries < 0) return Fail("--max-retries must be >= 0", cli::kExitUsage);
  if (vm->count("stage-port")) {
    if (stage_port < 0 || stage_port > 65535) {
      return Fail("--stage-port must be in [0, 65535]", cli::kExitUsage);
    }
    if (stage_threads < 0) return Fail("--stage-threads must be >= 0", cli::kExitUsage);
    fedslice::slicing::StageHostOptions stage;
    stage.port = static_cast<uint16_t>(stage_port);
    stage.bind_address = stage_bind;
    stage.advertise_host = stage_advertise;
    stage.engine_threads = stage_threads;
    options.stage = stage;
  } else if (!stage_advertise.empty() || stage_threads != 0 ||
             !vm->at("stage-bind").defaulted()) {
    return Fail("--stage-bind, --stage-advertise and --stage-threads need --stage-port",
                cli::kExitUsage);
  }
  if (give_up_after_s < 0) return Fail("--give-up-after-s must be >= 0", cli::kExitUsage);
  if (!(profile_seconds > 0 && profile_seconds <= 60)) {
    return Fail("--profile-seconds must be in (0, 60]", cli::kExitUsage);
  }
  // At most 15 timed runs per second of it, as by default (1 s, 15 runs).
  options.stage_timing.budget = std::chrono::milliseconds(std::llround(profile_seconds * 1000));
  options.stage_timing.max_runs = std::max(1, static_cast<int>(std::ceil(15 * profile_seconds)));
  for (auto [name, value] : {std::pair{"--connect-timeout-ms", connect_timeout_ms},
                             {"--welcome-timeout-ms", welcome_timeout_ms},
                             {"--backoff-initial-ms", backoff_initial_ms},
                             {"--backoff-max-ms", backoff_max_ms},
                             {"--heartbeat-ms", heartbeat_ms},
                             {"--idle-timeout-ms", idle_timeout_ms}}) {
    if (value <= 0) return Fail(std::string(name) + " must be positive", cli::kExitUsage);
  }
  using std::chrono::milliseconds;
  options.tls.allow_tls12 = tls12;
  options.tls.heartbeat_interval = milliseconds(heartbeat_ms);
  options.tls.idle_timeout = milliseconds(idle_timeout_ms);
  options.tls.max_frame_bytes = max_frame_bytes;
  options.connect_timeout = milliseconds(connect_timeout_ms);
  options.welcome_timeout = milliseconds(welcome_timeout_ms);
  options.initial_backoff = milliseconds(backoff_initial_ms);
  options.max_backoff = milliseconds(backoff_max_ms);
  options.max_connect_attempts = max_retries;
  if (give_up_after_s > 0) options.give_up_after = std::chrono::seconds(give_up_after_s);
  options.slowdown = slowdown;
  if (Status valid = options.Validate(); !valid.ok()) {
    return Fail(valid.message(), cli::kExitUsage);
  }

  // --- Identity first: a certificate problem is reported before any data is loaded.
  auto identity = fedslice::net::CertificateIdentity(options.tls.cert_file);
  if (!identity.ok()) return Fail("client certificate: " + identity.status().ToString());
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%l] [" + *identity + "] %v");
  fedslice::SetNumThreads(threads);

  data::Dataset train;
  std::optional<data::Dataset> test;
  if (Status loaded = LoadData(data_flags, &train, &test); !loaded.ok()) {
    return Fail(loaded.ToString());
  }
  fedslice::client::LocalTrainer trainer(std::move(train), std::move(test));

  fedslice::client::DeviceProfileOptions profile_options;
  if (memory_budget_mb > 0) {
    profile_options.memory_budget_bytes = static_cast<uint64_t>(memory_budget_mb * 1024 * 1024);
  }
  profile_options.slowdown = slowdown;
  profile_options.device_name = device_name;
  options.profile = fedslice::client::MeasureDeviceProfile(profile_options);
  spdlog::info("device: {:.1f} GFLOPS on {} threads, memory budget {} MB",
               options.profile.flops() / 1e9, options.profile.num_threads(),
               options.profile.memory_budget_bytes() >> 20);

  fedslice::client::EdgeClient client(options, trainer);
  // SIGINT / SIGTERM: leave cleanly (Bye to the coordinator) instead of dying mid-frame.
  boost::asio::io_context signal_io;
  boost::asio::signal_set signals(signal_io, SIGINT, SIGTERM);
  bool signalled = false;
  signals.async_wait([&client, &signalled](const boost::system::error_code& ec, int signal) {
    if (ec) return;
    spdlog::info("signal {}: stopping", signal);
    signalled = true;
    client.Stop();
  });
  std::thread signal_thread([&signal_io] { signal_io.run(); });

  Status run = client.Run();
  signals.cancel();
  signal_io.stop();
  signal_thread.join();

  if (run.ok()) return cli::kExitOk;
  if (run.code() == Status::Code::kAborted && signalled) {
    std::cerr << kCommand << ": stopped after " << client.fit_tasks_done() << " fit tasks\n";
    return kExitStopped;
  }
  return Fail(run.ToString());
}
