// Building what an NBD client sends, byte by byte and big-endian, without
// the server's own encoders: for tests of the handshake and for the fuzz
// targets' seed corpus (tests/fuzz/make_corpus.cc).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <vector>

#include "nbd/protocol.h"

namespace shadowd::test {

using Bytes = std::vector<uint8_t>;

struct Wire {
  Bytes b;
  Wire& u8(uint8_t v) {
    b.push_back(v);
    return *this;
  }
  Wire& u16(uint16_t v) { return u8(static_cast<uint8_t>(v >> 8)).u8(static_cast<uint8_t>(v)); }
  Wire& u32(uint32_t v) { return u16(static_cast<uint16_t>(v >> 16)).u16(static_cast<uint16_t>(v)); }
  Wire& u64(uint64_t v) { return u32(static_cast<uint32_t>(v >> 32)).u32(static_cast<uint32_t>(v)); }
  Wire& str(std::string_view s) {
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Wire& lstr(std::string_view s) { return u32(static_cast<uint32_t>(s.size())).str(s); }
  Wire& raw(const Bytes& x) {
    b.insert(b.end(), x.begin(), x.end());
    return *this;
  }
};

// One option: IHAVEOPT, option, length, data.
inline Bytes option(uint32_t opt, const Bytes& data = {}) {
  return Wire().u64(nbd::kIHaveOpt).u32(opt).u32(static_cast<uint32_t>(data.size())).raw(data).b;
}

// The data of NBD_OPT_INFO / NBD_OPT_GO.
inline Bytes info_data(std::string_view name, std::initializer_list<uint16_t> infos = {}) {
  Wire w;
  w.lstr(name).u16(static_cast<uint16_t>(infos.size()));
  for (uint16_t i : infos) w.u16(i);
  return w.b;
}

// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
inline Bytes meta_data(std::string_view name, std::initializer_list<std::string_view> queries) {
  Wire w;
  w.lstr(name).u32(static_cast<uint32_t>(queries.size()));
  for (std::string_view q : queries) w.lstr(q);
  return w.b;
}

}  // namespace shadowd::test
