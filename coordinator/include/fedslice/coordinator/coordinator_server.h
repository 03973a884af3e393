// CoordinatorServer: the networked coordinator. It accepts edge clients over mutual TLS
// (net::Server), registers them (Hello -> Welcome / Reject), and drives the Federation's
// rounds: waits for min_available clients, sends FitTasks to the sampled ones, folds their
// FitResults in as they arrive, drops clients that disconnect or miss the round deadline,
// and completes (or retries) the round.
//
// Serve mode (CoordinatorOptions::serve_inference): once the last round is done (at once for a
// run of 0 rounds, which serves FederationConfig::initial_params), the coordinator does not end
// the run but keeps its clients registered and serves split inference (slicing/pipeline.h)
// until Stop(): a session whose first message is a PipelineRequest (no Hello) is a requester,
// known by its certificate's identity; the coordinator plans a pipeline over the registered
// clients that announced a stage endpoint and host no other pipeline, assigns the slices of
// the global model, answers with the PipelinePlan, and releases the stages when the
// requester closes the pipeline, leaves, or a stage fails (PipelineFailed to the requester).
// Requests that arrive while rounds still run wait until training is over. Clients may send
// a ProfileUpdate (per-layer timings of the model) at any time after Welcome.
//
// Threads: one I/O thread runs the transport; Run() is the round thread and the only one that
// touches the Federation and the pipelines. Transport events reach it through a queue, so the
// round and pipeline logic is sequential, event-driven code (it never waits for one client).
// Every message a peer sends is validated before use; a bad one is answered with an Error (and
// logged) and never changes the global model.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <vector>

#include "fedslice/common/dataset.h"
#include "fedslice/common/net/server.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"
#include "fedslice/coordinator/federation.h"

namespace fedslice::coordinator {

struct CoordinatorOptions {
  FederationConfig federation;
  net::TlsConfig tls;
  net::ServerOptions server;
  // Rounds start once this many clients are registered.
  size_t min_available = 2;
  // Ask every registered client holding test data to evaluate the new global model every N
  // rounds (0 = never); the sample-weighted result goes into the metrics.
  uint32_t federated_eval_every = 0;
  // Serve split inference after training instead of ending the run (see above).
  bool serve_inference = false;
  // How long clients chosen for a pipeline have to answer SliceAssign with SliceReady.
  std::chrono::milliseconds slice_ready_timeout{30'000};
  // A stage reporting failure of an active pipeline is usually not the culprit: wait this
  // long for a client of the pipeline to disconnect (and name it) before naming the
  // reporter's next stage in PipelineFailed.
  std::chrono::milliseconds stage_failure_grace{1'000};
};

class CoordinatorServer {
 public:
  // Builds (or resumes) the federation and starts listening. Errors: bad configuration,
  // unreadable certificates, the port in use, an incompatible checkpoint.
  static Result<std::unique_ptr<CoordinatorServer>> Start(CoordinatorOptions options,
                                                          std::optional<data::Dataset> test_set);

  // Stops (as Stop()) and joins the I/O thread.
  ~CoordinatorServer();
  CoordinatorServer(const CoordinatorServer&) = delete;
  CoordinatorServer& operator=(const CoordinatorServer&) = delete;

  uint16_t port() const;

  // Runs rounds until the federation has completed all of them (clients then get
  // Bye{BYE_NORMAL, "run complete"}; returns OK) or Stop() is called (clients get
  // Bye{BYE_SHUTTING_DOWN}, so they retry and a restarted coordinator resumes; returns
  // Aborted). A completed round is checkpointed before the next starts, so a killed
  // coordinator loses at most the round in progress.
  // In serve mode, after the last round it serves split inference until Stop(); then every
  // pipeline is released, clients and requesters get Bye{BYE_NORMAL} (the run is complete:
  // clients exit instead of retrying) and it returns OK.
  Status Run();

  // Thread-safe and async-signal-free (sets a flag and wakes Run()). Idempotent.
  void Stop();

  // Thread-safe snapshots, for tests and status output.
  uint64_t completed_rounds() const;
  std::vector<float> GlobalWeights() const;
  std::vector<proto::RoundMetrics> History() const;
  size_t num_registered() const;
  // True once Run() serves split inference (serve mode, training over).
  bool serving() const;

  struct Impl;

 private:
  explicit CoordinatorServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fedslice::coordinator
