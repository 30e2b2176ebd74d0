// The rbd: spec parser (core/rbd_backend.h); the backend itself is tested
// against a real cluster in tests/ceph.
#include <catch2/catch.hpp>

#include "core/rbd_backend.h"

namespace shadowd {
namespace {

TEST_CASE("rbd spec: pool, namespace, image, snapshot and options", "[rbd]") {
  CHECK(is_rbd_spec("rbd:p/i"));
  CHECK_FALSE(is_rbd_spec("/dev/rbd0"));
  CHECK_FALSE(is_rbd_spec("nbd://host/x"));

  auto a = parse_rbd_spec("rbd:shadowd/vol1");
  REQUIRE(a);
  CHECK(a->pool == "shadowd");
  CHECK(a->ns.empty());
  CHECK(a->image == "vol1");
  CHECK(a->snap.empty());
  CHECK(rbd_spec_name(*a) == "rbd:shadowd/vol1");

  auto b = parse_rbd_spec(
      "rbd:rbd/tenant/vol@snap1:conf=/etc/ceph/c.conf:id=shadowd:keyring=/k:rbd_cache=false");
  REQUIRE(b);
  CHECK(b->pool == "rbd");
  CHECK(b->ns == "tenant");
  CHECK(b->image == "vol");
  CHECK(b->snap == "snap1");
  CHECK(b->conf == "/etc/ceph/c.conf");
  CHECK(b->id == "shadowd");
  CHECK(b->keyring == "/k");
  REQUIRE(b->options.size() == 1);
  CHECK(b->options.at("rbd_cache") == "false");
  // The name leaves out what may change between runs (paths, options).
  CHECK(rbd_spec_name(*b) == "rbd:rbd/tenant/vol@snap1");

  // A backslash escapes ':' inside a value (a mon address with a port).
  auto c = parse_rbd_spec("rbd:p/i:mon_host=127.0.0.1\\:6790");
  REQUIRE(c);
  CHECK(c->options.at("mon_host") == "127.0.0.1:6790");
}

TEST_CASE("rbd spec: malformed specs are refused with the spec in the message", "[rbd]") {
  for (const char* bad : {"rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:a/b/c/d",
                          "rbd:p/i@", "rbd:p/i@a@b", "rbd:p/i:conf", "rbd:p/i:=x"}) {
    INFO(bad);
    auto r = parse_rbd_spec(bad);
    REQUIRE_FALSE(r);
    CHECK(r.status().code() == Status::Code::kInvalid);
    CHECK(r.status().message().find(bad) != std::string::npos);
  }
  CHECK_FALSE(parse_rbd_spec("disk.img"));
}

}  // namespace
}  // namespace shadowd
