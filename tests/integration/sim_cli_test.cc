// `fedslice sim` as a user runs it: the sparse refit flags are checked before any data is
// read, and a topk run says that it refits.
#include <gtest/gtest.h>

#include "testing/subprocess.h"
#include "testing/test_util.h"

namespace fedslice {
namespace {

using namespace std::chrono_literals;

// A 4-client, 1-round sim on MNIST-10k plus `extra` flags.
testing::Finished RunSim(const std::vector<std::string>& extra) {
  static int counter = 0;
  testing::TempDir dir;
  auto binary = testing::BinaryPath("fedslice");
  EXPECT_TRUE(binary.ok()) << binary.status().ToString();
  auto mnist = testing::MnistDir();
  EXPECT_TRUE(mnist.has_value()) << "MNIST-10k not found: run scripts/fetch_mnist.sh";
  std::vector<std::string> args = {
      "sim",       "--model",  "mlp",      "--data",    mnist->string(),
      "--clients", "4",        "--rounds", "1",         "--fraction",
      "1",         "--epochs", "1",        "--out-dir", (dir.path() / "run").string()};
  args.insert(args.end(), extra.begin(), extra.end());
  auto run = testing::RunToEnd(*binary, args,
                               dir.path() / ("sim-" + std::to_string(counter++) + ".log"), 120s);
  EXPECT_TRUE(run.ok()) << run.status().ToString();
  return run.ok() ? *run : testing::Finished{};
}

TEST(SimCliTest, BadSparseRefitFlagsAreUsageErrors) {
  struct Case {
    std::vector<std::string> flags;
    std::string says;
  };
  for (const Case& c : {Case{{"--codec", "topk:0.01", "--sparse-refit", "lots"},
                             "--sparse-refit must be 'default' or a number in [0, 1), got 'lots'"},
                        Case{{"--codec", "topk:0.01", "--sparse-refit", "1"},
                             "sparse refit share must be in [0, 1)"},
                        Case{{"--codec", "int8", "--sparse-refit", "0.5"},
                             "sparse refit applies to topk codecs only, not int8"},
                        Case{{"--codec", "topk:0.01", "--sparse-refit-lr-scale", "100"},
                             "learning-rate scale must be in [0, 64]"}}) {
    const testing::Finished out = RunSim(c.flags);
    EXPECT_EQ(out.status.code, 2) << out.output;
    EXPECT_NE(out.output.find(c.says), std::string::npos) << out.output;
    EXPECT_EQ(out.output.find("round    1"), std::string::npos) << out.output;
  }
}

TEST(SimCliTest, TopKRefitsByDefaultAndNotWhenTurnedOff) {
  const testing::Finished on = RunSim({"--codec", "topk:0.01"});
  ASSERT_TRUE(on.status.success()) << on.output;
  EXPECT_NE(on.output.find("codec topk:0.01 (sparse refit: last 60% of steps at 4x lr)"),
            std::string::npos)
      << on.output;
  const testing::Finished off = RunSim({"--codec", "topk:0.01", "--sparse-refit", "0"});
  ASSERT_TRUE(off.status.success()) << off.output;
  EXPECT_EQ(off.output.find("sparse refit"), std::string::npos) << off.output;
  const testing::Finished int8 = RunSim({"--codec", "int8"});
  ASSERT_TRUE(int8.status.success()) << int8.output;
  EXPECT_EQ(int8.output.find("sparse refit"), std::string::npos) << int8.output;
}

}  // namespace
}  // namespace fedslice
