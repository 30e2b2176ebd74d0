// Helpers shared by the fuzz targets in this directory (one target per .cc,
// each defining LLVMFuzzerTestOneInput). The same sources build either as
// libFuzzer binaries (-DSHADOWD_FUZZ=ON, clang) or as replay drivers
// (replay_main.cc) that ctest runs over the checked-in inputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string_view>

// An invariant of the code under test. Unlike assert() it holds in every
// build (the replay drivers are built with NDEBUG), and it aborts, so that
// libFuzzer reports the input as a crash and keeps it.
#define FUZZ_CHECK(cond) \
  ((cond) ? static_cast<void>(0) : ::shadowd::fuzz::check_failed(#cond, __FILE__, __LINE__))
// A branch the code under test must never take.
#define FUZZ_FAIL(what) ::shadowd::fuzz::check_failed(what, __FILE__, __LINE__)

namespace shadowd::fuzz {

[[noreturn]] inline void check_failed(const char* what, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: fuzz invariant violated: %s\n", file, line, what);
  std::abort();
}

// Takes parameters off the front of a fuzz input; past its end every value
// is 0, so any input is a valid choice of parameters.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data, size) {}
  uint8_t u8() {
    if (pos_ == data_.size()) return 0;
    return data_[pos_++];
  }
  // Big-endian, as the NBD wire (and a hex dump) reads.
  uint32_t u32() { return static_cast<uint32_t>(uint_bytes(4)); }
  uint64_t u64() { return uint_bytes(8); }
  // Everything not taken yet.
  std::span<const uint8_t> rest() const { return data_.subspan(pos_); }
  std::string_view rest_text() const {
    return {reinterpret_cast<const char*>(data_.data() + pos_), data_.size() - pos_};
  }

 private:
  uint64_t uint_bytes(int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = v << 8 | u8();
    return v;
  }
  std::span<const uint8_t> data_;
  size_t pos_ = 0;
};

// Chunk sizes for feeding a stream piece by piece, drawn from a small
// generator seeded by one input byte: 0 means "everything at once"; other
// values give sizes of 1 .. 2^(seed & 7), so short reads at every offset
// (inside headers, inside payloads) are covered.
class Chunker {
 public:
  explicit Chunker(uint8_t seed) : seed_(seed), state_(seed * 0x9e3779b97f4a7c15ull | 1) {}
  size_t next(size_t left) {
    if (seed_ == 0) return left;
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    const size_t max = size_t{1} << (seed_ & 7);
    const size_t n = 1 + static_cast<size_t>(state_ % max);
    return n < left ? n : left;
  }

 private:
  uint8_t seed_;
  uint64_t state_;
};

}  // namespace shadowd::fuzz
