// EdgeClient: the networked side of an edge device. It connects to the coordinator over mutual
// TLS, registers, and serves FitTasks / EvaluateTasks with a LocalTrainer until the
// coordinator says the run is complete. Optionally it also hosts slices of split-inference
// pipelines (slicing/stage_host.h, protocol in slicing/pipeline.h).
//
// Protocol, per connection:
//
//   connect (TLS 1.3, both certificates checked against the run's CA)
//     -> Hello{client_id = identity of our certificate, protocol version, DeviceProfile,
//              stage_endpoint (when hosting stages)}
//     -> Welcome: trainer.SetModel(welcome.model)       | Reject: retry or give up (below)
//     -> when hosting stages: ProfileUpdate{profile with the announced model's per-layer
//        forward times measured on this device (cached per model), slowdown}
//     -> loop: FitTask      -> Fit -> FitResult          (bad task -> Error, stay connected)
//              EvaluateTask -> EvaluateResult            (no test data / bad task -> Error)
//              SliceAssign  -> StageHost::Assign -> SliceReady{ok, message}
//                              (ok = false, with the reason, for a bad assignment or when
//                              this client hosts no stages)
//              SliceRelease -> the slice is dropped (no reply)
//              Bye BYE_NORMAL -> Run() returns OK (run complete)
//     stage host, any time: a hosted stage that cannot deliver (next stage unreachable or
//        gone, no sink) -> SliceReady{pipeline, stage, ok = false, why}
//   When the session ends, the hosted slice is released: the coordinator counts the stages of
//   a client it lost as gone and re-plans without them.
//
// Reconnection: a refused connection, a lost session, a timeout, Bye{BYE_SHUTTING_DOWN} or a
// retryable Reject (duplicate identity, server full, shutting down) leads to a new attempt
// after an exponential, jittered backoff (initial_backoff doubling up to max_backoff; a
// Reject's retry_after_ms is honoured when longer). This is how clients outlive a coordinator
// that is killed and restarted: they keep trying until the new one listens. Once a session
// was registered (Welcome received) the backoff and the attempt count start over.
//
// Fatal (Run returns the error): unreadable certificate files, a server certificate that
// fails verification, our certificate refused at the handshake, a Reject for any other reason
// (not authorized, version mismatch, bad Hello), an Error in reply to our Hello, private data
// that does not fit the announced model, and running out of attempts / time.
//
// A task the client cannot do (weights of the wrong size, non-finite weights, a codec or
// hyperparameters it does not support, training that diverges) is answered with an Error
// carrying the matching ErrorCode; the session stays open and the trainer's data is intact.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "fedslice/client/local_trainer.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/stage_host.h"
#include "fedslice/wire.pb.h"

namespace fedslice::client {

struct EdgeClientOptions {
  std::string host;
  uint16_t port = 0;
  // CA, our certificate and key, timeouts, heartbeats. heartbeat_interval must be below the
  // coordinator's idle timeout (both default to the TlsConfig defaults).
  net::TlsConfig tls;
  // Name the coordinator's certificate must carry; empty: `host`.
  std::string server_name;
  // When set, the coordinator's certificate identity (CN) must equal this.
  std::string expected_server_identity;

  // Bound on one connect (TCP + TLS handshake + greeting).
  std::chrono::milliseconds connect_timeout{10'000};
  // How long to wait for Welcome / Reject after Hello.
  std::chrono::milliseconds welcome_timeout{30'000};

  // Reconnect backoff: the n-th consecutive failure waits a uniformly random time in
  // [b/2, b] with b = min(initial_backoff * 2^(n-1), max_backoff).
  std::chrono::milliseconds initial_backoff{200};
  std::chrono::milliseconds max_backoff{10'000};
  // Consecutive failed attempts (connect or registration) after which Run gives up;
  // 0 = never.
  int max_connect_attempts = 0;
  // Run gives up when no session was registered for this long (since start, or since the
  // last registered session ended). Unset: never.
  std::optional<std::chrono::seconds> give_up_after;

  // Sent in Hello; see MeasureDeviceProfile (device_profile.h).
  proto::DeviceProfile profile;
  // Emulates a device `slowdown` times slower (>= 1): after a Fit that took t seconds the
  // client waits (slowdown - 1) * t more before answering, and a hosted pipeline stage does
  // the same per micro-batch. For tests and demos of stragglers and pipelines.
  double slowdown = 1.0;
  // Where the CPU quota is read from (CgroupCpuLimit, device_profile.h): the ProfileUpdate's
  // slowdown is `slowdown` times CpuQuotaSlowdown(engine threads, quota), so that a container
  // limited to 0.5 CPU is planned as the half-speed device it is.
  std::string cgroup_root = "/sys/fs/cgroup";

  // Pipeline stage hosting. Unset (default): no stage server, Hello has no stage_endpoint,
  // no ProfileUpdate is sent, and a SliceAssign is answered with SliceReady{ok = false}.
  // Set: Run() starts a StageHost with `tls` (its slowdown is `slowdown` above, whatever the
  // field says) and reports its endpoint in Hello.
  std::optional<slicing::StageHostOptions> stage;
  // How the per-layer times for ProfileUpdate are measured (stage hosting only); the
  // micro-batch a pipeline will use is the right batch.
  slicing::TimingOptions stage_timing;

  // Checks host/port/cert paths, timeouts and backoff bounds, slowdown >= 1, and the stage
  // options when set.
  Status Validate() const;
};

class EdgeClient {
 public:
  // `trainer` must outlive the EdgeClient; Run() is its only user while it runs.
  EdgeClient(EdgeClientOptions options, LocalTrainer& trainer);
  ~EdgeClient();
  EdgeClient(const EdgeClient&) = delete;
  EdgeClient& operator=(const EdgeClient&) = delete;

  // Connects, registers and serves tasks until the coordinator ends the run. Blocking; call it
  // once, from one thread.
  // Returns OK when the coordinator said Bye{BYE_NORMAL} (run complete, also when it had
  // finished before we registered); Aborted after Stop(); otherwise the fatal error (see the
  // file comment), e.g. PermissionDenied for a refused certificate, Unavailable /
  // DeadlineExceeded when max_connect_attempts / give_up_after ran out.
  Status Run();

  // Makes Run() return Aborted as soon as possible: the open session (if any) is closed with
  // Bye{BYE_SHUTTING_DOWN}, a backoff wait ends at once; a Fit in progress runs to its end
  // but its result is not sent. Thread-safe (e.g. from a signal-handling thread), idempotent,
  // may be called before Run().
  void Stop();

  // Thread-safe counters, for tests and logs.
  uint64_t fit_tasks_done() const { return fit_tasks_done_.load(); }
  uint64_t sessions_registered() const { return sessions_registered_.load(); }
  uint64_t slices_assigned() const { return slices_assigned_.load(); }

 private:
  enum class SessionEnd { kRunComplete, kRetry, kFatal, kStopped };
  struct Outcome {
    SessionEnd end = SessionEnd::kRetry;
    Status status;            // why (kRetry, kFatal)
    bool registered = false;  // a Welcome arrived in this session
    std::chrono::milliseconds retry_after{0};
  };

  Outcome RunSession(const std::string& client_id);
  // Registers (Hello -> Welcome) and serves tasks until the session ends.
  Outcome Serve(net::Channel& channel, const std::string& client_id);
  // Handles one task; returns an error only when the session is lost (Send failed).
  Status HandleFit(net::Channel& channel, const proto::Envelope& envelope);
  Status HandleEvaluate(net::Channel& channel, const proto::Envelope& envelope);
  Status HandleSliceAssign(net::Channel& channel, const proto::Envelope& envelope);
  void HandleSliceRelease(const proto::Envelope& envelope);
  // Measures (once per model) and sends the per-layer times of the announced model.
  Status SendProfileUpdate(net::Channel& channel, const proto::ModelSpec& model);
  // StageHost failure callback: tells the coordinator through the current session.
  void ReportStageFailure(const slicing::StageHost& host, uint64_t pipeline_id,
                          uint32_t stage_index, const Status& why);
  // Validates task weights against the current model; on error sets the wire code.
  Status CheckWeights(const proto::EncodedTensor& weights, proto::ErrorCode* code) const;
  // Waits `duration` unless Stop() is called first; returns false when stopped.
  bool SleepUnlessStopped(std::chrono::steady_clock::duration duration);
  bool stopped() const { return stop_.load(); }

  EdgeClientOptions options_;
  LocalTrainer& trainer_;
  // Parameter count of the model announced in the last Welcome (0 before).
  uint64_t model_params_ = 0;

  std::atomic<bool> stop_{false};
  std::mutex mu_;  // guards channel_ and the stop wake-up
  std::condition_variable cv_;
  std::shared_ptr<net::Channel> channel_;

  std::mt19937_64 jitter_;
  std::atomic<uint64_t> fit_tasks_done_{0};
  std::atomic<uint64_t> sessions_registered_{0};
  std::atomic<uint64_t> slices_assigned_{0};

  // Started by Run() when options_.stage is set; destroyed first (its compute thread calls
  // ReportStageFailure, which uses the members above).
  std::unique_ptr<slicing::StageHost> stage_host_;
  // Per-layer timings of the model last measured (serialized spec), so that a reconnect does
  // not measure again.
  std::string timed_model_;
  std::vector<proto::LayerTiming> layer_timings_;
  double activation_io_ms_per_mb_ = 0;  // measured with the first layer timings; 0 = not yet
};

}  // namespace fedslice::client
