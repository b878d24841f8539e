#include "kvtier/status.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace kvtier {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInvalidArgument:
      return "InvalidArgument";
    case StatusCode::kNotFound:
      return "NotFound";
    case StatusCode::kAlreadyExists:
      return "AlreadyExists";
    case StatusCode::kResourceExhausted:
      return "ResourceExhausted";
    case StatusCode::kBusy:
      return "Busy";
    case StatusCode::kIOError:
      return "IOError";
    case StatusCode::kCorruption:
      return "Corruption";
    case StatusCode::kFailedPrecondition:
      return "FailedPrecondition";
    case StatusCode::kNotSupported:
      return "NotSupported";
    case StatusCode::kInternal:
      return "Internal";
    case StatusCode::kCancelled:
      return "Cancelled";
    case StatusCode::kPermissionDenied:
      return "PermissionDenied";
    case StatusCode::kUnavailable:
      return "Unavailable";
    case StatusCode::kQuotaExceeded:
      return "QuotaExceeded";
  }
  return "Unknown";
}

Status Status::FromErrno(int errnum, std::string_view context) {
  char buf[256];
  // GNU strerror_r returns the message, which may or may not be `buf`.
  const char* text = strerror_r(errnum, buf, sizeof(buf));
  std::string msg(context);
  msg += ": ";
  msg += text;
  StatusCode code = StatusCode::kIOError;
  if (errnum == ENOMEM || errnum == ENOSPC || errnum == EDQUOT) {
    code = StatusCode::kResourceExhausted;
  } else if (errnum == EINVAL) {
    code = StatusCode::kInvalidArgument;
  } else if (errnum == ENOENT) {
    code = StatusCode::kNotFound;
  } else if (errnum == EAGAIN || errnum == EBUSY) {
    code = StatusCode::kBusy;
  }
  return Status(code, msg);
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string msg(context);
  msg += ": ";
  msg += message_;
  return Status(code_, msg);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(StatusCodeName(code_));
  s += ": ";
  s += message_;
  return s;
}

Status FirstFailure(std::span<const Status> statuses) {
  for (const Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return Status::OK();
}

namespace internal {
void DieOnBadResultAccess(const Status& status) {
  std::fprintf(stderr, "kvtier: value() of a failed Result: %s\n", status.ToString().c_str());
  std::abort();
}
}  // namespace internal

}  // namespace kvtier
