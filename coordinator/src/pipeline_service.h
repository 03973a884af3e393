// PipelineService: the coordinator's side of split inference (slicing/pipeline.h has the whole
// protocol drawn out). It plans a pipeline over idle registered clients for a requester's
// PipelineRequest, sends each chosen client its SliceAssign (the slice's weights of the current
// global model), collects their SliceReady, answers the requester with the PipelinePlan, and
// tears pipelines down (SliceRelease to the stages, PipelineFailed to the requester) when a
// stage fails, the requester closes them or goes away.
//
// Assignment is a state machine driven by events, never a blocking wait: the coordinator's
// event loop calls Handle*/On* as messages and closes arrive and CheckDeadlines() regularly
// (NextDeadline() says when it must, at the latest). An assignment that fails (SliceReady
// ok = false, an Error from a chosen client, a chosen client gone, no SliceReady within
// ready_timeout) releases the other stages and is re-planned once without the failed clients;
// a second failure is reported to the requester as an Error.
//
// Who failed. A client whose session closes is the failed one. A stage that reports
// SliceReady{ok = false} for an active pipeline is usually the victim, not the culprit (its
// next stage is unreachable or went away, or no sink joined), so the service waits up to
// failure_grace for one of the pipeline's clients to disconnect, which then is named; if none
// does, it names the reporter's next stage (nobody for the last stage: the sink is the
// requester's own).
//
// Thread-safety: none. Every call comes from the coordinator's round thread, which also owns
// the client registry and the federation the service reads.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fedslice/common/net/session.h"
#include "fedslice/coordinator/federation.h"
#include "fedslice/wire.pb.h"

namespace fedslice::coordinator {

// A client registered with the coordinator (Hello answered with Welcome).
struct RegisteredClient {
  net::SessionPtr session;
  proto::DeviceProfile profile;  // from Hello, replaced by valid ProfileUpdates
  std::string stage_endpoint;    // "host:port" of its stage server; empty: serves no stages
  bool has_test_data = true;
};
using ClientRegistry = std::map<std::string, RegisteredClient>;

class PipelineService {
 public:
  using Clock = std::chrono::steady_clock;

  struct Options {
    // How long the chosen clients have to answer a SliceAssign with SliceReady.
    std::chrono::milliseconds ready_timeout{30'000};
    // How long a stage's failure report waits for the culprit to disconnect (see above).
    std::chrono::milliseconds failure_grace{1'000};
  };

  // `clients` and `federation` are the coordinator's; both must outlive the service.
  PipelineService(const Options& options, const ClientRegistry* clients,
                  const Federation* federation);

  // A requester's PipelineRequest: validates it, plans over the eligible clients and sends the
  // SliceAssigns; the PipelinePlan follows once every stage is ready. A request that cannot
  // be served is answered with an Error naming why (ERROR_INVALID_MESSAGE for a bad request,
  // ERROR_RESOURCE_EXHAUSTED when no plan is possible with the clients there are).
  void HandleRequest(const net::SessionPtr& requester, const proto::Envelope& envelope);
  // A requester's PipelineClose: releases the pipeline (only its own requester may close it).
  void HandlePipelineClose(const net::SessionPtr& requester, const proto::Envelope& envelope);
  // A registered client's SliceReady.
  void HandleSliceReady(const net::SessionPtr& client, const proto::Envelope& envelope);
  // An Error from a registered client: a client being assigned a stage cannot take it.
  void HandleClientError(const std::string& client_id, const proto::Error& error);
  // A registered client's session closed (it is no longer in the registry).
  void OnClientGone(const std::string& client_id, const Status& reason);
  // A requester's session closed: its pipelines are released.
  void OnRequesterGone(const net::SessionPtr& requester);

  // Fails the assignments whose SliceReady deadline has passed, and the pipelines whose
  // failure_grace has.
  void CheckDeadlines();
  // The earliest such deadline, if any.
  std::optional<Clock::time_point> NextDeadline() const;

  // Releases every pipeline (coordinator shutting down); requesters are not told, their
  // sessions are closed next.
  void ReleaseAll(const std::string& reason);

  // The pipeline a client hosts or is being assigned, 0 if none.
  uint64_t HostedBy(const std::string& client_id) const;
  size_t num_pipelines() const { return pipelines_.size(); }

 private:
  struct Stage {
    std::string client_id;
    std::string endpoint;
    int unit_begin = 0;
    int unit_end = 0;
    bool ready = false;
  };
  struct Pipeline {
    uint64_t id = 0;
    net::SessionPtr requester;
    uint64_t request_seq = 0;
    proto::PipelineRequest request;  // normalised (codec, in_flight set)
    std::set<std::string> excluded;  // the request's and those that failed an assignment
    int attempt = 0;                 // 0, or 1 after a re-plan
    bool active = false;             // PipelinePlan sent
    std::vector<Stage> stages;
    proto::PipelinePlan plan;        // sent once every stage is ready
    Clock::time_point deadline;      // for SliceReady, while not active
    // Active, a stage reported failure: fails at `deadline` blaming `suspect` unless a client
    // of the pipeline disconnects first.
    bool failing = false;
    std::string suspect;
    std::string failure;
  };

  // Plans and assigns `request` for `requester` (attempt 0 or 1); on failure answers the
  // requester with an Error.
  void Assign(const net::SessionPtr& requester, uint64_t request_seq,
              const proto::PipelineRequest& request, std::set<std::string> excluded, int attempt,
              const std::string& previous_failure);
  // Builds the pipeline (plan, assignments) without sending anything.
  Result<Pipeline> Prepare(const proto::PipelineRequest& request,
                           const std::set<std::string>& excluded,
                           std::vector<proto::Envelope>* assigns) const;
  // An assignment failed because of `failed` clients: release the rest, re-plan once.
  void FailAssignment(uint64_t pipeline_id, std::vector<std::string> failed, std::string reason);
  // An active pipeline lost a stage: release the rest, tell the requester.
  // (Arguments by value: they may point into the pipeline, which is forgotten.)
  void FailActive(uint64_t pipeline_id, std::string failed_client, std::string reason);
  // Sends SliceRelease to every stage still registered and forgets the pipeline. (A client
  // that does not hold the slice, e.g. one that never loaded it, ignores the release.)
  void Release(uint64_t pipeline_id, const std::string& reason);
  void Activate(Pipeline& pipeline);
  void ReplyError(const net::SessionPtr& requester, proto::ErrorCode code,
                  const std::string& message, uint64_t seq) const;
  net::SessionPtr SessionOf(const std::string& client_id) const;

  Options options_;
  const ClientRegistry* clients_;
  const Federation* federation_;
  std::map<uint64_t, Pipeline> pipelines_;
  std::map<std::string, uint64_t> host_of_;  // client -> pipeline it hosts or is assigned
  uint64_t next_id_;
};

}  // namespace fedslice::coordinator
