#include "fedslice/coordinator/metrics.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cmath>
#include <optional>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "file_util.h"

namespace fedslice::coordinator {
namespace {

constexpr std::string_view kColumns[] = {"round",
                                         "accuracy",
                                         "loss",
                                         "train_loss",
                                         "clients_asked",
                                         "clients_answered",
                                         "clients_dropped",
                                         "clients_rejected",
                                         "bytes_up",
                                         "bytes_down",
                                         "seconds",
                                         "strategy",
                                         "codec",
                                         "federated_accuracy",
                                         "federated_loss",
                                         "unix_ms"};

using Value = std::variant<uint64_t, int64_t, double, std::optional<double>, std::string>;

// The row's values in column order (kColumns).
std::vector<Value> Values(const proto::RoundMetrics& m) {
  const auto opt = [](bool has, double v) {
    return has ? std::optional<double>(v) : std::optional<double>();
  };
  return {Value(m.round()),
          Value(m.accuracy()),
          Value(m.loss()),
          Value(m.train_loss()),
          Value(uint64_t{m.clients_asked()}),
          Value(uint64_t{m.clients_answered()}),
          Value(uint64_t{m.clients_dropped()}),
          Value(uint64_t{m.clients_rejected()}),
          Value(m.bytes_up()),
          Value(m.bytes_down()),
          Value(m.seconds()),
          Value(m.strategy()),
          Value(m.codec()),
          Value(opt(m.has_federated_accuracy(), m.federated_accuracy())),
          Value(opt(m.has_federated_loss(), m.federated_loss())),
          Value(m.unix_ms())};
}

template <typename T>
void AppendNumber(std::string& out, T v) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);  // shortest round-trip
  if (ec == std::errc()) out.append(buf, end);
}

void AppendCsvDouble(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "nan";
  } else if (std::isinf(v)) {
    out += v > 0 ? "inf" : "-inf";
  } else {
    AppendNumber(out, v);
  }
}

void AppendJsonDouble(std::string& out, double v) {
  if (std::isfinite(v)) {
    AppendNumber(out, v);
  } else {
    out += "null";  // JSON has no NaN / Inf
  }
}

void AppendCsvString(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    if (c == '"') out += '"';  // RFC 4180: a quote inside a quoted field is doubled
    out += (c == '\n' || c == '\r') ? ' ' : c;
  }
  out += '"';
}

void AppendJsonString(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          static constexpr char kHex[] = "0123456789abcdef";
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Round number at the start of a metrics line, or nullopt if the line is not one of ours.
std::optional<uint64_t> LeadingRound(std::string_view line, bool csv) {
  if (!csv) {
    constexpr std::string_view kPrefix = "{\"round\":";
    if (line.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
    line.remove_prefix(kPrefix.size());
  }
  uint64_t round = 0;
  const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), round);
  if (ec != std::errc() || end == line.data()) return std::nullopt;
  const char next = end == line.data() + line.size() ? '\0' : *end;
  if (next != ',' && !(next == '}' && !csv)) return std::nullopt;
  return round;
}

// Brings an existing metrics file in line with a resume at keep_through_round + 1 and opens
// it for appending. Returns the file descriptor.
Result<int> PrepareAndOpen(const std::filesystem::path& path, bool csv,
                           uint64_t keep_through_round) {
  std::error_code ec;
  if (path.has_parent_path()) {
    std::filesystem::create_directories(path.parent_path(), ec);
    if (ec) {
      return Status::IoError("creating directory " + path.parent_path().string() + ": " +
                             ec.message());
    }
  }
  const std::string header = MetricsCsvHeader();
  std::string existing;
  Result<std::string> read = internal::ReadWholeFile(path);
  if (read.ok()) {
    existing = std::move(read).value();
  } else if (read.status().code() != Status::Code::kNotFound) {
    return read.status();
  }

  std::string kept;
  bool changed = false;
  size_t dropped_rows = 0;
  std::string_view rest = existing;
  if (csv) {
    kept = header;
    const size_t eol = rest.find('\n');
    if (eol == std::string_view::npos) {
      // New, empty, or killed while writing the header: (re)write the header.
      if (header.compare(0, rest.size(), rest) != 0) {
        return Status::FailedPrecondition(path.string() +
                                          " is not a FedSlice metrics CSV (unexpected header); "
                                          "move it away or choose another path");
      }
      changed = true;
      rest = {};
    } else if (rest.substr(0, eol + 1) != header) {
      return Status::FailedPrecondition(
          path.string() + " has a different header than this version writes (" +
          std::string(rest.substr(0, eol)) + "); move it away or choose another path");
    } else {
      rest.remove_prefix(eol + 1);
    }
  }
  size_t line_number = csv ? 1 : 0;
  while (!rest.empty()) {
    ++line_number;
    const size_t eol = rest.find('\n');
    if (eol == std::string_view::npos) {
      spdlog::warn("metrics: removing the incomplete last line of {}", path.string());
      changed = true;
      break;
    }
    const std::string_view line = rest.substr(0, eol);
    rest.remove_prefix(eol + 1);
    if (line.empty()) {
      changed = true;
      continue;
    }
    const std::optional<uint64_t> round = LeadingRound(line, csv);
    if (!round) {
      return Status::Corruption(path.string() + ":" + std::to_string(line_number) +
                                ": not a FedSlice metrics line; refusing to append to it");
    }
    if (*round > keep_through_round) {
      ++dropped_rows;
      changed = true;
      continue;
    }
    kept.append(line);
    kept += '\n';
  }
  if (dropped_rows > 0) {
    spdlog::info("metrics: removed {} row(s) after round {} from {} (rounds to be run again)",
                 dropped_rows, keep_through_round, path.string());
  }
  if (changed) {
    FEDSLICE_RETURN_IF_ERROR(internal::AtomicWriteFile(path, kept));
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return internal::ErrnoStatus("opening", path, errno);
  return fd;
}

}  // namespace

std::span<const std::string_view> MetricsColumns() { return kColumns; }

std::string MetricsCsvHeader() {
  std::string out;
  for (std::string_view c : kColumns) {
    if (!out.empty()) out += ',';
    out += c;
  }
  out += '\n';
  return out;
}

std::string MetricsCsvRow(const proto::RoundMetrics& m) {
  std::string out;
  bool first = true;
  for (const Value& v : Values(m)) {
    if (!first) out += ',';
    first = false;
    if (const auto* u = std::get_if<uint64_t>(&v)) {
      AppendNumber(out, *u);
    } else if (const auto* i = std::get_if<int64_t>(&v)) {
      AppendNumber(out, *i);
    } else if (const auto* d = std::get_if<double>(&v)) {
      AppendCsvDouble(out, *d);
    } else if (const auto* o = std::get_if<std::optional<double>>(&v)) {
      if (o->has_value()) AppendCsvDouble(out, **o);
    } else {
      AppendCsvString(out, std::get<std::string>(v));
    }
  }
  out += '\n';
  return out;
}

std::string MetricsJsonLine(const proto::RoundMetrics& m) {
  std::string out = "{";
  const std::vector<Value> values = Values(m);
  for (size_t k = 0; k < values.size(); ++k) {
    if (k > 0) out += ',';
    out += '"';
    out += kColumns[k];
    out += "\":";
    const Value& v = values[k];
    if (const auto* u = std::get_if<uint64_t>(&v)) {
      AppendNumber(out, *u);
    } else if (const auto* i = std::get_if<int64_t>(&v)) {
      AppendNumber(out, *i);
    } else if (const auto* d = std::get_if<double>(&v)) {
      AppendJsonDouble(out, *d);
    } else if (const auto* o = std::get_if<std::optional<double>>(&v)) {
      if (o->has_value()) {
        AppendJsonDouble(out, **o);
      } else {
        out += "null";
      }
    } else {
      AppendJsonString(out, std::get<std::string>(v));
    }
  }
  out += "}\n";
  return out;
}

Result<std::unique_ptr<MetricsWriter>> MetricsWriter::Open(const std::filesystem::path& csv_path,
                                                           const std::filesystem::path& jsonl_path,
                                                           uint64_t keep_through_round) {
  int csv_fd = -1;
  int jsonl_fd = -1;
  if (!csv_path.empty()) {
    FEDSLICE_ASSIGN_OR_RETURN(csv_fd, PrepareAndOpen(csv_path, /*csv=*/true, keep_through_round));
  }
  if (!jsonl_path.empty()) {
    Result<int> fd = PrepareAndOpen(jsonl_path, /*csv=*/false, keep_through_round);
    if (!fd.ok()) {
      if (csv_fd >= 0) ::close(csv_fd);
      return fd.status();
    }
    jsonl_fd = *fd;
  }
  return std::unique_ptr<MetricsWriter>(new MetricsWriter(csv_fd, jsonl_fd, csv_path, jsonl_path));
}

MetricsWriter::MetricsWriter(int csv_fd, int jsonl_fd, std::filesystem::path csv_path,
                             std::filesystem::path jsonl_path)
    : csv_fd_(csv_fd),
      jsonl_fd_(jsonl_fd),
      csv_path_(std::move(csv_path)),
      jsonl_path_(std::move(jsonl_path)) {}

MetricsWriter::~MetricsWriter() {
  if (csv_fd_ >= 0) ::close(csv_fd_);
  if (jsonl_fd_ >= 0) ::close(jsonl_fd_);
}

Status MetricsWriter::Append(const proto::RoundMetrics& metrics) {
  proto::RoundMetrics m = metrics;
  if (m.unix_ms() == 0) {
    m.set_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count());
  }
  // One write() per line: the kernel has the whole line or none of it when we are killed.
  if (csv_fd_ >= 0)
    FEDSLICE_RETURN_IF_ERROR(internal::WriteAll(csv_fd_, MetricsCsvRow(m), csv_path_));
  if (jsonl_fd_ >= 0) {
    FEDSLICE_RETURN_IF_ERROR(internal::WriteAll(jsonl_fd_, MetricsJsonLine(m), jsonl_path_));
  }
  return Status::Ok();
}

}  // namespace fedslice::coordinator
