#include "fedslice/slicing/requester.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "fedslice/common/blocking_queue.h"
#include "fedslice/common/codec.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/pipeline.h"

namespace fedslice::slicing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kPoll{100};

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// What the reader threads hand to Run(): a message or the end of a connection.
struct Event {
  enum class Source { kCoordinator, kUpstream, kSink } source = Source::kCoordinator;
  uint64_t generation = 0;  // the pipeline attempt a stage connection belongs to
  Result<proto::Envelope> message = Status::Internal("unset");
};

using EventQueue = BlockingQueue<Event>;

// Reads `channel` until it closes or `stop` is set, pushing every message (and finally the
// reason the connection ended) into `queue`.
void ReadLoop(net::Channel* channel, Event::Source source, uint64_t generation,
              const std::atomic<bool>* stop, EventQueue* queue) {
  while (!stop->load()) {
    auto received = channel->Receive(kPoll);
    if (!received.ok() && received.status().code() == Status::Code::kDeadlineExceeded) {
      // Nothing yet. A closed channel returns its close reason, which may itself be a
      // deadline (idle timeout): tell the two apart by whether the channel is still open.
      if (channel->is_open()) continue;
    }
    const bool ended = !received.ok();
    queue->Push({source, generation, std::move(received)});
    if (ended) return;
  }
}

Status CoordinatorRefusal(const proto::Error& error) {
  const std::string message =
      "the coordinator refused the pipeline request: " + proto::ErrorCode_Name(error.code()) +
      ": " + error.message();
  switch (error.code()) {
    case proto::ERROR_INVALID_MESSAGE:
      return Status::InvalidArgument(message);
    case proto::ERROR_RESOURCE_EXHAUSTED:
      return Status::ResourceExhausted(message);
    case proto::ERROR_UNSUPPORTED_MESSAGE:
    case proto::ERROR_UNEXPECTED_MESSAGE:
    case proto::ERROR_NOT_AUTHORIZED:
      return Status::FailedPrecondition(message);
    default:
      return Status::Unavailable(message);
  }
}

std::string Join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (const std::string& item : items) out += (out.empty() ? "" : sep) + item;
  return out;
}

}  // namespace

double Percentile(std::vector<double>& values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::ceil(std::clamp(p, 0.0, 100.0) / 100.0 * values.size());
  const size_t index = static_cast<size_t>(std::max(rank, 1.0)) - 1;
  return values[std::min(index, values.size() - 1)];
}

// The stage connections of one pipeline attempt and their reader threads.
struct InferenceRequester::Stream {
  uint64_t generation = 0;
  std::unique_ptr<net::Channel> upstream;  // stage 0 (also the sink when K = 1)
  std::unique_ptr<net::Channel> sink;      // stage K-1 when K > 1
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;

  ~Stream() { Shutdown(); }
  // Closes the connections (the stages see a normal close) and joins the readers.
  void Shutdown() {
    stop = true;
    if (sink) sink->Close();
    if (upstream) upstream->Close();
    for (std::thread& t : readers) {
      if (t.joinable()) t.join();
    }
    readers.clear();
  }
};

InferenceRequester::InferenceRequester(std::unique_ptr<net::Channel> coordinator,
                                       net::TlsConfig tls, std::string identity)
    : coordinator_(std::move(coordinator)), tls_(std::move(tls)), identity_(std::move(identity)) {}

InferenceRequester::~InferenceRequester() {
  if (coordinator_) coordinator_->Close();
}

Result<std::unique_ptr<InferenceRequester>> InferenceRequester::Connect(
    const std::string& host, uint16_t port, const net::TlsConfig& tls,
    const net::ConnectOptions& coordinator, milliseconds timeout) {
  FEDSLICE_ASSIGN_OR_RETURN(std::string identity, net::CertificateIdentity(tls.cert_file));
  FEDSLICE_ASSIGN_OR_RETURN(std::unique_ptr<net::Channel> channel,
                            net::Channel::Connect(host, port, tls, timeout, coordinator));
  return std::unique_ptr<InferenceRequester>(
      new InferenceRequester(std::move(channel), tls, std::move(identity)));
}

namespace {

// Everything Run() keeps across pipeline attempts.
struct RunState {
  const Tensor* images = nullptr;
  int64_t n = 0;
  int64_t micro_batch = 0;
  int64_t num_batches = 0;
  int classes = 0;
  std::vector<int64_t> sample_shape;
  std::vector<char> answered;  // per batch
  int64_t answered_batches = 0;
  std::vector<Clock::time_point> sent_at;  // per batch, last send
  std::vector<double> latencies_ms;
  std::optional<Clock::time_point> first_send;
  Clock::time_point last_result;
  codec::CodecSpec fp32;

  int64_t BatchSize(int64_t id) const { return std::min(micro_batch, n - id * micro_batch); }
};

// Why a pipeline attempt ended without answering everything.
struct Failure {
  std::string reason;
  std::string failed_client;  // empty when unknown
  bool coordinator_said = false;
};

// Checks that `plan` is one Run() can stream `state`'s images through; sets state->classes.
Status CheckPlan(const proto::PipelinePlan& plan, uint32_t micro_batch, RunState* state) {
  if (plan.pipeline_id() == 0) return Status::InvalidArgument("pipeline id 0");
  if (plan.stages_size() == 0) return Status::InvalidArgument("no stages");
  if (plan.micro_batch() != micro_batch) {
    return Status::InvalidArgument("micro_batch " + std::to_string(plan.micro_batch()) +
                                   ", asked for " + std::to_string(micro_batch));
  }
  const auto& input = plan.model().input_shape();
  if (!std::equal(input.begin(), input.end(), state->sample_shape.begin(),
                  state->sample_shape.end())) {
    return Status::InvalidArgument(
        "the model '" + plan.model().name() + "' takes samples of shape " +
        Tensor::ShapeToString(std::vector<int64_t>(input.begin(), input.end())) +
        ", the images are " + Tensor::ShapeToString(state->sample_shape));
  }
  FEDSLICE_ASSIGN_OR_RETURN(Chain chain, Chain::Create(plan.model(), plan.chain()));
  uint32_t next = 0;
  for (const proto::StageInfo& stage : plan.stages()) {
    if (stage.unit_begin() != next || stage.unit_end() <= stage.unit_begin()) {
      return Status::InvalidArgument("stage " + std::to_string(stage.index()) + " has units [" +
                                     std::to_string(stage.unit_begin()) + ", " +
                                     std::to_string(stage.unit_end()) + "), expected to start at " +
                                     std::to_string(next));
    }
    next = stage.unit_end();
    FEDSLICE_RETURN_IF_ERROR(ParseEndpoint(stage.endpoint()).status());
    if (stage.client_id().empty()) return Status::InvalidArgument("a stage without a client id");
  }
  if (static_cast<int>(next) != chain.num_units()) {
    return Status::InvalidArgument("the stages cover " + std::to_string(next) + " of " +
                                   std::to_string(chain.num_units()) + " units");
  }
  if (state->classes != 0 && state->classes != plan.model().num_classes()) {
    return Status::InvalidArgument("the model changed its number of classes between plans");
  }
  state->classes = plan.model().num_classes();
  return Status::Ok();
}

}  // namespace

Result<InferenceReport> InferenceRequester::Run(const Tensor& images,
                                                const RequesterOptions& options) try {
  // --- Options and inputs.
  if (options.micro_batch < 1 || options.micro_batch > StageExecutor::kMaxBatch) {
    return Status::InvalidArgument("micro_batch must be in [1, " +
                                   std::to_string(StageExecutor::kMaxBatch) + "]");
  }
  if (!IsActivationCodec(options.activation_codec)) {
    return Status::InvalidArgument("activation codec '" + options.activation_codec + "' is not " +
                                   std::string(kActivationCodecList));
  }
  if (options.max_replans < 0) return Status::InvalidArgument("max_replans must be >= 0");
  for (milliseconds t : {options.plan_timeout, options.progress_timeout, options.connect_timeout,
                         options.failure_grace}) {
    if (t.count() <= 0) return Status::InvalidArgument("timeouts must be > 0");
  }
  if (images.rank() < 2 || images.batch() < 1) {
    return Status::InvalidArgument("images must be [N, ...] with N >= 1, got " +
                                   images.ShapeString());
  }
  if (const size_t bad = net::FindNonFinite(images.span()); bad < images.span().size()) {
    return Status::InvalidArgument("images: value " + std::to_string(bad) + " is not finite");
  }

  const auto started = Clock::now();
  RunState state;
  state.images = &images;
  state.n = images.batch();
  state.micro_batch = options.micro_batch;
  state.num_batches = (state.n + state.micro_batch - 1) / state.micro_batch;
  state.sample_shape.assign(images.shape().begin() + 1, images.shape().end());
  state.answered.assign(static_cast<size_t>(state.num_batches), 0);
  state.sent_at.resize(static_cast<size_t>(state.num_batches));
  FEDSLICE_ASSIGN_OR_RETURN(state.fp32, codec::ParseCodec(kActivationFp32));

  InferenceReport report;
  report.images = state.n;
  report.batches = state.num_batches;

  // --- The coordinator's messages, read on their own thread for the whole run.
  EventQueue queue;
  std::atomic<bool> stop_coordinator{false};
  std::thread coordinator_reader(ReadLoop, coordinator_.get(), Event::Source::kCoordinator, 0,
                                 &stop_coordinator, &queue);
  struct JoinOnExit {
    std::atomic<bool>* stop;
    std::thread* thread;
    ~JoinOnExit() {
      stop->store(true);
      if (thread->joinable()) thread->join();
    }
  } join_reader{&stop_coordinator, &coordinator_reader};

  auto send_close = [&](uint64_t pipeline_id, bool failed, const std::string& reason) {
    proto::Envelope close;
    close.mutable_pipeline_close()->set_pipeline_id(pipeline_id);
    close.mutable_pipeline_close()->set_failed(failed);
    close.mutable_pipeline_close()->set_reason(reason.substr(0, 1000));
    if (Status sent = coordinator_->Send(std::move(close)); !sent.ok()) {
      spdlog::warn("cannot close pipeline {} at the coordinator: {}", pipeline_id, sent.ToString());
    }
  };

  std::vector<std::string> excluded = options.exclude_clients;
  uint64_t generation = 0;

  // Asks for a pipeline and waits for its plan; coordinator messages about earlier pipelines
  // are skipped, as are stage events of earlier attempts.
  auto request_plan = [&]() -> Result<proto::PipelinePlan> {
    const uint64_t token = next_token_++;
    proto::Envelope envelope;
    proto::PipelineRequest* request = envelope.mutable_pipeline_request();
    request->set_request_token(token);
    request->set_num_stages(options.num_stages);
    request->set_micro_batch(options.micro_batch);
    request->set_activation_codec(options.activation_codec);
    request->set_in_flight(options.in_flight);
    request->set_split_layers(options.split_layers);
    for (const std::string& id : excluded) request->add_exclude_clients(id);
    FEDSLICE_RETURN_IF_ERROR(
        coordinator_->Send(std::move(envelope)).WithContext("sending the pipeline request"));
    const auto deadline = Clock::now() + options.plan_timeout;
    while (true) {
      auto event = queue.Pop(deadline);
      if (!event) {
        return Status::DeadlineExceeded("no pipeline plan from the coordinator within " +
                                        std::to_string(options.plan_timeout.count()) + " ms");
      }
      if (event->source != Event::Source::kCoordinator) continue;  // an old stage's
      if (!event->message.ok()) {
        return Status::Unavailable("connection to the coordinator lost: " +
                                   event->message.status().ToString());
      }
      const proto::Envelope& m = *event->message;
      if (m.has_pipeline_plan() && m.pipeline_plan().request_token() == token) {
        return m.pipeline_plan();
      }
      if (m.has_error()) return CoordinatorRefusal(m.error());
      if (m.has_bye()) {
        return Status::Unavailable(
            "the coordinator closed the connection: " + proto::ByeReason_Name(m.bye().reason()) +
            " " + m.bye().message());
      }
      spdlog::debug("skipping {} from the coordinator while waiting for a plan", net::BodyName(m));
    }
  };

  // Connects to the plan's first and last stages and starts their readers.
  auto open_stream = [&](const proto::PipelinePlan& plan, Stream* stream,
                         Failure* failure) -> bool {
    const int k = plan.stages_size();
    auto connect = [&](const proto::StageInfo& stage, bool upstream,
                       bool sink) -> std::unique_ptr<net::Channel> {
      auto endpoint = ParseEndpoint(stage.endpoint());  // checked by CheckPlan
      net::ConnectOptions connect_options;
      connect_options.server_name = stage.client_id();
      connect_options.expected_identity = stage.client_id();
      auto channel = net::Channel::Connect(endpoint->host, endpoint->port, tls_,
                                           options.connect_timeout, connect_options);
      Status status = channel.status();
      if (channel.ok()) {
        proto::Envelope join;
        join.mutable_stage_join()->set_pipeline_id(plan.pipeline_id());
        join.mutable_stage_join()->set_upstream(upstream);
        join.mutable_stage_join()->set_sink(sink);
        status = (*channel)->Send(std::move(join));
        if (status.ok()) return std::move(channel).value();
      }
      *failure = {"cannot join stage " + std::to_string(stage.index()) + " on " +
                      stage.client_id() + " at " + stage.endpoint() + ": " + status.ToString(),
                  stage.client_id(), false};
      return nullptr;
    };
    // The sink first, so that the last stage has somewhere to send the first result.
    if (k > 1) {
      stream->sink = connect(plan.stages(k - 1), false, true);
      if (!stream->sink) return false;
    }
    stream->upstream = connect(plan.stages(0), true, k == 1);
    if (!stream->upstream) return false;
    stream->readers.emplace_back(ReadLoop, stream->upstream.get(),
                                 k == 1 ? Event::Source::kSink : Event::Source::kUpstream,
                                 stream->generation, &stream->stop, &queue);
    if (stream->sink) {
      stream->readers.emplace_back(ReadLoop, stream->sink.get(), Event::Source::kSink,
                                   stream->generation, &stream->stop, &queue);
    }
    return true;
  };

  // Streams every unanswered batch through the pipeline of `plan`. Returns nullopt when all
  // are answered, else why the pipeline was given up. Err only on a fatal problem (the
  // coordinator gone).
  auto stream_batches = [&](const proto::PipelinePlan& plan, Stream* stream,
                            std::set<int64_t>* outstanding) -> Result<std::optional<Failure>> {
    const int k = plan.stages_size();
    const uint64_t pipeline_id = plan.pipeline_id();
    const std::string& first_client = plan.stages(0).client_id();
    const std::string& last_client = plan.stages(k - 1).client_id();
    const uint32_t last_unit = plan.stages(k - 1).unit_end();
    const size_t window = options.max_outstanding != 0
                              ? options.max_outstanding
                              : static_cast<size_t>(k) * (plan.in_flight() + 1) + 1;
    std::vector<int64_t> to_send;
    for (int64_t id = 0; id < state.num_batches; ++id) {
      if (!state.answered[static_cast<size_t>(id)]) to_send.push_back(id);
    }
    size_t next = 0;
    auto last_progress = Clock::now();
    std::optional<Failure> failure;
    Clock::time_point grace_end;
    auto stage_failed = [&](std::string reason, const std::string& client) {
      if (failure) return;
      failure = Failure{std::move(reason), client, false};
      grace_end = Clock::now() + options.failure_grace;
    };
    Tensor input;
    Tensor logits;
    const std::vector<int64_t>& shape = state.sample_shape;

    while (state.answered_batches < state.num_batches) {
      // Send while the window allows; not once the pipeline is failing.
      while (!failure && outstanding->size() < window && next < to_send.size()) {
        const int64_t id = to_send[next++];
        if (state.answered[static_cast<size_t>(id)]) continue;
        const int64_t rows = state.BatchSize(id);
        std::vector<int64_t> batch_shape{rows};
        batch_shape.insert(batch_shape.end(), shape.begin(), shape.end());
        input.Resize(batch_shape);
        const int64_t per = input.sample_size();
        std::copy_n(images.data() + id * state.micro_batch * per, rows * per, input.data());
        proto::Envelope envelope;
        proto::ActivationBatch* batch = envelope.mutable_activation_batch();
        batch->set_pipeline_id(pipeline_id);
        batch->set_batch_id(static_cast<uint64_t>(id));
        batch->set_unit(0);
        batch->set_num_samples(static_cast<uint32_t>(rows));
        FEDSLICE_RETURN_IF_ERROR(EncodeActivation(input, state.fp32, batch->mutable_data()));
        if (Status sent = stream->upstream->Send(std::move(envelope)); !sent.ok()) {
          stage_failed("sending to stage 0 on " + first_client + ": " + sent.ToString(),
                       first_client);
          break;
        }
        const auto now = Clock::now();
        state.sent_at[static_cast<size_t>(id)] = now;
        if (!state.first_send) state.first_send = now;
        outstanding->insert(id);
        report.peak_outstanding = std::max(report.peak_outstanding, outstanding->size());
      }

      const auto deadline = failure ? grace_end : last_progress + options.progress_timeout;
      auto event = queue.Pop(deadline);
      if (!event) {
        if (Clock::now() < deadline) continue;
        if (failure) return failure;  // no word from the coordinator: blame the stage
        return std::optional<Failure>(Failure{
            "no result within " + std::to_string(options.progress_timeout.count()) + " ms (" +
                std::to_string(outstanding->size()) + " micro-batches unanswered)",
            "", false});
      }
      if (event->source == Event::Source::kCoordinator) {
        if (!event->message.ok()) {
          return Status::Unavailable("connection to the coordinator lost: " +
                                     event->message.status().ToString());
        }
        const proto::Envelope& m = *event->message;
        if (m.has_pipeline_failed() && m.pipeline_failed().pipeline_id() == pipeline_id) {
          return std::optional<Failure>(
              Failure{"the coordinator reports: " + m.pipeline_failed().reason(),
                      m.pipeline_failed().failed_client(), true});
        }
        if (m.has_bye()) {
          return Status::Unavailable(
              "the coordinator closed the connection: " + proto::ByeReason_Name(m.bye().reason()) +
              " " + m.bye().message());
        }
        if (m.has_error()) {
          spdlog::warn("coordinator reports {}: {}", proto::ErrorCode_Name(m.error().code()),
                       m.error().message());
        }
        continue;  // e.g. PipelineFailed of an earlier pipeline
      }
      if (event->generation != stream->generation) continue;  // an earlier pipeline's stage
      const bool from_sink = event->source == Event::Source::kSink;
      const std::string& client = from_sink ? last_client : first_client;
      const std::string which =
          from_sink ? "the last stage (" + last_client + ")" : "stage 0 (" + first_client + ")";
      if (!event->message.ok()) {
        stage_failed("connection to " + which + " lost: " + event->message.status().ToString(),
                     client);
        continue;
      }
      const proto::Envelope& m = *event->message;
      if (m.has_error()) {
        stage_failed(which + " reports " + proto::ErrorCode_Name(m.error().code()) + ": " +
                         m.error().message(),
                     client);
        continue;
      }
      if (m.has_bye()) {
        stage_failed(which + " said bye: " + proto::ByeReason_Name(m.bye().reason()) + " " +
                         m.bye().message(),
                     client);
        continue;
      }
      if (!m.has_activation_batch()) {
        spdlog::warn("unexpected {} from {}", net::BodyName(m), which);
        continue;
      }
      const proto::ActivationBatch& result = m.activation_batch();
      if (!from_sink) {
        stage_failed(which + " sent an ActivationBatch upstream", client);
        continue;
      }
      const int64_t id = static_cast<int64_t>(std::min<uint64_t>(
          result.batch_id(), static_cast<uint64_t>(std::numeric_limits<int64_t>::max())));
      if (result.pipeline_id() != pipeline_id || id >= state.num_batches ||
          state.answered[static_cast<size_t>(id)] || outstanding->count(id) == 0) {
        ++report.duplicates_discarded;
        continue;
      }
      const int64_t rows = state.BatchSize(id);
      Status valid;
      if (result.unit() != last_unit) {
        valid = Status::InvalidArgument("unit " + std::to_string(result.unit()) + ", expected " +
                                        std::to_string(last_unit));
      } else if (result.num_samples() != static_cast<uint64_t>(rows)) {
        valid = Status::InvalidArgument(std::to_string(result.num_samples()) +
                                        " samples, expected " + std::to_string(rows));
      } else if (result.data().codec() != kActivationFp32) {
        valid = Status::InvalidArgument("logits encoded as '" + result.data().codec() +
                                        "', expected fp32");
      } else if (result.carry().num_values() != 0) {
        valid = Status::InvalidArgument("a carry next to the logits");
      } else {
        valid = DecodeActivation(result.data(), {rows, state.classes}, &logits);
      }
      if (!valid.ok()) {
        stage_failed(which + " sent a bad result for micro-batch " + std::to_string(id) + ": " +
                         valid.message(),
                     client);
        continue;
      }
      const auto now = Clock::now();
      std::copy_n(logits.data(), rows * state.classes,
                  report.logits.data() + id * state.micro_batch * state.classes);
      state.answered[static_cast<size_t>(id)] = 1;
      ++state.answered_batches;
      report.answered += rows;
      outstanding->erase(id);
      state.latencies_ms.push_back(Ms(now - state.sent_at[static_cast<size_t>(id)]));
      state.last_result = now;
      last_progress = now;
      if (options.on_progress) options.on_progress(report.answered);
    }
    return failure;  // all answered (a failure seen meanwhile no longer matters)
  };

  // --- Pipelines until every batch is answered.
  while (state.answered_batches < state.num_batches) {
    FEDSLICE_ASSIGN_OR_RETURN(proto::PipelinePlan plan, request_plan());
    if (Status usable = CheckPlan(plan, options.micro_batch, &state); !usable.ok()) {
      send_close(plan.pipeline_id(), true, "unusable plan: " + usable.message());
      return Status::InvalidArgument("the coordinator's plan is unusable: " + usable.message());
    }
    if (report.logits.size() == 0) report.logits = Tensor({state.n, state.classes});
    report.plans.push_back(plan);
    if (options.on_plan) options.on_plan(plan);
    spdlog::info("pipeline {}: {} stage(s), predicted {:.1f} samples/s", plan.pipeline_id(),
                 plan.stages_size(), plan.predicted_samples_per_s());

    Stream stream;
    stream.generation = ++generation;
    Failure failure;
    std::set<int64_t> outstanding;
    std::optional<Failure> failed;
    if (open_stream(plan, &stream, &failure)) {
      FEDSLICE_ASSIGN_OR_RETURN(failed, stream_batches(plan, &stream, &outstanding));
    } else {
      failed = failure;
    }
    stream.Shutdown();
    if (!failed) {
      send_close(plan.pipeline_id(), false, "done");
      break;
    }
    if (state.answered_batches == state.num_batches) {
      // Everything was answered while the failure was confirmed: nothing to replay.
      if (!failed->coordinator_said) send_close(plan.pipeline_id(), true, failed->reason);
      break;
    }
    spdlog::warn("pipeline {} given up ({} of {} micro-batches answered): {}", plan.pipeline_id(),
                 state.answered_batches, state.num_batches, failed->reason);
    report.failures.push_back("pipeline " + std::to_string(plan.pipeline_id()) + ": " +
                              failed->reason);
    report.batches_replayed += static_cast<int64_t>(outstanding.size());
    if (!failed->coordinator_said) send_close(plan.pipeline_id(), true, failed->reason);
    if (!failed->failed_client.empty() &&
        std::find(excluded.begin(), excluded.end(), failed->failed_client) == excluded.end()) {
      excluded.push_back(failed->failed_client);
    }
    if (static_cast<int>(report.failures.size()) > options.max_replans) {
      return Status::Aborted(std::to_string(report.failures.size()) +
                             " pipelines failed (at most " + std::to_string(options.max_replans) +
                             " re-plans allowed), " + std::to_string(report.answered) + " of " +
                             std::to_string(state.n) +
                             " images answered: " + Join(report.failures, "; "));
    }
  }

  const auto done = Clock::now();
  report.seconds = std::chrono::duration<double>(done - started).count();
  if (state.first_send) {
    report.stream_seconds =
        std::chrono::duration<double>(state.last_result - *state.first_send).count();
  }
  report.images_per_s =
      report.stream_seconds > 0 ? static_cast<double>(state.n) / report.stream_seconds : 0;
  report.latency_p50_ms = Percentile(state.latencies_ms, 50);
  report.latency_p95_ms = Percentile(state.latencies_ms, 95);
  report.latency_p99_ms = Percentile(state.latencies_ms, 99);
  report.latency_max_ms = Percentile(state.latencies_ms, 100);
  return report;
} catch (const std::exception& e) {
  return Status::Internal(std::string("inference requester: ") + e.what());
}

}  // namespace fedslice::slicing
