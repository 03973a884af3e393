// Per-round metrics files: one CSV row and one JSON line per completed round.
//
// Each row goes to the kernel in a single write() as soon as it is appended (no user-space
// buffering), so a coordinator killed at any moment leaves only complete lines behind (short
// of a write that fails half-way, e.g. on a full disk, whose partial line the next Open
// removes). Rows are not fsync'ed: the checkpoint is the durable record, and on a resume the
// files are brought back in line with it.
//
// Resuming: Open() appends to existing files after checking that the CSV header is the one
// this version writes (the header is written once, when the file is new or empty). Rows for
// rounds after `keep_through_round` -- rounds the resumed coordinator is about to run again,
// because it died after writing their metrics but before their checkpoint -- and a trailing
// partial line are removed first (by an atomic rewrite of the file), so every round appears
// exactly once.
//
// Thread-safety: not thread-safe; one writer per pair of files.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "fedslice/common/status.h"
#include "fedslice/coordinator.pb.h"

namespace fedslice::coordinator {

// The CSV columns, in order; the JSON keys are the same names in the same order. Absent
// optional values are empty cells / null, non-finite numbers "nan" / "inf" cells and null.
std::span<const std::string_view> MetricsColumns();

// The CSV header line, "round,accuracy,...\n".
std::string MetricsCsvHeader();
// One CSV row ending in '\n'. Text fields are quoted (strategy strings contain commas).
std::string MetricsCsvRow(const proto::RoundMetrics& m);
// One JSON object on one line ending in '\n', starting with {"round":N.
std::string MetricsJsonLine(const proto::RoundMetrics& m);

class MetricsWriter {
 public:
  // Opens (creating if needed, with their parent directories) the CSV file `csv_path` and
  // the JSON-lines file `jsonl_path` for appending; either may be empty to skip that format.
  // Existing content is kept for rounds <= keep_through_round (pass the checkpoint's round
  // when resuming, 0 for a fresh run). Errors: FailedPrecondition if an existing CSV has
  // another header; Corruption if an existing line does not start with a round number
  // (files that are not FedSlice metrics are never rewritten); IoError.
  static Result<std::unique_ptr<MetricsWriter>> Open(const std::filesystem::path& csv_path,
                                                     const std::filesystem::path& jsonl_path,
                                                     uint64_t keep_through_round);

  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  // Appends one row to each file (unix_ms == 0 is replaced by the current time). IoError if
  // a write fails; the files then may end in a partial line, which the next Open removes.
  Status Append(const proto::RoundMetrics& metrics);

 private:
  MetricsWriter(int csv_fd, int jsonl_fd, std::filesystem::path csv_path,
                std::filesystem::path jsonl_path);

  int csv_fd_;    // -1 when not written
  int jsonl_fd_;  // -1 when not written
  std::filesystem::path csv_path_;
  std::filesystem::path jsonl_path_;
};

}  // namespace fedslice::coordinator
