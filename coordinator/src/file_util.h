// POSIX file helpers for the coordinator's durable state (checkpoints, metrics). Every
// function reports failures as a Status naming the path and strerror(errno).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "fedslice/common/status.h"

namespace fedslice::coordinator::internal {

// Writes all of `data` to `fd`, retrying short writes and EINTR.
Status WriteAll(int fd, std::string_view data, const std::filesystem::path& path);

// The whole content of `path` (NotFound if it does not exist).
Result<std::string> ReadWholeFile(const std::filesystem::path& path);

// Replaces `path` with `data` atomically: writes "<path>.tmp", fsyncs it, renames it over
// `path` and fsyncs the directory, so after a crash `path` holds either the old or the new
// content, never a mix.
Status AtomicWriteFile(const std::filesystem::path& path, std::string_view data);

// fsync on a directory, making renames and unlinks in it durable.
Status SyncDirectory(const std::filesystem::path& dir);

// "<path>: <strerror(err)>" as an IoError.
Status ErrnoStatus(std::string_view what, const std::filesystem::path& path, int err);

}  // namespace fedslice::coordinator::internal
