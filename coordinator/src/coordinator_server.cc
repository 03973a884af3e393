#include "fedslice/coordinator/coordinator_server.h"

#include <spdlog/spdlog.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "fedslice/common/blocking_queue.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/pipeline.h"
#include "fedslice/slicing/planner.h"
#include "pipeline_service.h"

namespace fedslice::coordinator {
namespace {

using Clock = std::chrono::steady_clock;

// A transport event, handed from the I/O thread to the round thread.
struct Event {
  enum class Kind { kOpen, kMessage, kClosed, kWake } kind = Kind::kWake;
  net::SessionPtr session;
  proto::Envelope envelope;
  Status reason;
};

using EventQueue = BlockingQueue<Event>;

// Forwards every transport callback into the queue: the round thread does the thinking, so
// the I/O thread never blocks on training-sized work.
class QueueingHandler final : public net::SessionHandler {
 public:
  explicit QueueingHandler(EventQueue* queue) : queue_(queue) {}
  void OnOpen(const net::SessionPtr& session) override {
    queue_->Push({Event::Kind::kOpen, session, {}, {}});
  }
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override {
    queue_->Push({Event::Kind::kMessage, session, std::move(envelope), {}});
  }
  void OnClosed(const net::SessionPtr& session, const Status& reason) override {
    queue_->Push({Event::Kind::kClosed, session, {}, reason});
  }
  void OnRejected(const std::string& remote_address, const Status& reason) override {
    spdlog::warn("refused connection from {}: {}", remote_address, reason.ToString());
  }

 private:
  EventQueue* queue_;
};

// On-the-wire size of a message: frame header plus payload.
uint64_t WireBytes(const proto::Envelope& envelope) {
  return net::kFrameHeaderBytes + envelope.ByteSizeLong();
}

proto::ErrorCode ErrorCodeFor(const Status& status) {
  switch (status.code()) {
    case Status::Code::kFailedPrecondition:
      return proto::ERROR_UNKNOWN_TASK;
    case Status::Code::kInvalidArgument:
      return status.message().find("the model has") != std::string::npos
                 ? proto::ERROR_SHAPE_MISMATCH
                 : proto::ERROR_INVALID_TENSOR;
    default:
      return proto::ERROR_INTERNAL;
  }
}

}  // namespace

struct CoordinatorServer::Impl {
  CoordinatorOptions options;
  std::unique_ptr<Federation> federation;
  boost::asio::io_context io;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::unique_ptr<net::Server> server;
  std::thread io_thread;
  EventQueue queue;
  std::atomic<bool> stop_requested{false};

  // Registered clients (Hello answered with Welcome), by certificate identity. Only the round
  // thread touches it.
  ClientRegistry clients;
  std::atomic<size_t> num_registered{0};

  // Split inference. Requesters: sessions whose first message was a PipelineRequest, by
  // session id. Requests that arrive while training runs wait in `deferred`.
  std::unique_ptr<PipelineService> pipelines;
  std::map<uint64_t, net::SessionPtr> requesters;
  std::deque<std::pair<net::SessionPtr, proto::Envelope>> deferred;
  std::atomic<bool> serving{false};
  std::atomic<uint64_t> completed_rounds{0};

  // Snapshots for other threads.
  mutable std::mutex snapshot_mu;
  std::vector<float> weights_snapshot;
  std::vector<proto::RoundMetrics> history_snapshot;

  // Traffic and federated evaluation of the round in progress.
  Federation::Traffic traffic;
  std::map<std::string, uint64_t> eval_tasks;  // client -> EvaluateTask id awaited
  std::vector<proto::EvaluateResult> eval_results;

  void TakeSnapshot() {
    std::lock_guard lock(snapshot_mu);
    const auto params = federation->global_model().params();
    weights_snapshot.assign(params.begin(), params.end());
    history_snapshot = federation->history();
    completed_rounds = federation->completed_rounds();
  }

  void Send(const net::SessionPtr& session, proto::Envelope envelope, bool count_down) {
    const uint64_t bytes = WireBytes(envelope);
    if (Status sent = session->Send(std::move(envelope)); !sent.ok()) {
      spdlog::warn("send to {} failed: {}", session->peer_identity(), sent.ToString());
      return;
    }
    if (count_down) traffic.bytes_down += bytes;
  }

  void SendError(const net::SessionPtr& session, proto::ErrorCode code, const std::string& message,
                 uint64_t seq) {
    spdlog::warn("{}: {}", session->peer_identity(), message);
    Send(session, net::MakeError(code, message, seq), false);
  }

  bool IsRegistered(const net::SessionPtr& session) const {
    auto it = clients.find(session->peer_identity());
    return it != clients.end() && it->second.session == session;
  }

  std::vector<std::string> RegisteredIds() const {
    std::vector<std::string> ids;
    for (const auto& [id, client] : clients) ids.push_back(id);
    return ids;
  }

  void HandleHello(const net::SessionPtr& session, const proto::Envelope& envelope) {
    const proto::Hello& hello = envelope.hello();
    const std::string& identity = session->peer_identity();
    if (IsRegistered(session)) {
      SendError(session, proto::ERROR_UNEXPECTED_MESSAGE, "Hello sent twice", envelope.seq());
      return;
    }
    if (hello.client_id() != identity) {
      Send(session,
           net::MakeReject(proto::REJECT_NOT_AUTHORIZED,
                           "client_id '" + hello.client_id() +
                               "' is not the identity of your certificate ('" + identity + "')"),
           false);
      session->Close(Status::PermissionDenied("Hello.client_id differs from the certificate"));
      return;
    }
    if (hello.protocol_major() != net::kProtocolMajor) {
      Send(session,
           net::MakeReject(proto::REJECT_VERSION_MISMATCH,
                           "protocol major " + std::to_string(hello.protocol_major()) +
                               " is not supported; this coordinator speaks " +
                               std::to_string(net::kProtocolMajor)),
           false);
      session->Close(Status::FailedPrecondition("protocol version mismatch"));
      return;
    }
    if (federation->finished() && !options.serve_inference) {
      session->Close();  // Bye BYE_NORMAL: nothing left to do
      return;
    }
    if (!hello.stage_endpoint().empty()) {
      if (auto endpoint = slicing::ParseEndpoint(hello.stage_endpoint()); !endpoint.ok()) {
        Send(session,
             net::MakeReject(proto::REJECT_BAD_HELLO,
                             "stage_endpoint: " + endpoint.status().message()),
             false);
        session->Close(Status::InvalidArgument("bad stage endpoint in Hello"));
        return;
      }
    }
    proto::Envelope welcome;
    welcome.mutable_welcome()->set_session_id(std::to_string(session->id()));
    *welcome.mutable_welcome()->mutable_model() = federation->config().model;
    *welcome.mutable_welcome()->mutable_run_config() = federation->run_config_message();
    welcome.mutable_welcome()->set_protocol_minor(net::kProtocolMinor);
    Send(session, std::move(welcome), false);
    clients[identity] = RegisteredClient{session, hello.profile(), hello.stage_endpoint(), true};
    num_registered = clients.size();
    spdlog::info("client {} registered from {} ({}; {} clients){}", identity,
                 session->remote_address(), session->tls_version(), clients.size(),
                 hello.stage_endpoint().empty() ? ""
                                                : "; stage server at " + hello.stage_endpoint());
  }

  // A new device profile, e.g. with per-layer timings of the model announced in Welcome. It
  // must describe this model (DeviceFromProfile checks timings, speed and link figures);
  // otherwise the old profile stays.
  void HandleProfileUpdate(const net::SessionPtr& session, const proto::Envelope& envelope) {
    const proto::DeviceProfile& profile = envelope.profile_update().profile();
    auto device = slicing::DeviceFromProfile(
        profile, slicing::ComputeLayerCosts(federation->global_model()));
    if (!device.ok()) {
      SendError(session, proto::ERROR_INVALID_MESSAGE,
                "ProfileUpdate refused, previous profile kept: " + device.status().message(),
                envelope.seq());
      return;
    }
    clients.at(session->peer_identity()).profile = profile;
    spdlog::info("client {} updated its device profile ({} layer timings, slowdown {})",
                 session->peer_identity(), profile.layer_timings_size(),
                 profile.slowdown() == 0 ? 1.0 : profile.slowdown());
  }

  bool IsRequester(const net::SessionPtr& session) const {
    return requesters.count(session->id()) != 0;
  }

  void HandlePipelineRequest(const net::SessionPtr& session, proto::Envelope envelope) {
    if (!options.serve_inference) {
      SendError(session, proto::ERROR_UNSUPPORTED_MESSAGE,
                "this coordinator does not serve split inference (start it with --serve)",
                envelope.seq());
      return;
    }
    if (!serving) {
      spdlog::info("pipeline request from {} waits until training is over",
                   session->peer_identity());
      deferred.emplace_back(session, std::move(envelope));
      return;
    }
    pipelines->HandleRequest(session, envelope);
  }

  // Messages of a requester session.
  void HandleRequesterMessage(const net::SessionPtr& session, proto::Envelope envelope) {
    switch (envelope.body_case()) {
      case proto::Envelope::kPipelineRequest:
        return HandlePipelineRequest(session, std::move(envelope));
      case proto::Envelope::kPipelineClose:
        return pipelines->HandlePipelineClose(session, envelope);
      case proto::Envelope::kBye:
        spdlog::info("requester {} says bye: {}", session->peer_identity(),
                     envelope.bye().message());
        return;
      case proto::Envelope::kError:
        spdlog::warn("requester {} reports {}: {}", session->peer_identity(),
                     proto::ErrorCode_Name(envelope.error().code()), envelope.error().message());
        return;
      default:
        SendError(session, proto::ERROR_UNEXPECTED_MESSAGE,
                  net::BodyName(envelope) + " is not a message a pipeline requester sends",
                  envelope.seq());
        return;
    }
  }

  void HandleFitResult(const net::SessionPtr& session, const proto::Envelope& envelope) {
    traffic.bytes_up += WireBytes(envelope);
    const std::string& identity = session->peer_identity();
    if (Status accepted = federation->AcceptFitResult(identity, envelope.fit_result());
        !accepted.ok()) {
      SendError(session, ErrorCodeFor(accepted), accepted.message(), envelope.seq());
      return;
    }
    spdlog::info("round {}: update from {} ({} samples, train loss {:.4f}, {:.2f}s)",
                 envelope.fit_result().round(), identity, envelope.fit_result().num_samples(),
                 envelope.fit_result().train_loss(), envelope.fit_result().compute_seconds());
  }

  void HandleEvaluateResult(const net::SessionPtr& session, const proto::Envelope& envelope) {
    const std::string& identity = session->peer_identity();
    const proto::EvaluateResult& result = envelope.evaluate_result();
    auto it = eval_tasks.find(identity);
    if (it == eval_tasks.end() || it->second != result.task_id()) {
      SendError(session, proto::ERROR_UNKNOWN_TASK,
                "EvaluateResult for task " + std::to_string(result.task_id()) +
                    ", which this client was not given",
                envelope.seq());
      return;
    }
    eval_tasks.erase(it);
    if (result.num_samples() == 0 || result.num_correct() > result.num_samples() ||
        !std::isfinite(result.loss())) {
      SendError(session, proto::ERROR_INVALID_MESSAGE, "inconsistent EvaluateResult",
                envelope.seq());
      return;
    }
    eval_results.push_back(result);
  }

  // Applies one transport event to the registry and the open round.
  void Handle(Event event) {
    const net::SessionPtr& session = event.session;
    switch (event.kind) {
      case Event::Kind::kWake:
      case Event::Kind::kOpen:
        return;  // registration waits for Hello
      case Event::Kind::kClosed: {
        if (IsRequester(session)) {
          requesters.erase(session->id());
          std::erase_if(deferred, [&](const auto& d) { return d.first == session; });
          pipelines->OnRequesterGone(session);
          spdlog::info("requester {} left: {}", session->peer_identity(),
                       event.reason.ToString());
          return;
        }
        if (!IsRegistered(session)) return;
        const std::string identity = session->peer_identity();
        clients.erase(identity);
        num_registered = clients.size();
        federation->MarkDropped(identity);
        eval_tasks.erase(identity);
        spdlog::info("client {} left: {} ({} clients)", identity, event.reason.ToString(),
                     clients.size());
        pipelines->OnClientGone(identity, event.reason);
        return;
      }
      case Event::Kind::kMessage:
        break;
    }
    proto::Envelope& envelope = event.envelope;
    if (IsRequester(session)) {
      if (envelope.has_hello()) {
        SendError(session, proto::ERROR_UNEXPECTED_MESSAGE,
                  "this session requests pipelines; it cannot register as a client",
                  envelope.seq());
        return;
      }
      return HandleRequesterMessage(session, std::move(envelope));
    }
    if (envelope.has_hello()) return HandleHello(session, envelope);
    if (!IsRegistered(session)) {
      if (envelope.has_pipeline_request()) {
        // The first message decides: this session is a requester from now on.
        requesters[session->id()] = session;
        spdlog::info("requester {} connected from {}", session->peer_identity(),
                     session->remote_address());
        return HandlePipelineRequest(session, std::move(envelope));
      }
      SendError(session, proto::ERROR_UNEXPECTED_MESSAGE,
                "expected Hello or PipelineRequest, got " + net::BodyName(envelope),
                envelope.seq());
      return;
    }
    switch (envelope.body_case()) {
      case proto::Envelope::kFitResult:
        return HandleFitResult(session, envelope);
      case proto::Envelope::kEvaluateResult:
        return HandleEvaluateResult(session, envelope);
      case proto::Envelope::kSliceReady:
        return pipelines->HandleSliceReady(session, envelope);
      case proto::Envelope::kProfileUpdate:
        return HandleProfileUpdate(session, envelope);
      case proto::Envelope::kPipelineRequest:
        SendError(session, proto::ERROR_UNEXPECTED_MESSAGE,
                  "a registered client may not request pipelines; a requester connects with "
                  "its own session (and certificate)",
                  envelope.seq());
        return;
      case proto::Envelope::kError:
        // A client that cannot do its task says so; it will not answer this round (nor take
        // a slice it is being assigned).
        spdlog::warn("{} reports: {}", session->peer_identity(), envelope.error().message());
        federation->MarkDropped(session->peer_identity());
        eval_tasks.erase(session->peer_identity());
        pipelines->HandleClientError(session->peer_identity(), envelope.error());
        return;
      case proto::Envelope::kBye:
        spdlog::info("{} says bye: {}", session->peer_identity(), envelope.bye().message());
        return;
      default:
        SendError(session, proto::ERROR_UNEXPECTED_MESSAGE,
                  net::BodyName(envelope) + " is not a message a client sends", envelope.seq());
        return;
    }
  }

  // Processes events until `done()` holds, `deadline` passes or a stop is requested.
  template <typename Done>
  void PumpUntil(Clock::time_point deadline, Done done) {
    while (!stop_requested && !done()) {
      auto event = queue.Pop(std::min(deadline, Clock::now() + std::chrono::seconds(1)));
      if (event) {
        Handle(std::move(*event));
      } else if (Clock::now() >= deadline) {
        return;
      }
    }
  }

  void WaitForClients() {
    auto next_log = Clock::now();
    while (!stop_requested && clients.size() < options.min_available) {
      if (Clock::now() >= next_log) {
        spdlog::info("waiting for clients: {} of {} registered", clients.size(),
                     options.min_available);
        next_log = Clock::now() + std::chrono::seconds(10);
      }
      PumpUntil(Clock::now() + std::chrono::seconds(1),
                [&] { return clients.size() >= options.min_available; });
    }
  }

  void FederatedEvaluation(proto::RoundMetrics* metrics) {
    eval_tasks.clear();
    eval_results.clear();
    proto::EvaluateTask base;
    base.set_round(metrics->round());
    if (!federation->EncodeGlobalWeights(base.mutable_weights()).ok()) return;
    base.set_deadline_ms(static_cast<uint32_t>(options.federation.round_deadline.count()));
    base.set_batch_size(static_cast<uint32_t>(options.federation.eval_batch_size));
    uint64_t next_id = (metrics->round() << 24) | (uint64_t{0xff} << 16);
    for (const auto& [id, client] : clients) {
      proto::Envelope envelope;
      *envelope.mutable_evaluate_task() = base;
      envelope.mutable_evaluate_task()->set_task_id(next_id);
      const uint64_t bytes = WireBytes(envelope);
      // Only a task that was actually queued is waited for.
      if (Status sent = client.session->Send(std::move(envelope)); !sent.ok()) {
        spdlog::warn("evaluate task to {} not sent: {}", id, sent.ToString());
        continue;
      }
      traffic.bytes_down += bytes;
      eval_tasks[id] = next_id++;
    }
    PumpUntil(Clock::now() + options.federation.round_deadline,
              [&] { return eval_tasks.empty(); });
    eval_tasks.clear();
    Federation::AddFederatedEvaluation(eval_results, metrics);
  }

  // Serve mode after training: pipeline requests until Stop(). Assignment deadlines are
  // checked at least every second and exactly when one is due.
  void Serve() {
    serving = true;
    spdlog::info("serving split inference with the model of round {} ({} clients registered)",
                 federation->completed_rounds(), clients.size());
    auto waiting = std::move(deferred);
    deferred.clear();
    for (auto& [session, envelope] : waiting) {
      if (session->is_open()) pipelines->HandleRequest(session, envelope);
    }
    while (!stop_requested) {
      auto deadline = Clock::now() + std::chrono::seconds(1);
      if (auto due = pipelines->NextDeadline()) deadline = std::min(deadline, *due);
      if (auto event = queue.Pop(deadline)) Handle(std::move(*event));
      pipelines->CheckDeadlines();
    }
    spdlog::info("stopped serving ({} pipeline(s) open)", pipelines->num_pipelines());
  }

  // One round, retried with a fresh sample until it completes or a stop is requested.
  Status RunRound() {
    for (uint32_t attempt = 0; !stop_requested; ++attempt) {
      WaitForClients();
      if (stop_requested) break;
      auto plan = federation->BeginRound(RegisteredIds(), attempt);
      if (!plan.ok()) {
        spdlog::warn("cannot start a round: {}", plan.status().ToString());
        PumpUntil(Clock::now() + std::chrono::seconds(1), [] { return false; });
        continue;
      }
      traffic = {};
      spdlog::info("round {} (attempt {}): asking {} of {} clients", plan->round, attempt,
                   plan->assignments.size(), clients.size());
      for (Assignment& a : plan->assignments) {
        proto::Envelope envelope;
        *envelope.mutable_fit_task() = std::move(a.task);
        Send(clients.at(a.client_id).session, std::move(envelope), true);
      }
      const auto deadline = Clock::now() + options.federation.round_deadline;
      PumpUntil(deadline, [&] { return federation->PendingClients().empty(); });
      if (stop_requested) break;
      for (const std::string& late : federation->PendingClients()) {
        spdlog::warn("round {}: {} missed the deadline", plan->round, late);
        federation->MarkDropped(late);
      }
      auto metrics = federation->FinishRound(traffic);
      if (!metrics.ok()) {
        if (metrics.status().code() != Status::Code::kUnavailable) return metrics.status();
        spdlog::warn("{}; retrying the round", metrics.status().message());
        continue;
      }
      if (options.federated_eval_every > 0 &&
          metrics->round() % options.federated_eval_every == 0) {
        FederatedEvaluation(&*metrics);
      }
      FEDSLICE_RETURN_IF_ERROR(federation->CommitRound(*metrics));
      TakeSnapshot();
      spdlog::info(
          "round {} done: accuracy {:.2f}%, loss {:.4f}, {}/{} clients answered, {} dropped, "
          "{:.2f} MB up, {:.2f} MB down, {:.2f}s",
          metrics->round(), 100.0 * metrics->accuracy(), metrics->loss(),
          metrics->clients_answered(), metrics->clients_asked(), metrics->clients_dropped(),
          static_cast<double>(metrics->bytes_up()) / 1e6,
          static_cast<double>(metrics->bytes_down()) / 1e6, metrics->seconds());
      return Status::Ok();
    }
    return Status::Aborted("stopped");
  }

  // Closes every client's session (the transport flushes, then sends Bye: BYE_NORMAL for an
  // OK reason, BYE_SHUTTING_DOWN for Unavailable, BYE_ERROR otherwise) and stops listening.
  void Shutdown(const Status& reason) {
    pipelines->ReleaseAll("coordinator shutting down");
    for (const auto& [id, client] : clients) client.session->Close(reason);
    for (const auto& [id, requester] : requesters) requester->Close(reason);
    clients.clear();
    requesters.clear();
    deferred.clear();
    num_registered = 0;
    if (server) server->Stop();
    work.reset();
  }
};

Result<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    CoordinatorOptions options, std::optional<data::Dataset> test_set) {
  // (Without rounds, a serving coordinator needs neither.)
  if (options.federation.rounds > 0 && options.min_available < options.federation.min_fit) {
    return Status::InvalidArgument("min_available (" + std::to_string(options.min_available) +
                                   ") must be >= min_fit (" +
                                   std::to_string(options.federation.min_fit) + ")");
  }
  auto impl = std::make_unique<Impl>();
  FEDSLICE_ASSIGN_OR_RETURN(impl->federation,
                            Federation::Create(options.federation, std::move(test_set)));
  impl->options = std::move(options);
  impl->TakeSnapshot();
  impl->pipelines = std::make_unique<PipelineService>(
      PipelineService::Options{impl->options.slice_ready_timeout,
                               impl->options.stage_failure_grace},
      &impl->clients,
      impl->federation.get());
  auto handler = std::make_shared<QueueingHandler>(&impl->queue);
  FEDSLICE_ASSIGN_OR_RETURN(
      impl->server,
      net::Server::Start(impl->io, impl->options.tls, impl->options.server, handler));
  impl->work.emplace(impl->io.get_executor());
  Impl* raw = impl.get();
  impl->io_thread = std::thread([raw] { raw->io.run(); });
  spdlog::info("coordinator listening on {}:{} (model {}, {} rounds, resuming after round {})",
               impl->options.server.bind_address, impl->server->port(),
               impl->federation->config().model.name(), impl->federation->config().rounds,
               impl->federation->completed_rounds());
  return std::unique_ptr<CoordinatorServer>(new CoordinatorServer(std::move(impl)));
}

CoordinatorServer::CoordinatorServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

CoordinatorServer::~CoordinatorServer() {
  Stop();
  if (impl_->server) impl_->server->Stop();
  impl_->work.reset();
  if (impl_->io_thread.joinable()) impl_->io_thread.join();
  impl_->server.reset();
}

uint16_t CoordinatorServer::port() const { return impl_->server->port(); }

Status CoordinatorServer::Run() {
  Impl& impl = *impl_;
  while (!impl.stop_requested && !impl.federation->finished()) {
    Status round = impl.RunRound();
    if (!round.ok() && !impl.stop_requested) {
      impl.Shutdown(round);
      return round;
    }
  }
  if (impl.federation->finished()) {
    spdlog::info("all {} rounds done", impl.federation->config().rounds);
    if (impl.options.serve_inference) impl.Serve();
    // Serve mode ends only by Stop(), but the run is complete: Bye{BYE_NORMAL} tells clients
    // not to reconnect.
    impl.Shutdown(Status::Ok());
    return Status::Ok();
  }
  impl.Shutdown(Status::Unavailable("coordinator shutting down"));
  return Status::Aborted("coordinator stopped before all rounds were done");
}

void CoordinatorServer::Stop() {
  impl_->stop_requested = true;
  impl_->queue.Push({});
}

uint64_t CoordinatorServer::completed_rounds() const { return impl_->completed_rounds.load(); }
size_t CoordinatorServer::num_registered() const { return impl_->num_registered.load(); }
bool CoordinatorServer::serving() const { return impl_->serving.load(); }

std::vector<float> CoordinatorServer::GlobalWeights() const {
  std::lock_guard lock(impl_->snapshot_mu);
  return impl_->weights_snapshot;
}

std::vector<proto::RoundMetrics> CoordinatorServer::History() const {
  std::lock_guard lock(impl_->snapshot_mu);
  return impl_->history_snapshot;
}

}  // namespace fedslice::coordinator
