// Status and Result<T>: the error currency at FedSlice module edges (leveldb style).
// Exceptions from Asio, Protobuf or the standard library are caught at the module boundary
// and turned into a Status; nothing that crosses a public interface throws.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace fedslice {

class [[nodiscard]] Status {
 public:
  enum class Code {
    kOk = 0,
    kInvalidArgument,
    kNotFound,
    kCorruption,
    kIoError,
    kUnavailable,
    kDeadlineExceeded,
    kPermissionDenied,
    kFailedPrecondition,
    kResourceExhausted,
    kAborted,
    kOutOfRange,
    kInternal,
  };

  Status() = default;  // OK
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
  static Status Corruption(std::string m) { return {Code::kCorruption, std::move(m)}; }
  static Status IoError(std::string m) { return {Code::kIoError, std::move(m)}; }
  static Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
  static Status DeadlineExceeded(std::string m) { return {Code::kDeadlineExceeded, std::move(m)}; }
  static Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
  static Status FailedPrecondition(std::string m) {
    return {Code::kFailedPrecondition, std::move(m)};
  }
  static Status ResourceExhausted(std::string m) {
    return {Code::kResourceExhausted, std::move(m)};
  }
  static Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {Code::kOutOfRange, std::move(m)}; }
  static Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OK" or "<code name>: <message>".
  std::string ToString() const;
  static std::string_view CodeName(Code code);

  // Prefixes the message with context ("reading train-images: bad magic ...").
  Status WithContext(std::string_view context) const {
    if (ok()) return *this;
    return {code_, std::string(context) + ": " + message_};
  }

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

// Either a value or a non-OK Status. Accessing value() of an error is a programming error
// (asserted in debug builds).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) v_ = Status::Internal("Result constructed from OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }

  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace fedslice

// Propagates a non-OK Status to the caller.
#define FEDSLICE_RETURN_IF_ERROR(expr)             \
  do {                                             \
    ::fedslice::Status fedslice_status_ = (expr);  \
    if (!fedslice_status_.ok()) return fedslice_status_; \
  } while (0)

#define FEDSLICE_CONCAT_INNER_(a, b) a##b
#define FEDSLICE_CONCAT_(a, b) FEDSLICE_CONCAT_INNER_(a, b)
// FEDSLICE_ASSIGN_OR_RETURN(auto x, MakeX()); declares x from a Result or returns its Status.
#define FEDSLICE_ASSIGN_OR_RETURN(lhs, expr)                                 \
  auto FEDSLICE_CONCAT_(fedslice_result_, __LINE__) = (expr);                \
  if (!FEDSLICE_CONCAT_(fedslice_result_, __LINE__).ok())                    \
    return FEDSLICE_CONCAT_(fedslice_result_, __LINE__).status();            \
  lhs = std::move(FEDSLICE_CONCAT_(fedslice_result_, __LINE__)).value()
