// `fedslice infer`: split inference of a data set through a pipeline of the coordinator's
// clients (slicing/requester.h), with the plan, throughput, latency and accuracy printed.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "cli.h"
#include "commands.h"
#include "fedslice/common/idx.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/pipeline.h"
#include "fedslice/slicing/requester.h"

namespace fedslice::cli {
namespace {

// Writes logits as raw little-endian float32, row-major [N, classes], no header.
Status WriteLogits(const std::string& path, const Tensor& logits) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Status::IoError("cannot open " + path + " for writing");
  out.write(reinterpret_cast<const char*>(logits.data()),
            static_cast<std::streamsize>(logits.size() * sizeof(float)));
  out.close();
  if (!out) return Status::IoError("cannot write " + path);
  return Status::Ok();
}

}  // namespace

int RunInfer(int argc, char** argv) {
  const std::string command = "infer";
  std::string coordinator, data_dir, images_file, labels_file, logits_out, activations = "fp32";
  std::string log_level = "warn";
  net::TlsConfig tls;
  net::ConnectOptions connect;
  slicing::RequesterOptions options;
  int64_t limit = 0;
  int64_t repeat = 1;
  int stages = 0, micro_batch = 64, in_flight = 2, max_replans = 3, window = 0;
  int plan_timeout_ms = 600'000, progress_timeout_ms = 30'000, connect_timeout_ms = 10'000;
  bool no_split_layers = false, tls12 = false;
  po::options_description flags;
  flags.add_options()("coordinator", po::value(&coordinator),
                      "coordinator address HOST:PORT (required)")(
      "ca", po::value(&tls.ca_file), "CA certificate (PEM) of the run (required)")(
      "cert", po::value(&tls.cert_file),
      "this requester's certificate (PEM), signed by the run's CA (required; e.g. "
      "'make_certs.sh DIR --names requester')")("key", po::value(&tls.key_file),
                                                "this requester's private key (PEM) (required)")(
      "server-name", po::value(&connect.server_name),
      "name the coordinator's certificate must carry (default: the host of --coordinator)")(
      "server-identity", po::value(&connect.expected_identity),
      "identity (CN) the coordinator's certificate must have (default: any of the CA)")(
      "tls12", po::bool_switch(&tls12), "also allow TLS 1.2 (default: TLS 1.3 only)")(
      "data", po::value(&data_dir), "MNIST-layout directory; its test split is classified")(
      "images", po::value(&images_file), "IDX images file (instead of --data)")(
      "labels", po::value(&labels_file), "IDX labels file for --images")(
      "limit", po::value(&limit)->default_value(0), "classify only the first N images (0 = all)")(
      "repeat", po::value(&repeat)->default_value(1),
      "stream the images R times, as R x N requests (for steady-state throughput: the first "
      "and last micro-batches of a stream only fill and drain the pipeline)")(
      "stages", po::value(&stages)->default_value(0),
      "pipeline stages K (0 = as many as the planner finds best)")(
      "micro-batch", po::value(&micro_batch)->default_value(64), "images per micro-batch")(
      "activations", po::value(&activations)->default_value("fp32"),
      "activation codec between stages: fp32 | fp16 | int8")(
      "in-flight", po::value(&in_flight)->default_value(2),
      "micro-batches a stage may buffer besides the one it computes")(
      "window", po::value(&window)->default_value(0),
      "micro-batches this requester keeps unanswered (0 = enough to keep every stage busy; "
      "1 = one at a time, so that the latency printed is that of an idle pipeline)")(
      "no-split-layers", po::bool_switch(&no_split_layers),
      "do not let the planner cut heavy layers into parts (whole layers per stage only)")(
      "max-replans", po::value(&max_replans)->default_value(3),
      "pipelines that may fail (and be re-planned) before giving up")(
      "plan-timeout-ms", po::value(&plan_timeout_ms)->default_value(600'000),
      "wait this long for a plan (a coordinator still training answers afterwards)")(
      "progress-timeout-ms", po::value(&progress_timeout_ms)->default_value(30'000),
      "a pipeline that returns no result for this long is given up")(
      "connect-timeout-ms", po::value(&connect_timeout_ms)->default_value(10'000),
      "connecting to the coordinator or a stage")(
      "logits-out", po::value(&logits_out),
      "write the logits here: raw little-endian float32, row-major [N, classes], no header")(
      "log-level", po::value(&log_level)->default_value("warn"),
      "trace | debug | info | warn | error | off (logs go to stderr)");
  int exit_code = kExitOk;
  auto vm = ParseOrExit(command,
                        "--coordinator HOST:PORT --ca ca.pem --cert requester.pem --key "
                        "requester.key (--data DIR | --images F --labels F) [--stages K] "
                        "[--micro-batch M] [--activations fp32|fp16|int8] [options]",
                        flags, argc, argv, &exit_code);
  if (!vm) return exit_code;
  auto usage = [&](const std::string& message) {
    PrintError(command, message);
    return kExitUsage;
  };
  if (std::string error = SetUpLogging("fedslice infer", log_level); !error.empty()) {
    return usage(error);
  }
  if (coordinator.empty()) return usage("--coordinator HOST:PORT is required");
  auto endpoint = slicing::ParseEndpoint(coordinator);
  if (!endpoint.ok()) return usage("--coordinator: " + endpoint.status().message());
  if (tls.ca_file.empty() || tls.cert_file.empty() || tls.key_file.empty()) {
    return usage("--ca, --cert and --key are required");
  }
  if (data_dir.empty() == images_file.empty()) {
    return usage("give either --data DIR or --images FILE (with --labels FILE)");
  }
  if (images_file.empty() != labels_file.empty()) {
    return usage("--images and --labels go together");
  }
  if (limit < 0) return usage("--limit must be >= 0");
  if (repeat < 1 || repeat > 1000) return usage("--repeat must be in [1, 1000]");
  if (stages < 0) return usage("--stages must be >= 0");
  if (micro_batch < 1 || micro_batch > slicing::StageExecutor::kMaxBatch) {
    return usage("--micro-batch must be in [1, " +
                 std::to_string(slicing::StageExecutor::kMaxBatch) + "]");
  }
  if (!slicing::IsActivationCodec(activations)) {
    return usage("--activations must be " + std::string(slicing::kActivationCodecList));
  }
  if (in_flight < 1 || in_flight > 64) return usage("--in-flight must be in [1, 64]");
  if (window < 0 || window > 4096) return usage("--window must be in [0, 4096]");
  if (max_replans < 0) return usage("--max-replans must be >= 0");
  if (plan_timeout_ms <= 0 || progress_timeout_ms <= 0 || connect_timeout_ms <= 0) {
    return usage("timeouts must be > 0");
  }
  tls.allow_tls12 = tls12;
  if (Status valid = tls.Validate(); !valid.ok()) return usage(valid.message());

  auto dataset = data_dir.empty() ? data::LoadIdx(images_file, labels_file)
                                  : data::LoadMnist(data_dir, data::Split::kTest);
  if (!dataset.ok()) {
    PrintError(command, dataset.status().ToString());
    return kExitFailure;
  }
  const int64_t distinct = limit > 0 ? std::min(limit, dataset->size()) : dataset->size();
  const int64_t n = distinct * repeat;
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), dataset->sample_shape.begin(), dataset->sample_shape.end());
  Tensor images(shape);
  for (int64_t r = 0; r < repeat; ++r) {
    std::copy_n(dataset->features.begin(), distinct * dataset->sample_size(),
                images.data() + r * distinct * dataset->sample_size());
  }

  options.micro_batch = static_cast<uint32_t>(micro_batch);
  options.num_stages = static_cast<uint32_t>(stages);
  options.activation_codec = activations;
  options.in_flight = static_cast<uint32_t>(in_flight);
  options.max_outstanding = static_cast<uint32_t>(window);
  options.split_layers = !no_split_layers;
  options.max_replans = max_replans;
  options.plan_timeout = std::chrono::milliseconds(plan_timeout_ms);
  options.progress_timeout = std::chrono::milliseconds(progress_timeout_ms);
  options.connect_timeout = std::chrono::milliseconds(connect_timeout_ms);

  auto requester = slicing::InferenceRequester::Connect(
      endpoint->host, endpoint->port, tls, connect, std::chrono::milliseconds(connect_timeout_ms));
  if (!requester.ok()) {
    PrintError(command, "connecting to the coordinator at " + coordinator + ": " +
                            requester.status().ToString());
    return kExitFailure;
  }
  std::printf(
      "infer: %lld images%s from %s as %s, micro-batches of %d, %s activations, %s\n",
      static_cast<long long>(n),
      repeat > 1 ? (" (" + std::to_string(distinct) + " x " + std::to_string(repeat) + ")").c_str()
                 : "",
      data_dir.empty() ? images_file.c_str() : data_dir.c_str(), (*requester)->identity().c_str(),
      micro_batch, activations.c_str(),
      stages == 0 ? "stages: planner's choice" : ("stages: " + std::to_string(stages)).c_str());
  std::fflush(stdout);
  // Plans are printed as they are used, so that a long stream shows where it runs.
  int plans = 0;
  options.on_plan = [&plans](const proto::PipelinePlan& plan) {
    std::printf("\n%s %llu (model %s of round %llu, %d stage(s)):\n",
                plans++ == 0 ? "plan" : "re-plan",
                static_cast<unsigned long long>(plan.pipeline_id()), plan.model().name().c_str(),
                static_cast<unsigned long long>(plan.global_round()), plan.stages_size());
    for (const proto::StageInfo& stage : plan.stages()) {
      std::printf("  stage %u: %-10s %-21s units [%u, %u) %s\n", stage.index(),
                  stage.client_id().c_str(), stage.endpoint().c_str(), stage.unit_begin(),
                  stage.unit_end(), stage.layers().c_str());
    }
    std::printf("%s", plan.plan_table().c_str());
    std::fflush(stdout);
  };
  auto report = (*requester)->Run(images, options);
  if (!report.ok()) {
    PrintError(command, report.status().ToString());
    return kExitFailure;
  }
  for (const std::string& failure : report->failures)
    std::printf("given up: %s\n", failure.c_str());

  const int classes = static_cast<int>(report->logits.batch() > 0 ? report->logits.dim(1) : 0);
  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = report->logits.data() + i * classes;
    const int predicted = static_cast<int>(std::max_element(row, row + classes) - row);
    if (predicted == dataset->labels[static_cast<size_t>(i % distinct)]) ++correct;
  }
  const proto::PipelinePlan& last = report->plans.back();
  std::printf("\nthroughput: %.1f images/s (predicted %.1f), %.2f s streaming, %.2f s in all\n",
              report->images_per_s, last.predicted_samples_per_s(), report->stream_seconds,
              report->seconds);
  // The planner predicts one micro-batch through an idle pipeline; with more outstanding,
  // the measured latency also holds the time spent queued behind the others.
  std::printf(
      "latency per micro-batch: p50 %.2f ms, p95 %.2f ms, max %.2f ms with up to %zu "
      "outstanding (predicted %.2f ms through an idle pipeline)\n",
      report->latency_p50_ms, report->latency_p95_ms, report->latency_max_ms,
      report->peak_outstanding, last.predicted_latency_ms());
  std::printf("accuracy: %.2f%% (%lld/%lld)\n", 100.0 * static_cast<double>(correct) / n,
              static_cast<long long>(correct), static_cast<long long>(n));
  std::printf("replayed %lld micro-batch(es) after %zu failure(s), discarded %lld duplicate(s)\n",
              static_cast<long long>(report->batches_replayed), report->failures.size(),
              static_cast<long long>(report->duplicates_discarded));
  const bool complete = report->answered == n;
  std::printf("answered %lld/%lld %s\n", static_cast<long long>(report->answered),
              static_cast<long long>(n), complete ? "exactly once" : "(INCOMPLETE)");
  if (!logits_out.empty()) {
    if (Status written = WriteLogits(logits_out, report->logits); !written.ok()) {
      PrintError(command, written.ToString());
      return kExitFailure;
    }
  }
  return complete ? kExitOk : kExitFailure;
}

}  // namespace fedslice::cli
