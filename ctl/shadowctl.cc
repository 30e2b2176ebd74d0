// shadowctl: the operator's command line for shadowd.
//
// Today it inspects a running export over NBD (libnbd). The control socket
// (status, tuning, history, restore) arrives with the monitoring work.
#include <libnbd.h>

#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "version.h"

namespace {

std::string uri_for(const std::string& uri, const std::string& unix_path,
                    const std::string& name) {
  if (!uri.empty()) return uri;
  return "nbd+unix:///" + name + "?socket=" + unix_path;
}

int cmd_info(const std::string& uri, bool as_json) {
  nbd_handle* h = nbd_create();
  if (h == nullptr) {
    std::fprintf(stderr, "shadowctl: %s\n", nbd_get_error());
    return 1;
  }
  nbd_set_request_structured_replies(h, true);
  nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  nbd_set_full_info(h, true);
  if (nbd_connect_uri(h, uri.c_str()) < 0) {
    std::fprintf(stderr, "shadowctl: cannot connect to %s: %s\n", uri.c_str(), nbd_get_error());
    nbd_close(h);
    return 1;
  }
  nlohmann::json j;
  j["uri"] = uri;
  char* name = nbd_get_canonical_export_name(h);
  j["export_name"] = name ? name : "";
  free(name);
  char* desc = nbd_get_export_description(h);
  j["description"] = desc ? desc : "";
  free(desc);
  j["size_bytes"] = nbd_get_size(h);
  j["read_only"] = nbd_is_read_only(h) == 1;
  j["can_flush"] = nbd_can_flush(h) == 1;
  j["can_fua"] = nbd_can_fua(h) == 1;
  j["can_trim"] = nbd_can_trim(h) == 1;
  j["can_zero"] = nbd_can_zero(h) == 1;
  j["can_cache"] = nbd_can_cache(h) == 1;
  j["can_multi_conn"] = nbd_can_multi_conn(h) == 1;
  j["base_allocation"] = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  j["structured_replies"] = nbd_get_structured_replies_negotiated(h) == 1;
  j["block_size_min"] = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  j["block_size_preferred"] = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
  j["block_size_max"] = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  nbd_shutdown(h, 0);
  nbd_close(h);
  if (as_json) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    std::printf("%-22s %s\n", it.key().c_str(),
                it->is_string() ? it->get<std::string>().c_str() : it->dump().c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "shadowctl: inspect and control a running shadowd.\n\n"
      "Commands:\n"
      "  info      show an export's size, flags and block sizes (over NBD)\n"
      "  version   print shadowctl's version\n"};
  app.require_subcommand(1);
  app.footer("Exit status: 0 on success, 1 when the daemon cannot be reached or refuses, "
             "2 on bad usage.");
  bool as_json = false;
  app.add_flag("--json", as_json, "Print machine-readable JSON");

  std::string uri, unix_path = "/run/shadowd/disk.nbd", name = "disk";
  CLI::App* info = app.add_subcommand("info", "Show an export's size, flags and block sizes");
  info->add_option("--uri", uri, "NBD URI (nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=PATH)");
  info->add_option("--unix", unix_path, "Unix socket of the daemon (default /run/shadowd/disk.nbd)");
  info->add_option("--export-name", name, "Export name (default disk)");
  info->add_flag("--json", as_json, "Print machine-readable JSON");
  CLI::App* version = app.add_subcommand("version", "Print shadowctl's version");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (*version) {
    if (as_json) {
      std::printf("{\"version\":\"%s\"}\n", SHADOWD_VERSION);
    } else {
      std::printf("shadowctl %s\n", SHADOWD_VERSION);
    }
    return 0;
  }
  if (*info) return cmd_info(uri_for(uri, unix_path, name), as_json);
  return 2;
}
