// Errors as values. Engine code returns Status or Result<T>; -errno from
// system calls is converted at the I/O boundary with Status::from_errno().
// Conversion to NBD error codes happens in exactly one place (nbd/errors.cc).
#pragma once

#include <cassert>
#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace shadowd {

class Status {
 public:
  enum class Code {
    kOk = 0,
    kIoError,       // EIO and anything unexpected from the kernel
    kNoSpace,       // ENOSPC / EDQUOT / EFBIG
    kInvalid,       // bad argument from a caller or the network
    kOutOfRange,    // offset/length past the end of a device
    kReadOnly,      // write to something read-only (EROFS, EPERM on ro export)
    kNotSupported,  // EOPNOTSUPP and friends
    kNotFound,      // ENOENT
    kCorruption,    // checksum mismatch, bad magic
    kShutdown,      // ESHUTDOWN / ECANCELED: the daemon is stopping
    kBusy,          // EAGAIN that could not be retried, resource limit
  };

  Status() = default;
  static Status ok() { return Status(); }
  static Status error(Code code, std::string msg, int err = 0) {
    return Status(code, std::move(msg), err);
  }
  static Status io_error(std::string msg) { return error(Code::kIoError, std::move(msg), EIO); }
  static Status invalid(std::string msg) { return error(Code::kInvalid, std::move(msg), EINVAL); }
  static Status out_of_range(std::string msg) {
    return error(Code::kOutOfRange, std::move(msg), EINVAL);
  }
  static Status not_supported(std::string msg) {
    return error(Code::kNotSupported, std::move(msg), EOPNOTSUPP);
  }
  // REQUIRES: err > 0 (a positive errno value, e.g. -res of a failed call).
  static Status from_errno(int err, std::string context);

  bool is_ok() const { return code_ == Code::kOk; }
  explicit operator bool() const { return is_ok(); }
  Code code() const { return code_; }
  // The errno this status came from (or the closest one); 0 when ok.
  int err() const { return errno_; }
  const std::string& message() const { return msg_; }
  std::string to_string() const;

 private:
  Status(Code code, std::string msg, int err) : code_(code), errno_(err), msg_(std::move(msg)) {}
  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string msg_;
};

const char* code_name(Status::Code code);

template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    assert(!std::get<Status>(v_).is_ok());
  }
  bool is_ok() const { return v_.index() == 0; }
  explicit operator bool() const { return is_ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }
  const Status& status() const {
    static const Status kOk;
    return is_ok() ? kOk : std::get<1>(v_);
  }

 private:
  std::variant<T, Status> v_;
};

}  // namespace shadowd
