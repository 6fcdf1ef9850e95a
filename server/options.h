// The command line of layerd: qemu-nbd's server options with the same
// meaning, plus a few of layerd's own. Parsing is pure (no I/O) so it can be
// tested on argument vectors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "overlay/image_registry.h"
#include "server/access_list.h"
#include "server/tls_settings.h"

namespace layerd {

enum class CacheMode { None, Writeback, Writethrough, DirectSync, Unsafe };
enum class DetectZeroes { Off, On, Unmap };
// Writes go to the image (None), to one throwaway overlay (Temp, -s), or
// to a throwaway overlay per client or session (PerClient).
enum class OverlayMode { None, Temp, PerClient };
enum class LogLevel { Error, Info };

// One export (the FILE argument with -x, -r, -s, -l, ..., or one
// --export / config file entry).
struct ExportSpec {
  std::string name;
  std::string description;
  std::string file;
  std::string format;  // empty: look at the image
  SnapshotSelector snapshot;
  OverlayMode overlay = OverlayMode::None;
  bool read_only = false;
  bool copy_on_read = false;
  bool allocation_depth = false;
  // -B: persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME, each
  // found in the first image of the chain that has it.
  std::vector<std::string> bitmaps;
  // -o: the export starts this many bytes into the image (qemu-nbd's raw
  // driver with an offset, over the image's format).
  uint64_t offset = 0;
  // --image-opts: the raw driver's size= (the window is this long, else it
  // reaches to the end), driver=compress (every write compressed, see
  // overlay/compress_layer.h) and backing= (the top image alone).
  std::optional<uint64_t> length;
  bool compress = false;
  bool no_backing = false;
  bool from_config = false;  // read from --config (SIGHUP reads it again)
  bool operator==(const ExportSpec&) const = default;
};

struct ServerOptions {
  // Where to listen. With none of socket/port/bind given, TCP 0.0.0.0:10809.
  std::string socket_path;          // -k
  std::string bind_address;         // -b (default 0.0.0.0)
  uint16_t port = 10809;            // -p
  bool port_given = false;
  bool bind_given = false;

  std::string export_name;          // -x
  std::string description;          // -D
  bool read_only = false;           // -r
  bool force_share = false;         // -U (only with -r)
  bool persistent = false;          // -t
  uint32_t max_connections = 1;     // -e; 0 = unlimited
  std::string format;               // -f; empty: look at the image
  bool format_given = false;
  std::string pid_file;             // --pid-file
  bool fork = false;                // --fork
  bool verbose = false;             // -v (prints what qemu-nbd -v prints)
  LogLevel log = LogLevel::Error;   // --log: connection logs with info
  CacheMode cache = CacheMode::Writeback;
  bool discard_unmap = false;       // --discard=unmap
  DetectZeroes detect_zeroes = DetectZeroes::Off;

  bool allow_data_file = false;     // --allow-data-file
  // --image-dir DIR (repeatable): where backing and data file names, and
  // file names sent over QMP, may lead, besides each exported image's own
  // directory; "/" follows names anywhere (overlay/image_dirs.h).
  std::vector<std::string> image_dirs;
  uint64_t l2_cache_bytes = 128ull << 20;  // --l2-cache-size, per image

  uint32_t max_request_size = 32u << 20;
  uint32_t handshake_limit_seconds = 10;
  // Network limits (docs/security.md).
  std::vector<AccessRule> access_rules;  // --allow, --deny in order
  std::optional<uint32_t> socket_mode;   // --socket-mode; unset: by umask
  uint32_t max_handshakes = 256;         // --max-handshakes
  uint32_t idle_timeout_seconds = 0;     // --idle-timeout; 0 = none
  uint32_t max_in_flight = 128;          // --max-in-flight, per connection
  uint64_t max_buffer = 64ull << 20;     // --max-buffer, per connection
  uint32_t threads = 0;             // --threads; 0: default_worker_threads()

  // The FILE argument's export (turned into exports[0]).
  OverlayMode overlay = OverlayMode::None;  // -s, --overlay
  SnapshotSelector load_snapshot;   // -l
  bool allocation_depth = false;    // -A
  std::vector<std::string> bitmaps;  // -B (repeatable)
  uint64_t offset = 0;              // -o
  bool image_opts = false;          // --image-opts: FILE is an option string
  bool copy_on_read = false;        // --copy-on-read
  std::string config_file;          // --config

  std::string temp_dir;             // --temp-dir; empty: default_temp_dir()
  std::string keep_overlay_dir;     // --keep-overlay
  std::vector<std::string> qmp_sockets;  // --qmp PATH (repeatable)
  // --qmp-listen NAME (repeatable): the socket-activated sockets of that
  // name (LISTEN_FDNAMES) are QMP control sockets, not NBD ones.
  std::vector<std::string> qmp_activated;

  // TLS: --tls-creds DIR (or the ID of an --object), --tls-psk FILE,
  // --tls-verify-peer, --tls=off|on|require. With credentials and no --tls,
  // TLS is required, as qemu-nbd requires it with --tls-creds.
  TlsSettings tls;

  bool list = false;                // -L: client mode
  std::string file;                 // the FILE argument (absent with -L)
  // Every export: the FILE argument's (with -x, -D, -r, -s, -l, -A,
  // --overlay, --copy-on-read), or those of --export and --config.
  std::vector<ExportSpec> exports;
};

// Parses "KEY=VALUE,..." of --export (the keys of ExportSpec: name, file,
// format, snapshot, overlay, read-only, copy-on-read, allocation-depth,
// bitmap (repeatable), offset, description). An error message naming the
// key on failure, else "".
std::string parse_export_spec(std::string_view text, ExportSpec* out);

// Reads a config file of [export] sections with "key = value" lines (the
// same keys); '#' starts a comment. Appends to `out`; an error naming the
// file, line and key on failure, else "".
std::string read_export_config(const std::string& path,
                               std::vector<ExportSpec>* out);

// Parses qemu's "--object tls-creds-x509,id=ID,endpoint=server,dir=DIR
// [,verify-peer=on|off][,priority=P]" or "tls-creds-psk,id=ID,
// endpoint=server,dir=DIR[,priority=P]" (qemu's PSK directory holds
// keys.psk; qemu verifies X.509 peers unless verify-peer=off). `id` gets
// the object's id. An error message naming the key on failure, else "".
std::string parse_tls_object(std::string_view text, std::string* id,
                             TlsSettings* out);

// Parses -l's argument.
std::string parse_snapshot_selector(std::string_view text, SnapshotSelector* out);

// Outcome of parsing: either options to run with, or something to print and
// an exit status (--help, --version, errors).
struct ParseResult {
  std::optional<ServerOptions> options;
  std::string message;  // for stdout (help/version) or stderr (errors)
  int exit_status = 0;
};

ParseResult parse_command_line(int argc, char** argv);

// Worker threads when --threads is not given: two per core, at least four.
// Requests served from the page cache gain nothing from more threads than
// cores (each extra one only adds wake-ups); slow storage wants more
// requests in flight, which --threads gives.
uint32_t default_worker_threads();

std::string usage_text();

}  // namespace layerd
