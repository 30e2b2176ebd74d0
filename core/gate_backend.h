// A gate in front of a backend: pause() holds new requests (queued, not
// failed) and waits until every request already passed through has
// completed; resume() lets the held ones go on. A rollback rewrites the live
// export below the gate while clients wait above it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "core/io_backend.h"

namespace shadowd {

class GateBackend final : public LayeredBackend {
 public:
  explicit GateBackend(std::shared_ptr<IoBackend> inner) : LayeredBackend(std::move(inner)) {}
  void submit(EventLoop& loop, BlockOp* op) override;

  // Hold new requests; return once none is in flight below the gate.
  // Called from a thread that is not an event loop of the export.
  void pause();
  // Let the held requests go on (each on the loop it came from).
  void resume();
  bool paused() const { return paused_.load(); }
  uint64_t held() const;

 private:
  class Pass;
  void finished();

  std::atomic<bool> paused_{false};
  std::atomic<uint64_t> active_{0};
  mutable std::mutex mu_;
  std::condition_variable drained_;
  std::vector<std::pair<EventLoop*, BlockOp*>> held_;
};

}  // namespace shadowd
