// Framing and validation of FedSlice wire messages (proto/fedslice/wire.proto).
//
// One frame carries one serialized proto::Envelope:
//
//     0       1       2       3       4       5       6       7       8
//     +-------+-------+-------+-------+-------+-------+-------+-------+------------------+
//     |  'F'  |  'S'  |  'L'  |  '1'  |   payload length N (u32, big-endian)  | payload ...
//     +-------+-------+-------+-------+-------+-------+-------+-------+------------------+
//     |<------------ magic ---------->|<------------------ N ------->|<----- N bytes ---->|
//
//   - magic "FSL1" tells a FedSlice peer from anything else (an HTTP client, a TLS record of a
//     mismatched layer) at the first frame and re-synchronisation is never attempted: a bad
//     magic ends the session.
//   - N counts the payload only, 1 <= N <= max_frame_bytes. The length is checked against the
//     receiver's limit BEFORE any buffer is allocated, so a peer cannot make us reserve memory
//     by announcing a large frame.
//   - payload = Envelope serialized with Protobuf; parsing it is followed by ValidateEnvelope.
//
// All functions here are pure, thread-safe, never throw and never abort on bad input.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::net {

// Protocol version spoken by this build. A peer with another major is refused; minor versions
// are compatible (new message types are answered with ERROR_UNSUPPORTED_MESSAGE).
inline constexpr uint32_t kProtocolMajor = 1;
// 1.1: split inference (fields 40-49); 1.2: conv2d layers cut by position
// (LayerSplit.by_position); 1.3: conv2d layers cut by sample (LayerSplit.by_sample).
inline constexpr uint32_t kProtocolMinor = 3;

inline constexpr std::array<uint8_t, 4> kFrameMagic = {'F', 'S', 'L', '1'};
inline constexpr size_t kFrameHeaderBytes = 8;
// Default frame limit: the CNN's 1,663,370 fp32 parameters are 6.7 MB; 16 MiB leaves room for
// larger models, activations of big micro-batches and Protobuf overhead.
inline constexpr size_t kDefaultMaxFrameBytes = size_t{16} << 20;
// Hard ceiling for any configured limit: the length field is 32 bits, and 1 GiB per frame is
// beyond anything FedSlice sends.
inline constexpr size_t kMaxFrameBytesCeiling = size_t{1} << 30;
// Bound on strings inside messages (ids, reasons, codec names); longer ones are rejected.
inline constexpr size_t kMaxStringBytes = 4096;

// Header of one frame, after checking.
struct FrameHeader {
  uint32_t payload_bytes = 0;
};

// Every decoding function below takes an optional `code` that receives, on failure, the wire
// error code to put in the Error reply (ERROR_MALFORMED_FRAME, ERROR_FRAME_TOO_LARGE, ...).

// Checks the 8 header bytes: magic, then 1 <= length <= max_frame_bytes.
// Errors: kCorruption (short header, bad magic, zero length),
//         kResourceExhausted (length above max_frame_bytes).
Result<FrameHeader> ParseFrameHeader(std::span<const uint8_t> header, size_t max_frame_bytes,
                                     proto::ErrorCode* code = nullptr);

// Writes the header for a payload of `payload_bytes` into out[0..8).
void WriteFrameHeader(uint32_t payload_bytes, std::span<uint8_t, kFrameHeaderBytes> out);

// Serializes `envelope` as one frame (header + payload) directly into `*out` (replacing its
// contents; the buffer's capacity is reused). Fails with kResourceExhausted when the payload
// would exceed max_frame_bytes, so nothing is sent that the peer would refuse.
Status EncodeFrame(const proto::Envelope& envelope, size_t max_frame_bytes, std::string* out);

// Parses a payload (a frame without its header) and validates it with ValidateEnvelope.
// Errors: kCorruption (not a valid Envelope), or ValidateEnvelope's.
Result<proto::Envelope> ParseEnvelope(std::span<const uint8_t> payload,
                                      proto::ErrorCode* code = nullptr);

// Decodes the first frame of `bytes` (header + payload). On success `*consumed` (if given) is
// the frame's size. Errors as ParseFrameHeader / ParseEnvelope, plus kOutOfRange when `bytes`
// holds less than a whole frame (truncated).
Result<proto::Envelope> DecodeFrame(std::span<const uint8_t> bytes, size_t max_frame_bytes,
                                    size_t* consumed = nullptr, proto::ErrorCode* code = nullptr);

// Structural validation of a parsed envelope, without decoding tensors:
//   - protocol_major == kProtocolMajor (else kFailedPrecondition, ERROR_UNSUPPORTED_VERSION),
//   - a body is present (else kInvalidArgument) and known to this build (else
//     kInvalidArgument with ERROR_UNSUPPORTED_MESSAGE, naming the unknown field number),
//   - seq >= 1, strings bounded, numeric fields finite and in range (kInvalidArgument),
//   - every EncodedTensor passes ValidateEncodedTensor (encoded_tensor.h).
// Semantic checks (shapes against the model spec, tasks actually given, turn order) belong to
// the layer that knows the model and the tasks.
Status ValidateEnvelope(const proto::Envelope& envelope, proto::ErrorCode* code = nullptr);

// Convenience builders. Version and seq are filled in by the sender (Session::Send).
proto::Envelope MakeError(proto::ErrorCode code, std::string_view message,
                          uint64_t in_reply_to_seq = 0);
proto::Envelope MakeBye(proto::ByeReason reason, std::string_view message);
proto::Envelope MakeReject(proto::RejectReason reason, std::string_view message,
                           uint32_t retry_after_ms = 0);
proto::Envelope MakeHeartbeat();

// Human-readable name of the envelope's body ("fit_task", "unknown field 45", "empty").
std::string BodyName(const proto::Envelope& envelope);

}  // namespace fedslice::net
