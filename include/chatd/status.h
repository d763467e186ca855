// The one error idiom of chatd: every fallible call returns a Status or a
// Result<T>. No exceptions cross module boundaries; the request boundary maps a
// Status to an HTTP status in exactly one place (http_api.cc).
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace chatd {

// What kind of failure happened. Each maps to exactly one HTTP status.
enum class Code {
  kOk,
  kInvalidArgument,       // 400: the client sent something we refuse
  kUnauthorized,          // 401
  kForbidden,             // 403
  kNotFound,              // 404
  kMethodNotAllowed,      // 405
  kConflict,              // 409: a same-key request in flight, or a lost race with an erase
  kPayloadTooLarge,       // 413
  kUnsupportedMediaType,  // 415
  kUnprocessable,         // 422: an Idempotency-Key reused with another request
  kRateLimited,           // 429
  kUnavailable,           // 503: a dependency we need is down
  kDeadlineExceeded,      // 504: the model did not answer in time
  kUpstream,              // 502: the model answered with an error
  kInternal,              // 500: a bug
};

class Status {
 public:
  Status() = default;  // ok
  Status(Code code, std::string reason, std::string message)
      : code_(code), reason_(std::move(reason)), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  // Short machine-readable reason, e.g. "message_too_long"; sent as "code".
  const std::string& reason() const { return reason_; }
  // Sentence for a person. Never contains secrets or upstream bodies.
  const std::string& message() const { return message_; }

 private:
  Code code_ = Code::kOk;
  std::string reason_;
  std::string message_;
};

// Shorthands so call sites stay one line.
inline Status InvalidArgument(std::string reason, std::string message) {
  return Status(Code::kInvalidArgument, std::move(reason), std::move(message));
}
inline Status Unavailable(std::string reason, std::string message) {
  return Status(Code::kUnavailable, std::move(reason), std::move(message));
}
inline Status Internal(std::string reason, std::string message) {
  return Status(Code::kInternal, std::move(reason), std::move(message));
}

// A value or the Status that explains its absence.
template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.ok()) status_ = Internal("empty_result", "internal error: ok status without a value");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace chatd
