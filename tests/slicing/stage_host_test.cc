// StageHost over real mutual TLS on loopback: two hosts (client-0, client-1) serve a 2-stage
// split of the mlp and the test plays the requester (client-2), joining stage 0 as upstream
// and stage 1 as sink.
#include "fedslice/slicing/stage_host.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <tuple>

#include "fedslice/common/codec.h"
#include "fedslice/common/model.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/pipeline.h"
#include "testing/net_fixture.h"

namespace fedslice::slicing {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

constexpr uint64_t kPipeline = 7;
const char* const kRequester = "client-2";

// Waits (bounded) until `done` holds; polling is fine for counters that only grow.
bool WaitUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Records failure callbacks.
struct Failures {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::tuple<uint64_t, uint32_t, Status>> seen;

  StageHost::FailureCallback Callback() {
    return [this](uint64_t pipeline, uint32_t stage, const Status& why) {
      std::lock_guard<std::mutex> lock(mu);
      seen.emplace_back(pipeline, stage, why);
      cv.notify_all();
    };
  }
  std::optional<std::tuple<uint64_t, uint32_t, Status>> Wait(std::chrono::milliseconds t = 30s) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, t, [&] { return !seen.empty(); })) return std::nullopt;
    return seen.front();
  }
};

proto::ChainSpec Splits(std::initializer_list<std::pair<int, int>> cuts) {
  proto::ChainSpec spec;
  for (auto [layer, parts] : cuts) {
    auto* s = spec.add_splits();
    s->set_layer_index(static_cast<uint32_t>(layer));
    s->set_parts(static_cast<uint32_t>(parts));
  }
  return spec;
}

class StageHostTest : public testing::NetTest {
 protected:
  void SetUp() override {
    NetTest::SetUp();
    auto model = Model::Create(MlpSpec());
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    model_ = std::make_unique<Model>(std::move(*model));
  }

  std::unique_ptr<StageHost> StartHost(const std::string& name, StageHostOptions options = {}) {
    auto host = StageHost::Start(pki().Config(name), std::move(options));
    EXPECT_TRUE(host.ok()) << host.status().ToString();
    if (!host.ok()) return nullptr;
    return std::move(*host);
  }

  // The SliceAssign for stage `stage` of `bounds` (unit boundaries) over the mlp's chain.
  proto::SliceAssign Assign(const std::vector<int>& bounds, size_t stage,
                            const StageHost* next = nullptr, const proto::ChainSpec& cuts = {},
                            const std::string& codec = "fp32", uint32_t in_flight = 2,
                            uint32_t micro_batch = 16) {
    auto chain = Chain::Create(model_->spec(), cuts);
    EXPECT_TRUE(chain.ok()) << chain.status().ToString();
    proto::SliceAssign a;
    a.set_pipeline_id(kPipeline);
    a.set_stage_index(static_cast<uint32_t>(stage));
    a.set_num_stages(static_cast<uint32_t>(bounds.size() - 1));
    *a.mutable_model() = model_->spec();
    *a.mutable_chain() = cuts;
    a.set_unit_begin(static_cast<uint32_t>(bounds[stage]));
    a.set_unit_end(static_cast<uint32_t>(bounds[stage + 1]));
    auto packed = chain->PackSlice(model_->params(), bounds[stage], bounds[stage + 1]);
    EXPECT_TRUE(packed.ok()) << packed.status().ToString();
    EXPECT_TRUE(net::EncodeFp32(*packed, a.mutable_weights()).ok());
    a.set_upstream_identity(stage == 0 ? kRequester : "client-" + std::to_string(stage - 1));
    if (stage + 2 < bounds.size()) {
      a.set_downstream_endpoint(next != nullptr ? next->endpoint() : "127.0.0.1:1");
      a.set_downstream_identity("client-" + std::to_string(stage + 1));
    }
    a.set_requester_identity(kRequester);
    a.set_micro_batch(micro_batch);
    a.set_in_flight(in_flight);
    a.set_activation_codec(codec);
    return a;
  }

  // A requester connection to `host` (whose certificate says `host_name`), joined as told.
  std::unique_ptr<net::Channel> Join(const StageHost& host, const std::string& host_name,
                                     bool upstream, bool sink, uint64_t pipeline = kPipeline,
                                     const std::string& as = kRequester) {
    net::ConnectOptions connect;
    connect.server_name = host_name;
    connect.expected_identity = host_name;
    auto channel = net::Channel::Connect("127.0.0.1", host.port(), pki().Config(as), 10s, connect);
    EXPECT_TRUE(channel.ok()) << channel.status().ToString();
    if (!channel.ok()) return nullptr;
    proto::Envelope join;
    join.mutable_stage_join()->set_pipeline_id(pipeline);
    join.mutable_stage_join()->set_upstream(upstream);
    join.mutable_stage_join()->set_sink(sink);
    EXPECT_TRUE((*channel)->Send(std::move(join)).ok());
    return std::move(*channel);
  }

  Tensor Input(int64_t batch, uint64_t seed) const {
    std::vector<int64_t> shape = {batch};
    for (int64_t d : model_->InputShape(0)) shape.push_back(d);
    Tensor t(shape);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (float& x : t.span()) x = u(rng);
    return t;
  }

  static proto::Envelope Batch(const Tensor& input, uint64_t batch_id,
                               uint64_t pipeline = kPipeline) {
    proto::Envelope e;
    proto::ActivationBatch* b = e.mutable_activation_batch();
    b->set_pipeline_id(pipeline);
    b->set_batch_id(batch_id);
    b->set_unit(0);
    b->set_num_samples(static_cast<uint32_t>(input.batch()));
    EXPECT_TRUE(EncodeActivation(input, *codec::ParseCodec("fp32"), b->mutable_data()).ok());
    return e;
  }

  // Reads the next result from `sink`: batch `batch_id`, logits of `input`.
  Tensor ReceiveLogits(net::Channel& sink, uint64_t batch_id, int64_t samples) {
    auto got = sink.Receive(30s);
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    if (!got.ok()) return {};
    EXPECT_TRUE(got->has_activation_batch())
        << net::BodyName(*got) << " " << got->ShortDebugString().substr(0, 300);
    const proto::ActivationBatch& b = got->activation_batch();
    EXPECT_EQ(b.pipeline_id(), kPipeline);
    EXPECT_EQ(b.batch_id(), batch_id);
    EXPECT_EQ(b.unit(), 6u);  // the mlp's 6 layers are 6 units
    EXPECT_EQ(b.num_samples(), static_cast<uint32_t>(samples));
    EXPECT_EQ(b.data().codec(), "fp32");
    Tensor logits;
    Status decoded = DecodeActivation(b.data(), {samples, 10}, &logits);
    EXPECT_TRUE(decoded.ok()) << decoded.ToString();
    return logits;
  }

  Tensor Expected(const Tensor& input) const {
    Tensor out;
    EXPECT_TRUE(model_->Forward(input, &out).ok());
    return out;
  }

  static proto::Error ExpectError(net::Channel& channel, proto::ErrorCode code) {
    auto got = channel.Receive(20s);
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    if (!got.ok()) return {};
    EXPECT_TRUE(got->has_error()) << net::BodyName(*got);
    EXPECT_EQ(got->error().code(), code)
        << proto::ErrorCode_Name(got->error().code()) << ": " << got->error().message();
    return got->error();
  }

  // True once the peer has closed `channel` (nothing but an Error may come first).
  static bool ClosedByPeer(net::Channel& channel) {
    for (int i = 0; i < 10; ++i) {
      auto got = channel.Receive(20s);
      if (!got.ok()) return got.status().code() != Status::Code::kDeadlineExceeded;
      if (!got->has_error() && !got->has_bye()) return false;
    }
    return false;
  }

  // One batch through a one-stage pipeline joined on `both`, checked bit for bit.
  void ExpectServed(net::Channel& both, uint64_t batch_id = 1) {
    Tensor input = Input(3, batch_id);
    ASSERT_TRUE(both.Send(Batch(input, batch_id)).ok());
    Tensor logits = ReceiveLogits(both, batch_id, 3);
    Tensor expected = Expected(input);
    ASSERT_EQ(logits.size(), expected.size());
    for (int64_t j = 0; j < logits.size(); ++j) ASSERT_EQ(logits.data()[j], expected.data()[j]);
  }

  std::unique_ptr<Model> model_;
};

TEST_F(StageHostTest, TwoStagesGiveSingleProcessLogitsBitForBit) {
  auto b = StartHost("client-1");
  StageHostOptions slow;
  slow.slowdown = 1.5;  // emulation only delays; the results must not change
  auto a = StartHost("client-0", slow);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->endpoint(), "127.0.0.1:" + std::to_string(a->port()));
  const std::vector<int> bounds = {0, 3, 6};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1)).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get())).ok());
  EXPECT_EQ(a->pipeline_id(), kPipeline);
  // The emulated stage has timed its slice by the time Assign returns (before SliceReady),
  // so that no batch of the stream waits for that timing; without emulation nothing is timed.
  EXPECT_GT(a->stats().emulated_batch_ms, 0.0);
  EXPECT_EQ(b->stats().emulated_batch_ms, 0.0);

  auto sink = Join(*b, "client-1", false, true);
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(sink && upstream);
  const std::vector<int64_t> sizes = {16, 16, 16, 16, 7};
  std::vector<Tensor> inputs;
  for (size_t i = 0; i < sizes.size(); ++i) {
    inputs.push_back(Input(sizes[i], 100 + i));
    ASSERT_TRUE(upstream->Send(Batch(inputs.back(), 1000 + i)).ok());
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    Tensor logits = ReceiveLogits(*sink, 1000 + i, sizes[i]);
    Tensor expected = Expected(inputs[i]);
    ASSERT_EQ(logits.shape(), expected.shape());
    for (int64_t j = 0; j < logits.size(); ++j) {
      ASSERT_EQ(logits.data()[j], expected.data()[j]) << "batch " << i << " value " << j;
    }
  }
  const StageHostStats sa = a->stats(), sb = b->stats();
  EXPECT_EQ(sa.batches_received, sizes.size());
  EXPECT_EQ(sa.batches_computed, sizes.size());
  EXPECT_EQ(sb.batches_computed, sizes.size());
  EXPECT_TRUE(WaitUntil([&] { return b->stats().batches_sent == sizes.size(); }));
  EXPECT_EQ(sa.downstream_connects, 1u);
  EXPECT_EQ(sa.batches_rejected + sb.batches_rejected, 0u);
  EXPECT_LE(sa.max_queued, 2u);
  EXPECT_LE(sa.max_unsent, 2u);
  EXPECT_LE(sb.max_queued, 2u);
  EXPECT_GT(sa.bytes_in, 0u);
  // Stage 0 sends [n, 200] activations onward, far fewer bytes than the [n, 784] it receives.
  EXPECT_TRUE(WaitUntil([&] { return a->stats().batches_sent == sizes.size(); }));
  EXPECT_LT(a->stats().bytes_out, sa.bytes_in / 3);
  EXPECT_EQ(b->stats().bytes_in, a->stats().bytes_out);
}

TEST_F(StageHostTest, CutLayerCarryCrossesTheNetwork) {
  // The first dense layer (layer 1) cut in two: stage 0 computes part 0 and sends the layer's
  // input with the channels done so far; stage 1 finishes the layer.
  const proto::ChainSpec cuts = Splits({{1, 2}});
  auto b = StartHost("client-1");
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  const std::vector<int> bounds = {0, 2, 7};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1, nullptr, cuts)).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get(), cuts)).ok());
  auto sink = Join(*b, "client-1", false, true);
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(sink && upstream);
  Tensor input = Input(16, 5);
  ASSERT_TRUE(upstream->Send(Batch(input, 1)).ok());
  auto got = sink->Receive(30s);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_activation_batch()) << net::BodyName(*got);
  EXPECT_EQ(got->activation_batch().unit(), 7u);
  Tensor logits;
  ASSERT_TRUE(DecodeActivation(got->activation_batch().data(), {16, 10}, &logits).ok());
  Tensor expected = Expected(input);
  for (int64_t j = 0; j < logits.size(); ++j) {
    ASSERT_NEAR(logits.data()[j], expected.data()[j], 1e-5) << j;
  }
}

TEST_F(StageHostTest, Int8ActivationsAreCloseAndSmaller) {
  auto b = StartHost("client-1");
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  const std::vector<int> bounds = {0, 3, 6};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1, nullptr, {}, "int8")).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get(), {}, "int8")).ok());
  auto sink = Join(*b, "client-1", false, true);
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(sink && upstream);
  Tensor input = Input(16, 9);
  ASSERT_TRUE(upstream->Send(Batch(input, 1)).ok());
  Tensor logits = ReceiveLogits(*sink, 1, 16);  // logits to the requester stay fp32
  Tensor expected = Expected(input);
  ASSERT_EQ(logits.size(), expected.size());
  float max_abs = 0, max_diff = 0;
  for (int64_t j = 0; j < logits.size(); ++j) {
    max_abs = std::max(max_abs, std::abs(expected.data()[j]));
    max_diff = std::max(max_diff, std::abs(logits.data()[j] - expected.data()[j]));
  }
  EXPECT_GT(max_diff, 0.0f) << "int8 between the stages should be lossy";
  EXPECT_LT(max_diff, 0.02f * max_abs);
  // [16, 200] activations as int8: ~1 byte per value instead of 4.
  EXPECT_TRUE(WaitUntil([&] { return a->stats().batches_sent == 1; }));
  EXPECT_LT(a->stats().bytes_out, 16u * 200u * 2u);
  EXPECT_GT(a->stats().bytes_out, 16u * 200u);
}

TEST_F(StageHostTest, OneStagePipelineJoinsUpstreamAndSinkOnOneSession) {
  auto a = StartHost("client-0");
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->Assign(Assign({0, 6}, 0)).ok());
  auto both = Join(*a, "client-0", true, true);
  ASSERT_TRUE(both);
  Tensor input = Input(3, 1);
  ASSERT_TRUE(both->Send(Batch(input, 42)).ok());
  Tensor logits = ReceiveLogits(*both, 42, 3);
  Tensor expected = Expected(input);
  ASSERT_EQ(logits.size(), expected.size());
  for (int64_t j = 0; j < logits.size(); ++j) ASSERT_EQ(logits.data()[j], expected.data()[j]);
}

TEST_F(StageHostTest, JoinsFromTheWrongIdentityRoleOrPipelineAreRefused) {
  auto b = StartHost("client-1");
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  const std::vector<int> bounds = {0, 3, 6};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1)).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get())).ok());
  {
    SCOPED_TRACE("client-1 is not stage 0's upstream");
    auto impostor = Join(*a, "client-0", true, false, kPipeline, "client-1");
    ASSERT_TRUE(impostor);
    EXPECT_THAT(ExpectError(*impostor, proto::ERROR_NOT_AUTHORIZED).message(),
                HasSubstr("client-1"));
    EXPECT_TRUE(ClosedByPeer(*impostor));
  }
  {
    SCOPED_TRACE("the requester is not stage 1's upstream");
    auto impostor = Join(*b, "client-1", true, false);
    ASSERT_TRUE(impostor);
    ExpectError(*impostor, proto::ERROR_NOT_AUTHORIZED);
    EXPECT_TRUE(ClosedByPeer(*impostor));
  }
  {
    SCOPED_TRACE("stage 0 is not the last: no sink there");
    auto sink = Join(*a, "client-0", false, true);
    ASSERT_TRUE(sink);
    ExpectError(*sink, proto::ERROR_NOT_AUTHORIZED);
    EXPECT_TRUE(ClosedByPeer(*sink));
  }
  {
    SCOPED_TRACE("another pipeline");
    auto other = Join(*a, "client-0", true, false, kPipeline + 1);
    ASSERT_TRUE(other);
    EXPECT_THAT(ExpectError(*other, proto::ERROR_NOT_AUTHORIZED).message(),
                HasSubstr("pipeline 8"));
    EXPECT_TRUE(ClosedByPeer(*other));
  }
  {
    SCOPED_TRACE("activations before StageJoin");
    net::ConnectOptions connect{"client-0", "client-0"};
    auto raw =
        net::Channel::Connect("127.0.0.1", a->port(), pki().Config(kRequester), 10s, connect);
    ASSERT_TRUE(raw.ok()) << raw.status().ToString();
    ASSERT_TRUE((*raw)->Send(Batch(Input(1, 1), 1)).ok());
    ExpectError(**raw, proto::ERROR_UNEXPECTED_MESSAGE);
    EXPECT_TRUE(ClosedByPeer(**raw));
  }
  EXPECT_EQ(a->stats().batches_received, 0u);
  // The rightful requester is still served.
  auto sink = Join(*b, "client-1", false, true);
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(sink && upstream);
  Tensor input = Input(4, 3);
  ASSERT_TRUE(upstream->Send(Batch(input, 1)).ok());
  Tensor logits = ReceiveLogits(*sink, 1, 4);
  EXPECT_EQ(logits.size(), 40);
}

TEST_F(StageHostTest, ASessionThatNeverJoinsIsClosed) {
  net::TlsConfig quick = pki().Config("client-0");
  quick.handshake_timeout = 500ms;  // also the time a new session has to send StageJoin
  auto host = StageHost::Start(quick, {});
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  ASSERT_TRUE((*host)->Assign(Assign({0, 6}, 0)).ok());
  net::ConnectOptions connect{"client-0", "client-0"};
  auto idle =
      net::Channel::Connect("127.0.0.1", (*host)->port(), pki().Config(kRequester), 10s, connect);
  ASSERT_TRUE(idle.ok()) << idle.status().ToString();
  EXPECT_THAT(ExpectError(**idle, proto::ERROR_UNEXPECTED_MESSAGE).message(),
              HasSubstr("no StageJoin"));
  EXPECT_TRUE(ClosedByPeer(**idle));
  // One that joins in time stays.
  auto joined = Join(**host, "client-0", true, true);
  ASSERT_TRUE(joined);
  ExpectServed(*joined);
}

TEST_F(StageHostTest, BadBatchesAreAnsweredWithErrorsAndTheStageKeepsServing) {
  auto a = StartHost("client-0");
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->Assign(Assign({0, 6}, 0)).ok());
  auto both = Join(*a, "client-0", true, true);
  ASSERT_TRUE(both);
  Tensor input = Input(4, 2);
  {
    SCOPED_TRACE("wrong unit");
    proto::Envelope e = Batch(input, 1);
    e.mutable_activation_batch()->set_unit(2);
    ASSERT_TRUE(both->Send(std::move(e)).ok());
    EXPECT_THAT(ExpectError(*both, proto::ERROR_INVALID_MESSAGE).message(), HasSubstr("unit 2"));
  }
  {
    SCOPED_TRACE("more samples than the micro-batch");
    ASSERT_TRUE(both->Send(Batch(Input(17, 1), 2)).ok());
    EXPECT_THAT(ExpectError(*both, proto::ERROR_INVALID_MESSAGE).message(),
                HasSubstr("micro-batch"));
  }
  {
    SCOPED_TRACE("data of another shape than num_samples says");
    proto::Envelope e = Batch(input, 3);
    e.mutable_activation_batch()->set_num_samples(5);
    ASSERT_TRUE(both->Send(std::move(e)).ok());
    ExpectError(*both, proto::ERROR_SHAPE_MISMATCH);
  }
  {
    SCOPED_TRACE("a NaN");
    Tensor bad = input;
    bad.data()[17] = std::numeric_limits<float>::quiet_NaN();
    proto::Envelope e = Batch(input, 4);
    // EncodeActivation refuses NaN, as it should; write the payload by hand.
    std::string* payload = e.mutable_activation_batch()->mutable_data()->mutable_payload();
    std::memcpy(payload->data(), bad.data(), payload->size());
    ASSERT_TRUE(both->Send(std::move(e)).ok());
    ExpectError(*both, proto::ERROR_INVALID_TENSOR);
  }
  {
    SCOPED_TRACE("a codec activations do not use");
    proto::Envelope e = Batch(input, 5);
    e.mutable_activation_batch()->mutable_data()->set_codec("int4");
    e.mutable_activation_batch()->mutable_data()->set_payload(std::string(4 * 784 / 2, '\0'));
    ASSERT_TRUE(both->Send(std::move(e)).ok());
    ExpectError(*both, proto::ERROR_INVALID_TENSOR);
  }
  {
    SCOPED_TRACE("another pipeline's batch");
    ASSERT_TRUE(both->Send(Batch(input, 6, kPipeline + 5)).ok());
    ExpectError(*both, proto::ERROR_INVALID_MESSAGE);
  }
  {
    SCOPED_TRACE("a message a stage does not take");
    proto::Envelope e;
    e.mutable_slice_release()->set_pipeline_id(kPipeline);
    ASSERT_TRUE(both->Send(std::move(e)).ok());
    ExpectError(*both, proto::ERROR_UNEXPECTED_MESSAGE);
  }
  EXPECT_EQ(a->stats().batches_rejected, 6u);
  EXPECT_EQ(a->stats().batches_computed, 0u);
  ASSERT_TRUE(both->is_open());
  ASSERT_TRUE(both->Send(Batch(input, 7)).ok());
  Tensor logits = ReceiveLogits(*both, 7, 4);
  Tensor expected = Expected(input);
  for (int64_t j = 0; j < logits.size(); ++j) ASSERT_EQ(logits.data()[j], expected.data()[j]);
}

TEST_F(StageHostTest, BackpressureStopsReadingAfterInFlightBatches) {
  // Stage 1 has no sink yet: its compute thread holds one result, `in_flight` batches wait
  // behind it, and it must read nothing more from stage 0 until the sink joins.
  constexpr uint32_t kInFlight = 2;
  constexpr int kBatches = 12;
  StageHostOptions patient;
  patient.sink_wait = 120s;
  auto b = StartHost("client-1", patient);
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  const std::vector<int> bounds = {0, 3, 6};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1, nullptr, {}, "fp32", kInFlight)).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get(), {}, "fp32", kInFlight)).ok());
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(upstream);
  std::vector<Tensor> inputs;
  for (int i = 0; i < kBatches; ++i) {
    inputs.push_back(Input(4, 300 + i));
    ASSERT_TRUE(upstream->Send(Batch(inputs.back(), static_cast<uint64_t>(i))).ok());
  }
  // Everything stage 0 computed is in the socket to stage 1 (the activations are small: 3 KB
  // per batch).
  ASSERT_TRUE(WaitUntil([&] { return a->stats().batches_sent == kBatches; }))
      << "stage 0 sent " << a->stats().batches_sent;
  ASSERT_TRUE(WaitUntil([&] {
    const StageHostStats s = b->stats();
    return s.batches_computed == 1 && s.queued == kInFlight;
  }));
  const StageHostStats held = b->stats();
  EXPECT_EQ(held.batches_received, kInFlight + 1);
  EXPECT_GE(held.upstream_pauses, 1u);
  EXPECT_EQ(held.max_queued, kInFlight);

  auto sink = Join(*b, "client-1", false, true);
  ASSERT_TRUE(sink);
  for (int i = 0; i < kBatches; ++i) {
    Tensor logits = ReceiveLogits(*sink, static_cast<uint64_t>(i), 4);
    Tensor expected = Expected(inputs[static_cast<size_t>(i)]);
    ASSERT_EQ(logits.size(), expected.size());
    for (int64_t j = 0; j < logits.size(); ++j) ASSERT_EQ(logits.data()[j], expected.data()[j]);
  }
  const StageHostStats done = b->stats();
  EXPECT_EQ(done.batches_received, static_cast<uint64_t>(kBatches));
  EXPECT_LE(done.max_queued, kInFlight);
  EXPECT_LE(done.max_unsent, kInFlight);
  EXPECT_GE(done.upstream_pauses, 1u);
}

TEST_F(StageHostTest, NextStageGoneMidStreamIsReportedOnce) {
  Failures failures;  // outlives the hosts that call it
  auto b = StartHost("client-1");
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  a->SetFailureCallback(failures.Callback());
  const std::vector<int> bounds = {0, 3, 6};
  ASSERT_TRUE(b->Assign(Assign(bounds, 1)).ok());
  ASSERT_TRUE(a->Assign(Assign(bounds, 0, b.get())).ok());
  auto sink = Join(*b, "client-1", false, true);
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(sink && upstream);
  Tensor input = Input(8, 4);
  ASSERT_TRUE(upstream->Send(Batch(input, 1)).ok());
  ReceiveLogits(*sink, 1, 8);

  b.reset();  // stage 1's device dies
  auto failure = failures.Wait();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(std::get<0>(*failure), kPipeline);
  EXPECT_EQ(std::get<1>(*failure), 0u);
  EXPECT_THAT(std::get<2>(*failure).message(), HasSubstr("client-1"));
  EXPECT_EQ(a->stats().failures, 1u);
  // Later batches are answered, not silently dropped, and reported no second time.
  ASSERT_TRUE(upstream->Send(Batch(input, 2)).ok());
  EXPECT_THAT(ExpectError(*upstream, proto::ERROR_INTERNAL).message(), HasSubstr("failed"));
  EXPECT_EQ(a->stats().failures, 1u);
  // Releasing the failed slice ends it; the host takes the next one.
  EXPECT_TRUE(a->Release(kPipeline).ok());
  EXPECT_FALSE(a->pipeline_id().has_value());
}

TEST_F(StageHostTest, UnreachableNextStageIsReportedAfterTheRetryBudget) {
  Failures failures;  // outlives the hosts that call it
  uint16_t dead_port = 0;
  {
    auto gone = StartHost("client-1");
    ASSERT_TRUE(gone);
    dead_port = gone->port();
  }
  StageHostOptions options;
  options.downstream_connect_budget = 500ms;
  auto a = StartHost("client-0", options);
  ASSERT_TRUE(a);
  a->SetFailureCallback(failures.Callback());
  proto::SliceAssign assign = Assign({0, 3, 6}, 0);
  assign.set_downstream_endpoint("127.0.0.1:" + std::to_string(dead_port));
  ASSERT_TRUE(a->Assign(assign).ok());
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(upstream);
  ASSERT_TRUE(upstream->Send(Batch(Input(2, 1), 1)).ok());
  auto failure = failures.Wait();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(std::get<0>(*failure), kPipeline);
  EXPECT_THAT(std::get<2>(*failure).message(), HasSubstr("unreachable"));
  EXPECT_EQ(a->stats().batches_computed, 1u);
  EXPECT_EQ(a->stats().batches_sent, 0u);
}

TEST_F(StageHostTest, NextStageWithAnotherIdentityIsRefusedAndReported) {
  Failures failures;  // outlives the hosts that call it
  // The endpoint is client-1's, but the assignment says the next stage is client-2: stage 0
  // must not hand activations to an impostor.
  auto b = StartHost("client-1");
  auto a = StartHost("client-0");
  ASSERT_TRUE(a && b);
  a->SetFailureCallback(failures.Callback());
  proto::SliceAssign assign = Assign({0, 3, 6}, 0, b.get());
  assign.set_downstream_identity("client-2");
  ASSERT_TRUE(a->Assign(assign).ok());
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(upstream);
  ASSERT_TRUE(upstream->Send(Batch(Input(2, 1), 1)).ok());
  auto failure = failures.Wait();
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(std::get<2>(*failure).code(), Status::Code::kPermissionDenied)
      << std::get<2>(*failure).ToString();
  EXPECT_EQ(b->stats().batches_received, 0u);
}

TEST_F(StageHostTest, SinkThatNeverJoinsIsReported) {
  Failures failures;  // outlives the hosts that call it
  StageHostOptions options;
  options.sink_wait = 300ms;
  auto a = StartHost("client-0", options);
  ASSERT_TRUE(a);
  a->SetFailureCallback(failures.Callback());
  ASSERT_TRUE(a->Assign(Assign({0, 6}, 0)).ok());
  auto upstream = Join(*a, "client-0", true, false);  // upstream only: no sink
  ASSERT_TRUE(upstream);
  ASSERT_TRUE(upstream->Send(Batch(Input(2, 1), 1)).ok());
  auto failure = failures.Wait();
  ASSERT_TRUE(failure.has_value());
  EXPECT_THAT(std::get<2>(*failure).message(), HasSubstr("did not join as sink"));
  EXPECT_EQ(a->stats().batches_dropped, 1u);
}

TEST_F(StageHostTest, BadAssignmentsChangeNothing) {
  auto a = StartHost("client-0");
  ASSERT_TRUE(a);
  const std::vector<int> bounds = {0, 3, 6};
  proto::SliceAssign good = Assign(bounds, 0);
  good.set_downstream_endpoint("127.0.0.1:9");
  ASSERT_TRUE(a->Assign(good).ok());
  auto upstream = Join(*a, "client-0", true, false);
  ASSERT_TRUE(upstream);

  struct Case {
    const char* what;
    std::function<void(proto::SliceAssign&)> edit;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"weights one value short",
       [](proto::SliceAssign& s) {
         s.mutable_weights()->set_num_values(s.weights().num_values() - 1);
       },
       "parameters"},
      {"weights as int8", [](proto::SliceAssign& s) { s.mutable_weights()->set_codec("int8"); },
       "fp32"},
      {"a NaN weight",
       [](proto::SliceAssign& s) {
         float nan = std::numeric_limits<float>::quiet_NaN();
         std::memcpy(s.mutable_weights()->mutable_payload()->data() + 8, &nan, 4);
       },
       ""},
      {"int4 activations", [](proto::SliceAssign& s) { s.set_activation_codec("int4"); }, "int4"},
      {"units past the chain", [](proto::SliceAssign& s) { s.set_unit_end(9); }, "units"},
      {"empty range", [](proto::SliceAssign& s) { s.set_unit_end(0); }, "units"},
      {"stage index out of range", [](proto::SliceAssign& s) { s.set_stage_index(2); },
       "stage_index"},
      {"ends the chain but not the last stage", [](proto::SliceAssign& s) { s.set_unit_end(6); },
       "last"},
      {"no downstream identity", [](proto::SliceAssign& s) { s.clear_downstream_identity(); },
       "downstream_identity"},
      {"bad downstream endpoint",
       [](proto::SliceAssign& s) { s.set_downstream_endpoint("no-port"); }, "no-port"},
      {"no upstream identity", [](proto::SliceAssign& s) { s.clear_upstream_identity(); },
       "upstream_identity"},
      {"in_flight 0", [](proto::SliceAssign& s) { s.set_in_flight(0); }, "in_flight"},
      {"in_flight too large", [](proto::SliceAssign& s) { s.set_in_flight(1000); }, "in_flight"},
      {"micro-batch 0", [](proto::SliceAssign& s) { s.set_micro_batch(0); }, "micro_batch"},
      {"a chain that cuts a relu",
       [](proto::SliceAssign& s) {
         *s.mutable_chain() = Splits({{2, 2}});
       },
       ""},
      {"another model's layers", [](proto::SliceAssign& s) { *s.mutable_model() = CnnSpec(); }, ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    proto::SliceAssign bad = good;
    bad.set_pipeline_id(kPipeline + 1);
    c.edit(bad);
    Status s = a->Assign(bad);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << s.ToString();
    EXPECT_THAT(s.message(), HasSubstr(c.says));
    EXPECT_EQ(a->pipeline_id(), kPipeline);
  }
  // The slice and its joined upstream survived every refusal.
  EXPECT_TRUE(upstream->is_open());
  EXPECT_EQ(a->Release(kPipeline + 1).code(), Status::Code::kNotFound);
  EXPECT_TRUE(a->Release(kPipeline).ok());
  EXPECT_FALSE(a->pipeline_id().has_value());
  EXPECT_TRUE(ClosedByPeer(*upstream));  // released: its sessions are closed
}

TEST_F(StageHostTest, ANewAssignmentReplacesTheSliceAndClosesItsSessions) {
  auto a = StartHost("client-0");
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->Assign(Assign({0, 6}, 0)).ok());
  auto old_session = Join(*a, "client-0", true, true);
  ASSERT_TRUE(old_session);
  Tensor input = Input(2, 8);
  ASSERT_TRUE(old_session->Send(Batch(input, 1)).ok());
  ReceiveLogits(*old_session, 1, 2);  // joined and served

  proto::SliceAssign next = Assign({0, 6}, 0);
  next.set_pipeline_id(kPipeline + 1);
  ASSERT_TRUE(a->Assign(next).ok());
  EXPECT_EQ(a->pipeline_id(), kPipeline + 1);
  EXPECT_TRUE(ClosedByPeer(*old_session));
  auto stale = Join(*a, "client-0", true, true, kPipeline);
  ASSERT_TRUE(stale);
  ExpectError(*stale, proto::ERROR_NOT_AUTHORIZED);
}

TEST(StageHostOptionsTest, ValidateNamesTheBadField) {
  StageHostOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.bind_address = "0.0.0.0";
  EXPECT_THAT(o.Validate().message(), HasSubstr("advertise"));
  o.advertise_host = "stage-a";
  EXPECT_TRUE(o.Validate().ok());
  o.slowdown = 0.5;
  EXPECT_THAT(o.Validate().message(), HasSubstr("slowdown"));
  o.slowdown = std::numeric_limits<double>::infinity();
  EXPECT_THAT(o.Validate().message(), HasSubstr("slowdown"));
  o.slowdown = 4;
  o.io_threads = 0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("io_threads"));
  o.io_threads = 1;
  o.engine_threads = -1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("engine_threads"));
  o.engine_threads = 0;
  o.sink_wait = 0ms;
  EXPECT_THAT(o.Validate().message(), HasSubstr("sink_wait"));
}

TEST_F(StageHostTest, AdvertisedHostIsTheEndpointAndBindErrorsAreReported) {
  StageHostOptions o;
  o.advertise_host = "stage-a.example";
  auto a = StartHost("client-0", o);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->endpoint(), "stage-a.example:" + std::to_string(a->port()));
  StageHostOptions taken;
  taken.port = a->port();
  auto clash = StageHost::Start(pki().Config("client-1"), taken);
  EXPECT_FALSE(clash.ok());
  StageHostOptions v6;
  v6.bind_address = "::1";
  auto six = StageHost::Start(pki().Config("client-1"), v6);
  if (six.ok()) {  // hosts without IPv6 cannot bind ::1
    EXPECT_EQ((*six)->endpoint(), "[::1]:" + std::to_string((*six)->port()));
  }
}

}  // namespace
}  // namespace fedslice::slicing
