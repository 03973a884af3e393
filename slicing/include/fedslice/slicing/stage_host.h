// StageHost: what lets an edge client host one slice of a pipeline (slicing/pipeline.h has the
// protocol drawn out). It owns a mutual-TLS server for stage connections, the executor of the
// slice it was assigned (chain.h), a compute thread, and the connection to the next stage.
//
//   Start ─▶ endpoint() goes into Hello.stage_endpoint
//   Assign(SliceAssign) ─▶ the slice is loaded, the server accepts StageJoins for it
//   upstream: StageJoin{upstream} + ActivationBatch…  ─▶ queue (≤ in_flight) ─▶ compute thread
//       ─▶ intermediate stage: the next stage (connected lazily, on the first batch)
//       ─▶ last stage: the sink (the requester, joined with StageJoin{sink})
//   Release(pipeline_id) or another Assign ─▶ the slice is dropped, its sessions closed.
//
// Who may talk to it. A new session must first send StageJoin for the hosted pipeline, as
// upstream with the identity SliceAssign.upstream_identity, or (last stage only) as sink
// with SliceAssign.requester_identity; anything else, or nothing within the TLS
// handshake_timeout, is answered with an Error (ERROR_UNEXPECTED_MESSAGE,
// ERROR_NOT_AUTHORIZED) and the session closed. The server keeps
// one session per identity and a newer one replaces the older (a stage that reconnects must
// not be locked out by its own stale session), so in a one-stage pipeline the requester,
// both upstream and sink, joins once with both flags set. ActivationBatches are taken only
// from the joined upstream session and for the hosted pipeline id. A batch the slice cannot
// run (wrong unit, more samples than SliceAssign.micro_batch, wrong shape or codec,
// non-finite values) is answered with an Error to its sender, which names the problem; the
// stage keeps serving.
//
// Flow control (pipeline.h): at most `in_flight` received batches wait besides the one being
// computed (beyond that the upstream session stops being read and TCP pushes back), and at
// most `in_flight` computed batches are not yet handed to TLS (the compute thread waits).
//
// Failure. When the stage cannot deliver — the next stage stays unreachable for
// downstream_connect_budget, the connection to it closes while the pipeline is hosted, or no
// sink joins within sink_wait of a result being ready — the failure callback is called once
// for that pipeline, queued batches are dropped and later ones answered with an Error, until
// the owner releases or replaces the slice. (The client reports it to the coordinator as
// SliceReady{ok = false}; the coordinator re-plans.) A closed upstream or sink session is
// not a failure of this stage: its peer is gone, and the coordinator hears of it elsewhere.
//
// Emulated slow devices: with slowdown N > 1 the stage keeps the timeline of a device whose
// layers take N·c per micro-batch, c being the least CPU time the slice's layers have taken
// for a batch so far (on one engine thread; with more, wall time; decoding and encoding the
// activations are not scaled: the planner counts them with the link). The device starts a
// batch once it has arrived and the device is done with the previous one (and, under
// backpressure, has handed it on), and a batch is released when both the device and this
// host are done with it. So the stage behaves as a device N times slower than this host's,
// also when neighbouring stages on the same host compete for its cores: the minimum CPU time
// leaves out how they slow us down while we run (shared core, caches: +23% CPU time
// measured on a 2-vCPU VM with the other vCPU busy), and the timeline lets a batch the host
// delayed past N·c be made up by the next, as a device with its own CPU would (holding
// each batch to N·c from the moment the host started it added every such delay). Assign
// times the slice on synthetic input (five runs of a micro-batch) before it returns, so that
// c starts near the host's speed rather than at a cold first batch's, and so that the timing
// is done before the coordinator reports the pipeline ready, not inside the stream.
// For measuring pipelines of several stages on one machine; real devices, or Docker CPU
// limits, need no emulation.
//
// Threads: `io_threads` run the sessions; one compute thread runs the executor (never an io
// thread, so a long micro-batch does not stall heartbeats or the upstream's reads). Public
// methods are thread-safe and never block on the network (Assign decodes the weights,
// builds the executor and, when emulating, times the slice, on the caller's thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "fedslice/common/net/tls.h"
#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::slicing {

// Bound on SliceAssign.in_flight: each unit of it lets a stage buffer two more micro-batches.
inline constexpr uint32_t kMaxStageInFlight = 64;

struct StageHostOptions {
  // Where the stage server listens; "0.0.0.0" or "::" only when stages run on other hosts.
  std::string bind_address = "127.0.0.1";
  uint16_t port = 0;  // 0 = ephemeral
  // Host other stages reach us by (endpoint()); empty: bind_address. Required when binding a
  // wildcard address. In Docker: the container name.
  std::string advertise_host;
  // Emulation factor >= 1 (see the file comment).
  double slowdown = 1.0;
  // Threads running the sessions' I/O, 1..16.
  int io_threads = 1;
  // Engine worker threads for stage compute; 0 = the process's current setting. The engine's
  // count is process-wide (threading.h), so the compute thread sets it around each micro-batch
  // and restores it afterwards; a process that trains while it serves a stage shares the
  // setting during those windows.
  int engine_threads = 0;
  // How long an intermediate stage keeps trying to reach the next one (exponential backoff
  // from 100 ms to 1 s between attempts) before it reports a failure.
  std::chrono::milliseconds downstream_connect_budget{10'000};
  // How long the last stage waits for the sink to join once it has a result for it.
  std::chrono::milliseconds sink_wait{30'000};

  // InvalidArgument naming the field: empty bind address, a wildcard bind without
  // advertise_host, slowdown < 1 or not finite, io_threads outside 1..16, engine_threads < 0,
  // non-positive durations.
  Status Validate() const;
};

// Cumulative over every slice the host served. Batches:
//   received = computed + rejected + dropped + (queued or being computed);
//   computed = sent + (not yet handed to TLS) + dropped after compute.
struct StageHostStats {
  uint64_t batches_received = 0;     // taken from the upstream session into the queue
  uint64_t batches_computed = 0;     // run by the executor
  uint64_t batches_sent = 0;         // handed to TLS (the Send callback said OK)
  uint64_t batches_rejected = 0;     // answered with an Error (bad batch, wrong pipeline...)
  uint64_t batches_dropped = 0;      // lost to a release, replacement, failure or closed sink
  uint64_t bytes_in = 0;             // serialized ActivationBatch bytes received
  uint64_t bytes_out = 0;            // serialized ActivationBatch bytes handed to TLS
  uint64_t queued = 0;               // waiting for the compute thread now
  uint64_t max_queued = 0;           // high-water mark of `queued`
  uint64_t max_unsent = 0;           // high-water mark of computed batches not yet handed to TLS
  uint64_t upstream_pauses = 0;      // times the upstream session was paused (queue full)
  uint64_t failures = 0;             // failure callbacks made
  uint64_t downstream_connects = 0;  // connections opened to a next stage
  // Emulation: how long the emulated device takes for a micro-batch of the hosted slice
  // (slowdown x the fastest the slice has run, timed first by Assign); 0 without emulation
  // or without a slice.
  double emulated_batch_ms = 0;
};

class StageHost {
 public:
  // Called once per failed pipeline, on the host's compute thread, without locks held: it may
  // block briefly (e.g. to send a message) but must not destroy the host.
  using FailureCallback =
      std::function<void(uint64_t pipeline_id, uint32_t stage_index, const Status& why)>;

  // Starts the io threads, the compute thread and the server (certificates of `tls`, which
  // also serve for connecting to the next stage). Errors: Validate()'s, the TlsConfig or
  // certificate problem, the bind error.
  static Result<std::unique_ptr<StageHost>> Start(const net::TlsConfig& tls,
                                                  StageHostOptions options);

  // Closes every session (Bye BYE_SHUTTING_DOWN), stops and joins the threads (bounded by the
  // TLS write and shutdown timeouts).
  ~StageHost();
  StageHost(const StageHost&) = delete;
  StageHost& operator=(const StageHost&) = delete;

  // "advertise_host:port" ("[v6]:port" for an IPv6 literal), for Hello.stage_endpoint.
  std::string endpoint() const;
  uint16_t port() const;

  // Set before the first Assign; replaces the previous callback.
  void SetFailureCallback(FailureCallback on_failure);

  // Loads the slice `assign` describes and starts accepting StageJoins for its pipeline,
  // replacing (releasing) any slice hosted before. Checks: the chain (Chain::Create), the
  // unit range, stage_index < num_stages, the last stage (unit_end = num_units) has no
  // downstream and the others have a parseable downstream_endpoint and a
  // downstream_identity, identities set, micro_batch in [1, StageExecutor::kMaxBatch],
  // in_flight in [1, kMaxStageInFlight], activation codec "fp32" (or empty), "fp16" or
  // "int8", and fp32 weights of exactly Chain::SliceParamCount values (checked before
  // allocating), all finite. InvalidArgument naming the problem; on error nothing changes.
  Status Assign(const proto::SliceAssign& assign);

  // Drops the slice of `pipeline_id` and closes its sessions (Bye BYE_NORMAL); batches not
  // yet sent are dropped. NotFound when that pipeline is not hosted (e.g. already replaced).
  Status Release(uint64_t pipeline_id);
  // Drops whatever slice is hosted (the client does so when it loses the coordinator, which
  // then counts this client's stages as gone).
  void ReleaseAll();

  // The pipeline hosted now, if any.
  std::optional<uint64_t> pipeline_id() const;
  StageHostStats stats() const;

  struct Impl;

 private:
  explicit StageHost(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace fedslice::slicing
