// libFuzzer target for the frame and envelope parsers (common/include/fedslice/common/net/
// wire.h): DecodeFrame on the raw bytes (header + payload) and ParseEnvelope on the same bytes
// taken as a payload. A frame that decodes must encode again and decode to the same envelope
// type, and its tensors must decode (or be refused) without crashing.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "fedslice/common/codec.h"
#include "fedslice/common/net/wire.h"

namespace {

constexpr size_t kMaxFrame = size_t{1} << 20;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "property violated: %s\n", what);
    std::abort();
  }
}

void Exercise(const fedslice::proto::Envelope& envelope) {
  std::string frame;
  Check(fedslice::net::EncodeFrame(envelope, fedslice::net::kMaxFrameBytesCeiling, &frame).ok(),
        "a valid envelope encodes");
  size_t consumed = 0;
  auto again = fedslice::net::DecodeFrame(
      std::span(reinterpret_cast<const uint8_t*>(frame.data()), frame.size()),
      fedslice::net::kMaxFrameBytesCeiling, &consumed);
  Check(again.ok(), "an encoded envelope decodes");
  Check(consumed == frame.size(), "the whole frame is consumed");
  Check(again->body_case() == envelope.body_case(), "the body survives a round trip");
  // Decode the tensors a coordinator or client would decode.
  const fedslice::proto::EncodedTensor* tensor = nullptr;
  if (envelope.has_fit_task()) tensor = &envelope.fit_task().global_weights();
  if (envelope.has_fit_result()) tensor = &envelope.fit_result().update();
  if (tensor != nullptr && tensor->num_values() <= (1u << 16)) {
    std::vector<float> out(tensor->num_values());
    (void)fedslice::codec::Decode(*tensor, out);
  }
}

}  // namespace

// Protobuf logs every invalid UTF-8 string it parses; silence it so that findings stand out.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  size_t consumed = 0;
  fedslice::proto::ErrorCode code{};
  auto frame = fedslice::net::DecodeFrame(bytes, kMaxFrame, &consumed, &code);
  if (frame.ok()) {
    Check(consumed >= fedslice::net::kFrameHeaderBytes && consumed <= size, "consumed in range");
    Exercise(*frame);
  }
  auto envelope = fedslice::net::ParseEnvelope(bytes, &code);
  if (envelope.ok()) Exercise(*envelope);
  return 0;
}
