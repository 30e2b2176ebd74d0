// Forecasting segment accesses (specification §6): the predictors behind
// the shadowing policy. The daemon's shadow thread and the simulator
// (`shadowctl simulate`) drive the same objects.
//
// A Predictor sees every access in time order (observe) and answers, for one
// segment, how many writes it expects within a horizon (forecast), and
// nominates segments it expects to be written soon, including ones it has
// never seen written (a sequential stream's next segments). Time is Unix
// nanoseconds (virtual in the simulator); calls are not thread-safe: the
// caller serialises them.
//
// Memory: each model keeps state only for active segments (accessed within
// its memory horizon, default one day), at most `max_segments` of them
// (default 1 Mi); beyond the bound the least recently used state is dropped.
// The figure per active segment is given by memory_bytes()/active_segments().
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace shadowd::predict {

enum class Op : uint8_t { kRead, kWrite };

struct Params {
  // Bucket of the seasonal and autoregressive models' series.
  uint32_t bucket_seconds = 60;
  // Forget a segment not accessed for this long (state is freed).
  uint32_t memory_seconds = 86400;
  uint64_t max_segments = 1u << 20;
  // ewma: time constants of the rates (seconds), shortest first; the
  // forecast rate is the largest of them (a burst is not averaged away).
  std::vector<double> ewma_tau_s = {10, 600, 86400};
  // holt-winters: smoothing of level, trend, season; the period (seconds,
  // 0 = found from the history among daily, weekly and shorter candidates).
  double hw_alpha = 0.3, hw_beta = 0.05, hw_gamma = 0.3;
  uint32_t hw_period_seconds = 0;
  uint32_t hw_season_slots = 96;  // the period is cut into at most this many slots
  // arima: AR order on the per-segment bucket series (pooled fit), refitted
  // every this many buckets.
  uint32_t ar_order = 4;
  uint32_t ar_refit_buckets = 10;
  // sequential: a write within seq_gap_s after a write to the segment before
  // it continues a stream; a live stream nominates the next seq_ahead
  // segments; one of two segments or more stays dormant for seq_dormant_s
  // (writeback and periodic jobs come back to where they stopped) and
  // nominates them with less confidence. The allocation frontier (past the
  // highest segment ever written, where file systems put new data) is
  // nominated up to frontier_ahead segments with the learned share of
  // first writes that land there.
  double seq_gap_s = 5;
  double seq_dormant_s = 600;
  uint32_t seq_ahead = 256;
  uint32_t seq_max_streams = 1024;
  uint32_t frontier_ahead = 2048;
};

// Segments a nomination should leave out (already holding a base).
using Skip = std::function<bool(uint64_t)>;

class Predictor {
 public:
  virtual ~Predictor() = default;
  virtual std::string_view name() const = 0;
  // One access to `segment` at `t_ns`, in time order.
  virtual void observe(uint64_t segment, Op op, int64_t t_ns) = 0;
  // Periodic work (refits, expiry); called with the current time, often.
  virtual void tick(int64_t now_ns) { (void)now_ns; }
  // Expected number of writes to `segment` in (now, now + horizon].
  virtual double forecast(uint64_t segment, int64_t now_ns, double horizon_s) const = 0;
  // Where the segment stands in this model's order of nominations (the
  // policy keeps and copies by it): the forecast, or more where the model
  // ranks a segment above what it can count (sequential: the neighbours of
  // a write made a moment ago).
  virtual double rank(uint64_t segment, int64_t now_ns, double horizon_s) const {
    return forecast(segment, now_ns, horizon_s);
  }
  // Appends up to `max` segments this model expects to be written within
  // the horizon, with their rank (see rank()), best first, leaving out those `skip`
  // (if set) says the caller already covers (before the cut to `max`).
  virtual void nominate(int64_t now_ns, double horizon_s, size_t max, const Skip& skip,
                        std::vector<std::pair<double, uint64_t>>& out) const = 0;
  virtual uint64_t active_segments() const = 0;
  virtual uint64_t memory_bytes() const = 0;
  // New parameters where a model can take them without losing what it has
  // learnt (sequential: how far ahead; the others keep theirs).
  virtual void set_params(const Params& p) { (void)p; }
  // The models inside (an ensemble's parts; else this one).
  virtual std::vector<const Predictor*> parts() const { return {this}; }
};

// "ewma", "holt-winters", "arima", "sequential", "auto" (sequential and
// ewma together: the larger forecast of the two; copies ahead from the
// sequential model's nominations).
Result<std::unique_ptr<Predictor>> make(std::string_view name, const Params& p);

// Building blocks, exposed for tests.
std::unique_ptr<Predictor> make_ewma(const Params& p);
std::unique_ptr<Predictor> make_holt_winters(const Params& p);
std::unique_ptr<Predictor> make_arima(const Params& p);
std::unique_ptr<Predictor> make_sequential(const Params& p);
std::unique_ptr<Predictor> make_ensemble(std::vector<std::unique_ptr<Predictor>> parts, size_t nominators);

// The period (in buckets) of a series of counts, by autocorrelation among
// `candidates` (in buckets); 0 if none is clearly seasonal (acf < 0.3).
uint32_t find_period(const std::vector<double>& series, const std::vector<uint32_t>& candidates);

// Least-squares AR(p) coefficients (intercept first, then lag 1..p) over a
// set of series, fitted with Eigen. Empty if there is too little data.
std::vector<double> fit_ar(const std::vector<std::vector<double>>& series, uint32_t p);

}  // namespace shadowd::predict
