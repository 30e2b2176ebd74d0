#include "core/status.h"

#include <cstring>

namespace shadowd {

Status Status::from_errno(int err, std::string context) {
  Code code;
  switch (err) {
    case 0:
      return Status();
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      code = Code::kNoSpace;
      break;
    case EINVAL:
    case EISDIR:
      code = Code::kInvalid;
      break;
    case EROFS:
    case EPERM:
    case EACCES:
      code = Code::kReadOnly;
      break;
    case EOPNOTSUPP:
    case ENOTTY:
    case ENOSYS:
      code = Code::kNotSupported;
      break;
    case ENOENT:
      code = Code::kNotFound;
      break;
    case ESHUTDOWN:
    case ECANCELED:
      code = Code::kShutdown;
      break;
    case EAGAIN:
    case EBUSY:
      code = Code::kBusy;
      break;
    default:
      code = Code::kIoError;
      break;
  }
  std::string msg = std::move(context);
  msg += ": ";
  msg += std::strerror(err);
  return Status(code, std::move(msg), err);
}

const char* code_name(Status::Code code) {
  switch (code) {
    case Status::Code::kOk: return "ok";
    case Status::Code::kIoError: return "io_error";
    case Status::Code::kNoSpace: return "no_space";
    case Status::Code::kInvalid: return "invalid";
    case Status::Code::kOutOfRange: return "out_of_range";
    case Status::Code::kReadOnly: return "read_only";
    case Status::Code::kNotSupported: return "not_supported";
    case Status::Code::kNotFound: return "not_found";
    case Status::Code::kCorruption: return "corruption";
    case Status::Code::kShutdown: return "shutdown";
    case Status::Code::kBusy: return "busy";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (is_ok()) return "ok";
  std::string s = code_name(code_);
  if (!msg_.empty()) {
    s += ": ";
    s += msg_;
  }
  return s;
}

}  // namespace shadowd
