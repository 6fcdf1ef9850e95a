// End-to-end test harness for the layerd binary.
//
// Every test gets its own temporary directory, makes its images there,
// starts the binary named by $LAYERD_BIN as a child process (normally on a
// Unix socket inside that directory), talks to it with libnbd, a raw socket
// or qemu's and libnbd's command-line tools, and stops it. Nothing outlives
// the test: the Server destructor kills a server that is still running and
// TempDir removes its directory.
//
// The binary's command line is a drop-in for qemu-nbd's server side, so the
// suite also runs with LAYERD_BIN=/usr/bin/qemu-nbd; tests that pin down
// layerd-only behaviour call SKIP_UNLESS_LAYERD().
//
// Not thread safe unless stated: one test thread drives a Server.
#pragma once

#include <libnbd.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

namespace layerd::test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Millis = std::chrono::milliseconds;

// --- The binary under test ---------------------------------------------------

// $LAYERD_BIN, or "" if it is not set.
std::string server_binary();
// True when $LAYERD_BIN is qemu-nbd standing in for layerd.
bool server_is_qemu_nbd();

#define SKIP_UNLESS_LAYERD()                                             \
  do {                                                                   \
    if (::layerd::test::server_is_qemu_nbd())                            \
      GTEST_SKIP() << "layerd-only behaviour (LAYERD_BIN is qemu-nbd)";  \
  } while (0)

// --- Files -------------------------------------------------------------------

// A fresh directory under /tmp (short, so Unix socket paths fit), removed
// with everything in it by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const fs::path& path() const { return path_; }
  fs::path operator/(std::string_view name) const { return path_ / name; }

 private:
  fs::path path_;
};

// A tmpfs of `size` (mount's "size=" value) mounted at `dir`, made if
// missing, for the scope; ok() false if the mount failed (not root, no
// tmpfs), with the reason in error(). Tests of full disks use it.
class Tmpfs {
 public:
  Tmpfs(const fs::path& dir, const std::string& size);
  ~Tmpfs();
  Tmpfs(const Tmpfs&) = delete;
  Tmpfs& operator=(const Tmpfs&) = delete;
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }

 private:
  fs::path dir_;
  bool ok_ = false;
  std::string error_;
};

// Deterministic, position-dependent bytes: byte i of an image made with
// `seed` is pattern_byte(i, seed), so data read from the wrong offset or
// written by the wrong client is noticed.
uint8_t pattern_byte(uint64_t offset, uint32_t seed);
std::vector<uint8_t> pattern(uint64_t offset, size_t length, uint32_t seed);

// A fully allocated raw image of `size` bytes filled with pattern(seed).
void create_pattern_image(const fs::path& file, uint64_t size, uint32_t seed);

struct Range {
  uint64_t offset;
  uint64_t length;
};

// A sparse raw image of `size` bytes: only `data` ranges are allocated and
// filled with pattern(seed); the rest are holes. Ranges should be 64 KiB
// aligned so that every file system keeps the holes.
void create_sparse_image(const fs::path& file, uint64_t size,
                         const std::vector<Range>& data, uint32_t seed);

std::vector<uint8_t> read_file_range(const fs::path& file, uint64_t offset,
                                     size_t length);
void write_file_range(const fs::path& file, uint64_t offset,
                      std::span<const uint8_t> data);
// Bytes actually allocated on disk (st_blocks * 512).
uint64_t allocated_bytes(const fs::path& file);
std::string read_text_file(const fs::path& file);

// Index of the first differing byte, or -1. For readable EXPECTs on buffers.
int64_t first_difference(std::span<const uint8_t> a, std::span<const uint8_t> b);
bool all_zero(std::span<const uint8_t> data);

// --- Child processes ---------------------------------------------------------

struct RunResult {
  int exit_code = -1;  // -1: killed by a signal or timed out
  bool timed_out = false;
  std::string out;
  std::string err;
  // "exit N; stdout: ...; stderr: ..." for failure messages.
  std::string describe() const;
};

// Runs argv[0] (searched in PATH) with stdin from /dev/null, capturing
// stdout and stderr, killing it after `timeout`. Returns once the process
// has exited (output written by daemons it leaves behind is not waited for).
RunResult run(const std::vector<std::string>& argv, Millis timeout = 30s);

// Runs the binary under test with `args`.
RunResult run_server_binary(const std::vector<std::string>& args,
                            Millis timeout = 10s);

// True if a Unix socket bound to `path` (or to the temporary name layerd
// binds, once renamed to `path`) is listening (from /proc/net/unix; does not
// connect, so it does not count as a client).
bool unix_socket_listening(const fs::path& path);
// True if something listens on TCP `port` (IPv4 or IPv6, /proc/net/tcp*).
bool tcp_port_listening(uint16_t port);
// A TCP port that was free a moment ago on `address` ("127.0.0.1", "::1").
uint16_t pick_free_port(const std::string& address);
// True if ::1 can be bound here.
bool ipv6_loopback_available();

// Polls `condition` every 10 ms until it holds or `timeout` passes.
bool wait_until(const std::function<bool()>& condition, Millis timeout);

// A child process whose stdin is a pipe this object keeps open, for
// interactive tools that must stay up (qemu-io holding an image open).
// Its output goes to /dev/null. The destructor closes the pipe (end of
// input ends such tools), waits up to 5 s, then kills the child.
class InteractiveProcess {
 public:
  explicit InteractiveProcess(const std::vector<std::string>& argv);
  ~InteractiveProcess();
  InteractiveProcess(const InteractiveProcess&) = delete;
  InteractiveProcess& operator=(const InteractiveProcess&) = delete;

  bool running();  // reaps the child if it has exited

 private:
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
};

// True if an open file description other than a fresh one of ours holds a
// lock on byte `byte` of `file`. QEMU's image locks: byte 100 + n for
// permission n taken, 200 + n for permission n not shared (n: 0 consistent
// read, 1 write, 2 write unchanged, 3 resize).
bool image_lock_byte_held(const fs::path& file, int byte);

// --- The server process ------------------------------------------------------

struct ServerOptions {
  // The program to start; empty means $LAYERD_BIN.
  std::string binary;
  // Arguments after the binary, including FILE (the caller decides order).
  std::vector<std::string> args;
  // What to wait for before the server counts as ready. If neither is set
  // (and no activation fd is given), start() does not wait.
  std::optional<fs::path> unix_socket;
  std::optional<uint16_t> tcp_port;
  // If >= 0: a listening socket handed to the child as fd 3 with
  // LISTEN_FDS=1 and LISTEN_PID=<child pid> (systemd socket activation).
  int activation_fd = -1;
  // Several listening sockets, handed over as fds 3, 4, ... with
  // LISTEN_FDS set to their number (instead of activation_fd).
  std::vector<int> activation_fds;
  // Extra environment variables "NAME=value" for the child.
  std::vector<std::string> env;
  // Where the child's stderr (and stdout) go; by default <dir>/server.log.
  fs::path log_file;
  Millis ready_timeout = 10s;
};

class Server {
 public:
  Server() = default;
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Forks and execs options.binary ($LAYERD_BIN by default), then waits (bounded) until it listens.
  // Returns false, with the reason in error(), if it could not be started,
  // exited, or did not listen in time.
  bool start(ServerOptions options);
  const std::string& error() const { return error_; }

  pid_t pid() const { return pid_; }
  bool running();  // reaps the child if it has exited
  void signal(int signo) const;

  // Waits for the child to exit. Returns its exit code (128 + signal if it
  // was killed by a signal), or nullopt if it still runs after `timeout`.
  std::optional<int> wait_exit(Millis timeout);

  // SIGTERM, then waits up to `timeout`; SIGKILLs if it does not exit.
  // Returns the exit code as wait_exit() does; -1 if it had to be killed.
  int stop(Millis timeout = 10s);

  // Everything the server wrote to stdout and stderr so far.
  std::string log() const;

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  fs::path log_file_;
  std::string error_;
};

// A field of /proc/PID/status in KiB ("VmRSS", "VmHWM"), or -1.
long proc_status_kib(pid_t pid, const std::string& field);
// True if `pid` runs with ASan's or TSan's runtime (their quarantine keeps
// freed memory, so its memory figures say nothing about layerd's bounds).
bool runs_sanitized(pid_t pid);

// Kills a daemon that is not our child (started with --fork) at scope exit.
class PidGuard {
 public:
  explicit PidGuard(pid_t pid = -1) : pid_(pid) {}
  ~PidGuard();
  void reset(pid_t pid) { pid_ = pid; }
  pid_t get() const { return pid_; }

 private:
  pid_t pid_;
};
// True if `pid` exists and is not a zombie.
bool process_alive(pid_t pid);

// --- libnbd ------------------------------------------------------------------

struct NbdCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Nbd = std::unique_ptr<nbd_handle, NbdCloser>;

// nbd_get_error() with errno, for failure messages.
std::string nbd_error_text();

// A new handle; `configure` runs before connecting (set export name, meta
// contexts, structured replies, strict mode, ...). Returns null and adds a
// test failure if creating or connecting fails.
using Configure = std::function<void(nbd_handle*)>;
// The handshake must finish within `timeout`.
Nbd nbd_connect_to_unix(const fs::path& socket, const Configure& configure = {},
                        Millis timeout = 10s);
// Same, but returns null without a test failure (for expected failures).
Nbd nbd_try_connect_unix(const fs::path& socket, const Configure& configure = {},
                         Millis timeout = 10s);

// Block status of [offset, offset+length) for base:allocation, collected by
// repeated calls until the range is covered; adjacent extents with equal
// flags are merged. Returns nullopt and adds a failure on error.
struct Extent {
  uint64_t offset;
  uint64_t length;
  uint32_t flags;
  bool operator==(const Extent&) const = default;
};
std::optional<std::vector<Extent>> block_status_map(nbd_handle* h,
                                                    uint64_t offset,
                                                    uint64_t length);
std::string to_string(const std::vector<Extent>& extents);

// --- Raw protocol client -------------------------------------------------------

// A plain socket for hand-crafted protocol bytes. Every receive is bounded
// by a timeout; a test never hangs on a silent server.
class RawClient {
 public:
  RawClient() = default;
  ~RawClient();
  RawClient(RawClient&& other) noexcept;
  RawClient& operator=(RawClient&&) = delete;
  RawClient(const RawClient&) = delete;

  bool connect_unix(const fs::path& path);
  int fd() const { return fd_; }
  void close();

  bool send_bytes(std::span<const uint8_t> data);
  // Receives exactly `length` bytes; false on EOF, error or timeout.
  bool recv_bytes(std::span<uint8_t> out, Millis timeout = 5s);
  // True if the server closes the connection (EOF or reset) within
  // `timeout`; any bytes it sends meanwhile are discarded.
  bool wait_closed(Millis timeout);

  // --- Handshake pieces ---
  struct Greeting {
    uint64_t magic = 0;
    uint64_t option_magic = 0;
    uint16_t flags = 0;
  };
  std::optional<Greeting> read_greeting();
  bool send_client_flags(uint32_t flags);
  bool send_option(uint32_t option, std::span<const uint8_t> payload);
  struct OptionReply {
    uint64_t magic = 0;
    uint32_t option = 0;
    uint32_t type = 0;
    std::vector<uint8_t> data;
  };
  std::optional<OptionReply> read_option_reply();

  struct ExportData {
    uint64_t size = 0;
    uint16_t flags = 0;
  };
  // NBD_OPT_GO for `name` after the greeting and client flags; reads
  // replies up to the final ACK. Returns nullopt on an error reply.
  std::optional<ExportData> opt_go(std::string_view name);
  // Greeting, client flags (fixed newstyle, no zeroes), optionally
  // STRUCTURED_REPLY, then GO. Returns nullopt (and adds a failure) on error.
  std::optional<ExportData> handshake(std::string_view name = "",
                                      bool structured = false);

  // --- Transmission ---
  bool send_request(uint16_t flags, uint16_t type, uint64_t cookie,
                    uint64_t offset, uint32_t length,
                    std::span<const uint8_t> payload = {});
  struct SimpleReply {
    uint32_t magic = 0;
    uint32_t error = 0;
    uint64_t cookie = 0;
  };
  std::optional<SimpleReply> read_simple_reply(Millis timeout = 5s);

 private:
  int fd_ = -1;
};

// Big-endian helpers for building payloads.
void append_be16(std::vector<uint8_t>& v, uint16_t x);
void append_be32(std::vector<uint8_t>& v, uint32_t x);
void append_be64(std::vector<uint8_t>& v, uint64_t x);
uint16_t load_be16(const uint8_t* p);
uint32_t load_be32(const uint8_t* p);
uint64_t load_be64(const uint8_t* p);

// --- Fixture -----------------------------------------------------------------

// Base fixture: a temp dir, an image path and a server on <dir>/nbd.sock.
class ServerTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kImageSize = 4 << 20;  // 4 MiB
  static constexpr uint32_t kSeed = 1;
  static constexpr const char* kExportName = "disk";
  static constexpr const char* kDescription = "test disk";

  fs::path socket_path() const { return dir_ / "nbd.sock"; }
  fs::path image_path() const { return dir_ / "disk.raw"; }
  // nbd+unix:///<export>?socket=<socket_path>
  std::string uri(std::string_view export_name = "") const;

  // Makes image_path() a pattern image of kImageSize unless it exists, and
  // starts the server as: [extra...] -k socket_path() image_path().
  // Use with ASSERT_NO_FATAL_FAILURE.
  void StartServer(std::vector<std::string> extra);
  // The common case: -f raw -t -x disk -D "test disk" plus `extra`.
  void StartDefaultServer(std::vector<std::string> extra = {});

  // libnbd connection to socket_path(), export kExportName unless configure
  // says otherwise; fails the test on error.
  Nbd Connect(const Configure& configure = {});

  TempDir dir_;
  Server server_;
};

}  // namespace layerd::test
