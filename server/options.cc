// getopt_long parsing of layerd's command line. Options qemu-nbd has but
// layerd does not (yet) support are recognized and refused by name, so a
// user gets "not supported" rather than "unknown option".
#include "server/options.h"

#include <getopt.h>

#include <algorithm>
#include <charconv>
#include <thread>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <fmt/format.h>

#include "server/image_opts.h"

namespace layerd {
namespace {

enum LongOnly {
  kOptPidFile = 256,
  kOptFork,
  kOptCache,
  kOptAio,
  kOptDiscard,
  kOptDetectZeroes,
  kOptMaxRequestSize,
  kOptHandshakeLimit,
  kOptThreads,
  kOptAllowDataFile,
  kOptImageDir,
  kOptL2CacheSize,
  kOptObject,
  kOptTlsCreds,
  kOptTlsAuthz,
  kOptTlsHostname,
  kOptImageOpts,
  kOptSelinuxLabel,
  kOptTempDir,
  kOptOverlay,
  kOptKeepOverlay,
  kOptQmp,
  kOptQmpListen,
  kOptCopyOnRead,
  kOptExport,
  kOptConfig,
  kOptLog,
  kOptTls,
  kOptTlsPsk,
  kOptTlsVerifyPeer,
  kOptAllow,
  kOptDeny,
  kOptSocketMode,
  kOptMaxHandshakes,
  kOptIdleTimeout,
  kOptMaxInFlight,
  kOptMaxBuffer,
};

const option kLongOptions[] = {
    {"help", no_argument, nullptr, 'h'},
    {"version", no_argument, nullptr, 'V'},
    {"port", required_argument, nullptr, 'p'},
    {"bind", required_argument, nullptr, 'b'},
    {"socket", required_argument, nullptr, 'k'},
    {"shared", required_argument, nullptr, 'e'},
    {"persistent", no_argument, nullptr, 't'},
    {"verbose", no_argument, nullptr, 'v'},
    {"export-name", required_argument, nullptr, 'x'},
    {"description", required_argument, nullptr, 'D'},
    {"offset", required_argument, nullptr, 'o'},
    {"allocation-depth", no_argument, nullptr, 'A'},
    {"bitmap", required_argument, nullptr, 'B'},
    {"list", no_argument, nullptr, 'L'},
    {"object", required_argument, nullptr, kOptObject},
    {"tls-creds", required_argument, nullptr, kOptTlsCreds},
    {"tls-authz", required_argument, nullptr, kOptTlsAuthz},
    {"tls-hostname", required_argument, nullptr, kOptTlsHostname},
    {"tls", required_argument, nullptr, kOptTls},
    {"tls-psk", required_argument, nullptr, kOptTlsPsk},
    {"tls-verify-peer", no_argument, nullptr, kOptTlsVerifyPeer},
    {"partition", required_argument, nullptr, 'P'},
    {"trace", required_argument, nullptr, 'T'},
    {"fork", no_argument, nullptr, kOptFork},
    {"pid-file", required_argument, nullptr, kOptPidFile},
    {"selinux-label", required_argument, nullptr, kOptSelinuxLabel},
    {"connect", required_argument, nullptr, 'c'},
    {"disconnect", no_argument, nullptr, 'd'},
    {"format", required_argument, nullptr, 'f'},
    {"read-only", no_argument, nullptr, 'r'},
    {"force-share", no_argument, nullptr, 'U'},
    {"snapshot", no_argument, nullptr, 's'},
    {"load-snapshot", required_argument, nullptr, 'l'},
    {"nocache", no_argument, nullptr, 'n'},
    {"cache", required_argument, nullptr, kOptCache},
    {"aio", required_argument, nullptr, kOptAio},
    {"discard", required_argument, nullptr, kOptDiscard},
    {"detect-zeroes", required_argument, nullptr, kOptDetectZeroes},
    {"image-opts", no_argument, nullptr, kOptImageOpts},
    {"max-request-size", required_argument, nullptr, kOptMaxRequestSize},
    {"handshake-limit", required_argument, nullptr, kOptHandshakeLimit},
    {"threads", required_argument, nullptr, kOptThreads},
    {"allow-data-file", no_argument, nullptr, kOptAllowDataFile},
    {"image-dir", required_argument, nullptr, kOptImageDir},
    {"l2-cache-size", required_argument, nullptr, kOptL2CacheSize},
    {"temp-dir", required_argument, nullptr, kOptTempDir},
    {"overlay", required_argument, nullptr, kOptOverlay},
    {"keep-overlay", required_argument, nullptr, kOptKeepOverlay},
    {"qmp", required_argument, nullptr, kOptQmp},
    {"qmp-listen", required_argument, nullptr, kOptQmpListen},
    {"copy-on-read", no_argument, nullptr, kOptCopyOnRead},
    {"export", required_argument, nullptr, kOptExport},
    {"config", required_argument, nullptr, kOptConfig},
    {"log", required_argument, nullptr, kOptLog},
    {"allow", required_argument, nullptr, kOptAllow},
    {"deny", required_argument, nullptr, kOptDeny},
    {"socket-mode", required_argument, nullptr, kOptSocketMode},
    {"max-handshakes", required_argument, nullptr, kOptMaxHandshakes},
    {"idle-timeout", required_argument, nullptr, kOptIdleTimeout},
    {"max-in-flight", required_argument, nullptr, kOptMaxInFlight},
    {"max-buffer", required_argument, nullptr, kOptMaxBuffer},
    {nullptr, 0, nullptr, 0},
};

constexpr const char* kShortOptions = "hVp:b:k:e:tvx:D:o:AB:LT:c:df:rUsl:nP:";

// Parses a decimal number with an optional K/M/G suffix (powers of 1024).
std::optional<uint64_t> parse_size(std::string_view s) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc{} || end == s.data()) return std::nullopt;
  std::string_view suffix(end, s.data() + s.size() - end);
  int shift = 0;
  if (suffix.empty() || suffix == "B") shift = 0;
  else if (suffix == "K" || suffix == "k") shift = 10;
  else if (suffix == "M") shift = 20;
  else if (suffix == "G") shift = 30;
  else if (suffix == "T") shift = 40;
  else return std::nullopt;
  if (value > (UINT64_MAX >> shift)) return std::nullopt;
  return value << shift;
}

std::optional<uint64_t> parse_number(std::string_view s, uint64_t max) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc{} || end != s.data() + s.size() || value > max)
    return std::nullopt;
  return value;
}

// -o's argument as qemu-nbd reads it (qemu_strtou64, base 0): decimal,
// 0x hexadecimal or 0 octal, no suffix.
std::optional<uint64_t> parse_offset(std::string_view s) {
  if (s.empty() || s.front() == '-' || s.front() == '+' ||
      std::isspace(static_cast<unsigned char>(s.front())))
    return std::nullopt;
  int base = 10;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    s.remove_prefix(2);
  } else if (s.size() > 1 && s[0] == '0') {
    base = 8;
    s.remove_prefix(1);
  }
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value, base);
  if (ec != std::errc{} || end != s.data() + s.size()) return std::nullopt;
  return value;
}

bool parse_overlay_mode(std::string_view v, OverlayMode* out) {
  if (v == "none") *out = OverlayMode::None;
  else if (v == "temp") *out = OverlayMode::Temp;
  else if (v == "per-client") *out = OverlayMode::PerClient;
  else return false;
  return true;
}

bool parse_on_off(std::string_view v, bool* out) {
  if (v == "on" || v == "yes" || v == "true") *out = true;
  else if (v == "off" || v == "no" || v == "false") *out = false;
  else return false;
  return true;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Sets one key of an export; an error message, or "" if it was fine.
std::string set_export_key(std::string_view key, std::string_view value,
                           ExportSpec* e) {
  auto bad = [&](std::string_view expected) {
    return fmt::format("invalid value '{}' for '{}' (expected {})", value, key,
                       expected);
  };
  if (key == "name") {
    if (value.size() > 4096) return "export name is longer than 4096 bytes";
    e->name = std::string(value);
  } else if (key == "file") {
    e->file = std::string(value);
  } else if (key == "format") {
    if (value != "raw" && value != "qcow2") return bad("raw or qcow2");
    e->format = std::string(value);
  } else if (key == "snapshot") {
    if (auto m = parse_snapshot_selector(value, &e->snapshot); !m.empty()) return m;
  } else if (key == "overlay") {
    if (!parse_overlay_mode(value, &e->overlay)) return bad("none, temp or per-client");
  } else if (key == "read-only") {
    if (!parse_on_off(value, &e->read_only)) return bad("on or off");
  } else if (key == "copy-on-read") {
    if (!parse_on_off(value, &e->copy_on_read)) return bad("on or off");
  } else if (key == "allocation-depth") {
    if (!parse_on_off(value, &e->allocation_depth)) return bad("on or off");
  } else if (key == "bitmap") {
    if (value.empty()) return bad("a bitmap name");
    e->bitmaps.emplace_back(value);
  } else if (key == "offset") {
    auto n = parse_offset(value);
    if (!n) return bad("a number of bytes");
    e->offset = *n;
  } else if (key == "description") {
    if (value.size() > 4096) return "description is longer than 4096 bytes";
    e->description = std::string(value);
  } else {
    return fmt::format("unknown export key '{}' (known: name, file, format, "
                       "snapshot, overlay, read-only, copy-on-read, "
                       "allocation-depth, bitmap, offset, description)", key);
  }
  return "";
}

// What an export must have and must not combine; "" if it is fine.
std::string check_export(const ExportSpec& e) {
  const std::string who = fmt::format("export '{}'", e.name);
  if (e.file.empty()) return who + ": no file given";
  if (e.overlay == OverlayMode::PerClient && e.read_only)
    return who + ": per-client overlays are for writing; drop read-only";
  if (e.copy_on_read && e.overlay == OverlayMode::None &&
      (e.read_only || !e.snapshot.empty()))
    return who + ": copy-on-read needs a writable top image, and this export "
                 "is read-only" + std::string(e.snapshot.empty() ? "" : " (an internal snapshot)") +
                 "; add a throwaway overlay (-s) to copy into";
  return "";
}

// The TLS options as given, resolved once every --object is known.
struct TlsArguments {
  std::optional<TlsMode> mode;  // --tls
  std::string creds;            // --tls-creds: an --object's id, or a directory
  std::string psk_file;         // --tls-psk
  bool verify_peer = false;     // --tls-verify-peer
  struct Object {
    std::string id;
    TlsSettings settings;
  };
  std::vector<Object> objects;  // --object
};

// qemu's option syntax: items split at ',', where ",," is a comma.
std::vector<std::string> split_qemu_options(std::string_view text) {
  std::vector<std::string> items(1);
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != ',') {
      items.back() += text[i];
    } else if (i + 1 < text.size() && text[i + 1] == ',') {
      items.back() += ',';
      ++i;
    } else {
      items.emplace_back();
    }
  }
  return items;
}

// "" if the TLS options fit together; fills o->tls.
std::string resolve_tls(const TlsArguments& t, ServerOptions* o) {
  TlsSettings& s = o->tls;
  if (!t.creds.empty() && !t.psk_file.empty())
    return "give either --tls-creds or --tls-psk, not both";
  if (!t.creds.empty()) {
    auto object = std::find_if(t.objects.begin(), t.objects.end(),
                               [&](const auto& x) { return x.id == t.creds; });
    if (object != t.objects.end()) {
      s = object->settings;
    } else if (!t.objects.empty()) {
      return fmt::format("--tls-creds '{}': no --object has id '{}'", t.creds, t.creds);
    } else {
      s.x509_dir = t.creds;  // nbdkit's --tls-certificates, by another name
    }
  }
  if (!t.psk_file.empty()) s.psk_file = t.psk_file;
  const bool have_creds = !s.x509_dir.empty() || !s.psk_file.empty();
  if (t.verify_peer) {
    if (!s.psk_file.empty())
      return "--tls-verify-peer is for X.509 certificates (with PSK every "
             "client proves its key anyway)";
    if (!have_creds) return "--tls-verify-peer needs --tls-creds";
    s.verify_peer = true;
  }
  s.mode = t.mode.value_or(have_creds ? TlsMode::Require : TlsMode::Off);
  if (s.mode != TlsMode::Off && !have_creds)
    return "--tls=on and --tls=require need --tls-creds DIR or --tls-psk FILE";
  if (s.mode != TlsMode::Off && o->list)
    return "-L does not speak TLS: list a TLS server's exports with "
           "'nbdinfo --list nbds://HOST/?tls-certificates=DIR'";
  return "";
}

// The cache mode with QEMU's cache.direct and cache.no-flush set as given;
// false for combinations layerd has no mode for.
bool combine_cache_mode(std::optional<bool> direct, std::optional<bool> no_flush,
                        CacheMode* mode) {
  bool d = *mode == CacheMode::None || *mode == CacheMode::DirectSync;
  bool nf = *mode == CacheMode::Unsafe;
  const bool writethrough = *mode == CacheMode::Writethrough || *mode == CacheMode::DirectSync;
  d = direct.value_or(d);
  nf = no_flush.value_or(nf);
  if (nf && (d || writethrough)) return false;
  *mode = nf ? CacheMode::Unsafe
        : d  ? (writethrough ? CacheMode::DirectSync : CacheMode::None)
             : (writethrough ? CacheMode::Writethrough : CacheMode::Writeback);
  return true;
}

// --image-opts: FILE (already in `e`) is a qemu option string; its image
// and window go into `e`, its settings into `o`. "" or an error.
std::string apply_image_opts(ServerOptions* o, ExportSpec* e) {
  ImageOpts io;
  if (auto m = parse_image_opts(e->file, &io); !m.empty()) return "--image-opts: " + m;
  e->file = io.filename;
  e->format = io.format;
  e->compress = io.compress;
  e->no_backing = io.no_backing;
  // -o stacks a raw window with that offset on top, as in qemu-nbd.
  if (io.size && o->offset > *io.size)
    return fmt::format("Offset ({}) cannot be greater than size of the "
                       "containing file ({})", o->offset, *io.size);
  if (io.offset + o->offset < io.offset) return "--image-opts: 'offset' is too large";
  e->offset = io.offset + o->offset;
  if (io.size) e->length = *io.size - o->offset;
  if (io.read_only.value_or(false)) e->read_only = true;
  if (io.force_share) o->force_share = *io.force_share;
  if (io.discard_unmap) o->discard_unmap = *io.discard_unmap;
  if (io.detect_zeroes) o->detect_zeroes = *io.detect_zeroes;
  if (io.detect_zeroes == DetectZeroes::Unmap && !o->discard_unmap)
    return "--image-opts: setting detect-zeroes to unmap is not allowed "
           "without setting discard operation to unmap";
  if (!combine_cache_mode(io.cache_direct, io.cache_no_flush, &o->cache))
    return "--image-opts: cache.no-flush=on cannot be combined with "
           "cache.direct=on or a writethrough cache mode in layerd";
  if (io.l2_cache_bytes) o->l2_cache_bytes = *io.l2_cache_bytes;
  if (e->compress && e->overlay != OverlayMode::None)
    return "--image-opts: driver=compress cannot be combined with -s or "
           "--overlay: writes would go to the throwaway overlay, uncompressed";
  return "";
}

ParseResult fail(std::string message) {
  return ParseResult{std::nullopt,
                     fmt::format("layerd: {}\nTry 'layerd --help' for more "
                                 "information.\n",
                                 message),
                     1};
}

}  // namespace

std::string parse_tls_object(std::string_view text, std::string* id,
                             TlsSettings* out) {
  *out = {};
  id->clear();
  if (!text.empty() && text.front() == '{')
    return "--object: JSON objects are not supported; write "
           "tls-creds-x509,id=ID,endpoint=server,dir=DIR";
  std::vector<std::string> items = split_qemu_options(text);
  std::string type;
  if (items.front().find('=') == std::string::npos) {
    type = items.front();
    items.erase(items.begin());
  }
  for (const std::string& item : items)
    if (item.starts_with("qom-type=")) type = item.substr(9);
  if (type != "tls-creds-x509" && type != "tls-creds-psk")
    return type.empty() ? "--object: no object type (tls-creds-x509 or tls-creds-psk)"
                        : fmt::format("--object: type '{}' is not supported (layerd "
                                      "knows tls-creds-x509 and tls-creds-psk)", type);
  std::string endpoint = "client";  // qemu's default
  std::string dir;
  std::optional<bool> verify_peer;
  for (const std::string& item : items) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos)
      return fmt::format("--object: '{}' is not KEY=VALUE", item);
    const std::string_view key = std::string_view(item).substr(0, eq);
    const std::string_view value = std::string_view(item).substr(eq + 1);
    if (key == "qom-type") {
      // the type, above
    } else if (key == "id") {
      *id = value;
    } else if (key == "endpoint") {
      endpoint = value;
    } else if (key == "dir") {
      dir = value;
    } else if (key == "verify-peer") {
      bool v = false;
      if (!parse_on_off(value, &v))
        return fmt::format("--object: invalid value '{}' for 'verify-peer' (on or off)", value);
      verify_peer = v;
    } else if (key == "priority") {
      out->priority = value;
    } else if (key == "sanity-check" || key == "loaded") {
      // qemu's; layerd always checks that the key matches the certificate.
    } else if (key == "passwordid") {
      return "--object: 'passwordid' (an encrypted private key) is not "
             "supported; decrypt the key with 'certtool --to-p8 --null-password'";
    } else {
      return fmt::format("--object: unknown key '{}' (known: id, endpoint, dir, "
                         "verify-peer, priority)", key);
    }
  }
  if (id->empty()) return fmt::format("--object {}: 'id' is missing", type);
  // qemu-nbd's words for a client endpoint.
  if (endpoint != "server")
    return fmt::format("--object {}: expecting TLS credentials with a server "
                       "endpoint (endpoint=server), not '{}'", *id, endpoint);
  if (dir.empty()) return fmt::format("--object {}: 'dir' is missing", *id);
  if (type == "tls-creds-x509") {
    out->x509_dir = dir;
    out->verify_peer = verify_peer.value_or(true);  // qemu's default
  } else {
    out->psk_file = (std::filesystem::path(dir) / "keys.psk").string();
  }
  return "";
}

std::string parse_snapshot_selector(std::string_view text, SnapshotSelector* out) {
  *out = {};
  if (text.rfind("snapshot.", 0) != 0) {
    if (text.empty()) return "empty snapshot name";
    out->id_or_name = std::string(text);
    return "";
  }
  while (!text.empty()) {
    size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    text = comma == std::string_view::npos ? "" : text.substr(comma + 1);
    size_t eq = item.find('=');
    std::string_view key = item.substr(0, eq);
    std::string_view value = eq == std::string_view::npos ? "" : item.substr(eq + 1);
    if (key == "snapshot.id") out->id = std::string(value);
    else if (key == "snapshot.name") out->name = std::string(value);
    else return fmt::format("invalid snapshot option '{}' (expected "
                            "snapshot.id=ID or snapshot.name=NAME)", key);
  }
  if (out->empty()) return "empty snapshot selector";
  return "";
}

std::string parse_export_spec(std::string_view text, ExportSpec* out) {
  *out = {};
  while (!text.empty()) {
    size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    text = comma == std::string_view::npos ? "" : text.substr(comma + 1);
    size_t eq = item.find('=');
    if (eq == std::string_view::npos)
      return fmt::format("--export: '{}' is not KEY=VALUE", item);
    if (auto m = set_export_key(item.substr(0, eq), item.substr(eq + 1), out);
        !m.empty())
      return "--export: " + m;
  }
  if (auto m = check_export(*out); !m.empty()) return "--export: " + m;
  return "";
}

std::string read_export_config(const std::string& path,
                               std::vector<ExportSpec>* out) {
  std::ifstream in(path);
  if (!in) return fmt::format("cannot read config file '{}'", path);
  std::string line;
  int number = 0;
  ExportSpec* current = nullptr;
  const size_t first = out->size();
  while (std::getline(in, line)) {
    ++number;
    std::string_view l = line;
    if (size_t hash = l.find('#'); hash != std::string_view::npos) l = l.substr(0, hash);
    l = trim(l);
    if (l.empty()) continue;
    auto where = fmt::format("{}:{}", path, number);
    if (l == "[export]") {
      current = &out->emplace_back();
      current->from_config = true;
      continue;
    }
    if (l.front() == '[') return fmt::format("{}: unknown section {}", where, l);
    if (!current) return fmt::format("{}: '{}' outside an [export] section", where, l);
    size_t eq = l.find('=');
    if (eq == std::string_view::npos)
      return fmt::format("{}: '{}' is not 'key = value'", where, l);
    if (auto m = set_export_key(trim(l.substr(0, eq)), trim(l.substr(eq + 1)), current);
        !m.empty())
      return fmt::format("{}: {}", where, m);
  }
  for (size_t i = first; i < out->size(); ++i)
    if (auto m = check_export((*out)[i]); !m.empty())
      return fmt::format("{}: {}", path, m);
  return "";
}

uint32_t default_worker_threads() {
  return std::max(4u, 2 * std::max(1u, std::thread::hardware_concurrency()));
}

std::string usage_text() {
  return R"(Usage: layerd [OPTIONS] FILE
  or:  layerd -L [OPTIONS]
Serve a disk image over NBD (qemu-nbd compatible command line).

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default 10809)
  -b, --bind=IFACE          address to bind to (default 0.0.0.0; '::' for IPv6)
  -k, --socket=PATH         listen on a Unix socket at PATH instead of TCP
  -e, --shared=NUM          serve at most NUM clients at once (default 1,
                            0 = unlimited); more clients wait to be accepted
  -t, --persistent          don't exit when the last client disconnects
  -v, --verbose             as qemu-nbd's -v (layerd's own logs: --log)
  -x, --export-name=NAME    export name (default: the empty string)
  -D, --description=TEXT    human-readable description of the export
      --fork                run in the background once listening
      --pid-file=PATH       write the server's process ID to PATH
  -L, --list                list the exports of the NBD server at -k or -b/-p
      --log=LEVEL           error (default) or info: also log connections

Image options:
  -f, --format=FORMAT       image format: raw or qcow2 (without -f, the image
                            is checked for a qcow2 header; backing images
                            always use the format their overlay records)
      --image-opts          FILE is a qemu option string instead of a file
                            name: driver=qcow2,file.filename=PATH,
                            driver=raw,file.filename=PATH,offset=N,size=N,
                            driver=compress,file.driver=qcow2,
                            file.file.filename=PATH (docs/compatibility.md)
  -r, --read-only           export read-only
  -s, --snapshot            write to a throwaway overlay (in --temp-dir) and
                            leave FILE and its backing images unchanged
  -l, --load-snapshot=SNAP  export internal snapshot SNAP of FILE (an id or a
                            name, or snapshot.id=ID,snapshot.name=NAME);
                            read-only, or writable with -s
  -o, --offset=OFFSET       the export starts OFFSET bytes into the image
                            (raw or qcow2; its size is the rest of the image)
  -A, --allocation-depth    expose the qemu:allocation-depth meta context
  -B, --bitmap=NAME         expose persistent dirty bitmap NAME (of FILE or
                            of a backing image) as the qemu:dirty-bitmap:NAME
                            meta context (repeatable)
      --overlay=MODE        none, temp (as -s) or per-client: every client
                            gets a throwaway overlay of its own; clients that
                            ask for export NAME@SESSION share one per SESSION
      --copy-on-read        reads of data from below the top image also
                            copy it into the top image (or the overlay)
      --temp-dir=DIR        where throwaway overlays live (default $TMPDIR,
                            else /var/tmp)
      --keep-overlay=DIR    keep each throwaway overlay as a qcow2 file in DIR
                            when its client leaves or layerd exits
      --qmp=PATH            a QMP control socket at PATH (repeatable): live
                            snapshot, commit and stream jobs, exports
                            (docs/control.md; use with -t)
      --qmp-listen=NAME     with socket activation: the passed sockets named
                            NAME (LISTEN_FDNAMES, systemd's
                            FileDescriptorName=) are QMP control sockets
                            (repeatable)
  -U, --force-share         serve the image even if another process (QEMU,
                            qemu-nbd, qemu-io) writes it; only with -r
  -n, --nocache             same as --cache=none
      --cache=MODE          none, writeback (default), writethrough,
                            directsync or unsafe
      --aio=MODE            accepted for compatibility (threads, native,
                            io_uring); layerd picks its own I/O strategy
      --discard=MODE        ignore (default) or unmap: whether TRIM and
                            zero writes may deallocate space
      --detect-zeroes=MODE  off (default), on or unmap: turn writes of
                            all-zero data into zero writes
  -T, --trace=PATTERN       accepted for compatibility; ignored
      --allow-data-file     open the external data file a qcow2 image names
                            (data_file); refused otherwise
      --image-dir=DIR       follow backing and data file names (and file
                            names sent over QMP) into DIR too; by default
                            only into the exported image's directory;
                            repeatable; / follows them anywhere
      --l2-cache-size=SIZE  qcow2 mapping cache per image (default 128M,
                            which maps 1 TiB at 64 KiB clusters)

Limits (layerd only):
      --max-request-size=SIZE  largest READ or WRITE (default 32M)
      --handshake-limit=SECS   drop clients that have not finished the
                               handshake after SECS seconds (default 10)
      --threads=N              I/O worker threads, and the most threads
                               that may run the event loop while a write
                               blocks (default: 2 per core, at least 4;
                               raise it for slow storage)
      --max-handshakes=N       connections negotiating at once (default
                               256); a new one beyond drops the oldest
      --idle-timeout=SECS      disconnect a served client that sends no
                               request for SECS seconds (default 0: never)
      --max-in-flight=N        requests of one connection in flight at
                               once (default 128)
      --max-buffer=SIZE        bytes of one connection's WRITE payloads in
                               flight at once (default 64M)

Access (layerd only; docs/security.md):
      --allow=CIDR             let TCP clients from CIDR in (repeatable;
                               with any --allow, nobody else)
      --deny=CIDR              keep TCP clients from CIDR out (repeatable);
                               the most specific rule wins
      --socket-mode=MODE       permissions of the -k socket (octal, e.g.
                               0600), set before it can be connected to

TLS (docs/security.md):
      --tls-creds=DIR       X.509 certificates in DIR: ca-cert.pem,
                            server-cert.pem, server-key.pem (or the id of
                            an --object tls-creds-x509/tls-creds-psk)
      --tls-verify-peer     clients must show a certificate signed by the
                            CA in ca-cert.pem
      --tls-psk=FILE        pre-shared keys: username:hexkey lines (psktool)
      --tls=MODE            off, on (TLS optional) or require (the default
                            with credentials: nothing before STARTTLS)
      --object=tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=on|off]
      --object=tls-creds-psk,id=ID,endpoint=server,dir=DIR
                            qemu-nbd's form, with --tls-creds=ID (qemu
                            verifies X.509 clients unless verify-peer=off;
                            the PSK dir holds keys.psk)

Several exports (layerd only):
      --export=KEY=VALUE,...  one export (repeatable); keys: name, file,
                            format, snapshot, overlay (none|temp|per-client),
                            read-only, copy-on-read, allocation-depth (on|off),
                            bitmap (repeatable), offset, description; then
                            FILE is not given
      --config=FILE         exports from FILE: [export] sections of
                            "key = value" lines with the same keys; SIGHUP
                            reads it again (connected clients keep the
                            export they negotiated)

Socket activation: started by systemd with LISTEN_FDS set, layerd serves on
the passed sockets (then -p, -b and -k must not be given).
)";
}

ParseResult parse_command_line(int argc, char** argv) {
  ServerOptions o;
  TlsArguments tls;
  optind = 1;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, kShortOptions, kLongOptions, nullptr)) !=
         -1) {
    std::string_view arg = optarg ? optarg : "";
    switch (c) {
      case 'h':
        return {std::nullopt, usage_text(), 0};
      case 'V':
        return {std::nullopt, fmt::format("layerd {}\n", LAYERD_VERSION), 0};
      case 'p': {
        auto port = parse_number(arg, 65535);
        if (!port || *port == 0) return fail(fmt::format("invalid port '{}'", arg));
        o.port = static_cast<uint16_t>(*port);
        o.port_given = true;
        break;
      }
      case 'b':
        o.bind_address = std::string(arg);
        o.bind_given = true;
        break;
      case 'k':
        o.socket_path = std::string(arg);
        break;
      case 'e': {
        auto n = parse_number(arg, 1u << 20);
        if (!n) return fail(fmt::format("invalid shared count '{}'", arg));
        o.max_connections = static_cast<uint32_t>(*n);
        break;
      }
      case 't': o.persistent = true; break;
      case 'v': o.verbose = true; break;
      case 'x':
        if (arg.size() > 4096) return fail("export name is longer than 4096 bytes");
        o.export_name = std::string(arg);
        break;
      case 'D':
        if (arg.size() > 4096) return fail("description is longer than 4096 bytes");
        o.description = std::string(arg);
        break;
      case 'L': o.list = true; break;
      case 'T': break;  // tracing: accepted, ignored
      case kOptFork: o.fork = true; break;
      case kOptPidFile: o.pid_file = std::string(arg); break;
      case 'f':
        o.format = std::string(arg);
        o.format_given = true;
        break;
      case 'r': o.read_only = true; break;
      case 'U': o.force_share = true; break;
      case 'n': o.cache = CacheMode::None; break;
      case kOptCache:
        if (arg == "none" || arg == "off") o.cache = CacheMode::None;
        else if (arg == "writeback") o.cache = CacheMode::Writeback;
        else if (arg == "writethrough") o.cache = CacheMode::Writethrough;
        else if (arg == "directsync") o.cache = CacheMode::DirectSync;
        else if (arg == "unsafe") o.cache = CacheMode::Unsafe;
        else return fail(fmt::format("invalid cache mode '{}'", arg));
        break;
      case kOptAio:
        if (arg != "threads" && arg != "native" && arg != "io_uring")
          return fail(fmt::format("invalid aio mode '{}'", arg));
        break;
      case kOptDiscard:
        if (arg == "ignore" || arg == "off") o.discard_unmap = false;
        else if (arg == "unmap" || arg == "on") o.discard_unmap = true;
        else return fail(fmt::format("invalid discard mode '{}'", arg));
        break;
      case kOptDetectZeroes:
        if (arg == "off") o.detect_zeroes = DetectZeroes::Off;
        else if (arg == "on") o.detect_zeroes = DetectZeroes::On;
        else if (arg == "unmap") o.detect_zeroes = DetectZeroes::Unmap;
        else return fail(fmt::format("invalid detect-zeroes mode '{}'", arg));
        break;
      case kOptMaxRequestSize: {
        auto n = parse_size(arg);
        if (!n || *n < 512 || *n > (1u << 30))
          return fail(fmt::format(
              "invalid --max-request-size '{}' (512 bytes to 1G)", arg));
        o.max_request_size = static_cast<uint32_t>(*n);
        break;
      }
      case kOptAllowDataFile: o.allow_data_file = true; break;
      case kOptImageDir: o.image_dirs.emplace_back(arg); break;
      case kOptL2CacheSize: {
        auto n = parse_size(arg);
        if (!n || *n < (1u << 20))
          return fail(fmt::format("invalid --l2-cache-size '{}' (at least 1M)", arg));
        o.l2_cache_bytes = *n;
        break;
      }
      case kOptHandshakeLimit: {
        auto n = parse_number(arg, 3600);
        if (!n) return fail(fmt::format("invalid --handshake-limit '{}'", arg));
        o.handshake_limit_seconds = static_cast<uint32_t>(*n);
        break;
      }
      case kOptAllow:
      case kOptDeny: {
        std::string error;
        auto rule = parse_access_rule(arg, c == kOptAllow, &error);
        if (!rule) return fail(error);
        o.access_rules.push_back(*rule);
        break;
      }
      case kOptSocketMode: {
        uint32_t mode = 0;
        auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), mode, 8);
        if (arg.empty() || ec != std::errc{} || end != arg.data() + arg.size() ||
            mode > 0777)
          return fail(fmt::format(
              "invalid --socket-mode '{}' (octal permissions, e.g. 0600)", arg));
        o.socket_mode = mode;
        break;
      }
      case kOptMaxHandshakes: {
        auto n = parse_number(arg, 1u << 20);
        if (!n || *n == 0)
          return fail(fmt::format("invalid --max-handshakes '{}' (at least 1)", arg));
        o.max_handshakes = static_cast<uint32_t>(*n);
        break;
      }
      case kOptIdleTimeout: {
        auto n = parse_number(arg, 30 * 86400);
        if (!n) return fail(fmt::format("invalid --idle-timeout '{}'", arg));
        o.idle_timeout_seconds = static_cast<uint32_t>(*n);
        break;
      }
      case kOptMaxInFlight: {
        auto n = parse_number(arg, 1u << 16);
        if (!n || *n == 0)
          return fail(fmt::format("invalid --max-in-flight '{}' (1 to 65536)", arg));
        o.max_in_flight = static_cast<uint32_t>(*n);
        break;
      }
      case kOptMaxBuffer: {
        auto n = parse_size(arg);
        if (!n || *n < (1u << 20) || *n > (16ull << 30))
          return fail(fmt::format("invalid --max-buffer '{}' (1M to 16G)", arg));
        o.max_buffer = *n;
        break;
      }
      case kOptThreads: {
        auto n = parse_number(arg, 1024);
        if (!n || *n == 0) return fail(fmt::format("invalid --threads '{}'", arg));
        o.threads = static_cast<uint32_t>(*n);
        break;
      }
      case 's': o.overlay = OverlayMode::Temp; break;
      case 'l':
        if (auto m = parse_snapshot_selector(arg, &o.load_snapshot); !m.empty())
          return fail(m);
        break;
      case 'A': o.allocation_depth = true; break;
      case kOptOverlay:
        if (!parse_overlay_mode(arg, &o.overlay))
          return fail(fmt::format("invalid --overlay '{}' (none, temp or per-client)", arg));
        break;
      case kOptCopyOnRead: o.copy_on_read = true; break;
      case kOptTempDir: o.temp_dir = std::string(arg); break;
      case kOptKeepOverlay: o.keep_overlay_dir = std::string(arg); break;
      case kOptQmp: o.qmp_sockets.emplace_back(arg); break;
      case kOptQmpListen: o.qmp_activated.emplace_back(arg); break;
      case kOptExport: {
        ExportSpec e;
        if (auto m = parse_export_spec(arg, &e); !m.empty()) return fail(m);
        o.exports.push_back(std::move(e));
        break;
      }
      case kOptConfig: o.config_file = std::string(arg); break;
      case kOptLog:
        if (arg == "error") o.log = LogLevel::Error;
        else if (arg == "info") o.log = LogLevel::Info;
        else return fail(fmt::format("invalid --log '{}' (error or info)", arg));
        break;
      case 'B':
        if (arg.empty()) return fail("-B/--bitmap needs a bitmap name");
        o.bitmaps.emplace_back(arg);
        break;
      case 'o': {
        auto n = parse_offset(arg);
        // qemu-nbd's words.
        if (!n) return fail(fmt::format("Invalid offset '{}'", arg));
        o.offset = *n;
        break;
      }
      // What layerd leaves to other tools, and which tool to use.
      case 'c':
        return fail("-c/--connect is not supported: layerd does not drive "
                    "the kernel's NBD devices itself. Serve FILE with layerd "
                    "and connect the device with nbd-client, e.g. 'layerd -k "
                    "SOCKET FILE' then 'nbd-client -unix SOCKET /dev/nbd0'");
      case 'd':
        return fail("-d/--disconnect is not supported: disconnect a kernel "
                    "NBD device with 'nbd-client -d /dev/nbd0'");
      case 'P':
        // Not an option of qemu-nbd 7.2 either (qemu-nbd: "invalid option
        // -- 'P'"); say what replaced it.
        return fail("-P/--partition is not supported (qemu-nbd dropped it "
                    "in 5.0): serve the partition with -o/--offset=START "
                    "(the export then reaches to the end of the image), or "
                    "find its start with 'sfdisk -d' or 'parted unit B print'");
      case kOptObject: {
        TlsArguments::Object object;
        if (auto m = parse_tls_object(arg, &object.id, &object.settings); !m.empty())
          return fail(m);
        for (const auto& other : tls.objects)
          if (other.id == object.id)
            return fail(fmt::format("--object: two objects have id '{}'", object.id));
        tls.objects.push_back(std::move(object));
        break;
      }
      case kOptTlsCreds:
        if (arg.empty()) return fail("--tls-creds needs a directory or an --object id");
        tls.creds = std::string(arg);
        break;
      case kOptTlsPsk:
        if (arg.empty()) return fail("--tls-psk needs a file");
        tls.psk_file = std::string(arg);
        break;
      case kOptTlsVerifyPeer: tls.verify_peer = true; break;
      case kOptTls:
        if (arg == "off") tls.mode = TlsMode::Off;
        else if (arg == "on") tls.mode = TlsMode::On;
        else if (arg == "require") tls.mode = TlsMode::Require;
        else return fail(fmt::format("invalid --tls '{}' (off, on or require)", arg));
        break;
      case kOptTlsAuthz:
        return fail("--tls-authz is not supported: layerd does not match "
                    "client names; --tls-verify-peer admits every client "
                    "whose certificate the CA in ca-cert.pem signed, and "
                    "with --tls-psk every user in the key file");
      case kOptTlsHostname:
        // qemu-nbd: it names the server certificate's host for -L.
        return fail("--tls-hostname is not supported (-L does not speak "
                    "TLS): to list the exports of a TLS server, use "
                    "'nbdinfo --list nbds://HOST/?tls-certificates=DIR'");
      case kOptImageOpts: o.image_opts = true; break;
      case kOptSelinuxLabel:
        return fail("--selinux-label is not supported: relabel the Unix "
                    "socket once layerd listens ('chcon -t TYPE SOCKET'), or "
                    "start layerd under 'runcon' with the context its "
                    "sockets should get");
      case '?':
      default:
        if (optopt && std::strchr(kShortOptions, optopt))
          return fail(fmt::format("option '-{}' requires an argument",
                                  static_cast<char>(optopt)));
        if (optopt) return fail(fmt::format("invalid option -- '{}'",
                                            static_cast<char>(optopt)));
        return fail(fmt::format("unrecognized option '{}'", argv[optind - 1]));
    }
  }

  if (auto m = resolve_tls(tls, &o); !m.empty()) return fail(m);
  if (o.list) {
    if (optind != argc) return fail("-L takes no FILE argument");
    if (!o.bind_given) o.bind_address = "localhost";
    return {o, "", 0};
  }
  if (o.format_given && o.format != "raw" && o.format != "qcow2")
    return fail(fmt::format("unknown format '{}' (supported: raw, qcow2)",
                            o.format));
  if (!o.config_file.empty()) {
    if (auto m = read_export_config(o.config_file, &o.exports); !m.empty())
      return fail(m);
  }
  if (!o.exports.empty()) {
    if (o.image_opts)
      return fail("--image-opts describes the FILE argument; it cannot be "
                  "combined with --export or --config");
    if (optind != argc)
      return fail(fmt::format("unexpected argument '{}': with --export or "
                              "--config, every image is named there",
                              argv[optind]));
  } else {
    if (optind == argc) return fail("missing FILE argument");
    if (optind + 1 != argc)
      return fail(fmt::format("unexpected argument '{}'", argv[optind + 1]));
    o.file = argv[optind];
    ExportSpec e;
    e.name = o.export_name;
    e.description = o.description;
    e.file = o.file;
    e.format = o.format;
    e.snapshot = o.load_snapshot;
    e.overlay = o.overlay;
    e.read_only = o.read_only;
    e.copy_on_read = o.copy_on_read;
    e.allocation_depth = o.allocation_depth;
    e.bitmaps = o.bitmaps;
    e.offset = o.offset;
    if (o.image_opts) {
      // qemu-nbd's words.
      if (o.format_given) return fail("--image-opts and -f are mutually exclusive");
      if (auto m = apply_image_opts(&o, &e); !m.empty()) return fail(m);
    }
    if (auto m = check_export(e); !m.empty()) {
      // Say it in the options the user typed.
      if (e.overlay == OverlayMode::PerClient && e.read_only)
        return fail("--overlay=per-client cannot be combined with -r");
      if (e.copy_on_read)
        return fail(e.snapshot.empty()
                        ? "--copy-on-read cannot be used with -r: it writes "
                          "into the top image (add -s to copy into a "
                          "throwaway overlay)"
                        : "--copy-on-read with -l needs -s: an internal "
                          "snapshot is read-only, so the copies go into a "
                          "throwaway overlay");
      return fail(m);
    }
    o.exports.push_back(std::move(e));
  }
  {
    std::set<std::string> names;
    for (const auto& e : o.exports)
      if (!names.insert(e.name).second)
        return fail(fmt::format("two exports are named '{}'", e.name));
  }
  if (o.force_share)
    for (const auto& e : o.exports)
      if (!e.read_only && e.snapshot.empty() && e.overlay == OverlayMode::None)
        return fail("-U/--force-share can only be used with -r/--read-only");
  if (!o.socket_path.empty() && (o.port_given || o.bind_given))
    return fail("-k cannot be combined with -p or -b");
  if (o.socket_mode && o.socket_path.empty())
    return fail("--socket-mode needs -k: it sets the permissions of the Unix socket");
  if (!o.access_rules.empty() && !o.socket_path.empty())
    return fail("--allow and --deny apply to TCP clients; with -k, use the "
                "socket's permissions (--socket-mode) instead");
  if (!o.bind_given) o.bind_address = "0.0.0.0";
  return {o, "", 0};
}

}  // namespace layerd
