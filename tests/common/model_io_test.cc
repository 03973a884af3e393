#include "fedslice/common/model_io.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>

#include "fedslice/common/model_zoo.h"
#include "testing/test_util.h"

namespace fedslice {
namespace {

using ::testing::HasSubstr;

std::string ReadBytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void WriteBytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

class ModelIoTest : public ::testing::Test {
 protected:
  ModelIoTest() : model_(*Model::Create(MlpSpec(3))) {
    // Not the freshly initialised weights, so that a load cannot pass by re-initialising.
    for (size_t i = 0; i < model_.params().size(); i += 7) model_.params()[i] *= -1.5f;
  }
  std::filesystem::path Path(const std::string& name) const { return dir_.path() / name; }

  Status LoadError(const std::filesystem::path& p) {
    Result<Model> m = LoadModel(p);
    EXPECT_FALSE(m.ok());
    if (m.ok()) return Status::Ok();
    EXPECT_THAT(m.status().message(), HasSubstr(p.string()));  // names the file
    return m.status();
  }

  testing::TempDir dir_;
  Model model_;
};

TEST_F(ModelIoTest, RoundTripIsBitIdentical) {
  const auto path = Path("m.pb");
  ASSERT_TRUE(SaveModel(model_, path, {{"round", "12"}}).ok());
  Result<Model> loaded = LoadModel(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ(loaded->spec().SerializeAsString(), model_.spec().SerializeAsString());
  ASSERT_EQ(loaded->param_count(), model_.param_count());
  EXPECT_EQ(std::memcmp(loaded->params().data(), model_.params().data(),
                        model_.params().size_bytes()),
            0);
  Result<proto::ModelFile> file = ReadModelFile(path);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->metadata().at("round"), "12");
  EXPECT_EQ(file->format_version(), kModelFormatVersion);
  // Nothing but the model file is left behind (the temporary was renamed).
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_.path()),
                          std::filesystem::directory_iterator()),
            1);
  // Overwriting an existing file works too.
  ASSERT_TRUE(SaveModel(*loaded, path).ok());
  EXPECT_TRUE(LoadModel(path).ok());
}

TEST_F(ModelIoTest, MissingEmptyAndGarbageFilesAreRejected) {
  EXPECT_EQ(LoadError(Path("nope.pb")).code(), Status::Code::kNotFound);
  WriteBytes(Path("empty.pb"), "");
  EXPECT_THAT(LoadError(Path("empty.pb")).message(), HasSubstr("is empty"));
  WriteBytes(Path("garbage.pb"), "this is not a protobuf \xff\xff\xff\xff\xff garbage");
  EXPECT_THAT(LoadError(Path("garbage.pb")).message(), HasSubstr("not a"));
  // A valid protobuf of another message type.
  proto::ModelSpec spec = MlpSpec();
  WriteBytes(Path("spec.pb"), spec.SerializeAsString());
  EXPECT_FALSE(LoadModel(Path("spec.pb")).ok());
  EXPECT_FALSE(SaveModel(model_, Path("no/such/dir/m.pb")).ok());
}

TEST_F(ModelIoTest, TruncatedFilesAreRejectedAtEveryLength) {
  const auto path = Path("m.pb");
  ASSERT_TRUE(SaveModel(model_, path).ok());
  const std::string bytes = ReadBytes(path);
  // A spread of cut points, including inside the spec, the weights and the trailing fields.
  for (size_t cut : {size_t{1}, size_t{10}, size_t{100}, bytes.size() / 2, bytes.size() - 9,
                     bytes.size() - 5, bytes.size() - 1}) {
    WriteBytes(Path("cut.pb"), bytes.substr(0, cut));
    Result<Model> m = LoadModel(Path("cut.pb"));
    EXPECT_FALSE(m.ok()) << "cut at " << cut;
  }
}

TEST_F(ModelIoTest, FlippedWeightByteFailsTheChecksum) {
  const auto path = Path("m.pb");
  ASSERT_TRUE(SaveModel(model_, path).ok());
  std::string bytes = ReadBytes(path);
  bytes[bytes.size() / 2] ^= 0x01;  // inside the weights
  WriteBytes(path, bytes);
  const Status s = LoadError(path);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("checksum mismatch"));
}

TEST_F(ModelIoTest, InconsistentFilesAreRejected) {
  auto write_and_load = [&](const proto::ModelFile& f) {
    WriteBytes(Path("bad.pb"), f.SerializeAsString());
    return LoadError(Path("bad.pb")).message();
  };
  proto::ModelFile f = ToModelFile(model_);
  f.set_format_version(2);
  EXPECT_THAT(write_and_load(f), HasSubstr("unsupported format_version 2"));

  f = ToModelFile(model_);
  f.set_param_count(1000);
  EXPECT_THAT(write_and_load(f), HasSubstr("param_count is 1000 but the spec has 199210"));

  f = ToModelFile(model_);
  f.mutable_weights()->Truncate(1000);
  f.set_weights_crc32(WeightsCrc32({f.weights().data(), 1000}));
  EXPECT_THAT(write_and_load(f), HasSubstr("holds 1000 weights"));

  f = ToModelFile(model_);
  f.mutable_spec()->mutable_layers(1)->mutable_dense()->set_out_features(100);  // no longer chains
  EXPECT_THAT(write_and_load(f), HasSubstr("layer 3"));

  f = ToModelFile(model_);
  f.set_weights(5, std::numeric_limits<float>::quiet_NaN());
  f.set_weights_crc32(WeightsCrc32({f.weights().data(), static_cast<size_t>(f.weights_size())}));
  EXPECT_THAT(write_and_load(f), HasSubstr("weight 5 is not finite"));

  f = ToModelFile(model_);
  f.clear_spec();
  EXPECT_THAT(write_and_load(f), HasSubstr("no model spec"));
}

TEST(WeightsCrc32Test, MatchesZlibOnKnownInput) {
  // crc32 of the bytes 00 00 80 3f (1.0f, little-endian), as computed by zlib / Python's
  // zlib.crc32(struct.pack('<f', 1.0)).
  const float one = 1.0f;
  EXPECT_EQ(WeightsCrc32({&one, 1}), 0xaca16a6au);
  EXPECT_EQ(WeightsCrc32({}), 0u);
}

}  // namespace
}  // namespace fedslice
