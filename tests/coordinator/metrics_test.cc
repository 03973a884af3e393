#include "fedslice/coordinator/metrics.h"

#include <google/protobuf/util/json_util.h>
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

std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string line; std::getline(ss, line);) out.push_back(line);
  return out;
}

// RFC 4180 fields of one CSV line.
std::vector<std::string> CsvFields(const std::string& line) {
  std::vector<std::string> fields(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        fields.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        fields.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      fields.emplace_back();
    } else {
      fields.back() += c;
    }
  }
  return fields;
}

proto::RoundMetrics Sample(uint64_t round) {
  proto::RoundMetrics m;
  m.set_round(round);
  m.set_accuracy(0.125 * static_cast<double>(round));
  m.set_loss(1.25);
  m.set_train_loss(0.75);
  m.set_clients_asked(10);
  m.set_clients_answered(9);
  m.set_clients_dropped(1);
  m.set_bytes_up(123456789012ULL);
  m.set_bytes_down(42);
  m.set_seconds(3.5);
  m.set_strategy("fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001");
  m.set_codec("int8");
  m.set_unix_ms(1700000000000 + static_cast<int64_t>(round));
  return m;
}

struct Files {
  testing::TempDir dir;
  std::filesystem::path csv = dir.path() / "out" / "metrics.csv";
  std::filesystem::path jsonl = dir.path() / "out" / "metrics.jsonl";
};

void Write(const Files& f, uint64_t keep_through, std::initializer_list<uint64_t> rounds) {
  Result<std::unique_ptr<MetricsWriter>> w = MetricsWriter::Open(f.csv, f.jsonl, keep_through);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  for (uint64_t r : rounds) ASSERT_TRUE((*w)->Append(Sample(r)).ok());
}

std::vector<uint64_t> CsvRounds(const Files& f) {
  std::vector<uint64_t> rounds;
  const std::vector<std::string> lines = Lines(Slurp(f.csv));
  EXPECT_FALSE(lines.empty());
  for (size_t i = 1; i < lines.size(); ++i) rounds.push_back(std::stoull(CsvFields(lines[i])[0]));
  return rounds;
}

std::vector<proto::RoundMetrics> JsonRows(const Files& f) {
  std::vector<proto::RoundMetrics> rows;
  for (const std::string& line : Lines(Slurp(f.jsonl))) {
    proto::RoundMetrics m;
    // Strict JSON parse into the same message: also proves each line is valid JSON.
    auto st = google::protobuf::util::JsonStringToMessage(line, &m);
    EXPECT_TRUE(st.ok()) << line << ": " << st.ToString();
    rows.push_back(m);
  }
  return rows;
}

TEST(MetricsTest, CsvHasHeaderOnceAndQuotedFields) {
  Files f;
  Write(f, 0, {1, 2});
  const std::vector<std::string> lines = Lines(Slurp(f.csv));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0] + "\n", MetricsCsvHeader());
  EXPECT_EQ(lines[0].rfind("round,accuracy,loss,", 0), 0u);
  const std::vector<std::string> header = CsvFields(lines[0]);
  const std::vector<std::string> row = CsvFields(lines[2]);
  ASSERT_EQ(row.size(), header.size());
  ASSERT_EQ(header.size(), MetricsColumns().size());
  const auto col = [&](std::string_view name) {
    for (size_t i = 0; i < header.size(); ++i) {
      if (header[i] == name) return row[i];
    }
    ADD_FAILURE() << "no column " << name;
    return std::string();
  };
  EXPECT_EQ(col("round"), "2");
  EXPECT_EQ(col("accuracy"), "0.25");
  EXPECT_EQ(col("bytes_up"), "123456789012");
  EXPECT_EQ(col("strategy"), "fedadam:lr=0.01,beta1=0.9,beta2=0.99,tau=0.001");
  EXPECT_EQ(col("codec"), "int8");
  EXPECT_EQ(col("federated_accuracy"), "");  // absent
  EXPECT_EQ(col("clients_dropped"), "1");
}

TEST(MetricsTest, JsonLinesAreValidAndRoundTrip) {
  Files f;
  {
    Result<std::unique_ptr<MetricsWriter>> w = MetricsWriter::Open(f.csv, f.jsonl, 0);
    ASSERT_TRUE(w.ok());
    proto::RoundMetrics with_fed = Sample(1);
    with_fed.set_federated_accuracy(0.875);
    with_fed.set_strategy("quote\" back\\slash\ttab");
    ASSERT_TRUE((*w)->Append(with_fed).ok());
    ASSERT_TRUE((*w)->Append(Sample(2)).ok());
    proto::RoundMetrics diverged = Sample(3);
    diverged.set_loss(std::numeric_limits<double>::quiet_NaN());
    diverged.set_unix_ms(0);  // filled in by the writer
    ASSERT_TRUE((*w)->Append(diverged).ok());
  }
  const std::vector<proto::RoundMetrics> rows = JsonRows(f);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].round(), 1u);
  EXPECT_TRUE(rows[0].has_federated_accuracy());
  EXPECT_DOUBLE_EQ(rows[0].federated_accuracy(), 0.875);
  EXPECT_EQ(rows[0].strategy(), "quote\" back\\slash\ttab");
  EXPECT_FALSE(rows[1].has_federated_accuracy());
  EXPECT_DOUBLE_EQ(rows[1].accuracy(), 0.25);
  EXPECT_EQ(rows[1].bytes_up(), 123456789012ULL);
  EXPECT_EQ(rows[1].clients_answered(), 9u);
  EXPECT_EQ(rows[1].codec(), "int8");
  EXPECT_EQ(rows[2].loss(), 0.0);  // NaN is written as null
  EXPECT_GT(rows[2].unix_ms(), 1600000000000);
  const std::vector<std::string> json = Lines(Slurp(f.jsonl));
  EXPECT_NE(json[2].find("\"loss\":null"), std::string::npos) << json[2];
  const std::vector<std::string> csv = Lines(Slurp(f.csv));
  EXPECT_EQ(CsvFields(csv[3])[2], "nan");
  EXPECT_EQ(CsvFields(csv[1])[MetricsColumns().size() - 3], "0.875");
}

TEST(MetricsTest, ResumeAppendsWithoutSecondHeader) {
  Files f;
  Write(f, 0, {1, 2, 3});
  Write(f, 3, {4, 5});
  EXPECT_EQ(CsvRounds(f), (std::vector<uint64_t>{1, 2, 3, 4, 5}));
  const std::string csv = Slurp(f.csv);
  EXPECT_EQ(csv.find("round,accuracy"), 0u);
  EXPECT_EQ(csv.find("round,accuracy", 1), std::string::npos);
  const std::vector<proto::RoundMetrics> rows = JsonRows(f);
  ASSERT_EQ(rows.size(), 5u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].round(), i + 1);
}

TEST(MetricsTest, ResumeDropsRoundsAfterTheCheckpointAndPartialLines) {
  Files f;
  Write(f, 0, {1, 2, 3, 4});
  // Killed mid-write of round 5, and the last checkpoint is round 3: rounds 4 and 5 run again.
  Spit(f.csv, Slurp(f.csv) + "5,0.9,0.1");
  Spit(f.jsonl, Slurp(f.jsonl) + "{\"round\":5,\"accu");
  Write(f, 3, {4, 5});
  EXPECT_EQ(CsvRounds(f), (std::vector<uint64_t>{1, 2, 3, 4, 5}));
  const std::vector<proto::RoundMetrics> rows = JsonRows(f);
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[3].round(), 4u);
  EXPECT_EQ(rows[4].round(), 5u);
}

TEST(MetricsTest, FreshRunOverExistingFilesStartsOver) {
  Files f;
  Write(f, 0, {1, 2});
  Write(f, 0, {1});
  EXPECT_EQ(CsvRounds(f), (std::vector<uint64_t>{1}));
  EXPECT_EQ(JsonRows(f).size(), 1u);
}

TEST(MetricsTest, HeaderKilledHalfWayIsRewritten) {
  Files f;
  std::filesystem::create_directories(f.csv.parent_path());
  Spit(f.csv, MetricsCsvHeader().substr(0, 10));
  Write(f, 0, {1});
  EXPECT_EQ(Lines(Slurp(f.csv)).size(), 2u);
  EXPECT_EQ(CsvRounds(f), (std::vector<uint64_t>{1}));
}

TEST(MetricsTest, RefusesForeignFilesAndLeavesThemAlone) {
  Files f;
  std::filesystem::create_directories(f.csv.parent_path());
  const std::string foreign_csv = "epoch,acc\n1,0.5\n";
  Spit(f.csv, foreign_csv);
  Result<std::unique_ptr<MetricsWriter>> w = MetricsWriter::Open(f.csv, f.jsonl, 10);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), Status::Code::kFailedPrecondition);
  EXPECT_NE(w.status().message().find("different header"), std::string::npos);
  EXPECT_EQ(Slurp(f.csv), foreign_csv);

  std::filesystem::remove(f.csv);
  const std::string foreign_json = "{\"round\":1}\n{\"epoch\":2}\n";
  Spit(f.jsonl, foreign_json);
  w = MetricsWriter::Open(f.csv, f.jsonl, 0);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), Status::Code::kCorruption);
  EXPECT_NE(w.status().message().find("metrics.jsonl:2"), std::string::npos)
      << w.status().message();
  EXPECT_EQ(Slurp(f.jsonl), foreign_json);

  const std::string bad_row = MetricsCsvHeader() + "x,1,2\n";
  Spit(f.csv, bad_row);
  w = MetricsWriter::Open(f.csv, "", 0);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), Status::Code::kCorruption);
  EXPECT_EQ(Slurp(f.csv), bad_row);
}

TEST(MetricsTest, EitherFileIsOptional) {
  Files f;
  Result<std::unique_ptr<MetricsWriter>> w = MetricsWriter::Open("", f.jsonl, 0);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Append(Sample(1)).ok());
  EXPECT_FALSE(std::filesystem::exists(f.csv));
  EXPECT_EQ(JsonRows(f).size(), 1u);
}

TEST(MetricsTest, UnwritableLocationIsAnError) {
  Files f;
  Spit(f.dir.path() / "file", "x");
  Result<std::unique_ptr<MetricsWriter>> w =
      MetricsWriter::Open(f.dir.path() / "file" / "metrics.csv", "", 0);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), Status::Code::kIoError);
}

}  // namespace
}  // namespace fedslice::coordinator
