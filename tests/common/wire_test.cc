// Framing, envelope validation and the fp32 tensor codec: pure functions, no sockets.
#include "fedslice/common/net/wire.h"

#include <google/protobuf/stubs/logging.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fedslice/common/net/encoded_tensor.h"

namespace fedslice::net {
namespace {

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

proto::Envelope Stamped(proto::Envelope e, uint64_t seq = 1) {
  e.set_protocol_major(kProtocolMajor);
  e.set_protocol_minor(kProtocolMinor);
  e.set_seq(seq);
  return e;
}

proto::Envelope FitTask(std::span<const float> weights) {
  proto::Envelope e;
  auto* t = e.mutable_fit_task();
  t->set_round(3);
  t->set_task_id(42);
  EXPECT_TRUE(EncodeFp32(weights, t->mutable_global_weights()).ok());
  t->set_local_epochs(5);
  t->set_batch_size(10);
  t->set_learning_rate(0.05f);
  t->set_momentum(0.9f);
  t->mutable_codec()->set_name("int8");
  t->mutable_codec()->set_block_size(256);
  t->set_deadline_ms(30'000);
  return Stamped(std::move(e), 7);
}

std::string Frame(const proto::Envelope& e, size_t max = kDefaultMaxFrameBytes) {
  std::string frame;
  Status s = EncodeFrame(e, max, &frame);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return frame;
}

// A frame whose payload is `payload`, bypassing EncodeFrame's checks.
std::string RawFrame(const std::string& payload) {
  std::string frame(kFrameHeaderBytes, '\0');
  WriteFrameHeader(static_cast<uint32_t>(payload.size()),
                   std::span<uint8_t, 8>(reinterpret_cast<uint8_t*>(frame.data()), 8));
  return frame + payload;
}

TEST(WireTest, FrameRoundTripPreservesEveryField) {
  const std::vector<float> w = {1.5f, -2.25f, 0.0f, 3.0e-7f, -1.0e30f};
  const proto::Envelope sent = FitTask(w);
  const std::string frame = Frame(sent);

  size_t consumed = 0;
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> got =
      DecodeFrame(Bytes(frame + "trailing"), kDefaultMaxFrameBytes, &consumed, &code);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(consumed, frame.size());
  EXPECT_EQ(got->SerializeAsString(), sent.SerializeAsString());
  EXPECT_EQ(got->seq(), 7u);
  Result<std::vector<float>> decoded = DecodeFp32(got->fit_task().global_weights());
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, w);
}

TEST(WireTest, HeaderIsMagicThenBigEndianLength) {
  const std::string frame = Frame(FitTask(std::vector<float>(1000, 1.0f)));
  ASSERT_GT(frame.size(), 4000u);
  EXPECT_EQ(frame.substr(0, 4), "FSL1");
  const uint32_t n = (uint32_t{uint8_t(frame[4])} << 24) | (uint32_t{uint8_t(frame[5])} << 16) |
                     (uint32_t{uint8_t(frame[6])} << 8) | uint32_t{uint8_t(frame[7])};
  EXPECT_EQ(n, frame.size() - kFrameHeaderBytes);
}

TEST(WireTest, OversizedLengthIsRejectedFromTheHeaderAlone) {
  // Only the 8 header bytes exist: the check cannot have read (or allocated) a payload.
  std::string header(kFrameHeaderBytes, '\0');
  WriteFrameHeader(0xFFFFFFFFu,
                   std::span<uint8_t, 8>(reinterpret_cast<uint8_t*>(header.data()), 8));
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<FrameHeader> h = ParseFrameHeader(Bytes(header), kDefaultMaxFrameBytes, &code);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), Status::Code::kResourceExhausted);
  EXPECT_NE(h.status().message().find("exceeds the limit"), std::string::npos);
  EXPECT_EQ(code, proto::ERROR_FRAME_TOO_LARGE);

  Result<proto::Envelope> e = DecodeFrame(Bytes(header), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(e.status().code(), Status::Code::kResourceExhausted);

  // One byte over a custom limit is already too much; exactly at the limit is fine.
  const std::string frame = Frame(FitTask(std::vector<float>(100, 1.0f)));
  const size_t payload = frame.size() - kFrameHeaderBytes;
  EXPECT_EQ(ParseFrameHeader(Bytes(frame), payload - 1).status().code(),
            Status::Code::kResourceExhausted);
  EXPECT_TRUE(ParseFrameHeader(Bytes(frame), payload).ok());
}

TEST(WireTest, EncodeRefusesAFrameThePeerWouldRefuse) {
  std::string out;
  Status s = EncodeFrame(FitTask(std::vector<float>(1000, 1.0f)), 1024, &out);
  EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
  EXPECT_NE(s.message().find("fit_task"), std::string::npos);
  EXPECT_EQ(EncodeFrame(proto::Envelope(), kDefaultMaxFrameBytes, &out).code(),
            Status::Code::kInvalidArgument);
}

TEST(WireTest, TruncatedFramesAreReported) {
  const std::string frame = Frame(FitTask(std::vector<float>(10, 1.0f)));
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> e =
      DecodeFrame(Bytes(frame.substr(0, frame.size() - 1)), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(e.status().code(), Status::Code::kOutOfRange);
  EXPECT_NE(e.status().message().find("truncated"), std::string::npos);
  EXPECT_EQ(code, proto::ERROR_MALFORMED_FRAME);

  e = DecodeFrame(Bytes(frame.substr(0, 5)), kDefaultMaxFrameBytes);
  EXPECT_EQ(e.status().code(), Status::Code::kCorruption);
  EXPECT_NE(e.status().message().find("header truncated"), std::string::npos);
}

TEST(WireTest, BadMagicAndEmptyPayloadAreCorruption) {
  std::string frame = Frame(FitTask(std::vector<float>(10, 1.0f)));
  frame[0] = 'G';
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> e = DecodeFrame(Bytes(frame), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(e.status().code(), Status::Code::kCorruption);
  EXPECT_NE(e.status().message().find("magic"), std::string::npos);
  EXPECT_EQ(code, proto::ERROR_MALFORMED_FRAME);

  e = DecodeFrame(Bytes(RawFrame("")), kDefaultMaxFrameBytes);
  EXPECT_EQ(e.status().code(), Status::Code::kCorruption);
  EXPECT_NE(e.status().message().find("empty payload"), std::string::npos);
}

TEST(WireTest, GarbagePayloadIsCorruption) {
  // 0xff starts a tag with wire type 7, which does not exist: never a valid Envelope.
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> e =
      DecodeFrame(Bytes(RawFrame(std::string(64, '\xff'))), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(e.status().code(), Status::Code::kCorruption);
  EXPECT_NE(e.status().message().find("not a valid Envelope"), std::string::npos);
  EXPECT_EQ(code, proto::ERROR_MALFORMED_FRAME);
}

TEST(WireTest, WrongProtocolMajorIsRefused) {
  proto::Envelope e = FitTask(std::vector<float>(4, 1.0f));
  e.set_protocol_major(kProtocolMajor + 1);
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> got = DecodeFrame(Bytes(Frame(e)), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(got.status().code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(got.status().message().find("protocol version 2." + std::to_string(kProtocolMinor) +
                                        " is not supported"),
            std::string::npos);
  EXPECT_EQ(code, proto::ERROR_UNSUPPORTED_VERSION);
}

TEST(WireTest, EmptyBodyAndUnknownBodyAreTold) {
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  Result<proto::Envelope> got =
      DecodeFrame(Bytes(Frame(Stamped(proto::Envelope()))), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(got.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(got.status().message().find("no body"), std::string::npos);
  EXPECT_EQ(code, proto::ERROR_INVALID_MESSAGE);

  // A body type from a newer minor version: field 65, length-delimited, empty.
  std::string payload = Stamped(proto::Envelope()).SerializeAsString();
  payload += "\x8a\x04";  // varint of tag (65 << 3) | 2 = 522
  payload += '\0';        // length 0
  got = DecodeFrame(Bytes(RawFrame(payload)), kDefaultMaxFrameBytes, nullptr, &code);
  EXPECT_EQ(got.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(got.status().message().find("unsupported message type (field 65)"), std::string::npos)
      << got.status().message();
  EXPECT_EQ(code, proto::ERROR_UNSUPPORTED_MESSAGE);
}

TEST(WireTest, FieldValidationCatchesBadValues) {
  const std::vector<float> w(4, 1.0f);
  auto expect_invalid = [](const proto::Envelope& e, const std::string& needle) {
    proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
    Status s = ValidateEnvelope(e, &code);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  };
  EXPECT_TRUE(ValidateEnvelope(FitTask(w)).ok());

  proto::Envelope e = FitTask(w);
  e.set_seq(0);
  expect_invalid(e, "seq is 0");
  e = FitTask(w);
  e.mutable_fit_task()->set_learning_rate(std::numeric_limits<float>::quiet_NaN());
  expect_invalid(e, "learning_rate");
  e = FitTask(w);
  e.mutable_fit_task()->set_local_epochs(0);
  expect_invalid(e, "local_epochs");
  e = FitTask(w);
  e.mutable_fit_task()->set_momentum(1.5f);
  expect_invalid(e, "momentum");
  e = FitTask(w);
  e.mutable_fit_task()->mutable_global_weights()->mutable_payload()->pop_back();
  proto::ErrorCode code = proto::ERROR_UNSPECIFIED;
  EXPECT_FALSE(ValidateEnvelope(e, &code).ok());
  EXPECT_EQ(code, proto::ERROR_INVALID_TENSOR);

  proto::Envelope r;
  auto* fr = r.mutable_fit_result();
  ASSERT_TRUE(EncodeFp32(w, fr->mutable_update()).ok());
  fr->set_num_samples(100);
  fr->set_train_loss(0.5);
  r = Stamped(r);
  EXPECT_TRUE(ValidateEnvelope(r).ok());
  r.mutable_fit_result()->set_train_loss(std::numeric_limits<double>::infinity());
  expect_invalid(r, "train_loss");
  r.mutable_fit_result()->set_train_loss(0.5);
  r.mutable_fit_result()->set_num_samples(0);
  expect_invalid(r, "num_samples");

  proto::Envelope h = Stamped(proto::Envelope());
  h.mutable_hello()->set_client_id("");
  expect_invalid(h, "client_id is empty");
  h.mutable_hello()->set_client_id(std::string(kMaxStringBytes + 1, 'a'));
  expect_invalid(h, "client_id is");
  h.mutable_hello()->set_client_id("client-0");
  h.mutable_hello()->mutable_profile()->set_flops(-1);
  expect_invalid(h, "flops");
  h.mutable_hello()->mutable_profile()->set_flops(1e9);
  h.mutable_hello()->mutable_profile()->set_activation_io_ms_per_mb(-0.1);
  expect_invalid(h, "hello.profile.activation_io_ms_per_mb");
  h.mutable_hello()->mutable_profile()->set_activation_io_ms_per_mb(0.7);
  auto* timing = h.mutable_hello()->mutable_profile()->add_layer_timings();
  timing->set_forward_ms_per_sample(0.1);
  timing->set_join_ms_per_sample(std::numeric_limits<double>::quiet_NaN());
  expect_invalid(h, "join_ms_per_sample");
  timing->set_join_ms_per_sample(-0.5);
  expect_invalid(h, "join_ms_per_sample");
  timing->set_join_ms_per_sample(0.01);
  timing->set_band_fixed_ms_per_sample(std::numeric_limits<double>::quiet_NaN());
  expect_invalid(h, "hello.profile.band_fixed_ms_per_sample");
  timing->set_band_fixed_ms_per_sample(0.02);
  timing->set_band_row_ms_per_sample(-1e-3);
  expect_invalid(h, "hello.profile.band_row_ms_per_sample");
  timing->set_band_row_ms_per_sample(0.003);
  EXPECT_TRUE(ValidateEnvelope(h).ok());
  proto::Envelope update = Stamped(proto::Envelope());
  *update.mutable_profile_update()->mutable_profile() = h.hello().profile();
  EXPECT_TRUE(ValidateEnvelope(update).ok());
  update.mutable_profile_update()
      ->mutable_profile()
      ->mutable_layer_timings(0)
      ->set_join_ms_per_sample(std::numeric_limits<double>::infinity());
  expect_invalid(update, "profile_update.join_ms_per_sample");
  update.mutable_profile_update()
      ->mutable_profile()
      ->mutable_layer_timings(0)
      ->set_join_ms_per_sample(0.01);
  update.mutable_profile_update()
      ->mutable_profile()
      ->mutable_layer_timings(0)
      ->set_band_row_ms_per_sample(std::numeric_limits<double>::infinity());
  expect_invalid(update, "profile_update.band_row_ms_per_sample");

  proto::Envelope ev = Stamped(proto::Envelope());
  ev.mutable_evaluate_result()->set_num_samples(10);
  ev.mutable_evaluate_result()->set_num_correct(11);
  expect_invalid(ev, "num_correct");
}

TEST(WireTest, SplitInferenceMessagesAreValidated) {
  auto expect_invalid = [](const proto::Envelope& e, const std::string& needle) {
    Status s = ValidateEnvelope(e);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
  };
  proto::Envelope req = Stamped(proto::Envelope());
  req.mutable_pipeline_request()->set_micro_batch(64);
  EXPECT_TRUE(ValidateEnvelope(req).ok());
  req.mutable_pipeline_request()->set_micro_batch(0);
  expect_invalid(req, "micro_batch is 0");

  proto::Envelope assign = Stamped(proto::Envelope());
  auto* a = assign.mutable_slice_assign();
  a->set_unit_begin(2);
  a->set_unit_end(5);
  a->set_num_stages(2);
  a->set_micro_batch(64);
  a->set_upstream_identity("client-0");
  a->set_requester_identity("requester");
  ASSERT_TRUE(EncodeFp32(std::vector<float>(8, 0.5f), a->mutable_weights()).ok());
  EXPECT_TRUE(ValidateEnvelope(assign).ok());
  a->set_unit_end(2);
  expect_invalid(assign, "empty unit range");
  a->set_unit_end(5);
  a->set_stage_index(2);
  expect_invalid(assign, "stage_index");
  a->set_stage_index(1);
  a->clear_requester_identity();
  expect_invalid(assign, "requester_identity");
  a->set_requester_identity("requester");
  a->mutable_weights()->mutable_payload()->pop_back();
  EXPECT_EQ(ValidateEnvelope(assign).code(), Status::Code::kInvalidArgument);

  proto::Envelope join = Stamped(proto::Envelope());
  join.mutable_stage_join()->set_pipeline_id(1);
  expect_invalid(join, "neither upstream nor sink");

  proto::Envelope batch = Stamped(proto::Envelope());
  auto* b = batch.mutable_activation_batch();
  ASSERT_TRUE(EncodeFp32(std::vector<float>(4, 1.0f), b->mutable_data()).ok());
  expect_invalid(batch, "num_samples is 0");
  b->set_num_samples(2);
  EXPECT_TRUE(ValidateEnvelope(batch).ok());
  b->mutable_carry()->set_codec("fp32");
  b->mutable_carry()->set_num_values(3);  // no payload
  EXPECT_EQ(ValidateEnvelope(batch).code(), Status::Code::kInvalidArgument);

  proto::Envelope plan = Stamped(proto::Envelope());
  plan.mutable_pipeline_plan()->set_micro_batch(8);
  expect_invalid(plan, "no stages");
  auto* st = plan.mutable_pipeline_plan()->add_stages();
  st->set_unit_begin(0);
  st->set_unit_end(3);
  st->set_predicted_ms(std::nan(""));
  expect_invalid(plan, "predicted_ms");
}

TEST(WireTest, RandomCorruptionNeverCrashes) {
  const std::string frame = Frame(FitTask(std::vector<float>(64, 0.5f)));
  std::mt19937 rng(1234);
  int accepted = 0;
  // Protobuf logs every invalid UTF-8 string it meets; thousands of those are noise here.
  google::protobuf::LogSilencer silence;
  for (int i = 0; i < 3000; ++i) {
    std::string mutated = frame;
    const int flips = 1 + static_cast<int>(rng() % 8);
    for (int f = 0; f < flips; ++f) mutated[rng() % mutated.size()] = static_cast<char>(rng());
    if (rng() % 4 == 0) mutated.resize(rng() % mutated.size());
    Result<proto::Envelope> e = DecodeFrame(Bytes(mutated), 1 << 16);
    if (e.ok()) {
      ++accepted;
      EXPECT_TRUE(ValidateEnvelope(*e).ok());
    }
  }
  // Flips inside float payload bytes still parse; flips in the structure must not.
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, 3000);
}

// ---------------------------------------------------------------------------------------------
// EncodedTensor / fp32

TEST(EncodedTensorTest, Fp32RoundTripIsBitExactAndLittleEndian) {
  const std::vector<float> v = {1.0f, -0.0f, std::numeric_limits<float>::denorm_min(),
                                std::numeric_limits<float>::max(), 3.14159f};
  proto::EncodedTensor t;
  ASSERT_TRUE(EncodeFp32(v, &t).ok());
  EXPECT_EQ(t.codec(), "fp32");
  EXPECT_EQ(t.num_values(), v.size());
  ASSERT_EQ(t.payload().size(), 4 * v.size());
  // 1.0f = 0x3f800000, little-endian first.
  EXPECT_EQ(static_cast<uint8_t>(t.payload()[0]), 0x00);
  EXPECT_EQ(static_cast<uint8_t>(t.payload()[3]), 0x3f);
  std::vector<float> out(v.size());
  ASSERT_TRUE(DecodeFp32(t, out).ok());
  EXPECT_EQ(std::memcmp(out.data(), v.data(), 4 * v.size()), 0);
}

TEST(EncodedTensorTest, LyingPayloadsAreRejected) {
  proto::EncodedTensor t;
  ASSERT_TRUE(EncodeFp32(std::vector<float>(8, 1.0f), &t).ok());

  proto::EncodedTensor longer = t;
  longer.set_num_values(9);
  Status s = ValidateEncodedTensor(longer);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("needs 36 payload bytes, has 32"), std::string::npos);

  // A huge claim is refused before anything is allocated.
  proto::EncodedTensor huge = t;
  huge.set_num_values(uint64_t{1} << 40);
  Result<std::vector<float>> r = DecodeFp32(huge);
  EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("limit"), std::string::npos);
  EXPECT_EQ(DecodeFp32(t, /*max_values=*/7).status().code(), Status::Code::kInvalidArgument);

  std::vector<float> wrong_size(7);
  s = DecodeFp32(t, wrong_size);
  EXPECT_NE(s.message().find("expected 7"), std::string::npos);

  proto::EncodedTensor other = t;
  other.set_codec("int8");
  EXPECT_NE(DecodeFp32(other).status().message().find("expected an fp32 tensor"),
            std::string::npos);
  other.set_codec("");
  EXPECT_FALSE(ValidateEncodedTensor(other).ok());

  proto::EncodedTensor shaped = t;
  shaped.add_shape(2);
  shaped.add_shape(4);
  EXPECT_TRUE(ValidateEncodedTensor(shaped).ok());
  shaped.add_shape(3);
  EXPECT_FALSE(ValidateEncodedTensor(shaped).ok());
  shaped.clear_shape();
  shaped.add_shape(int64_t{1} << 62);
  shaped.add_shape(int64_t{1} << 62);
  EXPECT_FALSE(ValidateEncodedTensor(shaped).ok());  // no overflow to a "matching" product
  shaped.clear_shape();
  shaped.add_shape(-8);
  EXPECT_FALSE(ValidateEncodedTensor(shaped).ok());
}

TEST(EncodedTensorTest, NonFiniteValuesAreRejectedBothWays) {
  std::vector<float> v(16, 1.0f);
  v[11] = std::numeric_limits<float>::infinity();
  proto::EncodedTensor t;
  Status s = EncodeFp32(v, &t);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("index 11"), std::string::npos);

  v[11] = 1.0f;
  ASSERT_TRUE(EncodeFp32(v, &t).ok());
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(t.mutable_payload()->data() + 4 * 5, &nan, 4);  // a peer's NaN
  Result<std::vector<float>> r = DecodeFp32(t);
  EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("at index 5"), std::string::npos);
  EXPECT_EQ(FindNonFinite(v), v.size());
}

// FindNonFinite scans in chunks without an early exit: the first bad index must still be
// found wherever it falls (chunk edges, the tail) and whatever follows it.
TEST(EncodedTensorTest, FindNonFiniteReturnsTheFirstBadIndexAcrossChunks) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t size : {size_t{1}, size_t{255}, size_t{256}, size_t{257}, size_t{1000}}) {
    for (size_t at : {size_t{0}, size_t{254}, size_t{255}, size_t{256}, size_t{511}, size - 1}) {
      if (at >= size) continue;
      std::vector<float> v(size, 0.5f);
      v[at] = (at % 2 == 0) ? nan : -inf;
      if (at + 3 < size) v[at + 3] = inf;  // a later bad value must not be reported instead
      EXPECT_EQ(FindNonFinite(v), at) << "size " << size << ", bad at " << at;
    }
  }
  EXPECT_EQ(FindNonFinite(std::span<const float>()), 0u);
  std::vector<float> fine(700, std::numeric_limits<float>::max());
  EXPECT_EQ(FindNonFinite(fine), fine.size());
}

}  // namespace
}  // namespace fedslice::net
