// The split-inference protocol (messages in proto/fedslice/wire.proto, fields 40-49), shared
// by the coordinator (assigns slices, coordinator/), the stage host in every client
// (stage_host.h) and the requester (requester.h).
//
//  requester            coordinator                client A (stage 0)    client B (stage 1)
//     │ PipelineRequest ──▶│ plan over idle clients      │                      │
//     │                    │── SliceAssign(units, weights of the slice) ──▶    │ (to each stage)
//     │                    │◀─ SliceReady{ok} ───────────│◀─────────────────────│
//     │◀─ PipelinePlan ────│                             │                      │
//     │── StageJoin{upstream} + ActivationBatch… ──────▶ │── StageJoin{upstream} ─▶ (lazy,
//     │── StageJoin{sink} ───────────────────────────────────────────────────▶ │   first batch)
//     │                    │                             │── ActivationBatch ──▶│
//     │◀──────────────── ActivationBatch (logits, unit = num_units) ────────────│
//     │── PipelineClose ──▶│── SliceRelease ────────────▶│ ──────────────────▶ │
//
// Every connection is mutual TLS with certificates of the run's CA. A stage connects to the
// next one with ConnectOptions{server_name = expected_identity = the next stage's client id}
// (client certificates carry their id as CN and DNS SAN), so a stage cannot be impersonated by
// another client of the same CA; a stage server accepts StageJoin only from the identity the
// SliceAssign named (upstream_identity: the previous stage's client id, or the requester's;
// requester_identity for the sink) and only for the pipeline it hosts. Activations never pass
// through the coordinator.
//
// Flow control: a stage holds at most `in_flight` received micro-batches besides the one it
// computes (it pauses reading its upstream connection beyond that, and TCP pushes back), and
// at most `in_flight` computed ones not yet handed to TLS. The requester keeps at most
// num_stages · (in_flight + 1) + 1 micro-batches unanswered.
//
// Failure: the coordinator notices a stage's client is gone (its session closed) or a stage
// reports SliceReady{ok = false} for an active pipeline (e.g. it cannot reach the next stage).
// It releases the surviving stages (SliceRelease) and tells the requester (PipelineFailed).
// The requester also gives up a pipeline whose stage connections break, telling the
// coordinator (PipelineClose{failed}). It then asks again (the coordinator re-plans over the
// devices left, excluding the failed client) and replays every micro-batch not yet answered.
// Results carry the pipeline id and the batch id: the requester accepts a batch id once, and
// only from the pipeline it currently uses, so no request is lost and none answered twice.
//
// One pipeline per client at a time: a new SliceAssign replaces the slice a client hosts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fedslice/common/status.h"

namespace fedslice::slicing {

struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string ToString() const;  // "host:port" ("[v6]:port" for an IPv6 literal)
};

// Parses "host:port" or "[v6addr]:port" (port 1..65535, host non-empty, at most 253 chars).
// InvalidArgument naming the text otherwise.
Result<Endpoint> ParseEndpoint(std::string_view text);

// Activation codecs a pipeline may use between stages (inputs from the requester and logits
// to it are always fp32): fp32 (exact), fp16 (half the bytes; relative error <= 2^-11 per
// value, values beyond ±65504 saturate) and int8 (a quarter; per-256-value-block scale and
// offset, error <= scale/2).
inline constexpr std::string_view kActivationFp32 = "fp32";
inline constexpr std::string_view kActivationFp16 = "fp16";
inline constexpr std::string_view kActivationInt8 = "int8";
inline constexpr std::string_view kActivationCodecList = "fp32, fp16 or int8";
inline bool IsActivationCodec(std::string_view name) {
  return name == kActivationFp32 || name == kActivationFp16 || name == kActivationInt8;
}

}  // namespace fedslice::slicing
