#include "kvtier/status.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

namespace kvtier {
namespace {

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(s.message().empty());
}

TEST(StatusTest, ErrorsCarryCodeAndMessage) {
  Status s = Status::NotFound("block 3");
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(s.IsNotFound());
  EXPECT_EQ(s.message(), "block 3");
  EXPECT_EQ(s.ToString(), "NotFound: block 3");
  EXPECT_EQ(Status::Busy("x").code(), StatusCode::kBusy);
  EXPECT_EQ(Status::Corruption("x").ToString(), "Corruption: x");
}

TEST(StatusTest, WithContextPrefixesErrorsOnly) {
  EXPECT_EQ(Status::IOError("disk").WithContext("slab 2").ToString(), "IOError: slab 2: disk");
  EXPECT_TRUE(Status::OK().WithContext("anything").ok());
}

TEST(StatusTest, FromErrnoMapsCodesAndKeepsText) {
  Status s = Status::FromErrno(ENOSPC, "write slab");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("write slab: "), std::string::npos);
  EXPECT_NE(s.message().find("space"), std::string::npos);  // "No space left on device"
  EXPECT_EQ(Status::FromErrno(EIO, "read").code(), StatusCode::kIOError);
  EXPECT_EQ(Status::FromErrno(ENOENT, "open").code(), StatusCode::kNotFound);
}

TEST(StatusTest, CodeNamesAreStable) {
  EXPECT_EQ(StatusCodeName(StatusCode::kInvalidArgument), "InvalidArgument");
  EXPECT_EQ(StatusCodeName(static_cast<StatusCode>(999)), "Unknown");
  // The C API and the wire protocol rely on these numbers.
  EXPECT_EQ(static_cast<int>(StatusCode::kNotFound), 2);
  EXPECT_EQ(static_cast<int>(StatusCode::kCancelled), 11);
  EXPECT_EQ(static_cast<int>(StatusCode::kQuotaExceeded), 14);
  EXPECT_EQ(StatusCodeName(StatusCode::kQuotaExceeded), "QuotaExceeded");
}

Result<int> Half(int x) {
  if (x % 2 != 0) return Status::InvalidArgument("odd");
  return x / 2;
}

Status Quarter(int x, int* out) {
  KVTIER_ASSIGN_OR_RETURN(int half, Half(x));
  KVTIER_ASSIGN_OR_RETURN(*out, Half(half));
  return Status::OK();
}

TEST(ResultTest, ValueOrStatus) {
  Result<int> r = Half(8);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 4);
  Result<int> e = Half(3);
  EXPECT_FALSE(e.ok());
  EXPECT_TRUE(e.status().IsInvalidArgument());
}

TEST(ResultTest, MacrosPropagate) {
  int out = -1;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_EQ(Quarter(6, &out).message(), "odd");  // 6 -> 3 is odd
}

TEST(ResultTest, MoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(7);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 7);
}

TEST(ResultTest, OkStatusIsNotAValue) {
  Result<int> r{Status::OK()};
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
}

TEST(ResultDeathTest, ValueOfErrorAborts) {
  Result<int> e = Half(3);
  EXPECT_DEATH((void)e.value(), "value\\(\\) of a failed Result: InvalidArgument: odd");
}

}  // namespace
}  // namespace kvtier
