// Fuzz target: the msr trace reader (core/trace.h); see trace_fuzz.h.
#include "tests/fuzz/trace_fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return shadowd::trace::fuzz::run(shadowd::trace::Format::kMsr, data, size);
}
