// `fedslice plan` as a user runs it: the table for a balanced cnn pipeline, a plan that cannot
// fit refused with its reason, and bad flags refused as usage errors.
#include <gtest/gtest.h>

#include <regex>

#include "testing/subprocess.h"
#include "testing/test_util.h"

namespace fedslice {
namespace {

using namespace std::chrono_literals;

using Outcome = testing::Finished;

Outcome RunPlan(const std::vector<std::string>& args) {
  static int counter = 0;
  testing::TempDir dir;
  auto binary = testing::BinaryPath("fedslice");
  EXPECT_TRUE(binary.ok()) << binary.status().ToString();
  auto run = testing::RunToEnd(*binary, args,
                               dir.path() / ("plan-" + std::to_string(counter++) + ".log"), 60s);
  EXPECT_TRUE(run.ok()) << run.status().ToString();
  return run.ok() ? *run : Outcome{};
}

TEST(PlanCliTest, PrintsATableWithOneRowPerSliceAndThePredictedThroughput) {
  // The FLOPs model (no --profile) makes the plan independent of this machine's load.
  Outcome out = RunPlan({"plan", "--model", "cnn", "--devices", "3", "--slowdown", "4", "--gflops",
                         "20", "--micro-batch", "64"});
  ASSERT_TRUE(out.status.success()) << out.output;
  // Three slices covering layers 0..9 contiguously, one per device.
  EXPECT_TRUE(std::regex_search(out.output, std::regex(R"(\n\s+1\s+0-\d)"))) << out.output;
  EXPECT_TRUE(std::regex_search(out.output, std::regex(R"(\n\s+3\s+\d-9 )"))) << out.output;
  EXPECT_FALSE(std::regex_search(out.output, std::regex(R"(\n\s+4\s+\d)"))) << out.output;
  EXPECT_NE(out.output.find("throughput"), std::string::npos) << out.output;
  EXPECT_NE(out.output.find("bottleneck"), std::string::npos) << out.output;
}

// --split-layers plans units, as the coordinator does: the cnn's conv2 (~80% of its FLOPs)
// is cut, and a 4-device plan puts stage boundaries inside it.
TEST(PlanCliTest, SplitLayersPlansPartsOfHeavyLayers) {
  Outcome out = RunPlan({"plan", "--model", "cnn", "--devices", "4", "--slowdown", "4", "--gflops",
                         "20", "--micro-batch", "64", "--split-layers"});
  ASSERT_TRUE(out.status.success()) << out.output;
  EXPECT_TRUE(std::regex_search(out.output, std::regex(R"(\n\s+4\s+\d+-\d+ \(conv2\[\d+/)")))
      << out.output;
  Outcome whole = RunPlan({"plan", "--model", "cnn", "--devices", "4", "--slowdown", "4",
                           "--gflops", "20", "--micro-batch", "64"});
  ASSERT_TRUE(whole.status.success()) << whole.output;
  EXPECT_EQ(whole.output.find("conv2["), std::string::npos) << whole.output;
}

TEST(PlanCliTest, PlanThatCannotFitIsRefusedWithTheReason) {
  Outcome out = RunPlan(
      {"plan", "--model", "cnn", "--device", "name=a,memory=1MB", "--device", "name=b,memory=1MB"});
  ASSERT_TRUE(out.status.exited);
  EXPECT_EQ(out.status.code, 1) << out.output;
  EXPECT_NE(out.output.find("fits no device"), std::string::npos) << out.output;
}

TEST(PlanCliTest, BadFlagsAreUsageErrors) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"plan", "--model", "cnn", "--device", "name=a,memory=1XB"},
           {"plan", "--model", "cnn", "--devices", "2", "--bogus"},
           {"plan", "--model", "nope", "--devices", "2"}}) {
    Outcome out = RunPlan(args);
    ASSERT_TRUE(out.status.exited) << out.output;
    EXPECT_EQ(out.status.code, 2) << out.output;
    EXPECT_NE(out.output.find("fedslice plan:"), std::string::npos) << out.output;
  }
}

}  // namespace
}  // namespace fedslice
