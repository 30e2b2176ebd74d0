#include "core/gate_backend.h"

namespace shadowd {

// The request as it goes below the gate: completes the client's op, then
// counts itself out.
class GateBackend::Pass final : public BlockOp {
 public:
  Pass(GateBackend* g, BlockOp* c) : gate(g), client(c) {
    kind = c->kind;
    flags = c->flags;
    buf = c->buf;
    offset = c->offset;
    length = c->length;
  }
  void on_done(Status st) override {
    GateBackend* g = gate;
    client->on_done(std::move(st));
    delete this;
    g->finished();
  }
  GateBackend* gate;
  BlockOp* client;
};

void GateBackend::submit(EventLoop& loop, BlockOp* op) {
  // Count first, then look at the gate: pause() sets the gate, then waits
  // for the count to drop to zero, so one of the two always sees the other.
  active_.fetch_add(1);
  if (paused_.load()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (paused_.load()) {
      held_.emplace_back(&loop, op);
      if (active_.fetch_sub(1) == 1) drained_.notify_all();
      return;
    }
  }
  inner_->submit(loop, new Pass(this, op));
}

void GateBackend::finished() {
  if (active_.fetch_sub(1) == 1 && paused_.load()) {
    std::lock_guard<std::mutex> lock(mu_);
    drained_.notify_all();
  }
}

void GateBackend::pause() {
  std::unique_lock<std::mutex> lock(mu_);
  paused_.store(true);
  drained_.wait(lock, [&] { return active_.load() == 0; });
}

void GateBackend::resume() {
  std::vector<std::pair<EventLoop*, BlockOp*>> held;
  {
    std::lock_guard<std::mutex> lock(mu_);
    paused_.store(false);
    held.swap(held_);
  }
  for (auto [loop, op] : held) {
    loop->post([this, loop, op] { submit(*loop, op); });
  }
}

uint64_t GateBackend::held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

}  // namespace shadowd
