// libFuzzer target for every update codec's decoder (common/include/fedslice/common/codec.h).
//
// Input, mode byte first:
//   bit 7 set:   the rest is a serialized proto::EncodedTensor, decoded as a peer would send
//                it (the receiver expects min(num_values, 1 << 16) values).
//   bit 7 clear: a structured tensor, so that most inputs get past the length checks and
//                reach the per-codec checks: codec = kCodecs[mode % size], then u16 n,
//                u16 block size, one flag byte (which of num_blocks / k are taken from the
//                input instead of being made consistent), u16 num_blocks, u16 k, then the
//                payload.
// Properties checked besides "no crash, no sanitizer report": a successful decode yields only
// finite values, and re-encoding them with the same codec decodes again.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "fedslice/common/codec.h"

namespace {

using fedslice::codec::CodecSpec;

constexpr const char* kCodecs[] = {"fp32", "fp16",   "int8",      "int4",    "qsgd:1",
                                   "qsgd:3", "qsgd:100", "sign", "topk:0.1", "topk:1",
                                   "topk:0.5x", "int9"};

uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "property violated: %s\n", what);
    std::abort();
  }
}

void DecodeAndCheck(const fedslice::proto::EncodedTensor& t, size_t expected) {
  std::vector<float> out(expected);
  if (!fedslice::codec::Decode(t, out).ok()) return;
  for (float x : out) Check(std::isfinite(x), "decoded value is finite");
  auto spec = fedslice::codec::ParseCodec(t.codec(), t.block_size());
  Check(spec.ok(), "a decodable codec name parses");
  fedslice::proto::EncodedTensor again;
  Check(fedslice::codec::Encode(*spec, out, &again, 7).ok(), "decoded values re-encode");
  std::vector<float> out2(expected);
  Check(fedslice::codec::Decode(again, out2).ok(), "a re-encoded tensor decodes");
}

}  // namespace

// Protobuf logs every invalid UTF-8 string it parses; silence it so that findings stand out.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  fedslice::proto::EncodedTensor t;
  if (mode & 0x80) {
    if (!t.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
    const size_t expected = t.num_values() <= (1u << 16) ? t.num_values() : 16;
    DecodeAndCheck(t, expected);
    return 0;
  }
  if (size < 10) return 0;
  const char* name = kCodecs[mode % (sizeof(kCodecs) / sizeof(kCodecs[0]))];
  const uint64_t n = U16(data + 1);
  const uint32_t block = U16(data + 3);
  const uint8_t flags = data[5];
  t.set_codec(name);
  t.set_num_values(n);
  t.set_block_size(block);
  auto spec = fedslice::codec::ParseCodec(name, 0);
  const bool block_wise = spec.ok() && spec->block_wise();
  t.set_num_blocks((flags & 1) || !block_wise || block == 0 ? U16(data + 6)
                                                            : (n + block - 1) / block);
  if ((flags & 2) || !spec.ok() || spec->kind != fedslice::codec::CodecKind::kTopK) {
    t.set_k(U16(data + 8));
  } else {
    t.set_k(fedslice::codec::TopKCount(spec->fraction, n));
  }
  if (!block_wise && !(flags & 1)) {
    t.set_block_size(0);
    t.set_num_blocks(0);
  }
  t.set_payload(reinterpret_cast<const char*>(data + 10), size - 10);
  // Expect what the tensor claims most of the time; sometimes one fewer (a count mismatch).
  DecodeAndCheck(t, (flags & 4) && n > 0 ? n - 1 : n);
  return 0;
}
