// Unit tests for the Holt-Winters and autoregressive predictors and their
// building blocks (core/predict_models.cc), on synthetic series with known
// answers. Time is virtual: plain integers of nanoseconds.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/predict.h"

namespace shadowd::predict {
namespace {

constexpr int64_t kNsPerS = 1'000'000'000;
// Aligned to the day, so bucket k of a day is the same slot every day.
constexpr int64_t kStart = 1'700'006'400LL * kNsPerS;
static_assert(kStart % (86400 * kNsPerS) == 0);

// `n` writes to `seg` spread evenly over the bucket [t0, t0 + bucket_s).
void write_bucket(Predictor& m, uint64_t seg, int64_t t0, uint32_t bucket_s, int n) {
  const int64_t step = static_cast<int64_t>(bucket_s) * kNsPerS / (n + 1);
  for (int i = 1; i <= n; ++i) m.observe(seg, Op::kWrite, t0 + i * step);
}

TEST_CASE("find_period finds a noisy 24-bucket season and rejects noise", "[predict]") {
  std::mt19937 rng(42);
  std::normal_distribution<double> noise(0.0, 2.0);
  std::vector<double> seasonal, white;
  for (int t = 0; t < 480; ++t) {
    seasonal.push_back(10 + 5 * std::sin(2 * M_PI * t / 24.0) + noise(rng));
    white.push_back(10 + noise(rng));
  }
  CHECK(find_period(seasonal, {12, 24, 48}) == 24);
  CHECK(find_period(white, {12, 24, 48}) == 0);
  // A lag of half the series or more is not considered.
  CHECK(find_period(std::vector<double>(seasonal.begin(), seasonal.begin() + 48), {24}) == 0);
  CHECK(find_period(std::vector<double>(100, 3.0), {12, 24}) == 0);
}

TEST_CASE("fit_ar recovers a simulated AR(2) from pooled series", "[predict]") {
  const double c = 1, phi1 = 0.5, phi2 = -0.2;
  std::mt19937 rng(7);
  std::normal_distribution<double> noise(0.0, 1.0);
  std::vector<std::vector<double>> series;
  for (int s = 0; s < 4; ++s) {
    std::vector<double> y = {0, 0};
    for (int t = 2; t < 2100; ++t) y.push_back(c + phi1 * y[t - 1] + phi2 * y[t - 2] + noise(rng));
    series.emplace_back(y.begin() + 100, y.end());  // drop the burn-in
  }
  const std::vector<double> coef = fit_ar(series, 2);
  REQUIRE(coef.size() == 3);
  CHECK(coef[0] == Approx(c).margin(0.05));
  CHECK(coef[1] == Approx(phi1).margin(0.05));
  CHECK(coef[2] == Approx(phi2).margin(0.05));

  CHECK(fit_ar({{1, 2, 3}}, 2).empty());  // one row: too little data
  CHECK(fit_ar({}, 1).empty());
}

// One segment written `count` times during bucket `hot` of each 24-bucket
// "day"; returns the forecasts of the next bucket just before the hot
// bucket and just after it, on the last day.
std::pair<double, double> daily_pattern(const Params& p, int days, int count) {
  auto m = make_holt_winters(p);
  const uint32_t bs = p.bucket_seconds;
  const int64_t b_ns = static_cast<int64_t>(bs) * kNsPerS;
  const int hot = 9;
  double before = -1, after = -1;
  for (int d = 0; d < days; ++d) {
    for (int b = 0; b < 24; ++b) {
      const int64_t t0 = kStart + (d * 24 + b) * b_ns;
      m->tick(t0);
      if (d == days - 1 && b == hot) before = m->forecast(1, t0, bs);
      if (d == days - 1 && b == hot + 1) after = m->forecast(1, t0, bs);
      if (b == hot) write_bucket(*m, 1, t0, bs, count);
    }
  }
  return {before, after};
}

TEST_CASE("holt-winters learns a daily pattern", "[predict]") {
  const int count = 20;
  Params p;
  SECTION("given period: 60 s buckets, a 1440 s day") {
    p.bucket_seconds = 60;
    p.hw_period_seconds = 1440;
  }
  SECTION("period found: hourly buckets, a real day") {
    p.bucket_seconds = 3600;
    p.hw_period_seconds = 0;
  }
  const auto [before, after] = daily_pattern(p, 12, count);
  INFO("before " << before << " after " << after);
  CHECK(before == Approx(count).epsilon(0.3));
  CHECK(before > 5 * after);
}

TEST_CASE("holt-winters without a known period follows the level", "[predict]") {
  // Same data as the detected-period case but over too few days to detect
  // it: the forecast is the plain Holt level, not seasonal.
  Params p;
  p.bucket_seconds = 3600;
  const auto [before, after] = daily_pattern(p, 2, 20);
  CHECK(before < 0.25 * 20);
  CHECK(after > before);
}

TEST_CASE("arima and holt-winters follow a step in the write rate", "[predict]") {
  const auto name = GENERATE(as<std::string>{}, "arima", "holt-winters");
  Params p;
  p.bucket_seconds = 60;
  auto m = name == "arima" ? make_arima(p) : make_holt_winters(p);
  REQUIRE(m->name() == name);
  const int64_t b_ns = 60 * kNsPerS;
  int64_t t = kStart;
  for (int b = 0; b < 40; ++b, t += b_ns) {
    m->tick(t);
    write_bucket(*m, 5, t, 60, b < 30 ? 2 : 10);
  }
  m->tick(t);
  INFO(name);
  CHECK(m->forecast(5, t, 60) == Approx(10).epsilon(0.25));
  CHECK(m->forecast(5, t, 30) == Approx(5).epsilon(0.25));  // half a bucket
  CHECK(m->forecast(6, t, 60) == 0);                           // never seen
}

TEST_CASE("arima forecasts a constant rate", "[predict]") {
  Params p;
  p.bucket_seconds = 10;
  p.ar_order = 3;
  auto m = make_arima(p);
  const int64_t b_ns = 10 * kNsPerS;
  int64_t t = kStart;
  for (int b = 0; b < 100; ++b, t += b_ns) {
    m->tick(t);
    write_bucket(*m, 3, t, 10, 7);
    m->observe(4, Op::kRead, t + 1);  // read only: active, no writes expected
  }
  m->tick(t);
  CHECK(m->forecast(3, t, 10) == Approx(7).epsilon(0.1));
  CHECK(m->forecast(3, t, 100) == Approx(70).epsilon(0.1));
  CHECK(m->forecast(4, t, 10) < 0.05);
  CHECK(m->active_segments() == 2);

  std::vector<std::pair<double, uint64_t>> out;
  m->nominate(t, 10, 8, {}, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 3);
}

TEST_CASE("nominate ranks segments by forecast", "[predict]") {
  const auto name = GENERATE(as<std::string>{}, "arima", "holt-winters");
  Params p;
  p.bucket_seconds = 60;
  auto m = name == "arima" ? make_arima(p) : make_holt_winters(p);
  const int64_t b_ns = 60 * kNsPerS;
  int64_t t = kStart;
  for (int b = 0; b < 30; ++b, t += b_ns) {
    m->tick(t);
    write_bucket(*m, 10, t, 60, 2);
    write_bucket(*m, 11, t, 60, 12);
    write_bucket(*m, 12, t, 60, 6);
    m->observe(13, Op::kRead, t + 1);
  }
  m->tick(t);
  INFO(name);
  std::vector<std::pair<double, uint64_t>> out = {{1.0, 99}};  // appended to
  m->nominate(t, 60, 2, {}, out);
  REQUIRE(out.front().second == 99);
  out.erase(out.begin());
  REQUIRE(out.size() == 2);
  CHECK(out[0].second == 11);
  CHECK(out[1].second == 12);
  CHECK(out[0].first > out[1].first);
  CHECK(out[0].first == Approx(m->forecast(11, t, 60)));
  out.clear();
  m->nominate(t, 60, 10, {}, out);
  CHECK(out.size() == 3);  // the read-only segment is not nominated
  // Segments the caller covers are left out before the cut.
  out.clear();
  m->nominate(t, 60, 1, [](uint64_t s) { return s == 11; }, out);
  REQUIRE(out.size() == 1);
  CHECK(out[0].second == 12);

  // A segment first seen in the open bucket is nominated too, and the
  // window may start and end within buckets.
  for (int i = 1; i <= 30; ++i) m->observe(20, Op::kWrite, t + i * kNsPerS / 10);
  const int64_t now = t + 5 * kNsPerS;
  out.clear();
  m->nominate(now, 90, 10, {}, out);
  REQUIRE(out.size() == 4);
  CHECK(out[0].second == 20);
  CHECK(out[0].first == Approx(m->forecast(20, now, 90)));
  CHECK(out[1].second == 11);
  CHECK(out[1].first == Approx(m->forecast(11, now, 90)));
  CHECK(out[1].first == Approx(18).epsilon(0.1));  // 12/bucket over 1.5 buckets
}

TEST_CASE("predictors keep at most max_segments and expire idle ones", "[predict]") {
  const auto name = GENERATE(as<std::string>{}, "arima", "holt-winters");
  Params p;
  p.max_segments = 100;
  p.memory_seconds = 3600;
  auto m = name == "arima" ? make_arima(p) : make_holt_winters(p);
  INFO(name);
  int64_t t = kStart;
  for (uint64_t seg = 0; seg < 1000; ++seg, t += kNsPerS / 10) m->observe(seg, Op::kWrite, t);
  CHECK(m->active_segments() <= 100);
  CHECK(m->active_segments() >= 50);
  CHECK(m->forecast(999, t, 60) > 0);  // the most recent survives
  CHECK(m->forecast(0, t, 60) == 0);   // the oldest was dropped
  const uint64_t per_seg = m->memory_bytes() / m->active_segments();
  CHECK(per_seg < 2048);

  m->tick(t + 3601 * kNsPerS);
  CHECK(m->active_segments() == 0);
}

}  // namespace
}  // namespace shadowd::predict
