#include "fedslice/common/net/wire.h"

#include <google/protobuf/unknown_field_set.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>

#include "fedslice/common/net/encoded_tensor.h"

namespace fedslice::net {
namespace {

void SetCode(proto::ErrorCode* code, proto::ErrorCode value) {
  if (code != nullptr) *code = value;
}

// Invalid message with ERROR_INVALID_MESSAGE.
Status Invalid(proto::ErrorCode* code, std::string message) {
  SetCode(code, proto::ERROR_INVALID_MESSAGE);
  return Status::InvalidArgument(std::move(message));
}

Status CheckString(const std::string& s, std::string_view field, proto::ErrorCode* code) {
  if (s.size() > kMaxStringBytes) {
    return Invalid(code, std::string(field) + " is " + std::to_string(s.size()) + " bytes, limit " +
                             std::to_string(kMaxStringBytes));
  }
  return Status::Ok();
}

// A finite value >= lo (and <= hi).
Status CheckNumber(double v, std::string_view field, proto::ErrorCode* code, double lo = 0.0,
                   double hi = std::numeric_limits<double>::max()) {
  if (!std::isfinite(v) || v < lo || v > hi) {
    return Invalid(code, std::string(field) + " = " + std::to_string(v) +
                             " is not finite or not in [" + std::to_string(lo) + ", " +
                             std::to_string(hi) + "]");
  }
  return Status::Ok();
}

// A profile's layer timing; `where` names the message ("hello.profile", "profile_update").
Status CheckLayerTiming(const proto::LayerTiming& t, const std::string& where,
                        proto::ErrorCode* code) {
  FEDSLICE_RETURN_IF_ERROR(CheckString(t.layer_name(), where + ".layer_name", code));
  const std::pair<double, const char*> numbers[] = {
      {t.forward_ms_per_sample(), ".forward_ms_per_sample"},
      {t.backward_ms_per_sample(), ".backward_ms_per_sample"},
      {t.join_ms_per_sample(), ".join_ms_per_sample"},
      {t.band_fixed_ms_per_sample(), ".band_fixed_ms_per_sample"},
      {t.band_row_ms_per_sample(), ".band_row_ms_per_sample"}};
  for (const auto& [value, name] : numbers) {
    FEDSLICE_RETURN_IF_ERROR(CheckNumber(value, where + name, code));
  }
  return Status::Ok();
}

Status CheckTensor(const proto::EncodedTensor& t, std::string_view field, proto::ErrorCode* code) {
  Status s = ValidateEncodedTensor(t);
  if (!s.ok()) {
    SetCode(code, proto::ERROR_INVALID_TENSOR);
    return s.WithContext(field);
  }
  return Status::Ok();
}

Status CheckCodecConfig(const proto::CodecConfig& c, std::string_view field,
                        proto::ErrorCode* code) {
  return CheckString(c.name(), std::string(field) + ".name", code);
}

// Number of the first unknown field in the body range (>= 10), 0 if none.
int UnknownBodyField(const proto::Envelope& e) {
  const auto& unknown = e.GetReflection()->GetUnknownFields(e);
  for (int i = 0; i < unknown.field_count(); ++i) {
    if (unknown.field(i).number() >= 10) return unknown.field(i).number();
  }
  return 0;
}

Status ValidateBody(const proto::Envelope& e, proto::ErrorCode* code) {
  using E = proto::Envelope;
  switch (e.body_case()) {
    case E::kHello: {
      const auto& m = e.hello();
      if (m.client_id().empty()) return Invalid(code, "hello.client_id is empty");
      FEDSLICE_RETURN_IF_ERROR(CheckString(m.client_id(), "hello.client_id", code));
      FEDSLICE_RETURN_IF_ERROR(CheckString(m.software_version(), "hello.software_version", code));
      FEDSLICE_RETURN_IF_ERROR(CheckString(m.stage_endpoint(), "hello.stage_endpoint", code));
      const auto& p = m.profile();
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(p.flops(), "hello.profile.flops", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(p.link_bandwidth_bytes_per_s(),
                                           "hello.profile.link_bandwidth_bytes_per_s", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckNumber(p.link_latency_ms(), "hello.profile.link_latency_ms", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(p.slowdown(), "hello.profile.slowdown", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckNumber(p.activation_io_ms_per_mb(), "hello.profile.activation_io_ms_per_mb", code));
      FEDSLICE_RETURN_IF_ERROR(CheckString(p.device_name(), "hello.profile.device_name", code));
      for (const auto& t : p.layer_timings()) {
        FEDSLICE_RETURN_IF_ERROR(CheckLayerTiming(t, "hello.profile", code));
      }
      return Status::Ok();
    }
    case E::kWelcome: {
      const auto& m = e.welcome();
      FEDSLICE_RETURN_IF_ERROR(CheckString(m.session_id(), "welcome.session_id", code));
      FEDSLICE_RETURN_IF_ERROR(CheckString(m.run_config().run_id(), "welcome.run_id", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckCodecConfig(m.run_config().uplink_codec(), "welcome.uplink_codec", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckCodecConfig(m.run_config().downlink_codec(), "welcome.downlink_codec", code));
      return Status::Ok();
    }
    case E::kReject:
      return CheckString(e.reject().message(), "reject.message", code);
    case E::kFitTask: {
      const auto& m = e.fit_task();
      FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.global_weights(), "fit_task.global_weights", code));
      if (m.local_epochs() == 0) return Invalid(code, "fit_task.local_epochs is 0");
      if (m.batch_size() == 0) return Invalid(code, "fit_task.batch_size is 0");
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.learning_rate(), "fit_task.learning_rate", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.momentum(), "fit_task.momentum", code, 0.0, 1.0));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.weight_decay(), "fit_task.weight_decay", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.prox_mu(), "fit_task.prox_mu", code));
      return CheckCodecConfig(m.codec(), "fit_task.codec", code);
    }
    case E::kFitResult: {
      const auto& m = e.fit_result();
      FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.update(), "fit_result.update", code));
      if (m.num_samples() == 0) return Invalid(code, "fit_result.num_samples is 0");
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.train_loss(), "fit_result.train_loss", code));
      return CheckNumber(m.compute_seconds(), "fit_result.compute_seconds", code);
    }
    case E::kEvaluateTask: {
      const auto& m = e.evaluate_task();
      FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.weights(), "evaluate_task.weights", code));
      if (m.batch_size() == 0) return Invalid(code, "evaluate_task.batch_size is 0");
      return Status::Ok();
    }
    case E::kEvaluateResult: {
      const auto& m = e.evaluate_result();
      if (m.num_correct() > m.num_samples()) {
        return Invalid(code, "evaluate_result.num_correct " + std::to_string(m.num_correct()) +
                                 " > num_samples " + std::to_string(m.num_samples()));
      }
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.loss(), "evaluate_result.loss", code));
      return CheckNumber(m.compute_seconds(), "evaluate_result.compute_seconds", code);
    }
    case E::kHeartbeat:
      return Status::Ok();
    case E::kError:
      return CheckString(e.error().message(), "error.message", code);
    case E::kBye:
      return CheckString(e.bye().message(), "bye.message", code);
    case E::kPipelineRequest: {
      const auto& m = e.pipeline_request();
      if (m.micro_batch() == 0) return Invalid(code, "pipeline_request.micro_batch is 0");
      FEDSLICE_RETURN_IF_ERROR(
          CheckString(m.activation_codec(), "pipeline_request.activation_codec", code));
      if (m.exclude_clients_size() > 4096) {
        return Invalid(code, "pipeline_request.exclude_clients has more than 4096 entries");
      }
      for (const auto& c : m.exclude_clients()) {
        FEDSLICE_RETURN_IF_ERROR(CheckString(c, "pipeline_request.exclude_clients", code));
      }
      return Status::Ok();
    }
    case E::kPipelinePlan: {
      const auto& m = e.pipeline_plan();
      if (m.stages_size() == 0) return Invalid(code, "pipeline_plan has no stages");
      if (m.micro_batch() == 0) return Invalid(code, "pipeline_plan.micro_batch is 0");
      for (const auto& st : m.stages()) {
        FEDSLICE_RETURN_IF_ERROR(CheckString(st.client_id(), "pipeline_plan.stage.client_id", code));
        FEDSLICE_RETURN_IF_ERROR(CheckString(st.endpoint(), "pipeline_plan.stage.endpoint", code));
        FEDSLICE_RETURN_IF_ERROR(CheckString(st.layers(), "pipeline_plan.stage.layers", code));
        if (st.unit_begin() >= st.unit_end()) {
          return Invalid(code, "pipeline_plan.stage has an empty unit range");
        }
        FEDSLICE_RETURN_IF_ERROR(
            CheckNumber(st.predicted_ms(), "pipeline_plan.stage.predicted_ms", code));
      }
      FEDSLICE_RETURN_IF_ERROR(
          CheckString(m.activation_codec(), "pipeline_plan.activation_codec", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(m.predicted_samples_per_s(),
                                           "pipeline_plan.predicted_samples_per_s", code));
      return CheckNumber(m.predicted_latency_ms(), "pipeline_plan.predicted_latency_ms", code);
    }
    case E::kSliceAssign: {
      const auto& m = e.slice_assign();
      if (m.unit_begin() >= m.unit_end()) {
        return Invalid(code, "slice_assign has an empty unit range");
      }
      if (m.stage_index() >= m.num_stages()) {
        return Invalid(code, "slice_assign.stage_index is not below num_stages");
      }
      if (m.micro_batch() == 0) return Invalid(code, "slice_assign.micro_batch is 0");
      FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.weights(), "slice_assign.weights", code));
      for (const auto& [s, name] :
           {std::pair{&m.upstream_identity(), "slice_assign.upstream_identity"},
            {&m.downstream_endpoint(), "slice_assign.downstream_endpoint"},
            {&m.downstream_identity(), "slice_assign.downstream_identity"},
            {&m.requester_identity(), "slice_assign.requester_identity"},
            {&m.activation_codec(), "slice_assign.activation_codec"}}) {
        FEDSLICE_RETURN_IF_ERROR(CheckString(*s, name, code));
      }
      if (m.upstream_identity().empty() || m.requester_identity().empty()) {
        return Invalid(code, "slice_assign needs upstream_identity and requester_identity");
      }
      return Status::Ok();
    }
    case E::kSliceReady:
      return CheckString(e.slice_ready().message(), "slice_ready.message", code);
    case E::kSliceRelease:
      return CheckString(e.slice_release().reason(), "slice_release.reason", code);
    case E::kPipelineFailed:
      FEDSLICE_RETURN_IF_ERROR(
          CheckString(e.pipeline_failed().failed_client(), "pipeline_failed.failed_client", code));
      return CheckString(e.pipeline_failed().reason(), "pipeline_failed.reason", code);
    case E::kPipelineClose:
      return CheckString(e.pipeline_close().reason(), "pipeline_close.reason", code);
    case E::kStageJoin:
      if (!e.stage_join().upstream() && !e.stage_join().sink()) {
        return Invalid(code, "stage_join is neither upstream nor sink");
      }
      return Status::Ok();
    case E::kActivationBatch: {
      const auto& m = e.activation_batch();
      if (m.num_samples() == 0) return Invalid(code, "activation_batch.num_samples is 0");
      FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.data(), "activation_batch.data", code));
      if (m.has_carry()) {
        FEDSLICE_RETURN_IF_ERROR(CheckTensor(m.carry(), "activation_batch.carry", code));
      }
      return Status::Ok();
    }
    case E::kProfileUpdate: {
      const auto& p = e.profile_update().profile();
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(p.flops(), "profile_update.flops", code));
      FEDSLICE_RETURN_IF_ERROR(CheckNumber(p.slowdown(), "profile_update.slowdown", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckNumber(p.activation_io_ms_per_mb(), "profile_update.activation_io_ms_per_mb", code));
      FEDSLICE_RETURN_IF_ERROR(
          CheckString(p.device_name(), "profile_update.device_name", code));
      if (p.layer_timings_size() > 4096) {
        return Invalid(code, "profile_update has more than 4096 layer timings");
      }
      for (const auto& t : p.layer_timings()) {
        FEDSLICE_RETURN_IF_ERROR(CheckLayerTiming(t, "profile_update", code));
      }
      return Status::Ok();
    }
    case E::BODY_NOT_SET:
      break;
  }
  // No body we know: either none at all, or one added by a newer minor version (kept by
  // Protobuf as an unknown field).
  if (const int field = UnknownBodyField(e); field != 0) {
    SetCode(code, proto::ERROR_UNSUPPORTED_MESSAGE);
    return Status::InvalidArgument("unsupported message type (field " + std::to_string(field) +
                                   ") from protocol " + std::to_string(e.protocol_major()) + "." +
                                   std::to_string(e.protocol_minor()) + "; this peer speaks " +
                                   std::to_string(kProtocolMajor) + "." +
                                   std::to_string(kProtocolMinor));
  }
  return Invalid(code, "envelope has no body");
}

}  // namespace

Result<FrameHeader> ParseFrameHeader(std::span<const uint8_t> header, size_t max_frame_bytes,
                                     proto::ErrorCode* code) {
  SetCode(code, proto::ERROR_MALFORMED_FRAME);
  if (header.size() < kFrameHeaderBytes) {
    return Status::Corruption("frame header truncated: " + std::to_string(header.size()) + " of " +
                              std::to_string(kFrameHeaderBytes) + " bytes");
  }
  if (std::memcmp(header.data(), kFrameMagic.data(), kFrameMagic.size()) != 0) {
    char hex[3 * 4 + 1];
    std::snprintf(hex, sizeof(hex), "%02x %02x %02x %02x", header[0], header[1], header[2],
                  header[3]);
    return Status::Corruption(std::string("bad frame magic (") + hex +
                              "), expected \"FSL1\": not a FedSlice peer or stream out of sync");
  }
  const uint32_t n = (uint32_t{header[4]} << 24) | (uint32_t{header[5]} << 16) |
                     (uint32_t{header[6]} << 8) | uint32_t{header[7]};
  if (n == 0) return Status::Corruption("frame with empty payload");
  if (n > max_frame_bytes) {
    SetCode(code, proto::ERROR_FRAME_TOO_LARGE);
    return Status::ResourceExhausted("frame payload of " + std::to_string(n) +
                                     " bytes exceeds the limit of " +
                                     std::to_string(max_frame_bytes) + " bytes");
  }
  SetCode(code, proto::ERROR_UNSPECIFIED);
  return FrameHeader{n};
}

void WriteFrameHeader(uint32_t payload_bytes, std::span<uint8_t, kFrameHeaderBytes> out) {
  std::memcpy(out.data(), kFrameMagic.data(), kFrameMagic.size());
  out[4] = static_cast<uint8_t>(payload_bytes >> 24);
  out[5] = static_cast<uint8_t>(payload_bytes >> 16);
  out[6] = static_cast<uint8_t>(payload_bytes >> 8);
  out[7] = static_cast<uint8_t>(payload_bytes);
}

Status EncodeFrame(const proto::Envelope& envelope, size_t max_frame_bytes, std::string* out) {
  const size_t limit = std::min(max_frame_bytes, kMaxFrameBytesCeiling);
  const size_t n = envelope.ByteSizeLong();
  if (n == 0) return Status::InvalidArgument("refusing to send an empty envelope");
  if (n > limit) {
    return Status::ResourceExhausted("message " + BodyName(envelope) + " serializes to " +
                                     std::to_string(n) + " bytes, above the frame limit of " +
                                     std::to_string(limit) + " bytes");
  }
  try {
    out->resize(kFrameHeaderBytes + n);
  } catch (const std::exception& e) {
    return Status::ResourceExhausted(std::string("allocating a frame: ") + e.what());
  }
  auto* data = reinterpret_cast<uint8_t*>(out->data());
  WriteFrameHeader(static_cast<uint32_t>(n), std::span<uint8_t, kFrameHeaderBytes>(data, 8));
  if (!envelope.SerializeToArray(data + kFrameHeaderBytes, static_cast<int>(n))) {
    return Status::Internal("serializing " + BodyName(envelope) + " failed");
  }
  return Status::Ok();
}

Result<proto::Envelope> ParseEnvelope(std::span<const uint8_t> payload, proto::ErrorCode* code) {
  proto::Envelope envelope;
  bool parsed = false;
  try {
    parsed = payload.size() <= kMaxFrameBytesCeiling &&
             envelope.ParseFromArray(payload.data(), static_cast<int>(payload.size()));
  } catch (const std::exception& e) {
    parsed = false;
  }
  if (!parsed) {
    SetCode(code, proto::ERROR_MALFORMED_FRAME);
    return Status::Corruption("frame payload of " + std::to_string(payload.size()) +
                              " bytes is not a valid Envelope");
  }
  FEDSLICE_RETURN_IF_ERROR(ValidateEnvelope(envelope, code));
  return envelope;
}

Result<proto::Envelope> DecodeFrame(std::span<const uint8_t> bytes, size_t max_frame_bytes,
                                    size_t* consumed, proto::ErrorCode* code) {
  FEDSLICE_ASSIGN_OR_RETURN(FrameHeader header, ParseFrameHeader(bytes, max_frame_bytes, code));
  const size_t total = kFrameHeaderBytes + header.payload_bytes;
  if (bytes.size() < total) {
    SetCode(code, proto::ERROR_MALFORMED_FRAME);
    return Status::OutOfRange("truncated frame: payload announced as " +
                              std::to_string(header.payload_bytes) + " bytes, only " +
                              std::to_string(bytes.size() - kFrameHeaderBytes) + " present");
  }
  FEDSLICE_ASSIGN_OR_RETURN(
      proto::Envelope envelope,
      ParseEnvelope(bytes.subspan(kFrameHeaderBytes, header.payload_bytes), code));
  if (consumed != nullptr) *consumed = total;
  return envelope;
}

Status ValidateEnvelope(const proto::Envelope& envelope, proto::ErrorCode* code) {
  if (envelope.protocol_major() != kProtocolMajor) {
    SetCode(code, proto::ERROR_UNSUPPORTED_VERSION);
    return Status::FailedPrecondition(
        "protocol version " + std::to_string(envelope.protocol_major()) + "." +
        std::to_string(envelope.protocol_minor()) + " is not supported; this peer speaks " +
        std::to_string(kProtocolMajor) + "." + std::to_string(kProtocolMinor));
  }
  if (envelope.seq() == 0) return Invalid(code, "envelope seq is 0 (sequence starts at 1)");
  return ValidateBody(envelope, code);
}

proto::Envelope MakeError(proto::ErrorCode code, std::string_view message,
                          uint64_t in_reply_to_seq) {
  proto::Envelope e;
  auto* error = e.mutable_error();
  error->set_code(code);
  error->set_message(std::string(message.substr(0, kMaxStringBytes)));
  error->set_in_reply_to_seq(in_reply_to_seq);
  return e;
}

proto::Envelope MakeBye(proto::ByeReason reason, std::string_view message) {
  proto::Envelope e;
  e.mutable_bye()->set_reason(reason);
  e.mutable_bye()->set_message(std::string(message.substr(0, kMaxStringBytes)));
  return e;
}

proto::Envelope MakeReject(proto::RejectReason reason, std::string_view message,
                           uint32_t retry_after_ms) {
  proto::Envelope e;
  auto* reject = e.mutable_reject();
  reject->set_reason(reason);
  reject->set_message(std::string(message.substr(0, kMaxStringBytes)));
  reject->set_retry_after_ms(retry_after_ms);
  return e;
}

proto::Envelope MakeHeartbeat() {
  proto::Envelope e;
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  e.mutable_heartbeat()->set_sent_unix_micros(
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(now).count()));
  return e;
}

std::string BodyName(const proto::Envelope& envelope) {
  if (envelope.body_case() != proto::Envelope::BODY_NOT_SET) {
    const auto* field = envelope.GetDescriptor()->FindFieldByNumber(envelope.body_case());
    if (field != nullptr) return field->name();
  }
  if (const int field = UnknownBodyField(envelope); field != 0) {
    return "unknown field " + std::to_string(field);
  }
  return "empty";
}

}  // namespace fedslice::net
