// The coordinator's side of split inference, against fake clients and a requester over
// loopback mutual TLS: slices assigned and wired as the protocol says, the plan sent only once
// every stage is ready, failures turned into SliceRelease + PipelineFailed, assignment
// failures re-planned once, bad requests refused with the reason.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <thread>

#include "fedslice/common/model.h"
#include "fedslice/common/net/client.h"
#include "fedslice/common/net/encoded_tensor.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/coordinator/coordinator_server.h"
#include "fedslice/slicing/chain.h"
#include "testing/net_test_util.h"
#include "testing/test_util.h"

namespace fedslice::coordinator {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// 16 inputs -> dense 32 -> relu -> dense 10: four layers, small messages.
proto::ModelSpec SmallSpec() {
  proto::ModelSpec spec;
  spec.set_name("small");
  spec.add_input_shape(1);
  spec.add_input_shape(4);
  spec.add_input_shape(4);
  spec.set_num_classes(10);
  spec.set_init_seed(11);
  spec.add_layers()->mutable_flatten();
  auto* fc1 = spec.add_layers()->mutable_dense();
  fc1->set_in_features(16);
  fc1->set_out_features(32);
  spec.add_layers()->mutable_relu();
  auto* fc2 = spec.add_layers()->mutable_dense();
  fc2->set_in_features(32);
  fc2->set_out_features(10);
  return spec;
}

proto::DeviceProfile FastProfile() {
  proto::DeviceProfile profile;
  profile.set_flops(1e9);
  profile.set_num_threads(1);
  return profile;
}

// A registered client under the test's control.
struct FakeClient {
  std::string id;
  std::string endpoint;
  std::unique_ptr<net::Channel> channel;
};

class PipelineServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pki = testing::TestPki::Create(dir_.path(), 3);
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_ = *pki;
    // The requester's certificate, as a user makes it: another name of the same CA.
    ASSERT_TRUE(testing::RunCommand("bash '" +
                                    (testing::SourceDir() / "scripts" / "make_certs.sh").string() +
                                    "' '" + dir_.path().string() + "' --names requester")
                    .ok());
    auto model = Model::Create(SmallSpec());
    ASSERT_TRUE(model.ok());
    params_.assign(model->params().begin(), model->params().end());
  }

  // Serve mode with the initial model and no training unless `rounds` > 0.
  void StartCoordinator(uint32_t rounds = 0, bool serve = true,
                        std::chrono::milliseconds ready_timeout = 10s) {
    CoordinatorOptions options;
    options.federation.model = SmallSpec();
    options.federation.initial_params = params_;
    options.federation.rounds = rounds;
    options.federation.fraction = 1.0;
    options.federation.min_fit = 1;
    options.federation.round_deadline = 20s;
    options.min_available = 1;
    options.serve_inference = serve;
    options.slice_ready_timeout = ready_timeout;
    options.tls = pki_.ServerConfig();
    auto server = CoordinatorServer::Start(options, std::nullopt);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
    runner_ = std::thread([this] { run_status_ = server_->Run(); });
  }

  void TearDown() override {
    if (server_) server_->Stop();
    if (runner_.joinable()) runner_.join();
  }

  std::unique_ptr<net::Channel> Connect(const std::string& name) {
    auto channel = net::Channel::Connect("127.0.0.1", server_->port(), pki_.Config(name), 5s);
    EXPECT_TRUE(channel.ok()) << channel.status().ToString();
    return channel.ok() ? std::move(channel).value() : nullptr;
  }

  // Registers `name` with a stage endpoint (nothing listens there: the coordinator never
  // connects to stages) and waits for Welcome.
  FakeClient Register(const std::string& name, const std::string& endpoint,
                      const proto::DeviceProfile& profile = FastProfile()) {
    FakeClient client{name, endpoint, Connect(name)};
    if (!client.channel) return client;
    proto::Envelope hello = testing::MakeHello(name);
    hello.mutable_hello()->set_stage_endpoint(endpoint);
    *hello.mutable_hello()->mutable_profile() = profile;
    EXPECT_TRUE(client.channel->Send(std::move(hello)).ok());
    auto welcome = client.channel->Receive(5s);
    EXPECT_TRUE(welcome.ok() && welcome->has_welcome())
        << (welcome.ok() ? net::BodyName(*welcome) : welcome.status().ToString());
    return client;
  }

  void WaitServing(size_t clients) {
    const auto deadline = Clock::now() + 10s;
    while ((!server_->serving() || server_->num_registered() < clients) &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_TRUE(server_->serving());
    ASSERT_EQ(server_->num_registered(), clients);
  }

  proto::Envelope Request(uint64_t token, uint32_t stages,
                          std::vector<std::string> exclude = {}) {
    proto::Envelope e;
    auto* r = e.mutable_pipeline_request();
    r->set_request_token(token);
    r->set_num_stages(stages);
    r->set_micro_batch(8);
    for (auto& id : exclude) r->add_exclude_clients(id);
    return e;
  }

  // The next message of `channel` that is not `skip`-typed, within 5 s.
  static proto::Envelope Next(net::Channel& channel) {
    auto m = channel.Receive(5s);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? *m : proto::Envelope();
  }

  // Collects one SliceAssign from each of `count` of `clients` (the planner decides which).
  std::map<std::string, proto::SliceAssign> CollectAssigns(std::vector<FakeClient*> clients,
                                                           size_t count) {
    std::map<std::string, proto::SliceAssign> assigns;
    const auto deadline = Clock::now() + 10s;
    while (assigns.size() < count && Clock::now() < deadline) {
      for (FakeClient* c : clients) {
        if (assigns.count(c->id)) continue;
        auto m = c->channel->Receive(20ms);
        if (!m.ok()) continue;
        EXPECT_TRUE(m->has_slice_assign()) << c->id << " got " << net::BodyName(*m);
        if (m->has_slice_assign()) assigns[c->id] = m->slice_assign();
      }
    }
    EXPECT_EQ(assigns.size(), count);
    return assigns;
  }

  static void Ready(FakeClient& client, const proto::SliceAssign& assign, bool ok = true,
                    const std::string& message = "") {
    proto::Envelope e;
    e.mutable_slice_ready()->set_pipeline_id(assign.pipeline_id());
    e.mutable_slice_ready()->set_stage_index(assign.stage_index());
    e.mutable_slice_ready()->set_ok(ok);
    e.mutable_slice_ready()->set_message(message);
    ASSERT_TRUE(client.channel->Send(std::move(e)).ok());
  }

  static void ExpectRelease(FakeClient& client, uint64_t pipeline_id) {
    proto::Envelope m = Next(*client.channel);
    ASSERT_TRUE(m.has_slice_release()) << client.id << " got " << net::BodyName(m);
    EXPECT_EQ(m.slice_release().pipeline_id(), pipeline_id);
    EXPECT_FALSE(m.slice_release().reason().empty());
  }

  static void ExpectError(net::Channel& channel, proto::ErrorCode code,
                          const std::string& mentions) {
    proto::Envelope m = Next(channel);
    ASSERT_TRUE(m.has_error()) << net::BodyName(m);
    EXPECT_EQ(m.error().code(), code) << m.error().message();
    EXPECT_NE(m.error().message().find(mentions), std::string::npos) << m.error().message();
  }

  // Two clients, a 2-stage pipeline assigned and readied; returns the plan.
  proto::PipelinePlan ActivePipeline(FakeClient& a, FakeClient& b, net::Channel& requester,
                                     std::map<std::string, proto::SliceAssign>* assigns) {
    EXPECT_TRUE(requester.Send(Request(7, 2)).ok());
    *assigns = CollectAssigns({&a, &b}, 2);
    if (assigns->size() != 2) return {};
    Ready(a, assigns->at(a.id));
    Ready(b, assigns->at(b.id));
    proto::Envelope m = Next(requester);
    EXPECT_TRUE(m.has_pipeline_plan()) << net::BodyName(m);
    return m.pipeline_plan();
  }

  testing::TempDir dir_;
  testing::TestPki pki_;
  std::vector<float> params_;
  std::unique_ptr<CoordinatorServer> server_;
  std::thread runner_;
  Status run_status_;
};

TEST_F(PipelineServiceTest, AssignsWiredSlicesAndSendsThePlanOnceAllStagesAreReady) {
  StartCoordinator();
  FakeClient a = Register("client-0", "127.0.0.1:41000");
  FakeClient b = Register("client-1", "127.0.0.1:41001");
  WaitServing(2);
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  ASSERT_TRUE(requester->Send(Request(7, 2)).ok());

  auto assigns = CollectAssigns({&a, &b}, 2);
  ASSERT_EQ(assigns.size(), 2u);
  // Order the stages and check the wiring: requester -> stage 0 -> stage 1 -> requester.
  std::vector<std::pair<FakeClient*, proto::SliceAssign>> stages(2);
  for (FakeClient* c : {&a, &b}) {
    const proto::SliceAssign& s = assigns.at(c->id);
    ASSERT_LT(s.stage_index(), 2u);
    stages[s.stage_index()] = {c, s};
  }
  ASSERT_NE(stages[0].first, stages[1].first);
  const proto::SliceAssign& s0 = stages[0].second;
  const proto::SliceAssign& s1 = stages[1].second;
  EXPECT_EQ(s0.pipeline_id(), s1.pipeline_id());
  EXPECT_EQ(s0.num_stages(), 2u);
  EXPECT_EQ(s0.upstream_identity(), "requester");
  EXPECT_EQ(s1.upstream_identity(), stages[0].first->id);
  EXPECT_EQ(s0.downstream_endpoint(), stages[1].first->endpoint);
  EXPECT_EQ(s0.downstream_identity(), stages[1].first->id);
  EXPECT_TRUE(s1.downstream_endpoint().empty());
  EXPECT_TRUE(s1.downstream_identity().empty());
  EXPECT_EQ(s0.requester_identity(), "requester");
  EXPECT_EQ(s1.requester_identity(), "requester");
  EXPECT_EQ(s0.micro_batch(), 8u);
  EXPECT_EQ(s0.in_flight(), 2u);  // 0 asked: the default
  EXPECT_EQ(s0.activation_codec(), "fp32");
  EXPECT_EQ(s0.model().name(), "small");
  // Units: contiguous, covering the chain; weights: exactly the slice's packed parameters.
  auto chain = slicing::Chain::Create(s0.model(), s0.chain());
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  EXPECT_EQ(s0.unit_begin(), 0u);
  EXPECT_EQ(s0.unit_end(), s1.unit_begin());
  EXPECT_EQ(static_cast<int>(s1.unit_end()), chain->num_units());
  for (const proto::SliceAssign* s : {&s0, &s1}) {
    auto expected = chain->PackSlice(params_, static_cast<int>(s->unit_begin()),
                                     static_cast<int>(s->unit_end()));
    ASSERT_TRUE(expected.ok());
    auto weights = net::DecodeFp32(s->weights());
    ASSERT_TRUE(weights.ok()) << weights.status().ToString();
    EXPECT_EQ(*weights, *expected);
  }

  // One stage ready is not enough for a plan.
  Ready(*stages[0].first, s0);
  auto early = requester->Receive(300ms);
  EXPECT_FALSE(early.ok()) << "plan before every stage was ready: " << net::BodyName(*early);
  Ready(*stages[1].first, s1);
  proto::Envelope reply = Next(*requester);
  ASSERT_TRUE(reply.has_pipeline_plan()) << net::BodyName(reply);
  const proto::PipelinePlan& plan = reply.pipeline_plan();
  EXPECT_EQ(plan.request_token(), 7u);
  EXPECT_EQ(plan.pipeline_id(), s0.pipeline_id());
  ASSERT_EQ(plan.stages_size(), 2);
  for (int k = 0; k < 2; ++k) {
    EXPECT_EQ(plan.stages(k).index(), static_cast<uint32_t>(k));
    EXPECT_EQ(plan.stages(k).client_id(), stages[k].first->id);
    EXPECT_EQ(plan.stages(k).endpoint(), stages[k].first->endpoint);
    EXPECT_EQ(plan.stages(k).unit_begin(), stages[k].second.unit_begin());
    EXPECT_EQ(plan.stages(k).unit_end(), stages[k].second.unit_end());
    EXPECT_FALSE(plan.stages(k).layers().empty());
    EXPECT_GT(plan.stages(k).predicted_ms(), 0);
  }
  EXPECT_EQ(plan.model().name(), "small");
  EXPECT_EQ(plan.micro_batch(), 8u);
  EXPECT_EQ(plan.activation_codec(), "fp32");
  EXPECT_GT(plan.predicted_samples_per_s(), 0);
  EXPECT_NE(plan.plan_table().find("client-"), std::string::npos) << plan.plan_table();
  EXPECT_EQ(plan.global_round(), 0u);

  // Done: both stages are released.
  proto::Envelope close;
  close.mutable_pipeline_close()->set_pipeline_id(plan.pipeline_id());
  ASSERT_TRUE(requester->Send(std::move(close)).ok());
  ExpectRelease(a, plan.pipeline_id());
  ExpectRelease(b, plan.pipeline_id());

  // Stopping a serving coordinator completes the run: everyone gets Bye NORMAL.
  server_->Stop();
  runner_.join();
  EXPECT_TRUE(run_status_.ok()) << run_status_.ToString();
  for (net::Channel* channel : {a.channel.get(), requester.get()}) {
    proto::Envelope bye = Next(*channel);
    ASSERT_TRUE(bye.has_bye()) << net::BodyName(bye);
    EXPECT_EQ(bye.bye().reason(), proto::BYE_NORMAL);
  }
}

TEST_F(PipelineServiceTest, AStageThatLeavesFailsThePipelineAndTheRestIsReleased) {
  StartCoordinator();
  FakeClient a = Register("client-0", "127.0.0.1:41000");
  FakeClient b = Register("client-1", "127.0.0.1:41001");
  WaitServing(2);
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  std::map<std::string, proto::SliceAssign> assigns;
  const proto::PipelinePlan plan = ActivePipeline(a, b, *requester, &assigns);
  ASSERT_EQ(plan.stages_size(), 2);

  b.channel->Close(Status::Aborted("killed"));
  ExpectRelease(a, plan.pipeline_id());
  proto::Envelope failed = Next(*requester);
  ASSERT_TRUE(failed.has_pipeline_failed()) << net::BodyName(failed);
  EXPECT_EQ(failed.pipeline_failed().pipeline_id(), plan.pipeline_id());
  EXPECT_EQ(failed.pipeline_failed().failed_client(), "client-1");
  EXPECT_FALSE(failed.pipeline_failed().reason().empty());

  // Asked again without the failed client: the survivor is free again and takes everything.
  ASSERT_TRUE(requester->Send(Request(8, 0, {"client-1"})).ok());
  proto::Envelope assign = Next(*a.channel);
  ASSERT_TRUE(assign.has_slice_assign()) << net::BodyName(assign);
  EXPECT_NE(assign.slice_assign().pipeline_id(), plan.pipeline_id());
  EXPECT_EQ(assign.slice_assign().num_stages(), 1u);
  EXPECT_EQ(assign.slice_assign().upstream_identity(), "requester");
  EXPECT_TRUE(assign.slice_assign().downstream_endpoint().empty());
  Ready(a, assign.slice_assign());
  proto::Envelope replan = Next(*requester);
  ASSERT_TRUE(replan.has_pipeline_plan()) << net::BodyName(replan);
  EXPECT_EQ(replan.pipeline_plan().request_token(), 8u);
  ASSERT_EQ(replan.pipeline_plan().stages_size(), 1);
  EXPECT_EQ(replan.pipeline_plan().stages(0).client_id(), "client-0");

  // The last stage reporting a failure (no sink joined) fails the pipeline without blaming
  // a client: the sink is the requester's own.
  Ready(a, assign.slice_assign(), false, "no sink joined");
  proto::Envelope failed2 = Next(*requester);
  ASSERT_TRUE(failed2.has_pipeline_failed()) << net::BodyName(failed2);
  EXPECT_EQ(failed2.pipeline_failed().failed_client(), "");
  EXPECT_NE(failed2.pipeline_failed().reason().find("no sink joined"), std::string::npos);
  ExpectRelease(a, assign.slice_assign().pipeline_id());
}

TEST_F(PipelineServiceTest, AStageReportingAFailureIsNotTheOneBlamed) {
  StartCoordinator();
  FakeClient c0 = Register("client-0", "127.0.0.1:41000");
  FakeClient c1 = Register("client-1", "127.0.0.1:41001");
  FakeClient c2 = Register("client-2", "127.0.0.1:41002");
  WaitServing(3);
  std::map<std::string, FakeClient*> by_id{{"client-0", &c0}, {"client-1", &c1},
                                           {"client-2", &c2}};
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);

  // Three stages; the middle one cannot reach the next: after the grace period (nobody
  // disconnected) the next stage is named, and every stage is released, the reporter too.
  auto start = [&](uint64_t token) {
    std::vector<std::pair<FakeClient*, proto::SliceAssign>> stages(3);
    EXPECT_TRUE(requester->Send(Request(token, 3)).ok());
    auto assigns = CollectAssigns({&c0, &c1, &c2}, 3);
    for (auto& [id, assign] : assigns) {
      if (assign.stage_index() < 3) stages[assign.stage_index()] = {by_id[id], assign};
      Ready(*by_id[id], assign);
    }
    proto::Envelope plan = Next(*requester);
    EXPECT_TRUE(plan.has_pipeline_plan()) << net::BodyName(plan);
    return stages;
  };
  auto stages = start(1);
  ASSERT_NE(stages[2].first, nullptr);
  const uint64_t first = stages[0].second.pipeline_id();
  Ready(*stages[1].first, stages[1].second, false, "next stage unreachable");
  proto::Envelope failed = Next(*requester);
  ASSERT_TRUE(failed.has_pipeline_failed()) << net::BodyName(failed);
  EXPECT_EQ(failed.pipeline_failed().pipeline_id(), first);
  EXPECT_EQ(failed.pipeline_failed().failed_client(), stages[2].first->id);
  EXPECT_NE(failed.pipeline_failed().reason().find("next stage unreachable"), std::string::npos);
  for (auto& [client, assign] : stages) ExpectRelease(*client, first);

  // Again; this time a client of the pipeline disconnects within the grace period: it is the
  // one named, even though it is not the reporter's next stage.
  stages = start(2);
  ASSERT_NE(stages[0].first, nullptr);
  const uint64_t second = stages[0].second.pipeline_id();
  Ready(*stages[1].first, stages[1].second, false, "upstream vanished");
  stages[0].first->channel->Close(Status::Aborted("killed"));
  proto::Envelope failed_again = Next(*requester);
  ASSERT_TRUE(failed_again.has_pipeline_failed()) << net::BodyName(failed_again);
  EXPECT_EQ(failed_again.pipeline_failed().pipeline_id(), second);
  EXPECT_EQ(failed_again.pipeline_failed().failed_client(), stages[0].first->id);
  ExpectRelease(*stages[1].first, second);
  ExpectRelease(*stages[2].first, second);
}

TEST_F(PipelineServiceTest, ARequesterThatLeavesReleasesItsPipeline) {
  StartCoordinator();
  FakeClient a = Register("client-0", "127.0.0.1:41000");
  FakeClient b = Register("client-1", "127.0.0.1:41001");
  WaitServing(2);
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  std::map<std::string, proto::SliceAssign> assigns;
  const proto::PipelinePlan plan = ActivePipeline(a, b, *requester, &assigns);
  ASSERT_EQ(plan.stages_size(), 2);
  requester->Close();
  ExpectRelease(a, plan.pipeline_id());
  ExpectRelease(b, plan.pipeline_id());
}

TEST_F(PipelineServiceTest, AFailedAssignmentIsReplannedOnceWithoutTheFailedClient) {
  StartCoordinator(0, true, /*ready_timeout=*/1500ms);
  FakeClient c0 = Register("client-0", "127.0.0.1:41000");
  FakeClient c1 = Register("client-1", "127.0.0.1:41001");
  FakeClient c2 = Register("client-2", "127.0.0.1:41002");
  WaitServing(3);
  std::map<std::string, FakeClient*> by_id{{"client-0", &c0}, {"client-1", &c1},
                                           {"client-2", &c2}};
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  ASSERT_TRUE(requester->Send(Request(9, 2)).ok());

  // First attempt: one stage cannot load its slice.
  auto first = CollectAssigns({&c0, &c1, &c2}, 2);
  ASSERT_EQ(first.size(), 2u);
  auto it = first.begin();
  const std::string refuser = it->first, loader = std::next(it)->first;
  Ready(*by_id[refuser], first.at(refuser), false, "out of memory");
  Ready(*by_id[loader], first.at(loader));
  // Both are released (the refuser holds nothing, and ignores it).
  ExpectRelease(*by_id[loader], first.at(loader).pipeline_id());
  ExpectRelease(*by_id[refuser], first.at(refuser).pipeline_id());

  // Second attempt: over the two others; one of them stays silent past the deadline.
  std::vector<FakeClient*> others;
  for (auto& [id, c] : by_id) {
    if (id != refuser) others.push_back(c);
  }
  auto second = CollectAssigns(others, 2);
  ASSERT_EQ(second.size(), 2u);
  EXPECT_EQ(second.count(refuser), 0u);
  const uint64_t second_id = second.begin()->second.pipeline_id();
  EXPECT_NE(second_id, first.begin()->second.pipeline_id());
  FakeClient* answering = by_id[second.begin()->first];
  Ready(*answering, second.begin()->second);
  ExpectRelease(*answering, second_id);
  // The silent one is released too, should it load the slice late.
  const std::string silent = std::next(second.begin())->first;
  ExpectRelease(*by_id[silent], second_id);

  // Re-planned once only: the requester is told why, naming the silent client.
  ExpectError(*requester, proto::ERROR_RESOURCE_EXHAUSTED, "no SliceReady from " + silent);
  // The refusing client got nothing more (no third attempt).
  auto extra = by_id[refuser]->channel->Receive(300ms);
  EXPECT_FALSE(extra.ok()) << net::BodyName(*extra);
}

TEST_F(PipelineServiceTest, RequestsThatCannotBeServedAreRefusedWithTheReason) {
  StartCoordinator();
  FakeClient trainer_only = Register("client-0", "");  // serves no stages
  WaitServing(1);
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);

  ASSERT_TRUE(requester->Send(Request(1, 0)).ok());
  ExpectError(*requester, proto::ERROR_RESOURCE_EXHAUSTED, "1 without a stage endpoint");

  FakeClient a = Register("client-1", "127.0.0.1:41001");
  WaitServing(2);
  proto::Envelope codec = Request(2, 0);
  codec.mutable_pipeline_request()->set_activation_codec("int4");
  ASSERT_TRUE(requester->Send(std::move(codec)).ok());
  ExpectError(*requester, proto::ERROR_INVALID_MESSAGE, "'int4'");

  ASSERT_TRUE(requester->Send(Request(3, 2)).ok());
  ExpectError(*requester, proto::ERROR_RESOURCE_EXHAUSTED, "only 1 client(s) can host one");

  ASSERT_TRUE(requester->Send(Request(4, 0, {"client-1"})).ok());
  ExpectError(*requester, proto::ERROR_RESOURCE_EXHAUSTED, "1 excluded");

  proto::Envelope huge = Request(5, 0);
  huge.mutable_pipeline_request()->set_micro_batch(1'000'000);
  ASSERT_TRUE(requester->Send(std::move(huge)).ok());
  ExpectError(*requester, proto::ERROR_INVALID_MESSAGE, "micro_batch");

  // Roles do not mix: a registered client may not request, a requester may not register.
  ASSERT_TRUE(a.channel->Send(Request(6, 0)).ok());
  ExpectError(*a.channel, proto::ERROR_UNEXPECTED_MESSAGE, "registered client");
  ASSERT_TRUE(requester->Send(testing::MakeHello("requester")).ok());
  ExpectError(*requester, proto::ERROR_UNEXPECTED_MESSAGE, "cannot register");
  EXPECT_EQ(server_->num_registered(), 2u);

  // A SliceReady for a stage the client was not given.
  proto::Envelope stray;
  stray.mutable_slice_ready()->set_pipeline_id(12345);
  stray.mutable_slice_ready()->set_ok(true);
  ASSERT_TRUE(a.channel->Send(std::move(stray)).ok());
  // Unknown pipeline: ignored (a late answer is normal), so the next reply is to this request.
  ASSERT_TRUE(requester->Send(Request(7, 1)).ok());
  proto::Envelope assign = Next(*a.channel);
  ASSERT_TRUE(assign.has_slice_assign()) << net::BodyName(assign);
  proto::Envelope wrong_stage;
  wrong_stage.mutable_slice_ready()->set_pipeline_id(assign.slice_assign().pipeline_id());
  wrong_stage.mutable_slice_ready()->set_stage_index(1);
  wrong_stage.mutable_slice_ready()->set_ok(true);
  ASSERT_TRUE(a.channel->Send(std::move(wrong_stage)).ok());
  ExpectError(*a.channel, proto::ERROR_INVALID_MESSAGE, "not assigned to you");
}

TEST_F(PipelineServiceTest, ProfileUpdatesAreValidatedAndSteerThePlan) {
  StartCoordinator();
  FakeClient a = Register("client-0", "127.0.0.1:41000");
  FakeClient b = Register("client-1", "127.0.0.1:41001");
  WaitServing(2);

  // Timings of another model (one layer short): refused, the old profile stays.
  proto::Envelope bad;
  for (int i = 0; i < 3; ++i) {
    auto* t = bad.mutable_profile_update()->mutable_profile()->add_layer_timings();
    t->set_layer_index(static_cast<uint32_t>(i));
    t->set_forward_ms_per_sample(1.0);
  }
  ASSERT_TRUE(a.channel->Send(std::move(bad)).ok());
  ExpectError(*a.channel, proto::ERROR_INVALID_MESSAGE, "previous profile kept");

  // client-0 measures itself very slow: a one-stage pipeline goes to client-1.
  proto::Envelope slow;
  for (int i = 0; i < 4; ++i) {
    auto* t = slow.mutable_profile_update()->mutable_profile()->add_layer_timings();
    t->set_layer_index(static_cast<uint32_t>(i));
    t->set_forward_ms_per_sample(50.0);
  }
  ASSERT_TRUE(a.channel->Send(std::move(slow)).ok());
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  ASSERT_TRUE(requester->Send(Request(1, 1)).ok());
  proto::Envelope assign = Next(*b.channel);
  ASSERT_TRUE(assign.has_slice_assign()) << net::BodyName(assign);
  auto nothing = a.channel->Receive(300ms);
  EXPECT_FALSE(nothing.ok()) << "the slow client got " << net::BodyName(*nothing);
}

TEST_F(PipelineServiceTest, RequestsWaitUntilTrainingIsOver) {
  StartCoordinator(/*rounds=*/1);
  FakeClient a = Register("client-0", "127.0.0.1:41000");
  proto::Envelope task = Next(*a.channel);
  ASSERT_TRUE(task.has_fit_task()) << net::BodyName(task);

  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  ASSERT_TRUE(requester->Send(Request(1, 1)).ok());
  auto early = requester->Receive(300ms);
  EXPECT_FALSE(early.ok()) << "answered during training: " << net::BodyName(*early);
  EXPECT_FALSE(server_->serving());

  // The round completes with a zero update; then the request is planned.
  proto::Envelope result;
  auto* r = result.mutable_fit_result();
  r->set_round(task.fit_task().round());
  r->set_task_id(task.fit_task().task_id());
  r->set_num_samples(10);
  ASSERT_TRUE(net::EncodeFp32(std::vector<float>(params_.size(), 0.f), r->mutable_update()).ok());
  ASSERT_TRUE(a.channel->Send(std::move(result)).ok());
  proto::Envelope assign = Next(*a.channel);
  ASSERT_TRUE(assign.has_slice_assign()) << net::BodyName(assign);
  Ready(a, assign.slice_assign());
  proto::Envelope plan = Next(*requester);
  ASSERT_TRUE(plan.has_pipeline_plan()) << net::BodyName(plan);
  EXPECT_EQ(plan.pipeline_plan().global_round(), 1u);
}

TEST_F(PipelineServiceTest, ACoordinatorThatDoesNotServeSaysSo) {
  StartCoordinator(/*rounds=*/1, /*serve=*/false);
  auto requester = Connect("requester");
  ASSERT_NE(requester, nullptr);
  ASSERT_TRUE(requester->Send(Request(1, 0)).ok());
  ExpectError(*requester, proto::ERROR_UNSUPPORTED_MESSAGE, "--serve");
}

}  // namespace
}  // namespace fedslice::coordinator
