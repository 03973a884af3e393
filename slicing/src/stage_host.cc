#include "fedslice/slicing/stage_host.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fedslice/common/codec.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/server.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/common/threading.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/pipeline.h"

namespace fedslice::slicing {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr milliseconds kFirstRetryDelay{100};
constexpr milliseconds kMaxRetryDelay{1000};

bool IsWildcard(const std::string& address) {
  return address == "0.0.0.0" || address == "::" || address == "[::]";
}

// Sets the engine's (process-wide) thread count for the scope and restores it afterwards.
class ScopedEngineThreads {
 public:
  explicit ScopedEngineThreads(int threads) {
    if (threads > 0 && NumThreads() != threads) {
      previous_ = NumThreads();
      SetNumThreads(threads);
    }
  }
  ~ScopedEngineThreads() {
    if (previous_ > 0) SetNumThreads(previous_);
  }
  ScopedEngineThreads(const ScopedEngineThreads&) = delete;
  ScopedEngineThreads& operator=(const ScopedEngineThreads&) = delete;

 private:
  int previous_ = 0;
};

std::string PipelineName(uint64_t id) { return "pipeline " + std::to_string(id); }

}  // namespace

Status StageHostOptions::Validate() const {
  if (bind_address.empty()) return Status::InvalidArgument("stage bind address is empty");
  if (IsWildcard(bind_address) && advertise_host.empty()) {
    return Status::InvalidArgument("stage bind address " + bind_address +
                                   " is a wildcard: give the host other stages reach this one "
                                   "by (advertise_host; fedslice-client --stage-advertise)");
  }
  if (!std::isfinite(slowdown) || slowdown < 1.0) {
    return Status::InvalidArgument("stage slowdown must be a finite factor >= 1");
  }
  if (io_threads < 1 || io_threads > 16) {
    return Status::InvalidArgument("stage io_threads must be in [1, 16]");
  }
  if (engine_threads < 0) return Status::InvalidArgument("stage engine_threads must be >= 0");
  if (downstream_connect_budget <= milliseconds::zero() || sink_wait <= milliseconds::zero()) {
    return Status::InvalidArgument(
        "stage downstream_connect_budget and sink_wait must be positive");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Implementation state. One mutex guards everything mutable; network calls (Send, Close,
// Pause/ResumeReading, AsyncConnect) are made with it released, because a session may call
// back into us from its strand.

namespace {

// One hosted slice. The fields below `// guarded` are guarded by Impl::mu.
struct Slice {
  uint64_t pipeline_id = 0;
  uint32_t stage_index = 0;
  uint32_t num_stages = 1;
  bool last = false;
  std::string upstream_identity;
  std::string requester_identity;
  std::string downstream_identity;
  Endpoint downstream_endpoint;  // intermediate stages only
  uint32_t micro_batch = 1;
  size_t in_flight = 1;
  std::vector<int64_t> input_shape;         // MainShape(unit_begin): per-sample shape entering
  codec::CodecSpec out_codec;               // activation codec, fp32 for the last stage's logits
  std::unique_ptr<StageExecutor> executor;  // compute thread only

  struct Item {
    proto::ActivationBatch batch;
    net::SessionPtr from;
    uint64_t seq = 0;
    Clock::time_point arrived;  // when it was queued: when an emulated device could start it
  };
  // guarded
  std::deque<Item> queue;
  net::SessionPtr upstream;
  net::SessionPtr sink;
  net::SessionPtr paused;              // upstream session we paused (queue full)
  net::SessionPtr downstream_session;  // our connection to the next stage, once open and joined
  net::SessionPtr connecting;          // connection attempt in progress
  bool connect_done = false;
  std::optional<Result<net::SessionPtr>> connect_result;
  size_t unsent = 0;  // computed batches whose Send callback has not fired
  bool released = false;
  bool failed = false;
  Status failure;

  // Where the compute thread's time went, for the summary logged at release (guarded).
  struct Timing {
    uint64_t batches = 0;
    double layers_cpu = 0;          // the layers' CPU time (what slowdown scales)
    double run_wall = 0;            // decode + layers + encode, wall clock
    double held = 0;                // emulation: held beyond run_wall
    double input_wait = 0;          // queue empty, after the first batch
    double send_wait = 0;           // waiting for the destination or a send slot
    double handing = 0;             // handing the batch to the session (validate, serialize, queue)
    Clock::time_point first_start;  // the first batch's processing began
    Clock::time_point last_done;    // the last batch was handed on
    double fastest = 0;  // the lowest layer time of a batch so far (what emulation holds to)
  } timing;
  // Emulation: when the emulated device is done with the last batch it started (guarded).
  Clock::time_point device_free;
};

enum class Role { kPending, kJoined };

struct Peer {
  net::SessionPtr session;
  Role role = Role::kPending;
  bool upstream = false;
  bool sink = false;
  std::weak_ptr<Slice> slice;  // the slice it joined
  // Closes the session if it has not joined by then; cancelled on join and on close.
  std::shared_ptr<boost::asio::steady_timer> join_deadline;
};

struct FailureNote {
  uint64_t pipeline_id = 0;
  uint32_t stage_index = 0;
  Status why;
};

// A reply or action decided under the lock, carried out after it is released.
struct Deferred {
  std::vector<std::pair<net::SessionPtr, proto::Envelope>> sends;
  std::vector<std::pair<net::SessionPtr, Status>> closes;
  net::SessionPtr pause;
  void Run() {
    for (auto& [session, envelope] : sends) {
      Status sent = session->Send(std::move(envelope));
      (void)sent;  // best effort: the peer may be gone already
    }
    if (pause) pause->PauseReading();
    for (auto& [session, why] : closes) session->Close(why);
  }
};

}  // namespace

struct StageHost::Impl : std::enable_shared_from_this<StageHost::Impl> {
  Impl(const net::TlsConfig& tls_config, StageHostOptions opts)
      : tls(tls_config), options(std::move(opts)) {}

  // Declared first so that it is destroyed last: sessions (and the handlers they hold) must
  // not outlive the io_context their sockets belong to.
  boost::asio::io_context io;
  // Set at Start, constant afterwards.
  net::TlsConfig tls;
  StageHostOptions options;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::vector<std::thread> io_threads;
  std::thread compute_thread;
  std::unique_ptr<net::Server> server;
  std::shared_ptr<net::SessionHandler> server_handler;
  std::shared_ptr<net::SessionHandler> downstream_handler;
  std::string endpoint;
  uint16_t port = 0;

  mutable std::mutex mu;
  std::condition_variable cv;  // compute thread: work, sink joined, connect done, send slots
  bool stop = false;
  std::shared_ptr<Slice> slice;
  std::unordered_map<uint64_t, Peer> peers;  // server-side sessions by id
  std::deque<FailureNote> failures;
  FailureCallback on_failure;
  StageHostStats stats;
  int io_running = 0;
  std::condition_variable io_cv;

  // --- Server side (io threads) ------------------------------------------------------------

  void OnServerOpen(const net::SessionPtr& session) {
    // A connection that never joins would hold a slot (and be kept alive by heartbeats)
    // forever: it gets the handshake timeout to say what it is here for.
    auto timer = std::make_shared<boost::asio::steady_timer>(io, tls.handshake_timeout);
    timer->async_wait([weak = weak_from_this(), session](const boost::system::error_code& ec) {
      if (ec) return;  // cancelled: joined or closed
      auto impl = weak.lock();
      if (!impl) return;
      {
        std::lock_guard<std::mutex> lock(impl->mu);
        auto it = impl->peers.find(session->id());
        if (it == impl->peers.end() || it->second.role != Role::kPending) return;
      }
      const std::string message = "no StageJoin within " +
                                  std::to_string(impl->tls.handshake_timeout.count()) +
                                  " ms of connecting";
      spdlog::warn("stage: '{}' ({}): {}", session->peer_identity(), session->remote_address(),
                   message);
      Status sent = session->Send(net::MakeError(proto::ERROR_UNEXPECTED_MESSAGE, message));
      (void)sent;
      session->Close(Status::DeadlineExceeded(message));
    });
    std::lock_guard<std::mutex> lock(mu);
    Peer peer;
    peer.session = session;
    peer.join_deadline = std::move(timer);
    peers[session->id()] = std::move(peer);
  }

  void OnServerMessage(const net::SessionPtr& session, proto::Envelope envelope);
  void OnServerClosed(const net::SessionPtr& session) {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = peers.find(session->id()); it != peers.end()) {
      if (it->second.join_deadline) it->second.join_deadline->cancel();
      peers.erase(it);
    }
    if (!slice) return;
    if (slice->upstream == session) slice->upstream.reset();
    if (slice->sink == session) slice->sink.reset();
    if (slice->paused == session) slice->paused.reset();
  }

  // --- Downstream side (io threads) --------------------------------------------------------

  void OnDownstreamMessage(const net::SessionPtr& session, const proto::Envelope& envelope) {
    switch (envelope.body_case()) {
      case proto::Envelope::kError:
        // The next stage refused something we sent: a bug or a version skew, worth a log line;
        // the pipeline's own failure handling (coordinator, requester) copes with the rest.
        spdlog::warn("stage: next stage '{}' reports {}: {}", session->peer_identity(),
                     proto::ErrorCode_Name(envelope.error().code()), envelope.error().message());
        return;
      case proto::Envelope::kBye:
        return;  // the close follows
      default: {
        Status sent = session->Send(net::MakeError(
            proto::ERROR_UNEXPECTED_MESSAGE,
            net::BodyName(envelope) + " is not a message a next stage sends", envelope.seq()));
        (void)sent;
        return;
      }
    }
  }

  void OnDownstreamClosed(const net::SessionPtr& session, const Status& reason) {
    std::lock_guard<std::mutex> lock(mu);
    if (!slice || slice->downstream_session != session) return;
    slice->downstream_session.reset();
    FailLocked(*slice, Status::Unavailable(
                           "the connection to the next stage '" + slice->downstream_identity +
                           "' at " + slice->downstream_endpoint.ToString() +
                           " closed: " + (reason.ok() ? "by the peer" : reason.ToString())));
  }

  // --- Shared -------------------------------------------------------------------------------

  // Marks `s` failed (once), drops its queue and wakes the compute thread, which calls the
  // failure callback. mu held.
  void FailLocked(Slice& s, const Status& why) {
    if (s.failed || s.released) return;
    s.failed = true;
    s.failure = why;
    stats.batches_dropped += s.queue.size();
    s.queue.clear();
    stats.queued = 0;
    ++stats.failures;
    spdlog::warn("stage: {} (stage {}) failed: {}", PipelineName(s.pipeline_id), s.stage_index,
                 why.ToString());
    failures.push_back({s.pipeline_id, s.stage_index, why});
    cv.notify_all();
  }

  // Takes the hosted slice away (mu held): it is marked released, its sessions and any
  // paused upstream are returned for closing.
  void DetachLocked(Deferred* deferred, const std::string& why) {
    if (!slice) return;
    std::shared_ptr<Slice> s = std::move(slice);
    slice.reset();
    s->released = true;
    stats.batches_dropped += s->queue.size();
    s->queue.clear();
    stats.queued = 0;
    const Status reason = Status::Ok();  // Bye BYE_NORMAL: done with this pipeline
    for (net::SessionPtr* p : {&s->upstream, &s->sink, &s->downstream_session, &s->connecting}) {
      if (*p) deferred->closes.emplace_back(std::move(*p), reason);
      p->reset();
    }
    s->paused.reset();
    const Slice::Timing& t = s->timing;
    if (t.batches > 0) {
      const double n = static_cast<double>(t.batches);
      spdlog::info(
          "stage: {} stage {}: {} batches; per batch: layers {:.2f} ms CPU, run {:.2f} ms, "
          "held {:.2f} ms (fastest layers {:.2f} ms), waited {:.2f} ms for input and {:.2f} ms "
          "to send, handing on {:.2f} ms; one batch every {:.2f} ms",
          PipelineName(s->pipeline_id), s->stage_index, t.batches, 1e3 * t.layers_cpu / n,
          1e3 * t.run_wall / n, 1e3 * t.held / n, 1e3 * t.fastest, 1e3 * t.input_wait / n,
          1e3 * t.send_wait / n, 1e3 * t.handing / n,
          t.batches > 1
              ? 1e3 * std::chrono::duration<double>(t.last_done - t.first_start).count() / (n - 1)
              : 0.0);
    }
    spdlog::info("stage: {} released ({})", PipelineName(s->pipeline_id), why);
    cv.notify_all();
  }

  // --- Compute thread -----------------------------------------------------------------------

  void ComputeLoop();
  void Process(const std::shared_ptr<Slice>& s, Slice::Item item);
  // Emulation: times the slice on synthetic input before its first batch (compute thread).
  void TimeSlice(const std::shared_ptr<Slice>& s);
  // The session results go to: the sink (last stage) or the next stage, connecting lazily.
  // Blocks (bounded); an error means the stage cannot deliver (or was released/stopped).
  Result<net::SessionPtr> Destination(const std::shared_ptr<Slice>& s);
  Result<net::SessionPtr> ConnectDownstream(const std::shared_ptr<Slice>& s);
  // Answers a batch the slice cannot run.
  void Reject(const Slice::Item& item, proto::ErrorCode code, const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ++stats.batches_rejected;
    }
    spdlog::warn("stage: batch {} of {} refused: {}", item.batch.batch_id(),
                 PipelineName(item.batch.pipeline_id()), message);
    if (item.from) {
      Status sent = item.from->Send(net::MakeError(code, message, item.seq));
      (void)sent;
    }
  }

  void Shutdown();
};

namespace {

class ServerHandler : public net::SessionHandler {
 public:
  explicit ServerHandler(std::weak_ptr<StageHost::Impl> impl) : impl_(std::move(impl)) {}
  void OnOpen(const net::SessionPtr& session) override {
    if (auto impl = impl_.lock()) impl->OnServerOpen(session);
  }
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override {
    if (auto impl = impl_.lock()) impl->OnServerMessage(session, std::move(envelope));
  }
  void OnClosed(const net::SessionPtr& session, const Status& reason) override {
    (void)reason;
    if (auto impl = impl_.lock()) impl->OnServerClosed(session);
  }

 private:
  std::weak_ptr<StageHost::Impl> impl_;
};

class DownstreamHandler : public net::SessionHandler {
 public:
  explicit DownstreamHandler(std::weak_ptr<StageHost::Impl> impl) : impl_(std::move(impl)) {}
  void OnOpen(const net::SessionPtr& session) override { (void)session; }
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override {
    if (auto impl = impl_.lock()) impl->OnDownstreamMessage(session, envelope);
  }
  void OnClosed(const net::SessionPtr& session, const Status& reason) override {
    if (auto impl = impl_.lock()) impl->OnDownstreamClosed(session, reason);
  }

 private:
  std::weak_ptr<StageHost::Impl> impl_;
};

}  // namespace

void StageHost::Impl::OnServerMessage(const net::SessionPtr& session, proto::Envelope envelope) {
  Deferred deferred;
  auto refuse = [&](proto::ErrorCode code, const std::string& message, bool close) {
    spdlog::warn("stage: {} from '{}' ({}) refused: {}", net::BodyName(envelope),
                 session->peer_identity(), session->remote_address(), message);
    deferred.sends.emplace_back(session, net::MakeError(code, message, envelope.seq()));
    if (close) deferred.closes.emplace_back(session, Status::InvalidArgument(message));
  };
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = peers.find(session->id());
    if (it == peers.end()) return;  // closed meanwhile
    Peer& peer = it->second;
    switch (envelope.body_case()) {
      case proto::Envelope::kBye:
        break;  // the close follows
      case proto::Envelope::kError:
        spdlog::warn("stage: '{}' reports {}: {}", session->peer_identity(),
                     proto::ErrorCode_Name(envelope.error().code()), envelope.error().message());
        break;
      case proto::Envelope::kStageJoin: {
        const proto::StageJoin& join = envelope.stage_join();
        if (peer.role != Role::kPending) {
          refuse(proto::ERROR_UNEXPECTED_MESSAGE, "this session has already joined", false);
          break;
        }
        if (!slice || slice->pipeline_id != join.pipeline_id()) {
          refuse(proto::ERROR_NOT_AUTHORIZED,
                 "this stage does not host " + PipelineName(join.pipeline_id()), true);
          break;
        }
        Slice& s = *slice;
        const std::string& who = session->peer_identity();
        if (join.upstream() && who != s.upstream_identity) {
          refuse(proto::ERROR_NOT_AUTHORIZED,
                 "'" + who + "' may not send activations to stage " +
                     std::to_string(s.stage_index) + " of " + PipelineName(s.pipeline_id),
                 true);
          break;
        }
        if (join.sink() && !s.last) {
          refuse(proto::ERROR_NOT_AUTHORIZED,
                 "stage " + std::to_string(s.stage_index) + " of " + PipelineName(s.pipeline_id) +
                     " is not the last: it has no results to sink",
                 true);
          break;
        }
        if (join.sink() && who != s.requester_identity) {
          refuse(proto::ERROR_NOT_AUTHORIZED,
                 "'" + who + "' is not the requester of " + PipelineName(s.pipeline_id), true);
          break;
        }
        peer.role = Role::kJoined;
        if (peer.join_deadline) peer.join_deadline->cancel();
        peer.upstream = join.upstream();
        peer.sink = join.sink();
        peer.slice = slice;
        if (join.upstream()) {
          if (s.upstream && s.upstream != session) {
            deferred.closes.emplace_back(s.upstream,
                                         Status::Aborted("replaced by a newer upstream session"));
          }
          s.upstream = session;
          if (s.queue.size() >= s.in_flight) {
            // A reconnecting upstream finds the queue still full.
            s.paused = session;
            deferred.pause = session;
            ++stats.upstream_pauses;
          }
        }
        if (join.sink()) s.sink = session;
        spdlog::info("stage: '{}' joined {} as{}{}", who, PipelineName(s.pipeline_id),
                     join.upstream() ? " upstream" : "", join.sink() ? " sink" : "");
        cv.notify_all();
        break;
      }
      case proto::Envelope::kActivationBatch: {
        const proto::ActivationBatch& batch = envelope.activation_batch();
        if (peer.role == Role::kPending) {
          refuse(proto::ERROR_UNEXPECTED_MESSAGE, "send StageJoin before activations", true);
          ++stats.batches_rejected;
          break;
        }
        if (!peer.upstream) {
          refuse(proto::ERROR_UNEXPECTED_MESSAGE,
                 "this session joined as sink; activations come only from the upstream", false);
          ++stats.batches_rejected;
          break;
        }
        std::shared_ptr<Slice> joined = peer.slice.lock();
        if (!slice || joined != slice || batch.pipeline_id() != slice->pipeline_id) {
          refuse(proto::ERROR_INVALID_MESSAGE,
                 "batch " + std::to_string(batch.batch_id()) + " is for " +
                     PipelineName(batch.pipeline_id()) + "; this session joined " +
                     (joined && !joined->released ? PipelineName(joined->pipeline_id)
                                                  : std::string("a pipeline no longer hosted")),
                 false);
          ++stats.batches_rejected;
          break;
        }
        Slice& s = *slice;
        if (s.failed) {
          refuse(proto::ERROR_INTERNAL,
                 PipelineName(s.pipeline_id) + " failed at this stage: " + s.failure.message(),
                 false);
          ++stats.batches_rejected;
          break;
        }
        stats.bytes_in += batch.ByteSizeLong();
        ++stats.batches_received;
        // Moved, not copied: the payload may be megabytes, and this is the io thread.
        s.queue.push_back(Slice::Item{std::move(*envelope.mutable_activation_batch()), session,
                                      envelope.seq(), Clock::now()});
        stats.queued = s.queue.size();
        stats.max_queued = std::max<uint64_t>(stats.max_queued, stats.queued);
        if (s.queue.size() >= s.in_flight && s.paused != session) {
          // Called on this session's strand, the pause takes effect before its next frame
          // is read (session.h), so the queue never exceeds in_flight.
          s.paused = session;
          deferred.pause = session;
          ++stats.upstream_pauses;
        }
        cv.notify_all();
        break;
      }
      default:
        refuse(proto::ERROR_UNEXPECTED_MESSAGE,
               net::BodyName(envelope) + " is not a message a pipeline stage accepts",
               peer.role == Role::kPending);
        break;
    }
  }
  deferred.Run();
}

void StageHost::Impl::ComputeLoop() {
  while (true) {
    std::unique_lock<std::mutex> lock(mu);
    const auto idle_from = Clock::now();
    cv.wait(lock, [this] { return stop || !failures.empty() || (slice && !slice->queue.empty()); });
    if (stop) return;
    if (!failures.empty()) {
      FailureNote note = std::move(failures.front());
      failures.pop_front();
      FailureCallback callback = on_failure;
      lock.unlock();
      if (callback) {
        try {
          callback(note.pipeline_id, note.stage_index, note.why);
        } catch (const std::exception& e) {
          spdlog::error("stage: failure callback threw: {}", e.what());
        }
      }
      continue;
    }
    std::shared_ptr<Slice> s = slice;
    if (s->timing.batches > 0) {
      s->timing.input_wait += std::chrono::duration<double>(Clock::now() - idle_from).count();
    }
    Slice::Item item = std::move(s->queue.front());
    s->queue.pop_front();
    stats.queued = s->queue.size();
    net::SessionPtr resume;
    if (s->paused && s->queue.size() < s->in_flight) {
      resume = std::move(s->paused);
      s->paused.reset();
    }
    lock.unlock();
    if (resume) resume->ResumeReading();
    Process(s, std::move(item));
  }
}

void StageHost::Impl::TimeSlice(const std::shared_ptr<Slice>& s) {
  // Emulation holds to N x the fastest the slice has run. Learnt from the stream alone, that
  // minimum starts at the first, cold batch and creeps down for a hundred batches while the
  // emulated device runs slower than it should; a few runs on synthetic input before the
  // first batch (which also allocate the buffers) start it near the host's speed.
  constexpr int kRuns = 5;
  Result<StageExecutor::ComputeTimes> best = Status::Internal("not run");
  bool single_threaded = false;
  {
    ScopedEngineThreads threads(options.engine_threads);
    single_threaded = NumThreads() == 1;
    try {
      best = s->executor->TimeRuns(static_cast<int>(s->micro_batch), kRuns, s->out_codec);
    } catch (const std::exception& e) {
      best = Status::Internal(e.what());
    }
  }
  if (!best.ok()) {
    // Not a failure of the stage: emulation learns the slice's speed from the stream instead.
    spdlog::warn("stage: timing {} on synthetic input failed: {}", PipelineName(s->pipeline_id),
                 best.status().ToString());
    return;
  }
  const double work = single_threaded ? best->cpu_seconds : best->wall_seconds;
  std::lock_guard<std::mutex> lock(mu);
  if (s->timing.fastest <= 0 || work < s->timing.fastest) s->timing.fastest = work;
}

void StageHost::Impl::Process(const std::shared_ptr<Slice>& s, Slice::Item item) {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (s->released) {  // replaced or released after the batch was taken from the queue
      ++stats.batches_dropped;
      return;
    }
  }
  const proto::ActivationBatch& batch = item.batch;
  const int unit_begin = s->executor->unit_begin();
  // Cheap checks first, each with the wire code that says what was wrong; the executor checks
  // the rest (codec, sizes against the shapes before allocating, finite values).
  if (batch.unit() != static_cast<uint32_t>(unit_begin)) {
    Reject(item, proto::ERROR_INVALID_MESSAGE,
           "batch " + std::to_string(batch.batch_id()) + " enters at unit " +
               std::to_string(batch.unit()) + "; this stage starts at unit " +
               std::to_string(unit_begin));
    return;
  }
  if (batch.num_samples() > s->micro_batch) {
    Reject(item, proto::ERROR_INVALID_MESSAGE,
           "batch " + std::to_string(batch.batch_id()) + " has " +
               std::to_string(batch.num_samples()) + " samples; the pipeline's micro-batch is " +
               std::to_string(s->micro_batch));
    return;
  }
  uint64_t per_sample = 1;
  for (int64_t d : s->input_shape) per_sample *= static_cast<uint64_t>(d);
  if (batch.data().num_values() != per_sample * batch.num_samples()) {
    Reject(item, proto::ERROR_SHAPE_MISMATCH,
           "batch " + std::to_string(batch.batch_id()) + ": data holds " +
               std::to_string(batch.data().num_values()) + " values; " +
               std::to_string(batch.num_samples()) + " samples of shape " +
               Tensor::ShapeToString(s->input_shape) + " are " +
               std::to_string(per_sample * batch.num_samples()));
    return;
  }

  const auto start = Clock::now();
  bool single_threaded = false;
  StageExecutor::ComputeTimes compute;
  Result<proto::ActivationBatch> out = Status::Internal("not run");
  {
    ScopedEngineThreads threads(options.engine_threads);
    single_threaded = NumThreads() == 1;
    try {
      out = s->executor->Run(std::move(item.batch), s->out_codec, &compute);
    } catch (const std::exception& e) {
      out = Status::Internal(std::string("stage compute failed: ") + e.what());
    }
  }
  const auto took = Clock::now() - start;
  if (!out.ok()) {
    Reject(item,
           out.status().code() == Status::Code::kInvalidArgument ? proto::ERROR_INVALID_TENSOR
                                                                 : proto::ERROR_INTERNAL,
           "batch " + std::to_string(batch.batch_id()) + ": " + out.status().message());
    return;
  }
  item.from.reset();
  {
    std::unique_lock<std::mutex> lock(mu);
    ++stats.batches_computed;
    if (s->timing.batches == 0) s->timing.first_start = start;
    ++s->timing.batches;
    s->timing.layers_cpu += compute.cpu_seconds;
    s->timing.run_wall += std::chrono::duration<double>(took).count();
    const double work = single_threaded ? compute.cpu_seconds : compute.wall_seconds;
    if (s->timing.fastest <= 0 || work < s->timing.fastest) s->timing.fastest = work;
    if (options.slowdown > 1.0) {
      // Emulation of a device `slowdown` times slower: it would still be computing. The
      // layers' time is scaled (not decoding/encoding the activations: the planner models
      // those with the link). On one engine thread that is N x their CPU time, so that other
      // processes on this host (neighbouring stages) stretching our wall time do not stretch
      // the emulated device as well; with several threads, N x their wall time.
      //
      // The lowest such time seen for this slice, not this batch's own: an emulated device is
      // a machine of its own, and on this host its neighbours slow it down even in CPU time
      // (measured: a spinning process on the other core of this 2-core VM makes the cnn's
      // single-thread forward pass use 23% more CPU time — shared core or cache). The
      // minimum is the slice's speed without them; the 1-stage baseline is measured the
      // same way.
      //
      // The emulated device keeps its own timeline: it starts a batch when the batch has
      // arrived and it is done with the one before, and is busy for N x that time. A batch is
      // released when both it and the host are done. Holding each batch to N x from the
      // moment the host starts it instead added every hiccup of the shared host (a batch whose
      // decode and layers were delayed past N x by the neighbouring stages) to the device's
      // time, where a device with a CPU of its own would have caught up with the next batch.
      const auto device_time = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(s->timing.fastest * options.slowdown));
      const Clock::time_point device_start = std::max(item.arrived, s->device_free);
      s->device_free = device_start + device_time;
      if (s->device_free > start + took) {
        cv.wait_until(lock, s->device_free, [&] { return stop || s->released; });
      }
      s->timing.held += std::chrono::duration<double>(Clock::now() - start - took).count();
    }
  }
  const auto send_from = Clock::now();

  Result<net::SessionPtr> destination = Destination(s);
  std::unique_lock<std::mutex> lock(mu);
  if (!destination.ok()) {
    ++stats.batches_dropped;
    if (!stop) FailLocked(*s, destination.status());  // no-op once released or failed
    return;
  }
  const bool slot_free = s->unsent < s->in_flight;
  cv.wait(lock, [&] { return stop || s->released || s->failed || s->unsent < s->in_flight; });
  if (stop || s->released || s->failed) {
    ++stats.batches_dropped;
    return;
  }
  // Backpressure stops an emulated device as it stops this thread: it cannot start the next
  // batch before this one is handed on.
  if (!slot_free) s->device_free = std::max(s->device_free, Clock::now());
  ++s->unsent;
  stats.max_unsent = std::max<uint64_t>(stats.max_unsent, s->unsent);
  s->timing.send_wait += std::chrono::duration<double>(Clock::now() - send_from).count();
  lock.unlock();
  const auto handing_from = Clock::now();

  proto::Envelope envelope;
  *envelope.mutable_activation_batch() = std::move(out).value();
  const uint64_t bytes = envelope.activation_batch().ByteSizeLong();
  const uint64_t batch_id = envelope.activation_batch().batch_id();
  std::weak_ptr<Impl> weak = weak_from_this();
  net::SessionPtr session = *destination;
  Status sent =
      session->Send(std::move(envelope), [weak, s, bytes, batch_id](const Status& status) {
        auto impl = weak.lock();
        if (!impl) return;
        std::lock_guard<std::mutex> guard(impl->mu);
        --s->unsent;
        if (status.ok()) {
          ++impl->stats.batches_sent;
          impl->stats.bytes_out += bytes;
        } else {
          ++impl->stats.batches_dropped;
          if (!s->last) {
            impl->FailLocked(*s, status.WithContext("sending batch " + std::to_string(batch_id) +
                                                    " to the next stage"));
          }
        }
        impl->cv.notify_all();
      });
  lock.lock();
  s->timing.last_done = Clock::now();
  s->timing.handing += std::chrono::duration<double>(s->timing.last_done - handing_from).count();
  if (!sent.ok()) {
    --s->unsent;
    ++stats.batches_dropped;
    if (s->last && sent.code() == Status::Code::kUnavailable) {
      // The sink is closing: the requester gave up this pipeline (it replays elsewhere).
      if (s->sink == session) s->sink.reset();
      spdlog::warn("stage: result of batch {} dropped: {}", batch_id, sent.ToString());
    } else {
      FailLocked(*s, sent.WithContext("sending batch " + std::to_string(batch_id)));
    }
    cv.notify_all();
  }
}

Result<net::SessionPtr> StageHost::Impl::Destination(const std::shared_ptr<Slice>& s) {
  if (!s->last) return ConnectDownstream(s);
  std::unique_lock<std::mutex> lock(mu);
  const bool joined = cv.wait_for(lock, options.sink_wait, [&] {
    return stop || s->released || s->failed || (s->sink && s->sink->is_open());
  });
  if (stop || s->released) return Status::Aborted("stage released");
  if (s->failed) return s->failure;
  if (!joined) {
    return Status::DeadlineExceeded(
        "the requester '" + s->requester_identity + "' did not join as sink within " +
        std::to_string(options.sink_wait.count()) + " ms of a result being ready");
  }
  return s->sink;
}

Result<net::SessionPtr> StageHost::Impl::ConnectDownstream(const std::shared_ptr<Slice>& s) {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (stop || s->released) return Status::Aborted("stage released");
    if (s->failed) return s->failure;
    if (s->downstream_session) return s->downstream_session;
  }
  const std::string target =
      "the next stage '" + s->downstream_identity + "' at " + s->downstream_endpoint.ToString();
  const auto connect_from = Clock::now();
  const auto deadline = connect_from + options.downstream_connect_budget;
  milliseconds delay = kFirstRetryDelay;
  Status last_error;
  int attempts = 0;
  while (true) {
    ++attempts;
    net::ConnectOptions connect;
    connect.server_name = s->downstream_identity;
    connect.expected_identity = s->downstream_identity;
    std::weak_ptr<Impl> weak = weak_from_this();
    {
      std::lock_guard<std::mutex> lock(mu);
      s->connect_done = false;
      s->connect_result.reset();
    }
    Result<net::SessionPtr> attempt = Status::Internal("not attempted");
    try {
      attempt =
          net::AsyncConnect(io, s->downstream_endpoint.host, s->downstream_endpoint.port, tls,
                            connect, downstream_handler, [weak, s](Result<net::SessionPtr> result) {
                              auto impl = weak.lock();
                              {
                                std::unique_lock<std::mutex> lock;
                                if (impl) lock = std::unique_lock<std::mutex>(impl->mu);
                                if (impl && !impl->stop && !s->released) {
                                  s->connect_result = std::move(result);
                                  s->connect_done = true;
                                  impl->cv.notify_all();
                                  return;
                                }
                              }
                              // Nobody waits for it any more.
                              if (result.ok()) (*result)->Close(Status::Aborted("unused"));
                            });
    } catch (const std::exception& e) {
      attempt = Status::Internal(std::string("connecting: ") + e.what());
    }
    if (!attempt.ok()) return attempt.status().WithContext("connecting to " + target);
    std::unique_lock<std::mutex> lock(mu);
    if (stop || s->released) {
      lock.unlock();
      (*attempt)->Close(Status::Aborted("stage released"));
      return Status::Aborted("stage released");
    }
    s->connecting = *attempt;
    // AsyncConnect bounds itself by the TLS connect and handshake timeouts.
    cv.wait(lock, [&] { return stop || s->released || s->connect_done; });
    s->connecting.reset();
    if (stop || s->released) {
      lock.unlock();
      (*attempt)->Close(Status::Aborted("stage released"));
      return Status::Aborted("stage released");
    }
    Result<net::SessionPtr> result = std::move(*s->connect_result);
    s->connect_result.reset();
    lock.unlock();
    if (result.ok()) {
      net::SessionPtr session = *result;
      proto::Envelope join;
      join.mutable_stage_join()->set_pipeline_id(s->pipeline_id);
      join.mutable_stage_join()->set_upstream(true);
      Status sent = session->Send(std::move(join));
      lock.lock();
      if (sent.ok() && session->is_open() && !stop && !s->released) {
        s->downstream_session = session;
        ++stats.downstream_connects;
        spdlog::info("stage: connected to {} for {} in {:.1f} ms", target,
                     PipelineName(s->pipeline_id),
                     1e3 * std::chrono::duration<double>(Clock::now() - connect_from).count());
        return session;
      }
      lock.unlock();
      session->Close(Status::Aborted("not used"));
      if (stop || s->released) return Status::Aborted("stage released");
      last_error = sent.ok() ? Status::Unavailable("connection closed right after opening") : sent;
    } else {
      last_error = result.status();
      // Another CA, the wrong identity, our certificate refused: no retry changes that.
      if (last_error.code() == Status::Code::kPermissionDenied) {
        return last_error.WithContext("connecting to " + target);
      }
    }
    if (Clock::now() + delay >= deadline) {
      return Status::Unavailable(target + " unreachable after " + std::to_string(attempts) +
                                 " attempts in " +
                                 std::to_string(options.downstream_connect_budget.count()) +
                                 " ms; last error: " + last_error.ToString());
    }
    spdlog::warn("stage: connecting to {}: {}; retrying in {} ms", target, last_error.ToString(),
                 delay.count());
    lock.lock();
    cv.wait_for(lock, delay, [&] { return stop || s->released; });
    if (stop || s->released) return Status::Aborted("stage released");
    lock.unlock();
    delay = std::min(delay * 2, kMaxRetryDelay);
  }
}

void StageHost::Impl::Shutdown() {
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (stop) return;
    stop = true;
    DetachLocked(&deferred, "stage host shutting down");
    cv.notify_all();
  }
  if (compute_thread.joinable()) compute_thread.join();
  deferred.Run();
  if (server) server->Stop();
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [id, peer] : peers) {
      if (peer.join_deadline) peer.join_deadline->cancel();
    }
    peers.clear();
  }
  work.reset();
  // The closes above are bounded by the TLS write and shutdown timeouts; after that the
  // io_context runs out of work. A wedged peer cannot hold us longer than that.
  const auto bound = tls.write_timeout + tls.shutdown_timeout + tls.connect_timeout +
                     tls.handshake_timeout + milliseconds(1000);
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!io_cv.wait_for(lock, bound, [this] { return io_running == 0; })) {
      spdlog::warn("stage: sessions did not close within {} ms; stopping I/O", bound.count());
      io.stop();
    }
  }
  for (std::thread& t : io_threads) t.join();
  io_threads.clear();
  server.reset();
}

// ---------------------------------------------------------------------------------------------

StageHost::StageHost(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

StageHost::~StageHost() { impl_->Shutdown(); }

Result<std::unique_ptr<StageHost>> StageHost::Start(const net::TlsConfig& tls,
                                                    StageHostOptions options) {
  FEDSLICE_RETURN_IF_ERROR(options.Validate());
  FEDSLICE_RETURN_IF_ERROR(tls.Validate());
  auto impl = std::make_shared<Impl>(tls, std::move(options));
  impl->server_handler = std::make_shared<ServerHandler>(impl);
  impl->downstream_handler = std::make_shared<DownstreamHandler>(impl);
  net::ServerOptions server_options;
  server_options.bind_address = impl->options.bind_address;
  server_options.port = impl->options.port;
  server_options.duplicate_policy = net::DuplicatePolicy::kReplaceExisting;
  auto server = net::Server::Start(impl->io, impl->tls, server_options, impl->server_handler);
  if (!server.ok()) return server.status().WithContext("starting the stage server");
  impl->server = std::move(server).value();
  impl->port = impl->server->port();
  const std::string& host = impl->options.advertise_host.empty() ? impl->options.bind_address
                                                                 : impl->options.advertise_host;
  impl->endpoint = Endpoint{host, impl->port}.ToString();
  impl->work.emplace(impl->io.get_executor());
  // From here on the destructor (Shutdown) owns the clean-up.
  std::unique_ptr<StageHost> host_object(new StageHost(impl));
  try {
    for (int i = 0; i < impl->options.io_threads; ++i) {
      {
        std::lock_guard<std::mutex> lock(impl->mu);
        ++impl->io_running;
      }
      Impl* raw = impl.get();
      impl->io_threads.emplace_back([raw] {
        try {
          raw->io.run();
        } catch (const std::exception& e) {
          spdlog::error("stage: I/O thread ended by an exception: {}", e.what());
        }
        std::lock_guard<std::mutex> lock(raw->mu);
        --raw->io_running;
        raw->io_cv.notify_all();
      });
    }
    impl->compute_thread = std::thread([raw = impl.get()] { raw->ComputeLoop(); });
  } catch (const std::system_error& e) {
    {
      std::lock_guard<std::mutex> lock(impl->mu);
      impl->io_running -= impl->options.io_threads - static_cast<int>(impl->io_threads.size());
    }
    return Status::ResourceExhausted(std::string("starting stage threads: ") + e.what());
  }
  spdlog::info("stage: serving pipeline stages at {} (bound to {}:{})", impl->endpoint,
               impl->options.bind_address, impl->port);
  return host_object;
}

std::string StageHost::endpoint() const { return impl_->endpoint; }
uint16_t StageHost::port() const { return impl_->port; }

void StageHost::SetFailureCallback(FailureCallback on_failure) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->on_failure = std::move(on_failure);
}

Status StageHost::Assign(const proto::SliceAssign& a) {
  auto s = std::make_shared<Slice>();
  s->pipeline_id = a.pipeline_id();
  s->stage_index = a.stage_index();
  s->num_stages = a.num_stages();
  const std::string where =
      "slice of " + PipelineName(a.pipeline_id()) + " stage " + std::to_string(a.stage_index());
  auto invalid = [&](const std::string& message) {
    return Status::InvalidArgument(where + ": " + message);
  };
  if (a.num_stages() == 0 || a.stage_index() >= a.num_stages()) {
    return invalid("stage_index " + std::to_string(a.stage_index()) + " is not below num_stages " +
                   std::to_string(a.num_stages()));
  }
  if (a.upstream_identity().empty()) return invalid("upstream_identity is empty");
  if (a.requester_identity().empty()) return invalid("requester_identity is empty");
  if (a.micro_batch() < 1 || a.micro_batch() > StageExecutor::kMaxBatch) {
    return invalid("micro_batch " + std::to_string(a.micro_batch()) + " is not in [1, " +
                   std::to_string(StageExecutor::kMaxBatch) + "]");
  }
  if (a.in_flight() < 1 || a.in_flight() > kMaxStageInFlight) {
    return invalid("in_flight " + std::to_string(a.in_flight()) + " is not in [1, " +
                   std::to_string(kMaxStageInFlight) + "]");
  }
  s->micro_batch = a.micro_batch();
  s->in_flight = a.in_flight();
  const std::string codec_name =
      a.activation_codec().empty() ? std::string(kActivationFp32) : a.activation_codec();
  if (!IsActivationCodec(codec_name)) {
    return invalid("activation codec '" + codec_name + "' is not " +
                   std::string(kActivationCodecList));
  }
  auto chain = Chain::Create(a.model(), a.chain());
  if (!chain.ok()) return chain.status().WithContext(where);
  const int units = chain->num_units();
  if (a.unit_begin() >= a.unit_end() || a.unit_end() > static_cast<uint32_t>(units)) {
    return invalid("units [" + std::to_string(a.unit_begin()) + ", " +
                   std::to_string(a.unit_end()) + ") are not a non-empty range of the chain's " +
                   std::to_string(units));
  }
  const int begin = static_cast<int>(a.unit_begin());
  const int end = static_cast<int>(a.unit_end());
  s->last = end == units;
  if (s->last != (a.stage_index() + 1 == a.num_stages())) {
    return invalid(s->last ? "it ends the chain but is not the last of " +
                                 std::to_string(a.num_stages()) + " stages"
                           : "it is the last stage but ends at unit " + std::to_string(end) +
                                 " of " + std::to_string(units));
  }
  if (s->last) {
    if (!a.downstream_endpoint().empty() || !a.downstream_identity().empty()) {
      return invalid("the last stage has no downstream, yet one is given");
    }
  } else {
    if (a.downstream_identity().empty()) return invalid("downstream_identity is empty");
    auto endpoint = ParseEndpoint(a.downstream_endpoint());
    if (!endpoint.ok()) return endpoint.status().WithContext(where + ": downstream_endpoint");
    s->downstream_endpoint = *endpoint;
    s->downstream_identity = a.downstream_identity();
  }
  s->upstream_identity = a.upstream_identity();
  s->requester_identity = a.requester_identity();
  auto out_codec = codec::ParseCodec(s->last ? std::string(kActivationFp32) : codec_name);
  if (!out_codec.ok()) return out_codec.status().WithContext(where);
  s->out_codec = *out_codec;

  // The weights: their announced size is checked before anything is allocated for them.
  const int64_t expected = chain->SliceParamCount(begin, end);
  if (a.weights().codec() != net::kCodecFp32) {
    return invalid("weights are '" + a.weights().codec() + "'; slices are sent as fp32");
  }
  if (a.weights().num_values() != static_cast<uint64_t>(expected)) {
    return invalid("weights hold " + std::to_string(a.weights().num_values()) + " values; units [" +
                   std::to_string(begin) + ", " + std::to_string(end) + ") have " +
                   std::to_string(expected) + " parameters");
  }
  std::vector<float> packed;
  try {
    packed.resize(static_cast<size_t>(expected));
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted(where + ": cannot allocate " + std::to_string(expected) +
                                     " parameters");
  }
  if (Status decoded = net::DecodeFp32(a.weights(), packed); !decoded.ok()) {
    return decoded.WithContext(where + ": weights");
  }
  auto executor = StageExecutor::Create(*chain, begin, end, packed);
  if (!executor.ok()) return executor.status().WithContext(where);
  s->executor = std::move(executor).value();
  s->input_shape = s->executor->chain().MainShape(begin);
  // Only emulation needs the slice's speed before the first batch. Timed here, before
  // SliceReady, not by the compute thread once the slice is published: that thread sleeps
  // until the first StageJoin or batch, so the timing ran inside the requester's stream and
  // each stage's first batch waited for it (measured: the first of a 4-stage stream's
  // results came after ~450 ms, against ~77 ms through an idle pipeline).
  if (impl_->options.slowdown > 1.0) impl_->TimeSlice(s);

  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stop) return Status::Unavailable("stage host is shutting down");
    if (impl_->slice) {
      impl_->DetachLocked(&deferred, "replaced by " + PipelineName(a.pipeline_id()) + " stage " +
                                         std::to_string(a.stage_index()));
    }
    impl_->slice = s;
  }
  deferred.Run();
  spdlog::info("stage: hosting {} stage {}/{}: units [{}, {}) {}{}", PipelineName(a.pipeline_id()),
               a.stage_index(), a.num_stages(), begin, end, chain->Describe(begin, end),
               s->last ? ", results to the requester"
                       : ", then to '" + s->downstream_identity + "' at " +
                             s->downstream_endpoint.ToString());
  return Status::Ok();
}

Status StageHost::Release(uint64_t pipeline_id) {
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->slice || impl_->slice->pipeline_id != pipeline_id) {
      return Status::NotFound(PipelineName(pipeline_id) + " is not hosted here");
    }
    impl_->DetachLocked(&deferred, "released");
  }
  deferred.Run();
  return Status::Ok();
}

void StageHost::ReleaseAll() {
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->DetachLocked(&deferred, "released");
  }
  deferred.Run();
}

std::optional<uint64_t> StageHost::pipeline_id() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!impl_->slice) return std::nullopt;
  return impl_->slice->pipeline_id;
}

StageHostStats StageHost::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  StageHostStats stats = impl_->stats;
  if (impl_->slice && impl_->options.slowdown > 1.0) {
    stats.emulated_batch_ms = 1e3 * impl_->slice->timing.fastest * impl_->options.slowdown;
  }
  return stats;
}

}  // namespace fedslice::slicing
