#include "nbd/export.h"

namespace shadowd::nbd {

uint16_t Export::transmission_flags() const {
  // Flush covers every connection: it is an fsync of the one backing inode,
  // and a write is acknowledged only after the kernel completed it.
  uint16_t f = kHasFlags | kSendFlush | kSendFua | kSendCache | kCanMultiConn;
  if (read_only) {
    f |= kReadOnly;
  } else {
    f |= kSendTrim | kSendWriteZeroes;
  }
  return f;
}

Status ExportRegistry::add(std::shared_ptr<Export> e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (e->name.size() > kMaxStringBytes) return Status::invalid("export name too long");
  if (exports_.count(e->name) != 0) return Status::invalid("export exists: " + e->name);
  if (exports_.empty()) default_name_ = e->name;
  exports_.emplace(e->name, std::move(e));
  return Status::ok();
}

Status ExportRegistry::remove(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  if (exports_.erase(name) == 0) {
    return Status::error(Status::Code::kNotFound, "no such export: " + name, ENOENT);
  }
  if (name == default_name_) default_name_.clear();
  return Status::ok();
}

std::shared_ptr<Export> ExportRegistry::find(std::string_view name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = exports_.find(name.empty() ? std::string_view(default_name_) : name);
  if (it == exports_.end()) return nullptr;
  return it->second;
}

std::vector<std::shared_ptr<Export>> ExportRegistry::list() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<Export>> out;
  for (auto& [name, e] : exports_) out.push_back(e);
  return out;
}

}  // namespace shadowd::nbd
