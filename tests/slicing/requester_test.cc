// InferenceRequester against a fake coordinator and fake one-stage pipelines over loopback
// mutual TLS: results land in request order, duplicates and stale results are dropped, a
// stage that dies or misbehaves mid-stream is given up and the unanswered micro-batches are
// replayed on a new pipeline without the failed client, and refusals come back as errors.
#include "fedslice/slicing/requester.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "fedslice/common/model.h"
#include "fedslice/common/net/server.h"
#include "fedslice/common/net/wire.h"
#include "fedslice/slicing/chain.h"
#include "testing/net_test_util.h"
#include "testing/test_util.h"

namespace fedslice::slicing {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

proto::ModelSpec SmallSpec() {
  proto::ModelSpec spec;
  spec.set_name("small");
  spec.add_input_shape(1);
  spec.add_input_shape(4);
  spec.add_input_shape(4);
  spec.set_num_classes(10);
  spec.set_init_seed(5);
  spec.add_layers()->mutable_flatten();
  auto* fc1 = spec.add_layers()->mutable_dense();
  fc1->set_in_features(16);
  fc1->set_out_features(24);
  spec.add_layers()->mutable_relu();
  auto* fc2 = spec.add_layers()->mutable_dense();
  fc2->set_in_features(24);
  fc2->set_out_features(10);
  return spec;
}

Tensor RandomImages(int64_t n, uint64_t seed) {
  Tensor t({n, 1, 4, 4});
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : t.span()) x = u(rng);
  return t;
}

// A one-stage pipeline host: runs the whole model on each micro-batch and answers the sink.
// Misbehaviours are switched on by the test.
class FakeStage : public net::SessionHandler {
 public:
  explicit FakeStage(const Model& model) : model_(model) {}
  ~FakeStage() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (answerer_.joinable()) answerer_.join();
  }

  void OnOpen(const net::SessionPtr&) override {}
  void OnClosed(const net::SessionPtr&, const Status&) override {}
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override {
    std::lock_guard lock(mu_);
    if (dead_) return session->Close(Status::Aborted("stage is dead"));
    if (envelope.has_stage_join()) {
      joins_.push_back(envelope.stage_join());
      return;
    }
    if (!envelope.has_activation_batch()) return;
    const proto::ActivationBatch& in = envelope.activation_batch();
    ++batches_;
    if (on_batch) on_batch(batches_);
    if (die_at_batch != 0 && batches_ >= die_at_batch) {
      dead_ = true;
      return session->Close(Status::Aborted("stage died"));
    }
    if (hold_from_batch != 0 && batches_ >= hold_from_batch) return;  // silently stuck
    const int64_t n = in.num_samples();
    Tensor x, y;
    EXPECT_TRUE(DecodeActivation(in.data(), {n, 1, 4, 4}, &x).ok());
    EXPECT_TRUE(model_.Forward(x, &y).ok());
    proto::Envelope out;
    proto::ActivationBatch* result = out.mutable_activation_batch();
    result->set_pipeline_id(in.pipeline_id());
    result->set_batch_id(in.batch_id());
    result->set_unit(static_cast<uint32_t>(num_units));
    result->set_num_samples(static_cast<uint32_t>(wrong_samples ? n + 1 : n));
    EXPECT_TRUE(EncodeActivation(y, *codec::ParseCodec("fp32"), result->mutable_data()).ok());
    if (stale_too) {
      proto::Envelope stale = out;
      stale.mutable_activation_batch()->set_pipeline_id(in.pipeline_id() + 1000);
      (void)session->Send(std::move(stale));
    }
    if (duplicate) (void)session->Send(out);
    if (answer_delay.count() > 0) {
      // Answered later by a thread of our own, so that the requester's next micro-batches
      // can arrive while this one is unanswered (as in a stage that takes time to compute).
      max_unanswered_ = std::max(max_unanswered_, ++unanswered_);
      delayed_.push_back({session, std::move(out)});
      if (!answerer_.joinable()) answerer_ = std::thread([this] { AnswerLater(); });
      cv_.notify_all();
      return;
    }
    (void)session->Send(std::move(out));
  }

  std::vector<proto::StageJoin> joins() {
    std::lock_guard lock(mu_);
    return joins_;
  }
  // With answer_delay: the most micro-batches received and not yet answered at once.
  int max_unanswered() {
    std::lock_guard lock(mu_);
    return max_unanswered_;
  }

  // Set before streaming.
  int num_units = 4;
  bool duplicate = false;
  bool stale_too = false;
  bool wrong_samples = false;
  int die_at_batch = 0;
  int hold_from_batch = 0;
  std::chrono::milliseconds answer_delay{0};  // answer each batch this long after it came
  std::function<void(int)> on_batch;

 private:
  void AnswerLater() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !delayed_.empty(); });
      if (stop_) return;
      auto [session, out] = std::move(delayed_.front());
      delayed_.erase(delayed_.begin());
      lock.unlock();
      std::this_thread::sleep_for(answer_delay);
      lock.lock();
      --unanswered_;  // before the send: the requester may answer with the next batch at once
      lock.unlock();
      (void)session->Send(std::move(out));
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  Model model_;
  std::vector<proto::StageJoin> joins_;
  int batches_ = 0;
  bool dead_ = false;
  bool stop_ = false;
  int unanswered_ = 0, max_unanswered_ = 0;
  std::vector<std::pair<net::SessionPtr, proto::Envelope>> delayed_;
  std::thread answerer_;
};

// Answers PipelineRequests with plans from `planner` (or an Error when it returns one) and
// records what the requester sends.
class FakeCoordinator : public net::SessionHandler {
 public:
  std::function<proto::Envelope(const proto::PipelineRequest&)> planner;

  void OnOpen(const net::SessionPtr& session) override {
    std::lock_guard lock(mu_);
    session_ = session;
  }
  void OnClosed(const net::SessionPtr&, const Status&) override {}
  void OnMessage(const net::SessionPtr& session, proto::Envelope envelope) override {
    std::unique_lock lock(mu_);
    if (envelope.has_pipeline_request()) {
      requests_.push_back(envelope.pipeline_request());
      proto::Envelope reply = planner(envelope.pipeline_request());
      lock.unlock();
      (void)session->Send(std::move(reply));
      return;
    }
    if (envelope.has_pipeline_close()) closes_.push_back(envelope.pipeline_close());
    cv_.notify_all();
  }

  void SendToRequester(proto::Envelope envelope) {
    std::lock_guard lock(mu_);
    ASSERT_NE(session_, nullptr);
    (void)session_->Send(std::move(envelope));
  }
  std::vector<proto::PipelineRequest> requests() {
    std::lock_guard lock(mu_);
    return requests_;
  }
  // The PipelineCloses received once there are `n` of them (or after 5 s).
  std::vector<proto::PipelineClose> WaitCloses(size_t n) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, 5s, [&] { return closes_.size() >= n; });
    return closes_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  net::SessionPtr session_;
  std::vector<proto::PipelineRequest> requests_;
  std::vector<proto::PipelineClose> closes_;
};

class RequesterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pki = testing::TestPki::Create(dir_.path(), 3);
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_ = *pki;
    auto model = Model::Create(SmallSpec());
    ASSERT_TRUE(model.ok());
    model_ = std::make_unique<Model>(std::move(model).value());
    coordinator_ = std::make_shared<FakeCoordinator>();
    for (int i = 0; i < 2; ++i) stages_.push_back(std::make_shared<FakeStage>(*model_));
  }

  void Start() {
    auto server = net::Server::Start(io_.io(), pki_.ServerConfig(), {}, coordinator_);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    coordinator_server_ = std::move(server).value();
    for (int i = 0; i < 2; ++i) {
      auto stage = net::Server::Start(io_.io(), pki_.Config("client-" + std::to_string(i)), {},
                                      stages_[static_cast<size_t>(i)]);
      ASSERT_TRUE(stage.ok()) << stage.status().ToString();
      stage_servers_.push_back(std::move(stage).value());
    }
    auto requester = InferenceRequester::Connect("127.0.0.1", coordinator_server_->port(),
                                                 pki_.Config("client-2"));
    ASSERT_TRUE(requester.ok()) << requester.status().ToString();
    requester_ = std::move(requester).value();
  }

  void TearDown() override {
    requester_.reset();
    for (auto& s : stage_servers_) s->Stop();
    if (coordinator_server_) coordinator_server_->Stop();
    io_.Stop();
    stage_servers_.clear();
    coordinator_server_.reset();
  }

  // A one-stage plan on fake stage `i` for `request`.
  proto::Envelope PlanOn(int i, const proto::PipelineRequest& request) {
    proto::Envelope e;
    proto::PipelinePlan* plan = e.mutable_pipeline_plan();
    plan->set_request_token(request.request_token());
    plan->set_pipeline_id(++pipeline_ids_);
    proto::StageInfo* stage = plan->add_stages();
    stage->set_client_id("client-" + std::to_string(i));
    stage->set_endpoint("127.0.0.1:" +
                        std::to_string(stage_servers_[static_cast<size_t>(i)]->port()));
    stage->set_unit_begin(0);
    stage->set_unit_end(4);
    stage->set_layers("all");
    *plan->mutable_model() = SmallSpec();
    plan->set_micro_batch(request.micro_batch());
    plan->set_activation_codec("fp32");
    plan->set_in_flight(request.in_flight() == 0 ? 2 : request.in_flight());
    plan->set_predicted_samples_per_s(1000);
    return e;
  }

  // Logits of `images` as the fake stages compute them: per micro-batch of `m`.
  Tensor Reference(const Tensor& images, int64_t m) {
    const int64_t n = images.batch();
    Tensor out({n, 10}), x, y;
    for (int64_t b = 0; b < n; b += m) {
      const int64_t rows = std::min(m, n - b);
      x.Resize({rows, 1, 4, 4});
      std::copy_n(images.data() + b * 16, rows * 16, x.data());
      EXPECT_TRUE(model_->Forward(x, &y).ok());
      std::copy_n(y.data(), rows * 10, out.data() + b * 10);
    }
    return out;
  }

  static void ExpectSameLogits(const Tensor& got, const Tensor& want) {
    ASSERT_EQ(got.shape(), want.shape());
    for (int64_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got.data()[i], want.data()[i]) << "value " << i;
    }
  }

  RequesterOptions Options(uint32_t micro_batch) {
    RequesterOptions o;
    o.micro_batch = micro_batch;
    o.failure_grace = 200ms;
    o.progress_timeout = 5s;
    o.plan_timeout = 5s;
    return o;
  }

  testing::TempDir dir_;
  testing::TestPki pki_;
  testing::IoThreads io_{2};
  std::unique_ptr<Model> model_;
  std::shared_ptr<FakeCoordinator> coordinator_;
  std::vector<std::shared_ptr<FakeStage>> stages_;
  std::unique_ptr<net::Server> coordinator_server_;
  std::vector<std::unique_ptr<net::Server>> stage_servers_;
  std::unique_ptr<InferenceRequester> requester_;
  std::atomic<uint64_t> pipeline_ids_{100};
};

TEST_F(RequesterTest, AnswersEveryImageInRequestOrderAndClosesThePipeline) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) { return PlanOn(0, r); };
  Start();
  const Tensor images = RandomImages(100, 1);
  RequesterOptions options = Options(16);
  options.num_stages = 1;
  options.activation_codec = "int8";
  auto report = requester_->Run(images, options);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 16));
  EXPECT_EQ(report->images, 100);
  EXPECT_EQ(report->batches, 7);
  EXPECT_EQ(report->answered, 100);
  EXPECT_EQ(report->batches_replayed, 0);
  EXPECT_EQ(report->duplicates_discarded, 0);
  EXPECT_TRUE(report->failures.empty());
  ASSERT_EQ(report->plans.size(), 1u);
  EXPECT_GT(report->latency_p50_ms, 0);
  EXPECT_LE(report->latency_p50_ms, report->latency_p95_ms);

  // What the coordinator was asked, and told at the end.
  auto requests = coordinator_->requests();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0].micro_batch(), 16u);
  EXPECT_EQ(requests[0].num_stages(), 1u);
  EXPECT_EQ(requests[0].activation_codec(), "int8");
  EXPECT_TRUE(requests[0].split_layers());
  auto closes = coordinator_->WaitCloses(1);
  ASSERT_EQ(closes.size(), 1u);
  EXPECT_EQ(closes[0].pipeline_id(), report->plans[0].pipeline_id());
  EXPECT_FALSE(closes[0].failed());
  // One connection to the single stage, joined as upstream and sink.
  auto joins = stages_[0]->joins();
  ASSERT_EQ(joins.size(), 1u);
  EXPECT_TRUE(joins[0].upstream());
  EXPECT_TRUE(joins[0].sink());
  EXPECT_EQ(joins[0].pipeline_id(), report->plans[0].pipeline_id());
}

// The requester keeps the pipeline full by default; max_outstanding = 1 sends each micro-batch
// only once the one before is answered (the latency of an idle pipeline).
TEST_F(RequesterTest, MaxOutstandingBoundsTheMicroBatchesInThePipeline) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) { return PlanOn(0, r); };
  stages_[0]->answer_delay = 20ms;
  stages_[1]->answer_delay = 20ms;
  Start();
  const Tensor images = RandomImages(48, 7);
  RequesterOptions options = Options(8);

  auto full = requester_->Run(images, options);  // window 1 * (2 + 1) + 1 = 4
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  ExpectSameLogits(full->logits, Reference(images, 8));
  EXPECT_EQ(full->peak_outstanding, 4u);
  EXPECT_GE(stages_[0]->max_unanswered(), 2);

  coordinator_->planner = [&](const proto::PipelineRequest& r) { return PlanOn(1, r); };
  options.max_outstanding = 1;
  auto idle = requester_->Run(images, options);
  ASSERT_TRUE(idle.ok()) << idle.status().ToString();
  ExpectSameLogits(idle->logits, Reference(images, 8));
  EXPECT_EQ(idle->peak_outstanding, 1u);
  EXPECT_EQ(stages_[1]->max_unanswered(), 1);
}

TEST_F(RequesterTest, DuplicateAndStaleResultsAreDiscarded) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) { return PlanOn(0, r); };
  stages_[0]->duplicate = true;
  stages_[0]->stale_too = true;
  Start();
  const Tensor images = RandomImages(50, 2);
  auto report = requester_->Run(images, Options(10));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 10));
  EXPECT_EQ(report->answered, 50);
  // Per batch: one result of another pipeline and one repeat, except that the last batch's
  // repeat arrives after everything is answered, when nobody reads the stage any more.
  EXPECT_EQ(report->duplicates_discarded, 9);
}

TEST_F(RequesterTest, AStageThatDiesIsGivenUpAndTheUnansweredBatchesAreReplayed) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) {
    return PlanOn(r.exclude_clients_size() == 0 ? 0 : 1, r);
  };
  stages_[0]->die_at_batch = 4;
  Start();
  const Tensor images = RandomImages(120, 3);
  auto report = requester_->Run(images, Options(10));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 10));
  EXPECT_EQ(report->answered, 120);
  ASSERT_EQ(report->plans.size(), 2u);
  ASSERT_EQ(report->failures.size(), 1u);
  EXPECT_THAT(report->failures[0], HasSubstr("client-0"));
  // Batches 0-2 were answered by the dead stage; at least batch 3 was outstanding.
  EXPECT_GE(report->batches_replayed, 1);

  // Asked again without the stage whose connection broke (no coordinator said otherwise),
  // and the failed pipeline was given up at the coordinator.
  auto requests = coordinator_->requests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_THAT(requests[1].exclude_clients(), ::testing::ElementsAre("client-0"));
  auto closes = coordinator_->WaitCloses(2);
  ASSERT_EQ(closes.size(), 2u);
  EXPECT_EQ(closes[0].pipeline_id(), report->plans[0].pipeline_id());
  EXPECT_TRUE(closes[0].failed());
  EXPECT_EQ(closes[1].pipeline_id(), report->plans[1].pipeline_id());
  EXPECT_FALSE(closes[1].failed());
}

TEST_F(RequesterTest, ThePipelineFailedOfTheCoordinatorNamesTheClientToExclude) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) {
    return PlanOn(r.exclude_clients_size() == 0 ? 0 : 1, r);
  };
  // Stage 0 hangs from its 3rd batch on; the coordinator reports a failure that it blames on
  // another client (as when a middle stage died), which the requester must believe.
  stages_[0]->hold_from_batch = 3;
  uint64_t first_pipeline = 0;
  stages_[0]->on_batch = [&](int batch) {
    if (batch != 3) return;
    proto::Envelope failed;
    failed.mutable_pipeline_failed()->set_pipeline_id(first_pipeline);
    failed.mutable_pipeline_failed()->set_failed_client("client-7");
    failed.mutable_pipeline_failed()->set_reason("client client-7 disconnected");
    coordinator_->SendToRequester(std::move(failed));
  };
  Start();
  first_pipeline = pipeline_ids_ + 1;
  const Tensor images = RandomImages(80, 4);
  auto report = requester_->Run(images, Options(8));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 8));
  EXPECT_EQ(report->answered, 80);
  ASSERT_EQ(report->failures.size(), 1u);
  EXPECT_THAT(report->failures[0], HasSubstr("client-7 disconnected"));
  auto requests = coordinator_->requests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_THAT(requests[1].exclude_clients(), ::testing::ElementsAre("client-7"));
  // The coordinator already knows: only the second pipeline is closed by the requester.
  auto closes = coordinator_->WaitCloses(1);
  ASSERT_EQ(closes.size(), 1u);
  EXPECT_EQ(closes[0].pipeline_id(), report->plans[1].pipeline_id());
}

TEST_F(RequesterTest, AMalformedResultFailsThePipeline) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) {
    return PlanOn(r.exclude_clients_size() == 0 ? 0 : 1, r);
  };
  stages_[0]->wrong_samples = true;
  Start();
  const Tensor images = RandomImages(30, 5);
  auto report = requester_->Run(images, Options(10));
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 10));
  ASSERT_EQ(report->failures.size(), 1u);
  EXPECT_THAT(report->failures[0], HasSubstr("bad result"));
  EXPECT_EQ(report->plans.back().stages(0).client_id(), "client-1");
}

TEST_F(RequesterTest, GivesUpAfterMaxReplans) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) { return PlanOn(0, r); };
  stages_[0]->die_at_batch = 1;
  Start();
  RequesterOptions options = Options(10);
  options.max_replans = 1;
  auto report = requester_->Run(RandomImages(30, 6), options);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), Status::Code::kAborted);
  EXPECT_THAT(report.status().message(), HasSubstr("2 pipelines failed"));
  EXPECT_EQ(coordinator_->requests().size(), 2u);
}

TEST_F(RequesterTest, RefusalsAndBadInputsAreErrors) {
  coordinator_->planner = [&](const proto::PipelineRequest& r) {
    if (r.num_stages() == 5) {
      return net::MakeError(proto::ERROR_RESOURCE_EXHAUSTED, "only 2 clients can host a stage");
    }
    proto::Envelope plan = PlanOn(0, r);
    if (r.num_stages() == 2) plan.mutable_pipeline_plan()->mutable_model()->set_input_shape(2, 5);
    return plan;
  };
  Start();
  const Tensor images = RandomImages(10, 7);
  RequesterOptions options = Options(4);
  options.num_stages = 5;
  auto refused = requester_->Run(images, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Status::Code::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("only 2 clients"));

  // A plan for another input shape: refused, and closed at the coordinator.
  options.num_stages = 2;
  auto mismatch = requester_->Run(images, options);
  ASSERT_FALSE(mismatch.ok());
  EXPECT_EQ(mismatch.status().code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("shape"));
  auto closes = coordinator_->WaitCloses(1);
  ASSERT_EQ(closes.size(), 1u);
  EXPECT_TRUE(closes[0].failed());

  // Checked before anything is sent.
  const size_t asked = coordinator_->requests().size();
  options.num_stages = 1;
  options.activation_codec = "int4";
  auto bad_codec = requester_->Run(images, options);
  EXPECT_EQ(bad_codec.status().code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(bad_codec.status().message(), HasSubstr("fp32, fp16 or int8"));
  options.activation_codec = "fp32";
  options.micro_batch = 0;
  EXPECT_EQ(requester_->Run(images, options).status().code(), Status::Code::kInvalidArgument);
  options.micro_batch = 4;
  Tensor nan = images;
  nan.data()[17] = std::nanf("");
  auto bad = requester_->Run(nan, options);
  EXPECT_EQ(bad.status().code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("17"));
  EXPECT_EQ(coordinator_->requests().size(), asked);

  // The requester still works afterwards.
  auto report = requester_->Run(images, options);
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  ExpectSameLogits(report->logits, Reference(images, 4));
}

TEST(PercentileTest, NearestRank) {
  std::vector<double> v{5, 1, 4, 2, 3};
  EXPECT_EQ(Percentile(v, 50), 3);
  EXPECT_EQ(Percentile(v, 95), 5);
  EXPECT_EQ(Percentile(v, 0), 1);
  std::vector<double> none;
  EXPECT_EQ(Percentile(none, 50), 0);
}

}  // namespace
}  // namespace fedslice::slicing
