// Exports served by the daemon. The registry is shared by every connection
// and may change at run time (later: point-in-time exports), so lookups hand
// out shared_ptrs that keep an export alive for the connections using it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/io_backend.h"
#include "nbd/protocol.h"

namespace shadowd::nbd {

struct Export {
  std::string name;
  std::string description;
  std::shared_ptr<IoBackend> backend;
  bool read_only = false;
  uint32_t min_block_bytes = 1;
  uint32_t preferred_block_bytes = 4096;
  uint32_t max_payload_bytes = 32u << 20;

  uint64_t size_bytes() const { return backend->size_bytes(); }
  // The transmission flags sent to clients.
  uint16_t transmission_flags() const;
};

class ExportRegistry {
 public:
  // The first export added becomes the default, reached by the empty name.
  Status add(std::shared_ptr<Export> e);
  Status remove(const std::string& name);
  // nullptr when there is no such export. "" selects the default export.
  std::shared_ptr<Export> find(std::string_view name) const;
  std::vector<std::shared_ptr<Export>> list() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Export>, std::less<>> exports_;
  std::string default_name_;
};

}  // namespace shadowd::nbd
