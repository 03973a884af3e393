// fedslice-coordinator: runs federated training rounds for edge clients over mutual TLS, and
// with --serve then serves split inference over them (coordinator_server.h).
#include <spdlog/spdlog.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "cli.h"
#include "federation_flags.h"
#include "fedslice/common/idx.h"
#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"
#include "fedslice/coordinator/coordinator_server.h"

namespace {

using fedslice::Status;
namespace cli = fedslice::cli;
namespace po = boost::program_options;

constexpr const char* kCommand = "fedslice-coordinator";

int Fail(const std::string& message, int code = cli::kExitFailure) {
  std::cerr << kCommand << ": " << message << "\n";
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  fedslice::coordinator::CoordinatorOptions options;
  auto& fed = options.federation;
  std::string config_file, data_dir, port_file, save_model, init_model, log_level = "info";
  int round_deadline_ms = 300'000, threads = 0, slice_ready_timeout_ms = 30'000;
  int heartbeat_ms = 10'000, idle_timeout_ms = 30'000, handshake_timeout_ms = 10'000;
  size_t max_frame_bytes = options.tls.max_frame_bytes;
  bool tls12 = false;
  po::options_description opts;
  opts.add_options()
      ("config", po::value(&config_file),
       "read options from this file (INI style: 'rounds = 10'); flags given on the command "
       "line win")
      ("bind", po::value(&options.server.bind_address)->default_value("127.0.0.1"),
       "address to listen on (0.0.0.0 to accept clients from other hosts)")
      ("port", po::value(&options.server.port)->default_value(7400), "port (0 = any free port)")
      ("port-file", po::value(&port_file), "write the bound port here once listening")
      ("ca", po::value(&options.tls.ca_file), "CA certificate (PEM) of the run (required)")
      ("cert", po::value(&options.tls.cert_file), "coordinator certificate (PEM) (required)")
      ("key", po::value(&options.tls.key_file), "coordinator private key (PEM) (required)")
      ("tls12", po::bool_switch(&tls12), "also accept TLS 1.2 (default: TLS 1.3 only)")
      ("data", po::value(&data_dir),
       "MNIST-layout directory whose test split evaluates the global model every round")
      ("min-available", po::value(&options.min_available)->default_value(2),
       "registered clients needed before a round starts")
      ("round-deadline-ms", po::value(&round_deadline_ms)->default_value(300'000),
       "a round waits at most this long for results")
      ("fed-eval-every", po::value(&options.federated_eval_every)->default_value(0),
       "ask clients to evaluate the global model every N rounds (0 = never)")
      ("save-model", po::value(&save_model), "write the final global model to this file")
      ("init-model", po::value(&init_model),
       "start from this model file (from 'fedslice train --out' or --save-model) instead of "
       "the seeded initialisation; its spec replaces --model. A checkpoint in --out-dir wins")
      ("serve", po::bool_switch(&options.serve_inference),
       "after the last round, keep the clients and serve split inference ('fedslice infer') "
       "until SIGINT/SIGTERM; with --rounds 0 and --init-model, serve that model at once")
      ("slice-ready-timeout-ms", po::value(&slice_ready_timeout_ms)->default_value(30'000),
       "clients chosen for a pipeline must load their slice within this time")
      ("heartbeat-ms", po::value(&heartbeat_ms)->default_value(10'000), "heartbeat interval")
      ("idle-timeout-ms", po::value(&idle_timeout_ms)->default_value(30'000),
       "drop a client silent for this long")
      ("handshake-timeout-ms", po::value(&handshake_timeout_ms)->default_value(10'000),
       "TLS handshake timeout")
      ("max-frame-bytes", po::value(&max_frame_bytes)->default_value(max_frame_bytes),
       "largest message accepted")
      ("threads", po::value(&threads)->default_value(0), "evaluation threads (0 = all cores)")
      ("log-level", po::value(&log_level)->default_value("info"),
       "trace | debug | info | warn | error");
  cli::FederationFlags federation_flags;
  cli::AddFederationFlags(opts, &fed, &federation_flags, {.local_epochs = 1, .min_fit = 2});
  int exit_code = cli::kExitOk;
  auto vm = cli::ParseOrExit(kCommand, "--ca ca.pem --cert coordinator.pem --key coordinator.key "
                                       "[--model mlp] [--data DIR] [--rounds N] [options]",
                             opts, argc, argv, &exit_code, nullptr, /*program=*/kCommand);
  if (!vm) return exit_code;
  if (!config_file.empty()) {
    if (std::string error = cli::MergeConfigFile(config_file, opts, &*vm); !error.empty()) {
      return Fail(error, cli::kExitUsage);
    }
  }
  // Required, but checked only now: they may come from the config file.
  for (const char* name : {"ca", "cert", "key"}) {
    if (vm->count(name) == 0) {
      return Fail(std::string("the option '--") + name + "' is required but missing (on the "
                  "command line or in --config)", cli::kExitUsage);
    }
  }
  if (std::string error = cli::SetUpLogging(kCommand, log_level); !error.empty()) {
    return Fail(error, cli::kExitUsage);
  }
  if (threads < 0) return Fail("--threads must be >= 0", cli::kExitUsage);
  if (threads > 0) fedslice::SetNumThreads(threads);

  fed.round_deadline = std::chrono::milliseconds(round_deadline_ms);
  if (slice_ready_timeout_ms <= 0) return Fail("--slice-ready-timeout-ms must be > 0", cli::kExitUsage);
  options.slice_ready_timeout = std::chrono::milliseconds(slice_ready_timeout_ms);
  if (fed.rounds == 0 && (init_model.empty() || !options.serve_inference)) {
    return Fail("--rounds 0 (no training) needs --serve and --init-model FILE: the model to serve",
                cli::kExitUsage);
  }
  std::optional<fedslice::Model> initial;
  if (!init_model.empty()) {
    auto loaded = fedslice::LoadModel(init_model);
    if (!loaded.ok()) return Fail("--init-model: " + loaded.status().ToString());
    if (!(*vm)["model"].defaulted() && federation_flags.model != loaded->spec().name()) {
      return Fail("--model " + federation_flags.model + " contradicts --init-model, a '" +
                      loaded->spec().name() + "' model (leave --model out)",
                  cli::kExitUsage);
    }
    const auto params = loaded->params();
    fed.initial_params.assign(params.begin(), params.end());
    initial = std::move(loaded).value();
  }
  if (Status applied = cli::ApplyFederationFlags(federation_flags, &fed); !applied.ok()) {
    return Fail(applied.message(), cli::kExitUsage);
  }
  if (initial) {
    fed.model = initial->spec();  // ApplyFederationFlags set the built-in one
    spdlog::info("initial model from {}: {} with {} parameters", init_model, fed.model.name(),
                 initial->param_count());
  }
  options.tls.allow_tls12 = tls12;
  options.tls.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  options.tls.idle_timeout = std::chrono::milliseconds(idle_timeout_ms);
  options.tls.handshake_timeout = std::chrono::milliseconds(handshake_timeout_ms);
  options.tls.max_frame_bytes = max_frame_bytes;
  if (Status valid = options.tls.Validate(); !valid.ok()) {
    return Fail(valid.message(), cli::kExitUsage);
  }

  std::optional<fedslice::data::Dataset> test_set;
  if (!data_dir.empty()) {
    auto test = fedslice::data::LoadMnist(data_dir, fedslice::data::Split::kTest);
    if (!test.ok()) return Fail(test.status().ToString());
    test_set = std::move(test).value();
  }

  auto server = fedslice::coordinator::CoordinatorServer::Start(options, std::move(test_set));
  if (!server.ok()) return Fail(server.status().ToString());
  if (!port_file.empty()) {
    // Written atomically so a watcher never reads a half-written port.
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << (*server)->port() << "\n";
    std::error_code ec;
    std::filesystem::rename(tmp, port_file, ec);
    if (ec) return Fail("cannot write --port-file " + port_file + ": " + ec.message());
  }

  // SIGINT / SIGTERM end the run cleanly: clients get Bye and the last completed round is
  // already checkpointed.
  boost::asio::io_context signal_io;
  boost::asio::signal_set signals(signal_io, SIGINT, SIGTERM);
  fedslice::coordinator::CoordinatorServer* raw = server->get();
  signals.async_wait([raw](const boost::system::error_code& ec, int signal) {
    if (ec) return;
    spdlog::info("signal {}: stopping", signal);
    raw->Stop();
  });
  std::thread signal_thread([&signal_io] { signal_io.run(); });

  Status run = (*server)->Run();
  signals.cancel();
  signal_io.stop();
  signal_thread.join();

  if (run.ok() && !save_model.empty()) {
    auto model = fedslice::Model::Create(fed.model);
    const std::vector<float> weights = (*server)->GlobalWeights();
    if (!model.ok() || !model->SetParams(weights).ok()) {
      return Fail("cannot rebuild the final model");
    }
    if (Status saved = fedslice::SaveModel(*model, save_model,
                                           {{"trained_by", "fedslice-coordinator"}});
        !saved.ok()) {
      return Fail(saved.ToString());
    }
    spdlog::info("saved the final model to {}", save_model);
  }
  const uint64_t completed = (*server)->completed_rounds();
  server->reset();
  if (!run.ok()) {
    if (run.code() == Status::Code::kAborted) {
      std::cerr << kCommand << ": stopped after round " << completed
                << (fed.out_dir.empty() ? "\n" : "; run again with the same --out-dir to resume\n");
      return 130;
    }
    return Fail(run.ToString());
  }
  return cli::kExitOk;
}
