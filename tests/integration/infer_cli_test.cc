// `fedslice infer` and the coordinator's serve mode as a user runs them: bad flags are usage
// errors, a serving coordinator without stage-hosting clients refuses with the reason, and a
// serve run stopped by SIGTERM is a completed run (exit 0, model saved). Pipelines over real
// clients are tested in the split-inference end-to-end tests.
#include <gtest/gtest.h>

#include <csignal>
#include <filesystem>

#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "testing/net_test_util.h"
#include "testing/subprocess.h"
#include "testing/test_util.h"

namespace fedslice {
namespace {

using namespace std::chrono_literals;

using Outcome = testing::Finished;

class InferCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto pki = testing::TestPki::Create(dir_.path() / "certs", 1);
    ASSERT_TRUE(pki.ok()) << pki.status().ToString();
    pki_ = *pki;
    ASSERT_TRUE(testing::RunCommand("bash '" +
                                    (testing::SourceDir() / "scripts" / "make_certs.sh").string() +
                                    "' '" + pki_.dir.string() + "' --names requester")
                    .ok());
    auto fedslice = testing::BinaryPath("fedslice");
    ASSERT_TRUE(fedslice.ok()) << fedslice.status().ToString();
    fedslice_ = *fedslice;
    auto coordinator = testing::BinaryPath("fedslice-coordinator");
    ASSERT_TRUE(coordinator.ok()) << coordinator.status().ToString();
    coordinator_ = *coordinator;
    auto spec = BuiltinSpec("mlp");
    ASSERT_TRUE(spec.ok());
    auto model = Model::Create(*spec);
    ASSERT_TRUE(model.ok());
    model_file_ = dir_.path() / "mlp.pb";
    ASSERT_TRUE(SaveModel(*model, model_file_).ok());
  }

  Outcome Run(const std::filesystem::path& program, const std::vector<std::string>& args) {
    auto run = testing::RunToEnd(program, args,
                                 dir_.path() / ("run-" + std::to_string(runs_++) + ".log"), 60s);
    EXPECT_TRUE(run.ok()) << run.status().ToString();
    return run.ok() ? *run : Outcome{};
  }

  std::vector<std::string> RequesterTls() const {
    return {"--ca", pki_.ca(), "--cert", pki_.cert("requester"), "--key", pki_.key("requester")};
  }
  std::vector<std::string> CoordinatorTls() const {
    return {"--ca", pki_.ca(), "--cert", pki_.cert("coordinator"), "--key",
            pki_.key("coordinator")};
  }

  static std::vector<std::string> Cat(std::vector<std::string> a,
                                      const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  testing::TempDir dir_;
  testing::TestPki pki_;
  std::filesystem::path fedslice_, coordinator_, model_file_;
  int runs_ = 0;
};

TEST_F(InferCliTest, BadFlagsAreUsageErrors) {
  const std::vector<std::string> tls = RequesterTls();
  for (const auto& [args, mentions] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {Cat({"infer", "--data", "d"}, tls), "--coordinator"},
           {Cat({"infer", "--coordinator", "localhost", "--data", "d"}, tls), "no port"},
           {Cat({"infer", "--coordinator", "127.0.0.1:7400"}, tls), "--data"},
           {Cat({"infer", "--coordinator", "127.0.0.1:7400", "--data", "d", "--images", "i"}, tls),
            "--data"},
           {Cat({"infer", "--coordinator", "127.0.0.1:7400", "--data", "d", "--activations",
                 "bf16"},
                tls),
            "fp32, fp16 or int8"},
           {Cat({"infer", "--coordinator", "127.0.0.1:7400", "--data", "d", "--micro-batch", "0"},
                tls),
            "--micro-batch"},
           {Cat({"infer", "--coordinator", "127.0.0.1:7400", "--data", "d", "--window", "-1"}, tls),
            "--window"},
           {{"infer", "--coordinator", "127.0.0.1:7400", "--data", "d"}, "--cert"}}) {
    Outcome out = Run(fedslice_, args);
    ASSERT_TRUE(out.status.exited) << out.output;
    EXPECT_EQ(out.status.code, 2) << out.output;
    EXPECT_NE(out.output.find(mentions), std::string::npos) << out.output;
  }
}

TEST_F(InferCliTest, CoordinatorServeFlagsAreChecked) {
  Outcome no_model = Run(coordinator_, Cat({"--rounds", "0", "--serve", "--port", "0"},
                                           CoordinatorTls()));
  EXPECT_EQ(no_model.status.code, 2) << no_model.output;
  EXPECT_NE(no_model.output.find("--init-model"), std::string::npos) << no_model.output;

  Outcome missing = Run(coordinator_, Cat({"--rounds", "0", "--serve", "--port", "0",
                                           "--init-model", (dir_.path() / "nope.pb").string()},
                                          CoordinatorTls()));
  EXPECT_EQ(missing.status.code, 1) << missing.output;
  EXPECT_NE(missing.output.find("nope.pb"), std::string::npos) << missing.output;

  Outcome contradicts = Run(coordinator_, Cat({"--rounds", "0", "--serve", "--port", "0",
                                               "--model", "cnn", "--init-model",
                                               model_file_.string()},
                                              CoordinatorTls()));
  EXPECT_EQ(contradicts.status.code, 2) << contradicts.output;
  EXPECT_NE(contradicts.output.find("contradicts"), std::string::npos) << contradicts.output;
}

TEST_F(InferCliTest, ServingWithoutStageClientsIsRefusedAndSigtermCompletesTheRun) {
  auto mnist = testing::MnistDir();
  ASSERT_TRUE(mnist.has_value()) << "MNIST-10k not found: run scripts/fetch_mnist.sh";
  const auto port_file = dir_.path() / "port";
  const auto saved = dir_.path() / "served.pb";
  auto coordinator = testing::Subprocess::Start(
      coordinator_,
      Cat({"--rounds", "0", "--serve", "--init-model", model_file_.string(), "--port", "0",
           "--port-file", port_file.string(), "--min-available", "1", "--save-model",
           saved.string()},
          CoordinatorTls()),
      dir_.path() / "coordinator.log");
  ASSERT_TRUE(coordinator.ok()) << coordinator.status().ToString();
  auto port = testing::ReadPortFile(port_file, 30s);
  ASSERT_TRUE(port.ok()) << port.status().ToString() << "\n" << (*coordinator)->ReadLog();

  Outcome out = Run(fedslice_, Cat({"infer", "--coordinator", "127.0.0.1:" + std::to_string(*port),
                                    "--data", mnist->string(), "--limit", "10"},
                                   RequesterTls()));
  ASSERT_TRUE(out.status.exited) << out.output;
  EXPECT_EQ(out.status.code, 1) << out.output;
  EXPECT_NE(out.output.find("no client can host a stage"), std::string::npos) << out.output;

  ASSERT_TRUE((*coordinator)->Kill(SIGTERM).ok());
  auto status = (*coordinator)->Wait(30s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(status->success()) << status->ToString() << "\n" << (*coordinator)->ReadLog();
  auto reloaded = LoadModel(saved);
  ASSERT_TRUE(reloaded.ok()) << reloaded.status().ToString();
  auto original = LoadModel(model_file_);
  ASSERT_TRUE(original.ok());
  EXPECT_TRUE(std::equal(reloaded->params().begin(), reloaded->params().end(),
                         original->params().begin(), original->params().end()));
}

}  // namespace
}  // namespace fedslice
