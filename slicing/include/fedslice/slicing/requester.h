// InferenceRequester: the requester of split inference (slicing/pipeline.h). It asks the
// coordinator for a pipeline, streams a set of inputs to its first stage as micro-batches and
// reads the logits from its last stage, and survives stage failures: every input is answered
// exactly once, or Run() fails saying why.
//
//   Run(images):
//     PipelineRequest -> PipelinePlan                       (coordinator)
//     StageJoin{upstream} to stage 0, StageJoin{sink} to stage K-1 (one connection, both
//       flags, when K = 1), each with ConnectOptions{server_name = expected_identity = the
//       stage's client id}
//     micro-batch j (batch_id j: inputs [j·m, min(N, (j+1)·m))) -> stage 0, at most
//       K·(in_flight + 1) + 1 unanswered at a time (the pipeline's own buffering plus one),
//       or max_outstanding when set (1: each micro-batch through an otherwise idle
//       pipeline, so that its latency is the pipeline's, not the queues')
//     ActivationBatch (logits) <- stage K-1: accepted only if its pipeline id is the current
//       one and its batch id is unanswered (else counted as a duplicate and dropped), with
//       [n, classes] finite fp32 logits
//     PipelineClose -> coordinator when done
//
// Failure of the pipeline in use: PipelineFailed from the coordinator, a stage connection that
// closes or sends an Error, a malformed result, or no result within progress_timeout. The
// requester then closes the pipeline (PipelineClose{failed}, unless the coordinator reported
// the failure), asks again with the failed client excluded (when known: the coordinator's
// failed_client, else the stage whose connection broke) and replays every unanswered
// micro-batch in id order. At most max_replans times; then Run() fails.
//
// When a stage connection breaks, the requester waits up to failure_grace for the
// coordinator's PipelineFailed, which names the client that actually failed (a stage may close
// because its neighbour died), before blaming that stage itself.
//
// Thread-safety: one Run() at a time per requester. Run() uses a few threads of its own
// (readers of the coordinator and stage connections); they end before it returns.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fedslice/common/net/client.h"
#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"
#include "fedslice/common/tensor.h"
#include "fedslice/wire.pb.h"

namespace fedslice::slicing {

struct RequesterOptions {
  uint32_t micro_batch = 64;              // samples per micro-batch (>= 1, <= 4096)
  uint32_t num_stages = 0;                // 0: as many as the planner finds best
  std::string activation_codec = "fp32";  // between stages: "fp32" or "int8"
  uint32_t in_flight = 2;    // micro-batches a stage may buffer (0: the coordinator's 2)
  // Unanswered micro-batches the requester allows itself (0: K·(in_flight + 1) + 1, enough to
  // keep every stage busy; 1: one at a time, for the latency of an idle pipeline).
  uint32_t max_outstanding = 0;
  bool split_layers = true;  // let the planner cut heavy layers into parts
  int max_replans = 3;       // pipelines given up before Run() fails
  // Waiting for a PipelinePlan (requests wait while the coordinator still trains).
  std::chrono::milliseconds plan_timeout{std::chrono::minutes(10)};
  // A pipeline with unanswered micro-batches that returns nothing for this long has failed.
  std::chrono::milliseconds progress_timeout{30'000};
  // Connecting to a stage (TCP + TLS + greeting).
  std::chrono::milliseconds connect_timeout{10'000};
  // See the file comment.
  std::chrono::milliseconds failure_grace{2'000};
  // Clients not to use from the start.
  std::vector<std::string> exclude_clients;
  // Observers, called on Run()'s thread (keep them short): with each plan before streaming
  // through it, and with the number of images answered after each accepted result. For
  // progress output, and for tests that inject a failure at a chosen point of a stream.
  std::function<void(const proto::PipelinePlan&)> on_plan;
  std::function<void(int64_t answered_images)> on_progress;
};

struct InferenceReport {
  Tensor logits;  // [N, classes], row i = images[i]
  // Every PipelinePlan used, in order (more than one after a failure).
  std::vector<proto::PipelinePlan> plans;
  int64_t images = 0;
  int64_t batches = 0;
  int64_t answered = 0;               // images answered (== images when Run() succeeds)
  int64_t batches_replayed = 0;       // sent again to a new pipeline after a failure
  int64_t duplicates_discarded = 0;   // results for a batch already answered or of an old pipeline
  std::vector<std::string> failures;  // why each given-up pipeline was given up
  double seconds = 0;                 // the whole Run(), planning included
  double stream_seconds = 0;          // first micro-batch sent to the last result
  double images_per_s = 0;            // images / stream_seconds
  // Per micro-batch, from handing it to TLS to its result (answered batches only; a replayed
  // batch is timed from its last send).
  double latency_p50_ms = 0;
  double latency_p95_ms = 0;
  double latency_p99_ms = 0;
  double latency_max_ms = 0;
  size_t peak_outstanding = 0;  // the most micro-batches unanswered at once
};

class InferenceRequester {
 public:
  // Connects to the coordinator at host:port with `tls` (the requester's certificate; its
  // identity is how the coordinator and the stages know the requester). `coordinator` names
  // the coordinator's expected certificate name / identity (empty: the host).
  // Errors: as net::Channel::Connect.
  static Result<std::unique_ptr<InferenceRequester>> Connect(
      const std::string& host, uint16_t port, const net::TlsConfig& tls,
      const net::ConnectOptions& coordinator = {},
      std::chrono::milliseconds timeout = std::chrono::seconds(10));

  ~InferenceRequester();
  InferenceRequester(const InferenceRequester&) = delete;
  InferenceRequester& operator=(const InferenceRequester&) = delete;

  // Answers every row of `images` ([N] + the model's input shape, N >= 1, finite values) with
  // its logits through pipelines of the coordinator's clients (see the file comment).
  // Errors: InvalidArgument for bad options or images that do not fit the model the
  // coordinator serves; the coordinator's refusal (its Error message); Unavailable when the
  // coordinator connection is lost; Aborted when max_replans pipelines failed (the report's
  // failures are in the message). On error no partial report is returned.
  Result<InferenceReport> Run(const Tensor& images, const RequesterOptions& options);

  // The identity of our certificate.
  const std::string& identity() const { return identity_; }

 private:
  InferenceRequester(std::unique_ptr<net::Channel> coordinator, net::TlsConfig tls,
                     std::string identity);
  struct Stream;

  std::unique_ptr<net::Channel> coordinator_;
  net::TlsConfig tls_;
  std::string identity_;
  uint64_t next_token_ = 1;
};

// Percentile p in [0, 100] of `values` (nearest rank; 0 for none). Sorts `values`.
double Percentile(std::vector<double>& values, double p);

}  // namespace fedslice::slicing
