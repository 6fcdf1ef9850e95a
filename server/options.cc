// getopt_long parsing of layerd's command line. Options qemu-nbd has but
// layerd does not (yet) support are recognized and refused by name, so a
// user gets "not supported" rather than "unknown option".
#include "server/options.h"

#include <getopt.h>

#include <algorithm>
#include <charconv>
#include <thread>
#include <cstring>

#include <fmt/format.h>

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
  kOptL2CacheSize,
  kOptObject,
  kOptTlsCreds,
  kOptTlsAuthz,
  kOptImageOpts,
  kOptSelinuxLabel,
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
    {"l2-cache-size", required_argument, nullptr, kOptL2CacheSize},
    {nullptr, 0, nullptr, 0},
};

constexpr const char* kShortOptions = "hVp:b:k:e:tvx:D:o:AB:LT:c:df:rUsl:n";

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

ParseResult fail(std::string message) {
  return ParseResult{std::nullopt,
                     fmt::format("layerd: {}\nTry 'layerd --help' for more "
                                 "information.\n",
                                 message),
                     1};
}

}  // namespace

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
  -v, --verbose             log connections and errors to stderr
  -x, --export-name=NAME    export name (default: the empty string)
  -D, --description=TEXT    human-readable description of the export
      --fork                run in the background once listening
      --pid-file=PATH       write the server's process ID to PATH
  -L, --list                list the exports of the NBD server at -k or -b/-p

Image options:
  -f, --format=FORMAT       image format: raw or qcow2 (without -f, the image
                            is checked for a qcow2 header; backing images
                            always use the format their overlay records)
  -r, --read-only           export read-only
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

Socket activation: started by systemd with LISTEN_FDS set, layerd serves on
the passed sockets (then -p, -b and -k must not be given).
)";
}

ParseResult parse_command_line(int argc, char** argv) {
  ServerOptions o;
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
      case kOptThreads: {
        auto n = parse_number(arg, 1024);
        if (!n || *n == 0) return fail(fmt::format("invalid --threads '{}'", arg));
        o.threads = static_cast<uint32_t>(*n);
        break;
      }
      case 's':
        return fail("-s/--snapshot is not supported yet");
      case 'l':
        return fail("-l/--load-snapshot is not supported yet");
      case 'A':
        return fail("-A/--allocation-depth is not supported yet");
      case 'B':
        return fail("-B/--bitmap is not supported");
      case 'o':
        return fail("-o/--offset is not supported");
      case 'c':
      case 'd':
        return fail("kernel NBD client options (-c, -d) are not supported: "
                    "use nbd-client");
      case kOptObject:
      case kOptTlsCreds:
      case kOptTlsAuthz:
        return fail("TLS and --object are not supported yet");
      case kOptImageOpts:
        return fail("--image-opts is not supported");
      case kOptSelinuxLabel:
        return fail("--selinux-label is not supported");
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

  if (o.list) {
    if (optind != argc) return fail("-L takes no FILE argument");
    if (!o.bind_given) o.bind_address = "localhost";
    return {o, "", 0};
  }
  if (optind == argc) return fail("missing FILE argument");
  if (optind + 1 != argc)
    return fail(fmt::format("unexpected argument '{}'", argv[optind + 1]));
  o.file = argv[optind];
  if (o.format_given && o.format != "raw" && o.format != "qcow2")
    return fail(fmt::format("unknown format '{}' (supported: raw, qcow2)",
                            o.format));
  if (o.force_share && !o.read_only)
    return fail("-U/--force-share can only be used with -r/--read-only");
  if (!o.socket_path.empty() && (o.port_given || o.bind_given))
    return fail("-k cannot be combined with -p or -b");
  if (!o.bind_given) o.bind_address = "0.0.0.0";
  return {o, "", 0};
}

}  // namespace layerd
