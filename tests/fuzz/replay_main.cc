// The main() of a fuzz target built without libFuzzer: runs
// LLVMFuzzerTestOneInput once on every file named, or in a directory named
// (not recursively; names starting with '.' are skipped), in name order.
// ctest runs it over tests/fuzz/corpus/<target>/ and regressions/<target>/,
// so every checked-in input stays tested by a plain gcc build. An input that
// breaks an invariant aborts (see fuzz_util.h); a missing path is an error.
//
//   fuzz_<target> PATH...
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

namespace fs = std::filesystem;

bool collect(const fs::path& p, std::vector<fs::path>& files) {
  std::error_code ec;
  if (fs::is_regular_file(p, ec)) {
    files.push_back(p);
    return true;
  }
  if (!fs::is_directory(p, ec)) {
    std::fprintf(stderr, "replay: error: %s: not a file or directory\n", p.c_str());
    return false;
  }
  std::vector<fs::path> found;
  for (const fs::directory_entry& e : fs::directory_iterator(p, ec)) {
    if (e.is_regular_file() && !e.path().filename().string().starts_with(".")) found.push_back(e.path());
  }
  if (ec) {
    std::fprintf(stderr, "replay: error: %s: %s\n", p.c_str(), ec.message().c_str());
    return false;
  }
  std::sort(found.begin(), found.end());
  files.insert(files.end(), found.begin(), found.end());
  return true;
}

bool run_one(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "replay: error: cannot read %s\n", p.c_str());
    return false;
  }
  const std::vector<char> bytes{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  // Announced first, so that an input that aborts is named.
  std::fprintf(stderr, "replay: %s (%zu bytes)\n", p.c_str(), bytes.size());
  // A heap copy of exactly its size, as libFuzzer passes it: ASan sees a read past the end.
  const std::unique_ptr<uint8_t[]> data(new uint8_t[bytes.size()]);
  std::copy(bytes.begin(), bytes.end(), data.get());
  LLVMFuzzerTestOneInput(data.get(), bytes.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE|DIR...\n", argv[0]);
    return 2;
  }
  std::vector<fs::path> files;
  for (int i = 1; i < argc; ++i) {
    if (!collect(argv[i], files)) return 2;
  }
  for (const fs::path& p : files) {
    if (!run_one(p)) return 2;
  }
  std::printf("replay: %zu inputs ran\n", files.size());
  return 0;
}
