#include "fedslice/client/edge_client.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <thread>
#include <vector>

#include "fedslice/client/device_profile.h"
#include "fedslice/common/codec.h"
#include "fedslice/common/model.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/io_cost.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/common/threading.h"

namespace fedslice::client {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kSoftwareVersion = "fedslice-client 0.1";
// Receive() wakes at least this often to notice Stop() even if closing the channel raced.
constexpr milliseconds kPollInterval{1000};

// The transport turns a Reject received as the server's greeting (duplicate identity, server
// full or shutting down: decided before any Hello) into a PermissionDenied status naming the
// reason, "server at H:P rejected us: REJECT_...: message". Recovers that reason so that a
// retryable refusal is not mistaken for a certificate problem (also PermissionDenied).
std::optional<proto::RejectReason> GreetingRejectReason(const Status& status) {
  if (status.code() != Status::Code::kPermissionDenied) return std::nullopt;
  constexpr std::string_view kMarker = "rejected us: ";
  const std::string& message = status.message();
  const size_t at = message.find(kMarker);
  if (at == std::string::npos) return std::nullopt;
  const size_t begin = at + kMarker.size();
  const size_t end = message.find(':', begin);
  proto::RejectReason reason;
  if (!proto::RejectReason_Parse(
          message.substr(begin, end == std::string::npos ? std::string::npos : end - begin),
          &reason)) {
    return std::nullopt;
  }
  return reason;
}

// A refusal that says "not now" rather than "never".
bool IsRetryableReject(proto::RejectReason reason) {
  return reason == proto::REJECT_DUPLICATE_IDENTITY || reason == proto::REJECT_SERVER_FULL ||
         reason == proto::REJECT_SHUTTING_DOWN;
}

// Connection failures worth another attempt: the coordinator is not (yet) there, slow, or
// went away. Everything else (certificates, configuration) would fail the same way again.
bool IsRetryableConnectError(const Status& status) {
  switch (status.code()) {
    case Status::Code::kUnavailable:
    case Status::Code::kDeadlineExceeded:
    case Status::Code::kAborted:
    case Status::Code::kResourceExhausted:
    case Status::Code::kIoError:
      return true;
    case Status::Code::kPermissionDenied: {
      auto reason = GreetingRejectReason(status);
      return reason && IsRetryableReject(*reason);
    }
    default:
      return false;
  }
}

// Wire code for a LocalTrainer failure on a task whose weights already passed CheckWeights.
proto::ErrorCode TrainerErrorCode(const Status& status) {
  switch (status.code()) {
    case Status::Code::kInvalidArgument:
      return proto::ERROR_INVALID_MESSAGE;  // hyperparameters or codec we cannot honour
    default:
      return proto::ERROR_INTERNAL;  // diverged training, no model
  }
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

Status EdgeClientOptions::Validate() const {
  if (host.empty()) return Status::InvalidArgument("coordinator host is empty");
  if (port == 0) return Status::InvalidArgument("coordinator port must be in [1, 65535]");
  FEDSLICE_RETURN_IF_ERROR(tls.Validate());
  if (connect_timeout <= milliseconds::zero() || welcome_timeout <= milliseconds::zero()) {
    return Status::InvalidArgument("connect and welcome timeouts must be positive");
  }
  if (initial_backoff <= milliseconds::zero() || max_backoff < initial_backoff) {
    return Status::InvalidArgument("backoff: need 0 < initial_backoff <= max_backoff");
  }
  if (max_connect_attempts < 0) {
    return Status::InvalidArgument("max_connect_attempts must be >= 0 (0 = retry forever)");
  }
  if (give_up_after && give_up_after->count() <= 0) {
    return Status::InvalidArgument("give_up_after must be positive");
  }
  if (!std::isfinite(slowdown) || slowdown < 1.0) {
    return Status::InvalidArgument("slowdown must be a finite factor >= 1");
  }
  if (stage) {
    slicing::StageHostOptions checked = *stage;
    checked.slowdown = slowdown;
    FEDSLICE_RETURN_IF_ERROR(checked.Validate());
    if (stage_timing.batch < 1 || stage_timing.batch > 4096 ||
        stage_timing.budget <= milliseconds::zero() || stage_timing.max_runs < 1) {
      return Status::InvalidArgument(
          "stage timing: need batch in [1, 4096], a positive budget and max_runs >= 1");
    }
  }
  return Status::Ok();
}

EdgeClient::EdgeClient(EdgeClientOptions options, LocalTrainer& trainer)
    : options_(std::move(options)), trainer_(trainer), jitter_(std::random_device{}()) {}

EdgeClient::~EdgeClient() {
  Stop();
  // Joins the stage's compute thread, the only other caller of our members.
  stage_host_.reset();
}

void EdgeClient::Stop() {
  std::shared_ptr<net::Channel> channel;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    channel = channel_;
  }
  cv_.notify_all();
  // Bye{BYE_SHUTTING_DOWN} tells the coordinator at once that we will not answer this round.
  if (channel) channel->Close(Status::Unavailable("client shutting down"));
}

bool EdgeClient::SleepUnlessStopped(Clock::duration duration) {
  std::unique_lock<std::mutex> lock(mu_);
  return !cv_.wait_for(lock, duration, [this] { return stop_.load(); });
}

Status EdgeClient::Run() {
  FEDSLICE_RETURN_IF_ERROR(options_.Validate().WithContext("client options"));
  // The coordinator checks Hello.client_id against the certificate; an unreadable or nameless
  // certificate is our configuration error, reported before any connection.
  FEDSLICE_ASSIGN_OR_RETURN(std::string client_id,
                            net::CertificateIdentity(options_.tls.cert_file));
  if (options_.stage && !stage_host_) {
    slicing::StageHostOptions stage = *options_.stage;
    stage.slowdown = options_.slowdown;
    auto host = slicing::StageHost::Start(options_.tls, std::move(stage));
    if (!host.ok()) return host.status().WithContext("pipeline stage server");
    stage_host_ = std::move(host).value();
    // The raw pointer, not stage_host_: the callback may run while the destructor resets it.
    stage_host_->SetFailureCallback([this, host = stage_host_.get()](uint64_t pipeline_id,
                                                                     uint32_t stage_index,
                                                                     const Status& why) {
      ReportStageFailure(*host, pipeline_id, stage_index, why);
    });
  }
  int failures = 0;
  auto last_registered = Clock::now();
  while (true) {
    if (stopped()) return Status::Aborted("client stopped");
    Outcome outcome = RunSession(client_id);
    switch (outcome.end) {
      case SessionEnd::kRunComplete:
        spdlog::info("run complete after {} fit tasks", fit_tasks_done_.load());
        return Status::Ok();
      case SessionEnd::kStopped:
        return Status::Aborted("client stopped");
      case SessionEnd::kFatal:
        return outcome.status;
      case SessionEnd::kRetry:
        break;
    }
    if (outcome.registered) {
      // A working session proves the set-up right: count failures from here on.
      failures = 0;
      last_registered = Clock::now();
    }
    ++failures;
    if (options_.max_connect_attempts > 0 && failures >= options_.max_connect_attempts) {
      return Status::Unavailable("giving up after " + std::to_string(failures) +
                                 " failed attempts to reach the coordinator at " + options_.host +
                                 ":" + std::to_string(options_.port) +
                                 "; last error: " + outcome.status.ToString());
    }
    if (options_.give_up_after && Clock::now() - last_registered >= *options_.give_up_after) {
      return Status::DeadlineExceeded("giving up: no session with the coordinator at " +
                                      options_.host + ":" + std::to_string(options_.port) +
                                      " for " + std::to_string(options_.give_up_after->count()) +
                                      " s; last error: " + outcome.status.ToString());
    }
    // Exponential backoff with "equal jitter": clients that lost the same coordinator do not
    // come back in lockstep.
    const int doublings = std::min(failures - 1, 30);
    const auto ceiling = std::min<milliseconds::rep>(options_.initial_backoff.count() << doublings,
                                                     options_.max_backoff.count());
    std::uniform_int_distribution<milliseconds::rep> pick(ceiling / 2, ceiling);
    milliseconds wait{pick(jitter_)};
    wait = std::max(wait, outcome.retry_after);
    spdlog::warn("{}; retrying in {} ms (attempt {})", outcome.status.ToString(), wait.count(),
                 failures + 1);
    if (!SleepUnlessStopped(wait)) return Status::Aborted("client stopped");
  }
}

EdgeClient::Outcome EdgeClient::RunSession(const std::string& client_id) {
  net::ConnectOptions connect;
  connect.server_name = options_.server_name;
  connect.expected_identity = options_.expected_server_identity;
  spdlog::debug("connecting to {}:{}", options_.host, options_.port);
  auto connected = net::Channel::Connect(options_.host, options_.port, options_.tls,
                                         options_.connect_timeout, connect);
  if (!connected.ok()) {
    const Status& error = connected.status();
    if (stopped()) return {SessionEnd::kStopped, error};
    if (IsRetryableConnectError(error)) return {SessionEnd::kRetry, error};
    return {SessionEnd::kFatal,
            error.WithContext("connecting to the coordinator at " + options_.host + ":" +
                              std::to_string(options_.port))};
  }
  std::shared_ptr<net::Channel> channel = std::move(connected).value();
  {
    std::lock_guard<std::mutex> lock(mu_);
    channel_ = channel;
  }
  Outcome outcome;
  if (stopped()) {
    outcome = {SessionEnd::kStopped, Status::Aborted("client stopped")};
  } else {
    spdlog::info("connected to coordinator '{}' at {}:{}", channel->peer_identity(), options_.host,
                 options_.port);
    outcome = Serve(*channel, client_id);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    channel_.reset();
  }
  // The coordinator counts the stages of a client it lost as gone (pipeline.h); a slice kept
  // here would serve a pipeline nobody tracks.
  if (stage_host_) stage_host_->ReleaseAll();
  switch (outcome.end) {
    case SessionEnd::kRunComplete:
      channel->Close(Status::Ok());
      break;
    case SessionEnd::kStopped:
      channel->Close(Status::Unavailable("client shutting down"));
      break;
    case SessionEnd::kRetry:
    case SessionEnd::kFatal:
      channel->Close(Status::Aborted(outcome.status.message()));  // Bye{BYE_ERROR}
      break;
  }
  return outcome;
}

EdgeClient::Outcome EdgeClient::Serve(net::Channel& channel, const std::string& client_id) {
  // --- Registration: Hello -> Welcome | Reject.
  proto::Envelope hello;
  proto::Hello* h = hello.mutable_hello();
  h->set_client_id(client_id);
  h->set_protocol_major(net::kProtocolMajor);
  h->set_protocol_minor(net::kProtocolMinor);
  *h->mutable_profile() = options_.profile;
  h->set_software_version(kSoftwareVersion);
  if (stage_host_) h->set_stage_endpoint(stage_host_->endpoint());
  if (Status sent = channel.Send(std::move(hello)); !sent.ok()) {
    if (stopped()) return {SessionEnd::kStopped, sent};
    return {SessionEnd::kRetry, sent.WithContext("sending Hello")};
  }
  const auto welcome_deadline = Clock::now() + options_.welcome_timeout;
  bool registered = false;
  while (!registered) {
    const auto now = Clock::now();
    if (now >= welcome_deadline) {
      return {SessionEnd::kRetry,
              Status::DeadlineExceeded("no Welcome within " +
                                       std::to_string(options_.welcome_timeout.count()) +
                                       " ms of Hello")};
    }
    auto received = channel.Receive(std::min(
        kPollInterval,
        std::chrono::duration_cast<milliseconds>(welcome_deadline - now) + milliseconds(1)));
    if (stopped()) return {SessionEnd::kStopped, Status::Aborted("client stopped")};
    if (!received.ok()) {
      if (received.status().code() == Status::Code::kDeadlineExceeded && channel.is_open()) {
        continue;
      }
      return {SessionEnd::kRetry, received.status().WithContext("waiting for Welcome")};
    }
    const proto::Envelope& envelope = *received;
    switch (envelope.body_case()) {
      case proto::Envelope::kWelcome: {
        const proto::Welcome& welcome = envelope.welcome();
        Status fits = trainer_.SetModel(welcome.model(), welcome.run_config().run_id());
        auto model = fits.ok() ? Model::Create(welcome.model()) : Result<Model>(fits);
        if (!model.ok()) {
          // Our data cannot train the announced model (other image size, more classes): no
          // later attempt can change that.
          Status sent = channel.Send(net::MakeError(
              proto::ERROR_SHAPE_MISMATCH,
              "client data does not fit the model: " + model.status().message(), envelope.seq()));
          (void)sent;  // best effort: we are leaving anyway
          return {SessionEnd::kFatal,
                  Status::FailedPrecondition(
                      "the coordinator's model '" + welcome.model().name() +
                      "' does not fit this client's data: " + model.status().message())};
        }
        model_params_ = static_cast<uint64_t>(model->param_count());
        registered = true;
        sessions_registered_.fetch_add(1);
        spdlog::info(
            "registered as '{}' (session {}, model {} with {} parameters, run {}: next round {} "
            "of {})",
            client_id, welcome.session_id(), welcome.model().name(), model_params_,
            welcome.run_config().run_id(), welcome.run_config().next_round(),
            welcome.run_config().total_rounds());
        if (stage_host_) {
          if (Status sent = SendProfileUpdate(channel, welcome.model()); !sent.ok()) {
            if (stopped()) return {SessionEnd::kStopped, sent, true};
            return {SessionEnd::kRetry, sent.WithContext("sending ProfileUpdate"), true};
          }
        }
        break;
      }
      case proto::Envelope::kReject: {
        const proto::Reject& reject = envelope.reject();
        Status why = Status::PermissionDenied(
            "coordinator refused us: " + proto::RejectReason_Name(reject.reason()) + ": " +
            reject.message());
        if (IsRetryableReject(reject.reason()) || reject.retry_after_ms() > 0) {
          return {SessionEnd::kRetry, why, false, milliseconds(reject.retry_after_ms())};
        }
        return {SessionEnd::kFatal, why};
      }
      case proto::Envelope::kBye:
        if (envelope.bye().reason() == proto::BYE_NORMAL) {
          // The coordinator had already finished the run before we registered.
          return {SessionEnd::kRunComplete, Status::Ok()};
        }
        return {SessionEnd::kRetry,
                Status::Unavailable("coordinator said bye before Welcome: " +
                                    proto::ByeReason_Name(envelope.bye().reason()) + ": " +
                                    envelope.bye().message())};
      case proto::Envelope::kError:
        return {SessionEnd::kFatal,
                Status::FailedPrecondition("coordinator answered our Hello with " +
                                           proto::ErrorCode_Name(envelope.error().code()) + ": " +
                                           envelope.error().message())};
      default: {
        Status sent = channel.Send(net::MakeError(
            proto::ERROR_UNEXPECTED_MESSAGE,
            "expected Welcome or Reject, got " + net::BodyName(envelope), envelope.seq()));
        if (!sent.ok()) return {SessionEnd::kRetry, sent.WithContext("answering")};
        break;
      }
    }
  }

  // --- Tasks until the run is complete.
  auto retry = [](Status why) { return Outcome{SessionEnd::kRetry, std::move(why), true}; };
  while (true) {
    auto received = channel.Receive(kPollInterval);
    if (stopped()) return {SessionEnd::kStopped, Status::Aborted("client stopped"), true};
    if (!received.ok()) {
      if (received.status().code() == Status::Code::kDeadlineExceeded && channel.is_open()) {
        continue;
      }
      return retry(received.status().WithContext("connection to the coordinator lost"));
    }
    const proto::Envelope& envelope = *received;
    Status handled;
    switch (envelope.body_case()) {
      case proto::Envelope::kFitTask:
        handled = HandleFit(channel, envelope);
        break;
      case proto::Envelope::kEvaluateTask:
        handled = HandleEvaluate(channel, envelope);
        break;
      case proto::Envelope::kSliceAssign:
        handled = HandleSliceAssign(channel, envelope);
        break;
      case proto::Envelope::kSliceRelease:
        HandleSliceRelease(envelope);
        break;
      case proto::Envelope::kBye:
        if (envelope.bye().reason() == proto::BYE_NORMAL) {
          spdlog::info("coordinator ended the run{}{}",
                       envelope.bye().message().empty() ? "" : ": ", envelope.bye().message());
          return {SessionEnd::kRunComplete, Status::Ok(), true};
        }
        return retry(Status::Unavailable(
            "coordinator said bye: " + proto::ByeReason_Name(envelope.bye().reason()) + ": " +
            envelope.bye().message()));
      case proto::Envelope::kError:
        // E.g. a result that arrived after the round's deadline. Nothing to undo here.
        spdlog::warn("coordinator reports {}: {}", proto::ErrorCode_Name(envelope.error().code()),
                     envelope.error().message());
        break;
      default:
        spdlog::warn("unexpected {} from the coordinator", net::BodyName(envelope));
        handled = channel.Send(net::MakeError(
            proto::ERROR_UNEXPECTED_MESSAGE,
            net::BodyName(envelope) + " is not a message a coordinator sends now", envelope.seq()));
        break;
    }
    if (stopped()) return {SessionEnd::kStopped, Status::Aborted("client stopped"), true};
    if (!handled.ok()) return retry(handled);
  }
}

Status EdgeClient::CheckWeights(const proto::EncodedTensor& weights, proto::ErrorCode* code) const {
  if (weights.num_values() != model_params_) {
    *code = proto::ERROR_SHAPE_MISMATCH;
    return Status::InvalidArgument("weights have " + std::to_string(weights.num_values()) +
                                   " values, the model has " + std::to_string(model_params_));
  }
  // Decoding checks the codec, every header field, the payload length and finiteness; a
  // failure here is the sender's tensor, not our training, hence its own error code.
  *code = proto::ERROR_INVALID_TENSOR;
  std::vector<float> scratch(model_params_);
  return codec::Decode(weights, scratch);
}

Status EdgeClient::HandleFit(net::Channel& channel, const proto::Envelope& envelope) {
  const auto received = Clock::now();
  const proto::FitTask& task = envelope.fit_task();
  spdlog::info("round {}: fit task {} received ({} epochs, batch {}, lr {})", task.round(),
               task.task_id(), task.local_epochs(), task.batch_size(), task.learning_rate());
  auto refuse = [&](proto::ErrorCode code, const Status& why) {
    spdlog::warn("round {}: cannot do fit task {}: {}", task.round(), task.task_id(),
                 why.ToString());
    return channel.Send(net::MakeError(
        code, "FitTask " + std::to_string(task.task_id()) + ": " + why.message(), envelope.seq()));
  };
  proto::ErrorCode code = proto::ERROR_INVALID_TENSOR;
  if (Status ok = CheckWeights(task.global_weights(), &code); !ok.ok()) return refuse(code, ok);
  auto result = trainer_.Fit(task);
  if (!result.ok()) return refuse(TrainerErrorCode(result.status()), result.status());
  if (options_.slowdown > 1.0) {
    const double compute = result->compute_seconds();
    const auto extra = std::chrono::duration<double>(compute * (options_.slowdown - 1.0));
    if (!SleepUnlessStopped(std::chrono::duration_cast<Clock::duration>(extra))) {
      return Status::Aborted("client stopped");
    }
    result->set_compute_seconds(compute * options_.slowdown);
  }
  if (stopped()) return Status::Aborted("client stopped");
  const double elapsed = Seconds(Clock::now() - received);
  if (task.deadline_ms() > 0 && elapsed * 1000.0 > task.deadline_ms()) {
    // The budget counts from our receipt, after the coordinator sent it: if we are late, the
    // coordinator has closed the round already and would refuse the result.
    spdlog::warn("round {}: training took {:.2f}s, past the {} ms deadline; result not sent",
                 task.round(), elapsed, task.deadline_ms());
    return Status::Ok();
  }
  const uint64_t samples = result->num_samples();
  const double loss = result->train_loss();
  proto::Envelope reply;
  *reply.mutable_fit_result() = std::move(result).value();
  FEDSLICE_RETURN_IF_ERROR(channel.Send(std::move(reply)).WithContext("sending FitResult"));
  fit_tasks_done_.fetch_add(1);
  spdlog::info("round {}: trained on {} samples, loss {:.4f}, {:.2f}s", task.round(), samples, loss,
               elapsed);
  return Status::Ok();
}

Status EdgeClient::HandleEvaluate(net::Channel& channel, const proto::Envelope& envelope) {
  const proto::EvaluateTask& task = envelope.evaluate_task();
  auto refuse = [&](proto::ErrorCode code, const Status& why) {
    spdlog::warn("round {}: cannot do evaluate task {}: {}", task.round(), task.task_id(),
                 why.ToString());
    return channel.Send(net::MakeError(
        code, "EvaluateTask " + std::to_string(task.task_id()) + ": " + why.message(),
        envelope.seq()));
  };
  proto::ErrorCode code = proto::ERROR_INVALID_TENSOR;
  if (Status ok = CheckWeights(task.weights(), &code); !ok.ok()) return refuse(code, ok);
  auto result = trainer_.Evaluate(task);
  if (!result.ok()) {
    // FailedPrecondition: no local test data; this client cannot serve the request type.
    return refuse(result.status().code() == Status::Code::kFailedPrecondition
                      ? proto::ERROR_UNSUPPORTED_MESSAGE
                      : TrainerErrorCode(result.status()),
                  result.status());
  }
  spdlog::info("round {}: evaluated on {} samples: loss {:.4f}, accuracy {:.2f}%", task.round(),
               result->num_samples(), result->loss(),
               100.0 * static_cast<double>(result->num_correct()) /
                   static_cast<double>(std::max<uint64_t>(1, result->num_samples())));
  proto::Envelope reply;
  *reply.mutable_evaluate_result() = std::move(result).value();
  return channel.Send(std::move(reply)).WithContext("sending EvaluateResult");
}

Status EdgeClient::SendProfileUpdate(net::Channel& channel, const proto::ModelSpec& model) {
  const std::string key = model.SerializeAsString();
  const int stage_threads = options_.stage ? options_.stage->engine_threads : 0;
  if (key != timed_model_) {
    auto created = Model::Create(model);
    if (!created.ok()) return created.status().WithContext("timing the announced model");
    // Timed with the threads the stage will compute with (the setting is process-wide).
    const int previous = NumThreads();
    if (stage_threads > 0) SetNumThreads(stage_threads);
    auto timings = slicing::MeasureLayerTimes(*created, options_.stage_timing);
    if (stage_threads > 0) SetNumThreads(previous);
    if (!timings.ok()) return timings.status().WithContext("timing the announced model");
    layer_timings_ = std::move(timings).value();
    timed_model_ = key;
    double total = 0;
    for (const auto& t : layer_timings_) total += t.forward_ms_per_sample();
    spdlog::info("model {}: {} layers take {:.4f} ms per sample here (batch {}){}", model.name(),
                 layer_timings_.size(), total, options_.stage_timing.batch,
                 options_.slowdown > 1.0
                     ? fmt::format(", emulating a device {}x slower", options_.slowdown)
                     : std::string());
  }
  proto::Envelope update;
  proto::DeviceProfile* profile = update.mutable_profile_update()->mutable_profile();
  *profile = options_.profile;
  profile->clear_layer_timings();
  for (const auto& t : layer_timings_) *profile->add_layer_timings() = t;
  const int threads = stage_threads > 0 ? stage_threads : NumThreads();
  double slowdown = options_.slowdown;
  if (activation_io_ms_per_mb_ <= 0) {
    if (auto io = net::MeasureActivationIoMsPerMb(); io.ok()) {
      activation_io_ms_per_mb_ = *io;
    } else {
      spdlog::warn("activation I/O cost not measured: {}", io.status().ToString());
    }
  }
  profile->set_activation_io_ms_per_mb(activation_io_ms_per_mb_);
  // The stage's I/O thread competes with its engine threads when the CPUs this process may
  // use cannot run them all at once.
  double cpus_usable = std::max(1u, std::thread::hardware_concurrency());
  if (auto cpus = CgroupCpuLimit(options_.cgroup_root); cpus.ok()) {
    cpus_usable = std::min(cpus_usable, *cpus);
    const double quota = CpuQuotaSlowdown(threads, *cpus);
    if (quota > 1.0) {
      spdlog::info(
          "CPU quota of {:.2f} CPUs for {} engine thread(s): reported {:.2f}x slower "
          "than the layer timings",
          *cpus, threads, quota);
    }
    slowdown *= quota;
  } else if (cpus.status().code() != Status::Code::kNotFound) {
    spdlog::warn("CPU quota not read ({}); timings reported as measured", cpus.status().ToString());
  }
  profile->set_slowdown(slowdown);
  profile->set_io_shares_compute(cpus_usable < static_cast<double>(threads) + 1.0);
  if (profile->io_shares_compute()) {
    spdlog::info(
        "{:.2f} usable CPUs for {} engine thread(s) and I/O: stages pay {:.2f} ms of "
        "CPU per MB of activations in and out",
        cpus_usable, threads, activation_io_ms_per_mb_ * slowdown);
  }
  if (options_.stage && options_.stage->engine_threads > 0) {
    profile->set_num_threads(static_cast<uint32_t>(options_.stage->engine_threads));
  }
  return channel.Send(std::move(update));
}

Status EdgeClient::HandleSliceAssign(net::Channel& channel, const proto::Envelope& envelope) {
  const proto::SliceAssign& assign = envelope.slice_assign();
  Status loaded = stage_host_
                      ? stage_host_->Assign(assign)
                      : Status::FailedPrecondition("this client does not host pipeline stages");
  proto::Envelope reply;
  proto::SliceReady* ready = reply.mutable_slice_ready();
  ready->set_pipeline_id(assign.pipeline_id());
  ready->set_stage_index(assign.stage_index());
  ready->set_ok(loaded.ok());
  if (loaded.ok()) {
    slices_assigned_.fetch_add(1);
  } else {
    spdlog::warn("cannot host stage {} of pipeline {}: {}", assign.stage_index(),
                 assign.pipeline_id(), loaded.ToString());
    // Bounded like every wire string; the reason's start says what was wrong.
    ready->set_message(loaded.message().substr(0, net::kMaxStringBytes));
  }
  return channel.Send(std::move(reply)).WithContext("sending SliceReady");
}

void EdgeClient::HandleSliceRelease(const proto::Envelope& envelope) {
  const proto::SliceRelease& release = envelope.slice_release();
  if (!stage_host_) return;
  if (Status released = stage_host_->Release(release.pipeline_id()); !released.ok()) {
    // Already replaced by a newer slice, or lost with an earlier session: nothing to drop.
    spdlog::debug("SliceRelease: {}", released.ToString());
    return;
  }
  spdlog::info("pipeline {} released{}{}", release.pipeline_id(),
               release.reason().empty() ? "" : ": ", release.reason());
}

void EdgeClient::ReportStageFailure(const slicing::StageHost& host, uint64_t pipeline_id,
                                    uint32_t stage_index, const Status& why) {
  // A failure of a slice released meanwhile (with the session it came from) is old news.
  if (host.pipeline_id() != pipeline_id) return;
  std::shared_ptr<net::Channel> channel;
  {
    std::lock_guard<std::mutex> lock(mu_);
    channel = channel_;
  }
  if (!channel) return;
  proto::Envelope reply;
  proto::SliceReady* ready = reply.mutable_slice_ready();
  ready->set_pipeline_id(pipeline_id);
  ready->set_stage_index(stage_index);
  ready->set_ok(false);
  ready->set_message(why.message().substr(0, net::kMaxStringBytes));
  if (Status sent = channel->Send(std::move(reply)); !sent.ok()) {
    spdlog::warn("could not report the failure of pipeline {}: {}", pipeline_id, sent.ToString());
  }
}

}  // namespace fedslice::client
