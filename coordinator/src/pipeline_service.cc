#include "pipeline_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/pipeline.h"
#include "fedslice/slicing/planner.h"

namespace fedslice::coordinator {
namespace {

// Bounds on what a request may ask for: micro-batches a stage can run, buffers it may hold.
constexpr uint32_t kMaxInFlight = 64;
constexpr uint32_t kDefaultInFlight = 2;

proto::ErrorCode ErrorCodeFor(const Status& status) {
  switch (status.code()) {
    case Status::Code::kInvalidArgument:
      return proto::ERROR_INVALID_MESSAGE;
    case Status::Code::kResourceExhausted:
      return proto::ERROR_RESOURCE_EXHAUSTED;
    default:
      return proto::ERROR_INTERNAL;
  }
}

std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Pipeline ids must not repeat after a coordinator restart (a stage host or a requester may
// still hold an old one), so they start from the clock rather than from 1.
uint64_t FirstPipelineId() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

PipelineService::PipelineService(const Options& options, const ClientRegistry* clients,
                                 const Federation* federation)
    : options_(options), clients_(clients), federation_(federation), next_id_(FirstPipelineId()) {}

uint64_t PipelineService::HostedBy(const std::string& client_id) const {
  auto it = host_of_.find(client_id);
  return it == host_of_.end() ? 0 : it->second;
}

net::SessionPtr PipelineService::SessionOf(const std::string& client_id) const {
  auto it = clients_->find(client_id);
  return it == clients_->end() ? nullptr : it->second.session;
}

void PipelineService::ReplyError(const net::SessionPtr& requester, proto::ErrorCode code,
                                 const std::string& message, uint64_t seq) const {
  spdlog::warn("pipeline request from {} refused: {}", requester->peer_identity(), message);
  if (Status sent = requester->Send(net::MakeError(code, message, seq)); !sent.ok()) {
    spdlog::warn("cannot tell {}: {}", requester->peer_identity(), sent.ToString());
  }
}

void PipelineService::HandleRequest(const net::SessionPtr& requester,
                                    const proto::Envelope& envelope) {
  proto::PipelineRequest request = envelope.pipeline_request();
  const uint64_t seq = envelope.seq();
  // The transport checked micro_batch >= 1 and the strings; the rest is ours to check.
  if (request.activation_codec().empty()) {
    request.set_activation_codec(std::string(slicing::kActivationFp32));
  }
  if (!slicing::IsActivationCodec(request.activation_codec())) {
    return ReplyError(requester, proto::ERROR_INVALID_MESSAGE,
                      "activation codec '" + request.activation_codec() +
                          "' is not supported between stages (use " +
                          std::string(slicing::kActivationCodecList) + ")",
                      seq);
  }
  if (request.micro_batch() > static_cast<uint32_t>(slicing::StageExecutor::kMaxBatch)) {
    return ReplyError(requester, proto::ERROR_INVALID_MESSAGE,
                      "micro_batch " + std::to_string(request.micro_batch()) +
                          " is above the most a stage runs at once (" +
                          std::to_string(slicing::StageExecutor::kMaxBatch) + ")",
                      seq);
  }
  if (request.in_flight() == 0) request.set_in_flight(kDefaultInFlight);
  if (request.in_flight() > kMaxInFlight) {
    return ReplyError(requester, proto::ERROR_INVALID_MESSAGE,
                      "in_flight " + std::to_string(request.in_flight()) + " is above " +
                          std::to_string(kMaxInFlight),
                      seq);
  }
  if (request.num_stages() > static_cast<uint32_t>(slicing::kMaxDevices)) {
    return ReplyError(requester, proto::ERROR_INVALID_MESSAGE,
                      "num_stages " + std::to_string(request.num_stages()) + " is above " +
                          std::to_string(slicing::kMaxDevices),
                      seq);
  }
  std::set<std::string> excluded(request.exclude_clients().begin(),
                                 request.exclude_clients().end());
  Assign(requester, seq, request, std::move(excluded), 0, "");
}

Result<PipelineService::Pipeline> PipelineService::Prepare(
    const proto::PipelineRequest& request, const std::set<std::string>& excluded,
    std::vector<proto::Envelope>* assigns) const {
  const Model& model = federation_->global_model();
  const std::vector<slicing::LayerCost> costs = slicing::ComputeLayerCosts(model);

  // Eligible: serves stages, not excluded, not hosting another pipeline, a usable profile.
  // In client-id order, so that equal devices give the same plan every time.
  std::vector<std::string> ids;
  std::vector<slicing::Device> devices;
  size_t no_endpoint = 0, skipped = 0, busy = 0, unusable = 0;
  for (const auto& [id, client] : *clients_) {
    if (client.stage_endpoint.empty()) {
      ++no_endpoint;
    } else if (excluded.count(id) != 0) {
      ++skipped;
    } else if (host_of_.count(id) != 0) {
      ++busy;
    } else if (devices.size() < static_cast<size_t>(slicing::kMaxDevices)) {
      auto device = slicing::DeviceFromProfile(client.profile, costs);
      if (!device.ok()) {
        spdlog::warn("client {} cannot host a stage: {}", id, device.status().message());
        ++unusable;
        continue;
      }
      device->name = id;
      ids.push_back(id);
      devices.push_back(std::move(device).value());
    }
  }
  if (devices.empty()) {
    return Status::ResourceExhausted(
        "no client can host a stage: " + std::to_string(clients_->size()) + " registered, " +
        std::to_string(no_endpoint) + " without a stage endpoint, " + std::to_string(skipped) +
        " excluded, " + std::to_string(busy) + " hosting another pipeline, " +
        std::to_string(unusable) + " with an unusable device profile");
  }
  if (request.num_stages() > devices.size()) {
    return Status::ResourceExhausted("asked for " + std::to_string(request.num_stages()) +
                                     " stages but only " + std::to_string(devices.size()) +
                                     " client(s) can host one (" + JoinNames(ids) + ")");
  }

  const int max_stages = request.num_stages() > 0 ? static_cast<int>(request.num_stages())
                                                  : static_cast<int>(devices.size());
  const proto::ChainSpec chain_spec =
      request.split_layers() ? slicing::AutoSplit(model.spec(), costs, max_stages,
                                                  static_cast<int>(request.micro_batch()))
                             : proto::ChainSpec();
  auto chain = slicing::Chain::Create(model.spec(), chain_spec);
  if (!chain.ok()) return Status::Internal("cannot cut the model: " + chain.status().message());
  const std::vector<slicing::LayerCost> unit_costs = chain->UnitCosts(costs);
  for (slicing::Device& device : devices) device = chain->UnitDevice(device);
  slicing::PlanOptions plan_options;
  plan_options.micro_batch = static_cast<int>(request.micro_batch());
  plan_options.order = slicing::DeviceOrder::kAny;
  plan_options.in_flight = static_cast<int>(request.in_flight());
  plan_options.num_stages = static_cast<int>(request.num_stages());
  FEDSLICE_ASSIGN_OR_RETURN(slicing::Plan plan,
                            slicing::PlanPipeline(unit_costs, devices, plan_options));

  Pipeline pipeline;
  pipeline.request = request;
  pipeline.excluded = excluded;
  proto::PipelinePlan& message = pipeline.plan;
  message.set_request_token(request.request_token());
  *message.mutable_model() = model.spec();
  *message.mutable_chain() = chain_spec;
  message.set_micro_batch(request.micro_batch());
  message.set_activation_codec(request.activation_codec());
  message.set_in_flight(request.in_flight());
  message.set_predicted_samples_per_s(plan.throughput_samples_per_s);
  message.set_predicted_latency_ms(plan.latency_ms);
  message.set_plan_table(slicing::FormatPlan(plan, unit_costs));
  message.set_global_round(federation_->completed_rounds());

  const size_t k = plan.stages.size();
  for (size_t s = 0; s < k; ++s) {
    const slicing::PlannedStage& planned = plan.stages[s];
    const std::string& id = ids[static_cast<size_t>(planned.device)];
    Stage stage;
    stage.client_id = id;
    stage.endpoint = clients_->at(id).stage_endpoint;
    stage.unit_begin = planned.begin;
    stage.unit_end = planned.end;
    pipeline.stages.push_back(stage);

    proto::StageInfo* info = message.add_stages();
    info->set_index(static_cast<uint32_t>(s));
    info->set_client_id(id);
    info->set_endpoint(stage.endpoint);
    info->set_unit_begin(static_cast<uint32_t>(planned.begin));
    info->set_unit_end(static_cast<uint32_t>(planned.end));
    info->set_layers(chain->Describe(planned.begin, planned.end));
    info->set_predicted_ms(planned.estimate.stage_ms);
    info->set_bytes_sent(static_cast<uint64_t>(planned.estimate.bytes_sent));
  }
  for (size_t s = 0; s < k; ++s) {
    const Stage& stage = pipeline.stages[s];
    FEDSLICE_ASSIGN_OR_RETURN(std::vector<float> packed,
                              chain->PackSlice(model.params(), stage.unit_begin, stage.unit_end));
    proto::Envelope envelope;
    proto::SliceAssign* assign = envelope.mutable_slice_assign();
    assign->set_stage_index(static_cast<uint32_t>(s));
    assign->set_num_stages(static_cast<uint32_t>(k));
    *assign->mutable_model() = model.spec();
    *assign->mutable_chain() = chain_spec;
    assign->set_unit_begin(static_cast<uint32_t>(stage.unit_begin));
    assign->set_unit_end(static_cast<uint32_t>(stage.unit_end));
    FEDSLICE_RETURN_IF_ERROR(net::EncodeFp32(packed, assign->mutable_weights()));
    // The requester's identity is filled in by Assign (it is not known here).
    assign->set_upstream_identity(s == 0 ? "" : pipeline.stages[s - 1].client_id);
    if (s + 1 < k) {
      assign->set_downstream_endpoint(pipeline.stages[s + 1].endpoint);
      assign->set_downstream_identity(pipeline.stages[s + 1].client_id);
    }
    assign->set_micro_batch(request.micro_batch());
    assign->set_in_flight(request.in_flight());
    assign->set_activation_codec(request.activation_codec());
    assigns->push_back(std::move(envelope));
  }
  return pipeline;
}

void PipelineService::Assign(const net::SessionPtr& requester, uint64_t request_seq,
                             const proto::PipelineRequest& request, std::set<std::string> excluded,
                             int attempt, const std::string& previous_failure) {
  const std::string& who = requester->peer_identity();
  std::vector<proto::Envelope> assigns;
  auto prepared = Prepare(request, excluded, &assigns);
  if (!prepared.ok()) {
    std::string message = "request " + std::to_string(request.request_token()) + ": ";
    if (!previous_failure.empty()) message += previous_failure + "; re-planning failed: ";
    return ReplyError(requester, ErrorCodeFor(prepared.status()),
                      message + prepared.status().message(), request_seq);
  }
  Pipeline pipeline = std::move(prepared).value();
  pipeline.id = next_id_++;
  pipeline.requester = requester;
  pipeline.request_seq = request_seq;
  pipeline.attempt = attempt;
  pipeline.plan.set_pipeline_id(pipeline.id);
  pipeline.deadline = Clock::now() + options_.ready_timeout;
  const uint64_t id = pipeline.id;

  std::string stages_text;
  for (const Stage& stage : pipeline.stages) {
    stages_text += (stages_text.empty() ? "" : ", ") + stage.client_id + " [" +
                   std::to_string(stage.unit_begin) + "," + std::to_string(stage.unit_end) + ")";
  }
  spdlog::info("pipeline {} for {} (request {}{}): assigning {} stage(s): {}", id, who,
               request.request_token(), attempt > 0 ? ", re-planned" : "", pipeline.stages.size(),
               stages_text);

  for (const Stage& stage : pipeline.stages) host_of_[stage.client_id] = id;
  auto& stored = pipelines_.emplace(id, std::move(pipeline)).first->second;
  std::vector<std::string> unreachable;
  std::string why;
  for (size_t s = 0; s < assigns.size(); ++s) {
    proto::SliceAssign* assign = assigns[s].mutable_slice_assign();
    assign->set_pipeline_id(id);
    if (s == 0) assign->set_upstream_identity(who);
    assign->set_requester_identity(who);
    const std::string& client_id = stored.stages[s].client_id;
    net::SessionPtr session = SessionOf(client_id);
    Status sent =
        session ? session->Send(std::move(assigns[s])) : Status::Unavailable("not registered");
    if (!sent.ok()) {
      unreachable.push_back(client_id);
      why += (why.empty() ? "" : "; ") + client_id + ": " + sent.message();
    }
  }
  if (!unreachable.empty()) {
    FailAssignment(id, unreachable, "cannot send SliceAssign to " + why);
  }
}

void PipelineService::FailAssignment(uint64_t pipeline_id, std::vector<std::string> failed,
                                     std::string reason) {
  auto it = pipelines_.find(pipeline_id);
  if (it == pipelines_.end()) return;
  Pipeline pipeline = it->second;  // a copy: Release forgets the original
  spdlog::warn("pipeline {}: assignment failed: {}", pipeline_id, reason);
  // Every stage still registered is released, the failed ones too: a client that missed the
  // deadline may still load the slice, and then drops it at once.
  Release(pipeline_id, "assignment failed: " + reason);
  if (!pipeline.requester->is_open()) return;
  if (pipeline.attempt == 0) {
    std::set<std::string> excluded = pipeline.excluded;
    excluded.insert(failed.begin(), failed.end());
    spdlog::info("pipeline {}: re-planning without {}", pipeline_id, JoinNames(failed));
    Assign(pipeline.requester, pipeline.request_seq, pipeline.request, std::move(excluded), 1,
           "assignment failed (" + reason + ")");
    return;
  }
  ReplyError(pipeline.requester, proto::ERROR_RESOURCE_EXHAUSTED,
             "request " + std::to_string(pipeline.request.request_token()) +
                 ": assignment failed again after re-planning: " + reason,
             pipeline.request_seq);
}

void PipelineService::FailActive(uint64_t pipeline_id, std::string failed_client,
                                 std::string reason) {
  auto it = pipelines_.find(pipeline_id);
  if (it == pipelines_.end()) return;
  net::SessionPtr requester = it->second.requester;
  spdlog::warn("pipeline {} failed ({}): {}", pipeline_id,
               failed_client.empty() ? "no client to blame" : "blaming " + failed_client, reason);
  Release(pipeline_id, "stage failed: " + reason);
  proto::Envelope failed;
  failed.mutable_pipeline_failed()->set_pipeline_id(pipeline_id);
  failed.mutable_pipeline_failed()->set_reason(reason);
  failed.mutable_pipeline_failed()->set_failed_client(failed_client);
  if (Status sent = requester->Send(std::move(failed)); !sent.ok()) {
    spdlog::warn("cannot tell {} that pipeline {} failed: {}", requester->peer_identity(),
                 pipeline_id, sent.ToString());
  }
}

void PipelineService::Release(uint64_t pipeline_id, const std::string& reason) {
  auto it = pipelines_.find(pipeline_id);
  if (it == pipelines_.end()) return;
  for (const Stage& stage : it->second.stages) {
    host_of_.erase(stage.client_id);
    if (net::SessionPtr session = SessionOf(stage.client_id)) {
      proto::Envelope release;
      release.mutable_slice_release()->set_pipeline_id(pipeline_id);
      release.mutable_slice_release()->set_reason(reason);
      (void)session->Send(std::move(release));  // a closing session releases by itself
    }
  }
  pipelines_.erase(it);
}

void PipelineService::Activate(Pipeline& pipeline) {
  pipeline.active = true;
  spdlog::info(
      "pipeline {} ready for {}: {} stage(s), predicted {:.1f} samples/s, latency "
      "{:.2f} ms, model of round {}\n{}",
      pipeline.id, pipeline.requester->peer_identity(), pipeline.stages.size(),
      pipeline.plan.predicted_samples_per_s(), pipeline.plan.predicted_latency_ms(),
      pipeline.plan.global_round(), pipeline.plan.plan_table());
  proto::Envelope envelope;
  *envelope.mutable_pipeline_plan() = pipeline.plan;
  if (Status sent = pipeline.requester->Send(std::move(envelope)); !sent.ok()) {
    // Its session is closing: OnRequesterGone will release the pipeline.
    spdlog::warn("cannot send pipeline {} to {}: {}", pipeline.id,
                 pipeline.requester->peer_identity(), sent.ToString());
  }
}

void PipelineService::HandleSliceReady(const net::SessionPtr& client,
                                       const proto::Envelope& envelope) {
  const proto::SliceReady& ready = envelope.slice_ready();
  const std::string& id = client->peer_identity();
  auto it = pipelines_.find(ready.pipeline_id());
  if (it == pipelines_.end()) {
    // A pipeline already released (a late answer after a timeout, or a stage that noticed a
    // failure the coordinator acted on first): nothing to do.
    spdlog::debug("{}: SliceReady for pipeline {}, which is not assigned (any more)", id,
                  ready.pipeline_id());
    return;
  }
  Pipeline& pipeline = it->second;
  if (ready.stage_index() >= pipeline.stages.size() ||
      pipeline.stages[ready.stage_index()].client_id != id) {
    if (Status sent = client->Send(net::MakeError(
            proto::ERROR_INVALID_MESSAGE,
            "SliceReady for stage " + std::to_string(ready.stage_index()) + " of pipeline " +
                std::to_string(ready.pipeline_id()) + ", which is not assigned to you",
            envelope.seq()));
        !sent.ok()) {
      spdlog::debug("cannot answer {}: {}", id, sent.ToString());
    }
    return;
  }
  Stage& stage = pipeline.stages[ready.stage_index()];
  const std::string what = "stage " + std::to_string(ready.stage_index()) + " on " + id;
  if (!ready.ok()) {
    const std::string reason =
        what + " reports failure: " + (ready.message().empty() ? "no reason" : ready.message());
    if (!pipeline.active) return FailAssignment(pipeline.id, {id}, reason);
    if (pipeline.failing) return;  // the first report stands
    pipeline.failing = true;
    pipeline.failure = reason;
    pipeline.suspect = ready.stage_index() + 1 < pipeline.stages.size()
                           ? pipeline.stages[ready.stage_index() + 1].client_id
                           : "";
    pipeline.deadline = Clock::now() + options_.failure_grace;
    spdlog::info("pipeline {}: {}; waiting up to {} ms for the culprit to show", pipeline.id,
                 reason, options_.failure_grace.count());
    return;
  }
  if (pipeline.active || stage.ready) return;  // a repeated ready changes nothing
  stage.ready = true;
  spdlog::debug("pipeline {}: {} ready", pipeline.id, what);
  if (std::all_of(pipeline.stages.begin(), pipeline.stages.end(),
                  [](const Stage& s) { return s.ready; })) {
    Activate(pipeline);
  }
}

void PipelineService::HandleClientError(const std::string& client_id, const proto::Error& error) {
  const uint64_t id = HostedBy(client_id);
  if (id == 0) return;
  Pipeline& pipeline = pipelines_.at(id);
  if (pipeline.active) return;  // not about the assignment; logged by the caller
  FailAssignment(
      id, {client_id},
      client_id + " answered with " + proto::ErrorCode_Name(error.code()) + ": " + error.message());
}

void PipelineService::OnClientGone(const std::string& client_id, const Status& reason) {
  const uint64_t id = HostedBy(client_id);
  if (id == 0) return;
  const std::string why = "client " + client_id + " disconnected (" + reason.ToString() + ")";
  if (pipelines_.at(id).active) {
    FailActive(id, client_id, why);
  } else {
    FailAssignment(id, {client_id}, why);
  }
}

void PipelineService::OnRequesterGone(const net::SessionPtr& requester) {
  std::vector<uint64_t> ids;
  for (const auto& [id, pipeline] : pipelines_) {
    if (pipeline.requester == requester) ids.push_back(id);
  }
  for (uint64_t id : ids) {
    spdlog::info("pipeline {}: requester {} left; releasing the stages", id,
                 requester->peer_identity());
    Release(id, "requester gone");
  }
}

void PipelineService::HandlePipelineClose(const net::SessionPtr& requester,
                                          const proto::Envelope& envelope) {
  const proto::PipelineClose& close = envelope.pipeline_close();
  auto it = pipelines_.find(close.pipeline_id());
  if (it == pipelines_.end()) {
    // Already released (e.g. the coordinator saw the failure first and sent PipelineFailed).
    spdlog::debug("{}: PipelineClose for pipeline {}, which is not open",
                  requester->peer_identity(), close.pipeline_id());
    return;
  }
  if (it->second.requester != requester) {
    if (Status sent = requester->Send(net::MakeError(
            proto::ERROR_NOT_AUTHORIZED,
            "pipeline " + std::to_string(close.pipeline_id()) + " is not yours to close",
            envelope.seq()));
        !sent.ok()) {
      spdlog::debug("cannot answer {}: {}", requester->peer_identity(), sent.ToString());
    }
    return;
  }
  if (close.failed()) {
    spdlog::warn("pipeline {}: requester {} gives it up: {}", close.pipeline_id(),
                 requester->peer_identity(), close.reason());
  } else {
    spdlog::info("pipeline {}: closed by {}{}{}", close.pipeline_id(), requester->peer_identity(),
                 close.reason().empty() ? "" : ": ", close.reason());
  }
  Release(close.pipeline_id(), close.failed() ? "requester saw a failure: " + close.reason()
                                              : "closed by the requester");
}

void PipelineService::CheckDeadlines() {
  const auto now = Clock::now();
  std::vector<uint64_t> expired;
  for (const auto& [id, pipeline] : pipelines_) {
    if ((!pipeline.active || pipeline.failing) && now >= pipeline.deadline) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    auto it = pipelines_.find(id);
    if (it == pipelines_.end()) continue;  // a re-plan of an earlier one cannot take this id
    if (it->second.active) {
      FailActive(id, it->second.suspect, it->second.failure);
      continue;
    }
    std::vector<std::string> late;
    for (const Stage& stage : it->second.stages) {
      if (!stage.ready) late.push_back(stage.client_id);
    }
    FailAssignment(id, late,
                   "no SliceReady from " + JoinNames(late) + " within " +
                       std::to_string(options_.ready_timeout.count()) + " ms");
  }
}

std::optional<PipelineService::Clock::time_point> PipelineService::NextDeadline() const {
  std::optional<Clock::time_point> next;
  for (const auto& [id, pipeline] : pipelines_) {
    if ((!pipeline.active || pipeline.failing) && (!next || pipeline.deadline < *next)) {
      next = pipeline.deadline;
    }
  }
  return next;
}

void PipelineService::ReleaseAll(const std::string& reason) {
  std::vector<uint64_t> ids;
  for (const auto& [id, pipeline] : pipelines_) ids.push_back(id);
  for (uint64_t id : ids) Release(id, reason);
}

}  // namespace fedslice::coordinator
