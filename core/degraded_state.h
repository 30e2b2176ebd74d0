// The record of a degraded history episode, kept outside the shadow pool.
//
// While history is degraded (the pool failed), writes go to the primary and
// are acknowledged without a journal record. Recovery at start-up re-applies
// journal records the last checkpoint does not cover; over such a write that
// would put older data back. The pool cannot say so itself (it takes no
// writes then), so the store records the episode here first: "history
// degraded when the journal had reached sequence number N". A start that
// finds the record re-applies no journal record with seq <= N and restarts
// history (docs/FORMAT.md, "Start-up"; README "Shadow pool").
//
// The record is a small text file, <state_dir>/<export>.<pool uuid>.degraded,
// replaced atomically (written to a temporary file, fsynced, renamed over
// the old one, the directory fsynced) and removed the same way.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/pool_format.h"
#include "core/status.h"

namespace shadowd {

struct DegradedState {
  pool::Uuid pool_uuid{};       // the pool whose journal must not be replayed
  std::string primary_id;       // for people reading the file
  uint64_t seq = 0;             // no journal record with seq <= this is re-applied
  int64_t since_ns = 0;         // when history degraded (the store's clock)
  bool primary_flushed = false; // the primary was flushed after history degraded, before this was written
  std::string reason;           // why history degraded (one line)
};

// The file's text, and back. parse: kCorruption for anything that is not a
// complete record of format 1.
std::string encode_degraded_state(const DegradedState& s);
Result<DegradedState> parse_degraded_state(std::string_view text);
Result<pool::Uuid> parse_uuid(std::string_view text);

// Where the record lives. save() and clear() are durable when they return ok.
class DegradedStateStore {
 public:
  virtual ~DegradedStateStore() = default;
  // For messages: the file's path.
  virtual const std::string& where() const = 0;
  // nullopt: no record. An error: a record is there but cannot be read.
  virtual Result<std::optional<DegradedState>> load() = 0;
  virtual Status save(const DegradedState& s) = 0;
  virtual Status clear() = 0;
};

// "<export>.<uuid>.degraded"; characters of the export name other than
// [A-Za-z0-9._-] become '_', and it is cut to 64 bytes.
std::string state_file_name(const std::string& export_name, const pool::Uuid& uuid);

// The state file of `export_name` and the pool `uuid` in `dir`. Creates
// `dir` (and its parents, mode 0755) if missing and checks that a file can
// be created there: an error says why not.
Result<std::unique_ptr<DegradedStateStore>> open_state_file(const std::string& dir,
                                                            const std::string& export_name,
                                                            const pool::Uuid& uuid);

// The state files of `export_name` in `dir`, of any pool (full paths,
// sorted). Empty when `dir` does not exist.
std::vector<std::string> find_state_files(const std::string& dir, const std::string& export_name);

}  // namespace shadowd
