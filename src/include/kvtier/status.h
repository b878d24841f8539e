// Status and Result<T>: how every kvtier operation reports success or failure.
//
// A Status is a code plus a human-readable message. OK carries no message and costs
// no allocation. Errors from the system (errno), CUDA and RocksDB are converted into a
// Status where they enter kvtier, keeping their message. No exception crosses a kvtier
// API; a broken internal invariant aborts the process (it is a bug, not an input).
//
// Thread safety: Status and Result are values; distinct objects may be used from
// distinct threads freely, one object needs external synchronisation like any value.
#ifndef KVTIER_STATUS_H_
#define KVTIER_STATUS_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

namespace kvtier {

// Stable numeric values: the C API and the sidecar protocol expose them.
enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,     // the caller passed something malformed
  kNotFound = 2,            // no such block, sequence or file
  kAlreadyExists = 3,       // creating something that exists
  kResourceExhausted = 4,   // out of memory, slots or disk space
  kBusy = 5,                // transient: retry later (every slot pinned, queue full)
  kIOError = 6,             // the operating system or a device failed an operation
  kCorruption = 7,          // stored data failed a checksum or a format check
  kFailedPrecondition = 8,  // the store is in a state that forbids the operation
  kNotSupported = 9,        // not available in this build or on this machine
  kInternal = 10,           // a bug in kvtier; please report it
  kCancelled = 11,          // the operation was abandoned (shutdown)
  kPermissionDenied = 12,   // the caller may not do this (namespace, token, peer)
  kUnavailable = 13,        // the sidecar cannot be reached now (the client reconnects)
  kQuotaExceeded = 14,      // the namespace is at its host or disk quota
};

// "OK", "InvalidArgument", ...; "Unknown" for a value outside the enum.
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  // OK.
  Status() = default;
  Status(StatusCode code, std::string_view message) : code_(code), message_(message) {}

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string_view msg) {
    return Status(StatusCode::kInvalidArgument, msg);
  }
  static Status NotFound(std::string_view msg) { return Status(StatusCode::kNotFound, msg); }
  static Status AlreadyExists(std::string_view msg) {
    return Status(StatusCode::kAlreadyExists, msg);
  }
  static Status ResourceExhausted(std::string_view msg) {
    return Status(StatusCode::kResourceExhausted, msg);
  }
  static Status Busy(std::string_view msg) { return Status(StatusCode::kBusy, msg); }
  static Status IOError(std::string_view msg) { return Status(StatusCode::kIOError, msg); }
  static Status Corruption(std::string_view msg) { return Status(StatusCode::kCorruption, msg); }
  static Status FailedPrecondition(std::string_view msg) {
    return Status(StatusCode::kFailedPrecondition, msg);
  }
  static Status NotSupported(std::string_view msg) {
    return Status(StatusCode::kNotSupported, msg);
  }
  static Status Internal(std::string_view msg) { return Status(StatusCode::kInternal, msg); }
  static Status Cancelled(std::string_view msg) { return Status(StatusCode::kCancelled, msg); }
  static Status PermissionDenied(std::string_view msg) {
    return Status(StatusCode::kPermissionDenied, msg);
  }
  static Status Unavailable(std::string_view msg) { return Status(StatusCode::kUnavailable, msg); }
  static Status QuotaExceeded(std::string_view msg) {
    return Status(StatusCode::kQuotaExceeded, msg);
  }
  // An IOError from an errno value: "<context>: <strerror(errnum)>".
  static Status FromErrno(int errnum, std::string_view context);

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  bool IsNotFound() const { return code_ == StatusCode::kNotFound; }
  bool IsInvalidArgument() const { return code_ == StatusCode::kInvalidArgument; }
  bool IsBusy() const { return code_ == StatusCode::kBusy; }

  // The same code, with "<context>: " put before the message. OK stays OK.
  Status WithContext(std::string_view context) const;

  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// The outcome of a batch from its members' statuses: the first failure in member order,
// or OK.
Status FirstFailure(std::span<const Status> statuses);

namespace internal {
[[noreturn]] void DieOnBadResultAccess(const Status& status);
}  // namespace internal

// A value or the Status that explains why there is none (StatusOr-style).
// Reading value() of a failed Result is a bug and aborts with the status message.
template <typename T>
class [[nodiscard]] Result {
 public:
  // Implicit from a value or from a non-OK Status, so `return value;` and
  // `return Status::NotFound(...)` both work in a function returning Result<T>.
  Result(T value) : value_(std::move(value)) {}         // NOLINT(runtime/explicit)
  Result(Status status) : status_(std::move(status)) {  // NOLINT(runtime/explicit)
    if (status_.ok()) status_ = Status::Internal("Result constructed from an OK Status");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }

  T& value() & {
    if (!ok()) internal::DieOnBadResultAccess(status_);
    return *value_;
  }
  const T& value() const& {
    if (!ok()) internal::DieOnBadResultAccess(status_);
    return *value_;
  }
  T&& value() && {
    if (!ok()) internal::DieOnBadResultAccess(status_);
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace kvtier

#define KVTIER_CONCAT_INNER_(a, b) a##b
#define KVTIER_CONCAT_(a, b) KVTIER_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define KVTIER_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::kvtier::Status kvtier_status_ = (expr);        \
    if (!kvtier_status_.ok()) return kvtier_status_; \
  } while (0)

// `lhs = value of expr` (a Result), or returns its Status from the enclosing function.
#define KVTIER_ASSIGN_OR_RETURN(lhs, expr) \
  KVTIER_ASSIGN_OR_RETURN_IMPL_(KVTIER_CONCAT_(kvtier_result_, __LINE__), lhs, expr)
#define KVTIER_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return tmp.status();                 \
  lhs = std::move(tmp).value()

#endif  // KVTIER_STATUS_H_
