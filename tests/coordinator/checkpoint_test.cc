#include "fedslice/coordinator/checkpoint.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace fedslice::coordinator {
namespace {

using google::protobuf::util::MessageDifferencer;

constexpr size_t kParams = 6;  // dense 2 -> 2: 4 weights + 2 biases

proto::ModelSpec TinySpec(int out = 2) {
  proto::ModelSpec spec;
  spec.set_name("tiny");
  spec.add_input_shape(2);
  proto::LayerSpec* layer = spec.add_layers();
  layer->set_name("fc");
  layer->mutable_dense()->set_in_features(2);
  layer->mutable_dense()->set_out_features(out);
  spec.set_num_classes(2);
  spec.set_init_seed(1);
  return spec;
}

proto::ModelFile TinyModel(float base) {
  proto::ModelFile file;
  file.set_format_version(1);
  *file.mutable_spec() = TinySpec();
  file.set_param_count(kParams);
  for (size_t i = 0; i < kParams; ++i) file.add_weights(base + 0.5f * static_cast<float>(i));
  return file;
}

RunConfig Config() {
  return {{"strategy", "fedavgm:lr=1,momentum=0.9"}, {"codec", "fp32"}, {"seed", "42"}};
}

// A checkpoint after `round` rounds of FedAvgM, so the strategy state is not trivial.
proto::Checkpoint MakeAt(uint64_t round) {
  auto config = StrategyConfig::Parse("fedavgm:lr=1,momentum=0.9");
  auto strategy = std::move(MakeStrategy(*config, kParams)).value();
  std::vector<float> w(kParams, 0.0f);
  for (uint64_t r = 0; r < round; ++r) {
    EXPECT_TRUE(strategy->BeginRound(w).ok());
    EXPECT_TRUE(strategy->Accumulate(std::vector<float>(kParams, 0.1f * (r + 1)), 3).ok());
    EXPECT_TRUE(strategy->FinishRound(w).ok());
  }
  return MakeCheckpoint(round, TinyModel(static_cast<float>(round)), *strategy, Config(), 42);
}

std::vector<std::string> Names(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string Slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void Spit(const std::filesystem::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

TEST(CheckpointTest, RoundTrip) {
  testing::TempDir dir;
  Result<CheckpointStore> store = CheckpointStore::Open(dir.path() / "ckpt");
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  Result<std::optional<proto::Checkpoint>> none = store->LoadLatest();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  const proto::Checkpoint saved = MakeAt(3);
  EXPECT_EQ(saved.format_version(), kCheckpointFormatVersion);
  EXPECT_GT(saved.created_unix_ms(), 0);
  ASSERT_TRUE(store->Save(saved).ok());
  EXPECT_EQ(Names(store->dir()), std::vector<std::string>{"round-000000003.ckpt"});

  Result<std::optional<proto::Checkpoint>> loaded = LoadLatestCheckpoint(store->dir());
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ASSERT_TRUE(loaded->has_value());
  EXPECT_TRUE(MessageDifferencer::Equals(**loaded, saved));
  EXPECT_EQ((*loaded)->round(), 3u);
  EXPECT_EQ((*loaded)->seed(), 42u);
  EXPECT_EQ((*loaded)->strategy_state().step(), 3u);
  EXPECT_EQ((*loaded)->run_config().at("codec"), "fp32");

  // The strategy state continues identically after the round trip.
  auto config = StrategyConfig::Parse("fedavgm:lr=1,momentum=0.9");
  auto resumed = std::move(MakeStrategy(*config, kParams)).value();
  ASSERT_TRUE(resumed->LoadState((*loaded)->strategy_state()).ok());
  EXPECT_EQ(resumed->SaveState().SerializeAsString(), saved.strategy_state().SerializeAsString());
}

TEST(CheckpointTest, KeepsTheNewestTwo) {
  testing::TempDir dir;
  auto store = std::move(CheckpointStore::Open(dir.path())).value();
  for (uint64_t r = 1; r <= 5; ++r) ASSERT_TRUE(store.Save(MakeAt(r)).ok());
  EXPECT_EQ(Names(dir.path()),
            (std::vector<std::string>{"round-000000004.ckpt", "round-000000005.ckpt"}));
  auto three = std::move(CheckpointStore::Open(dir.path(), 3)).value();
  ASSERT_TRUE(three.Save(MakeAt(6)).ok());
  ASSERT_TRUE(three.Save(MakeAt(7)).ok());
  EXPECT_EQ(Names(dir.path()),
            (std::vector<std::string>{"round-000000005.ckpt", "round-000000006.ckpt",
                                      "round-000000007.ckpt"}));
  EXPECT_EQ(CheckpointStore::Open(dir.path(), 0).status().code(), Status::Code::kInvalidArgument);
}

class CorruptLatestTest : public ::testing::TestWithParam<int> {};

TEST_P(CorruptLatestTest, FallsBackToThePreviousCheckpoint) {
  testing::TempDir dir;
  auto store = std::move(CheckpointStore::Open(dir.path())).value();
  const proto::Checkpoint four = MakeAt(4);
  ASSERT_TRUE(store.Save(four).ok());
  ASSERT_TRUE(store.Save(MakeAt(5)).ok());
  const std::filesystem::path latest = dir.path() / CheckpointStore::FileName(5);
  std::string bytes = Slurp(latest);
  switch (GetParam()) {
    case 0:
      bytes.resize(bytes.size() / 2);
      break;  // truncated
    case 1:
      bytes[bytes.size() - 7] ^= 0x40;
      break;  // bit flip in the payload
    case 2:
      bytes[0] = 'X';
      break;  // bad magic
    case 3:
      bytes.resize(20);
      break;  // shorter than the header
    case 4:
      bytes += "trailing";
      break;  // longer than announced
    case 5:
      bytes.clear();
      break;   // empty
    case 6: {  // renamed from another round
      std::filesystem::copy_file(dir.path() / CheckpointStore::FileName(4),
                                 dir.path() / CheckpointStore::FileName(9));
      break;
    }
  }
  if (GetParam() != 6) Spit(latest, bytes);
  Result<std::optional<proto::Checkpoint>> loaded = store.LoadLatest();
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ASSERT_TRUE(loaded->has_value());
  if (GetParam() == 6) {
    EXPECT_EQ((*loaded)->round(), 5u);
  } else {
    EXPECT_EQ((*loaded)->round(), 4u);
    EXPECT_TRUE(MessageDifferencer::Equals(**loaded, four));
  }
}

INSTANTIATE_TEST_SUITE_P(Damage, CorruptLatestTest, ::testing::Range(0, 7));

TEST(CheckpointTest, NothingUsableIsAClearError) {
  testing::TempDir dir;
  auto store = std::move(CheckpointStore::Open(dir.path())).value();
  ASSERT_TRUE(store.Save(MakeAt(1)).ok());
  ASSERT_TRUE(store.Save(MakeAt(2)).ok());
  for (uint64_t r : {1, 2}) {
    const auto path = dir.path() / CheckpointStore::FileName(r);
    std::string bytes = Slurp(path);
    bytes.resize(bytes.size() - 3);
    Spit(path, bytes);
  }
  Result<std::optional<proto::Checkpoint>> loaded = store.LoadLatest();
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), Status::Code::kCorruption);
  const std::string msg = loaded.status().message();
  EXPECT_NE(msg.find("round-000000002.ckpt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("round-000000001.ckpt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST(CheckpointTest, DecodeNamesTheProblem) {
  const std::string good = *EncodeCheckpointFile(MakeAt(2));
  ASSERT_TRUE(DecodeCheckpointFile(good).ok());
  EXPECT_EQ(*EncodeCheckpointFile(*DecodeCheckpointFile(good)), good);  // deterministic
  const auto message = [](std::string_view bytes) {
    Result<proto::Checkpoint> r = DecodeCheckpointFile(bytes);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kCorruption);
    return r.status().message();
  };
  EXPECT_NE(message(good.substr(0, 10)).find("shorter than the 48-byte header"), std::string::npos);
  EXPECT_NE(message("NOTCKPT!" + good.substr(8)).find("bad magic"), std::string::npos);
  EXPECT_NE(message(good.substr(0, good.size() - 1)).find("(truncated)"), std::string::npos);
  std::string flipped = good;
  flipped[60] ^= 1;
  EXPECT_NE(message(flipped).find("SHA-256 mismatch"), std::string::npos);

  // An intact file whose content is not a valid checkpoint (e.g. from a buggy writer).
  proto::Checkpoint invalid = MakeAt(2);
  invalid.mutable_model()->set_weights(1, std::numeric_limits<float>::infinity());
  EXPECT_NE(message(*EncodeCheckpointFile(invalid)).find("weight 1 is not finite"),
            std::string::npos);
  invalid = MakeAt(2);
  invalid.set_format_version(7);
  EXPECT_NE(message(*EncodeCheckpointFile(invalid)).find("format_version 7"), std::string::npos);
}

TEST(CheckpointTest, SaveRefusesInvalidCheckpointsAndKeepsTheOldOnes) {
  testing::TempDir dir;
  auto store = std::move(CheckpointStore::Open(dir.path())).value();
  ASSERT_TRUE(store.Save(MakeAt(1)).ok());
  proto::Checkpoint bad = MakeAt(2);
  bad.mutable_model()->add_weights(1.0f);  // param_count disagrees
  EXPECT_EQ(store.Save(bad).code(), Status::Code::kInvalidArgument);
  bad = MakeAt(2);
  bad.mutable_strategy_state()->set_num_params(kParams + 1);
  EXPECT_EQ(store.Save(bad).code(), Status::Code::kInvalidArgument);
  bad = MakeAt(2);
  bad.clear_strategy_state();
  EXPECT_EQ(store.Save(bad).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(Names(dir.path()), std::vector<std::string>{"round-000000001.ckpt"});
  EXPECT_EQ((*store.LoadLatest())->round(), 1u);
}

TEST(CheckpointTest, ResumeRewritesHistoryAfterTheResumedRound) {
  testing::TempDir dir;
  auto store = std::move(CheckpointStore::Open(dir.path())).value();
  ASSERT_TRUE(store.Save(MakeAt(4)).ok());
  ASSERT_TRUE(store.Save(MakeAt(5)).ok());
  // Round 5's file is corrupt; the run resumed from 4 and has now finished round 5 again...
  // and a stale round-7 file from some earlier timeline must not shadow it.
  std::filesystem::copy_file(dir.path() / CheckpointStore::FileName(5),
                             dir.path() / CheckpointStore::FileName(7));
  ASSERT_TRUE(store.Save(MakeAt(5)).ok());
  EXPECT_EQ(Names(dir.path()),
            (std::vector<std::string>{"round-000000004.ckpt", "round-000000005.ckpt"}));
}

TEST(CheckpointTest, OpenRemovesLeftoverTemporaryFiles) {
  testing::TempDir dir;
  Spit(dir.path() / "round-000000003.ckpt.tmp", "half a checkpoint");
  Spit(dir.path() / "notes.txt", "not ours");
  ASSERT_TRUE(CheckpointStore::Open(dir.path()).ok());
  EXPECT_EQ(Names(dir.path()), std::vector<std::string>{"notes.txt"});
  Spit(dir.path() / "file", "x");
  EXPECT_EQ(CheckpointStore::Open(dir.path() / "file").status().code(), Status::Code::kIoError);
  Result<std::optional<proto::Checkpoint>> missing =
      LoadLatestCheckpoint(dir.path() / "does-not-exist");
  ASSERT_TRUE(missing.ok());
  EXPECT_FALSE(missing->has_value());
}

TEST(CheckpointTest, ResumeWithDifferentSettingsIsRefused) {
  const proto::Checkpoint c = MakeAt(3);
  EXPECT_TRUE(CheckResume(c, TinySpec(), Config()).ok());

  RunConfig other = Config();
  other["strategy"] = "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001";
  Status st = CheckResume(c, TinySpec(), other);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(st.message().find("strategy: 'fedavgm:lr=1,momentum=0.9' in the checkpoint, "
                              "'fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001' now"),
            std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("new checkpoint directory"), std::string::npos);

  st = CheckResume(c, TinySpec(/*out=*/3), Config());
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(st.message().find("model: 'tiny' (1 layers) in the checkpoint"), std::string::npos)
      << st.message();

  RunConfig missing = Config();
  missing.erase("codec");
  missing["partition"] = "shards";
  st = CheckResume(c, TinySpec(), missing);
  EXPECT_NE(st.message().find("codec: 'fp32' in the checkpoint, not set now"), std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("partition: not set in the checkpoint, 'shards' now"),
            std::string::npos);
}

}  // namespace
}  // namespace fedslice::coordinator
