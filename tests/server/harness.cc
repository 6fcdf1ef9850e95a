#include "tests/server/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "nbd/protocol.h"

namespace layerd::test {

namespace nbdp = layerd::nbd;
using Clock = std::chrono::steady_clock;

// --- The binary under test ---------------------------------------------------

std::string server_binary() {
  const char* bin = std::getenv("LAYERD_BIN");
  return bin ? bin : "";
}

bool server_is_qemu_nbd() {
  return fs::path(server_binary()).filename() == "qemu-nbd";
}

// --- Watchdog ----------------------------------------------------------------

namespace {

// Every test gets kTestTimeLimit seconds; a hung test is killed with a
// message instead of stalling the suite. Servers die with the test process
// (PR_SET_PDEATHSIG).
constexpr unsigned kTestTimeLimit = 45;

void on_alarm(int) {
  static const char msg[] = "\n*** e2e watchdog: test exceeded its time limit, aborting\n";
  ssize_t ignored = ::write(2, msg, sizeof msg - 1);
  (void)ignored;
  ::signal(SIGALRM, SIG_DFL);
  ::raise(SIGALRM);
}

class Watchdog : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override {
    ::signal(SIGALRM, on_alarm);
    ::alarm(kTestTimeLimit);
  }
  void OnTestEnd(const ::testing::TestInfo&) override { ::alarm(0); }
};

const bool watchdog_installed = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new Watchdog);
  return true;
}();

}  // namespace

// --- Files -------------------------------------------------------------------

TempDir::TempDir() {
  char templ[] = "/tmp/layerd-e2e-XXXXXX";
  if (mkdtemp(templ) == nullptr) {
    ADD_FAILURE() << "mkdtemp: " << std::strerror(errno);
    return;
  }
  path_ = templ;
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ec;
  // A test may have made something unreadable; removal runs as the owner.
  fs::remove_all(path_, ec);
}

Tmpfs::Tmpfs(const fs::path& dir, const std::string& size) : dir_(dir) {
  fs::create_directories(dir);
  ok_ = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, ("size=" + size).c_str()) == 0;
  if (!ok_) error_ = std::strerror(errno);
}

Tmpfs::~Tmpfs() {
  if (ok_) ::umount2(dir_.c_str(), MNT_DETACH);
}

uint8_t pattern_byte(uint64_t offset, uint32_t seed) {
  // splitmix64 of the 8-byte word index, one byte per position.
  uint64_t z = (offset >> 3) + (uint64_t{seed} << 48) + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<uint8_t>(z >> ((offset & 7) * 8));
}

std::vector<uint8_t> pattern(uint64_t offset, size_t length, uint32_t seed) {
  std::vector<uint8_t> v(length);
  for (size_t i = 0; i < length; ++i) v[i] = pattern_byte(offset + i, seed);
  return v;
}

namespace {

void write_all_fd(int fd, const uint8_t* p, size_t n, uint64_t offset) {
  while (n > 0) {
    ssize_t r = pwrite(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      ADD_FAILURE() << "pwrite: " << std::strerror(errno);
      return;
    }
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

void fill_pattern(int fd, uint64_t offset, uint64_t length, uint32_t seed) {
  constexpr uint64_t kChunk = 1 << 20;
  for (uint64_t done = 0; done < length; done += kChunk) {
    uint64_t n = std::min(kChunk, length - done);
    auto buf = pattern(offset + done, n, seed);
    write_all_fd(fd, buf.data(), buf.size(), offset + done);
  }
}

}  // namespace

void create_pattern_image(const fs::path& file, uint64_t size, uint32_t seed) {
  create_sparse_image(file, size, {{0, size}}, seed);
}

void create_sparse_image(const fs::path& file, uint64_t size,
                         const std::vector<Range>& data, uint32_t seed) {
  int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    ADD_FAILURE() << "open " << file << ": " << std::strerror(errno);
    return;
  }
  if (ftruncate(fd, static_cast<off_t>(size)) != 0)
    ADD_FAILURE() << "ftruncate: " << std::strerror(errno);
  for (const auto& r : data) fill_pattern(fd, r.offset, r.length, seed);
  ::close(fd);
}

std::vector<uint8_t> read_file_range(const fs::path& file, uint64_t offset,
                                     size_t length) {
  std::vector<uint8_t> v(length);
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    ADD_FAILURE() << "open " << file << ": " << std::strerror(errno);
    return {};
  }
  size_t done = 0;
  while (done < length) {
    ssize_t r = pread(fd, v.data() + done, length - done,
                      static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ADD_FAILURE() << "pread " << file << " at " << offset + done << ": "
                    << (r == 0 ? "EOF" : std::strerror(errno));
      v.resize(done);
      break;
    }
    done += static_cast<size_t>(r);
  }
  ::close(fd);
  return v;
}

void write_file_range(const fs::path& file, uint64_t offset,
                      std::span<const uint8_t> data) {
  int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    ADD_FAILURE() << "open " << file << ": " << std::strerror(errno);
    return;
  }
  write_all_fd(fd, data.data(), data.size(), offset);
  ::close(fd);
}

uint64_t allocated_bytes(const fs::path& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

std::string read_text_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int64_t first_difference(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

bool all_zero(std::span<const uint8_t> data) {
  for (uint8_t b : data)
    if (b != 0) return false;
  return true;
}

// --- Child processes ---------------------------------------------------------

std::string RunResult::describe() const {
  std::ostringstream os;
  if (timed_out)
    os << "timed out";
  else
    os << "exit " << exit_code;
  os << "\n--- stdout ---\n" << out << "\n--- stderr ---\n" << err;
  return os.str();
}

namespace {

std::vector<char*> c_argv(std::vector<std::string>& args) {
  std::vector<char*> v;
  for (auto& a : args) v.push_back(a.data());
  v.push_back(nullptr);
  return v;
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// In a forked child before exec. A test run from a background shell job
// inherits SIGINT ignored, and ignored signals survive exec: give the child
// default dispositions and an empty mask.
void reset_child_signals() {
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT, SIGALRM}) ::signal(sig, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
}

void drain_fd(int fd, std::string& into) {
  char buf[4096];
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r > 0) {
      into.append(buf, static_cast<size_t>(r));
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    return;  // EOF, EAGAIN or error
  }
}

}  // namespace

RunResult run(const std::vector<std::string>& argv, Millis timeout) {
  RunResult res;
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    res.err = std::string("pipe: ") + std::strerror(errno);
    return res;
  }
  std::vector<std::string> args = argv;
  auto cargv = c_argv(args);
  pid_t pid = fork();
  if (pid < 0) {
    res.err = std::string("fork: ") + std::strerror(errno);
    return res;
  }
  if (pid == 0) {
    reset_child_signals();
    int devnull = ::open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    execvp(cargv[0], cargv.data());
    std::fprintf(stderr, "exec %s: %s\n", cargv[0], std::strerror(errno));
    _exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  fcntl(out_pipe[0], F_SETFL, O_NONBLOCK);
  fcntl(err_pipe[0], F_SETFL, O_NONBLOCK);

  const auto deadline = Clock::now() + timeout;
  int status = 0;
  bool exited = false;
  while (!exited) {
    pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
    ::poll(fds, 2, 20);
    drain_fd(out_pipe[0], res.out);
    drain_fd(err_pipe[0], res.err);
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) {
      exited = true;
      break;
    }
    if (Clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      res.timed_out = true;
      break;
    }
  }
  // Output still in the pipes once the process is gone. A daemon it forked
  // may hold the write ends; do not wait for EOF.
  drain_fd(out_pipe[0], res.out);
  drain_fd(err_pipe[0], res.err);
  ::close(out_pipe[0]);
  ::close(err_pipe[0]);
  res.exit_code = res.timed_out ? -1 : (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return res;
}

InteractiveProcess::InteractiveProcess(const std::vector<std::string>& argv) {
  int in_pipe[2];
  if (pipe2(in_pipe, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return;
  }
  std::vector<std::string> args = argv;
  auto cargv = c_argv(args);
  pid_ = fork();
  if (pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    reset_child_signals();
    int devnull = ::open("/dev/null", O_WRONLY);
    dup2(in_pipe[0], 0);
    dup2(devnull, 1);
    dup2(devnull, 2);
    execvp(cargv[0], cargv.data());
    _exit(127);
  }
  ::close(in_pipe[0]);
  if (pid_ < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    ::close(in_pipe[1]);
    return;
  }
  stdin_fd_ = in_pipe[1];
}

InteractiveProcess::~InteractiveProcess() {
  if (stdin_fd_ >= 0) ::close(stdin_fd_);
  if (pid_ <= 0) return;
  if (!wait_until([this] { return !running(); }, 5s)) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

bool InteractiveProcess::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) pid_ = -1;
  return pid_ > 0;
}

bool image_lock_byte_held(const fs::path& file, int byte) {
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  bool held = ::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
  ::close(fd);
  return held;
}

RunResult run_server_binary(const std::vector<std::string>& args, Millis timeout) {
  std::vector<std::string> argv{server_binary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, timeout);
}

bool unix_socket_listening(const fs::path& path) {
  std::ifstream in("/proc/net/unix");
  std::string line;
  std::getline(in, line);  // header
  const std::string want = path.string();
  while (std::getline(in, line)) {
    // Num RefCount Protocol Flags Type St Inode Path
    std::istringstream ls(line);
    std::string num, ref, proto, flags, type, st, inode, p;
    if (!(ls >> num >> ref >> proto >> flags >> type >> st >> inode >> p)) continue;
    // layerd binds "PATH.PID~" and renames it to PATH once it listens;
    // the kernel keeps the name it was bound with.
    const bool renamed_into_place =
        p.size() > want.size() + 2 && p.compare(0, want.size(), want) == 0 &&
        p[want.size()] == '.' && p.back() == '~' &&
        p.find_first_not_of("0123456789", want.size() + 1) == p.size() - 1;
    if (p != want && !renamed_into_place) continue;
    // Listening under the temporary name is not enough: until the rename,
    // a client connecting to PATH gets ENOENT.
    std::error_code ec;
    if (renamed_into_place && !fs::is_socket(path, ec)) continue;
    unsigned long f = std::strtoul(flags.c_str(), nullptr, 16);
    if (f & 0x10000) return true;  // __SO_ACCEPTCON: listening
  }
  return false;
}

bool tcp_port_listening(uint16_t port) {
  for (const char* file : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(file);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string sl, local, remote, st;
      if (!(ls >> sl >> local >> remote >> st)) continue;
      auto colon = local.rfind(':');
      if (colon == std::string::npos) continue;
      unsigned long p = std::strtoul(local.c_str() + colon + 1, nullptr, 16);
      if (p == port && st == "0A") return true;  // TCP_LISTEN
    }
  }
  return false;
}

uint16_t pick_free_port(const std::string& address) {
  bool v6 = address.find(':') != std::string::npos;
  int fd = ::socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_storage ss{};
  socklen_t len;
  if (v6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    inet_pton(AF_INET6, address.c_str(), &a->sin6_addr);
    len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    inet_pton(AF_INET, address.c_str(), &a->sin_addr);
    len = sizeof *a;
  }
  uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
    port = ntohs(v6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                    : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  }
  ::close(fd);
  return port;
}

bool ipv6_loopback_available() { return pick_free_port("::1") != 0; }

bool wait_until(const std::function<bool()>& condition, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
}

// --- The server process ------------------------------------------------------

Server::~Server() {
  if (pid_ > 0 && !exit_code_) {
    ::kill(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
  }
}

bool Server::start(ServerOptions options) {
  const std::string bin = options.binary.empty() ? server_binary() : options.binary;
  if (bin.empty()) {
    error_ = "LAYERD_BIN is not set";
    return false;
  }
  log_file_ = options.log_file;
  std::vector<std::string> args{bin};
  args.insert(args.end(), options.args.begin(), options.args.end());
  auto cargv = c_argv(args);
  int log_fd = ::open(log_file_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    error_ = "open log " + log_file_.string() + ": " + std::strerror(errno);
    return false;
  }
  pid_ = fork();
  if (pid_ < 0) {
    error_ = std::string("fork: ") + std::strerror(errno);
    ::close(log_fd);
    return false;
  }
  if (pid_ == 0) {
    // If the test process dies (crash, watchdog), the server dies with it.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    reset_child_signals();
    int devnull = ::open("/dev/null", O_RDONLY);
    dup2(devnull, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    for (const auto& e : options.env) putenv(const_cast<char*>(e.c_str()));
    if (options.activation_fd >= 0) {
      if (options.activation_fd == 3) {
        int flags = fcntl(3, F_GETFD);
        fcntl(3, F_SETFD, flags & ~FD_CLOEXEC);
      } else {
        dup2(options.activation_fd, 3);  // dup2 clears FD_CLOEXEC
      }
      setenv("LISTEN_FDS", "1", 1);
      setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1);
    }
    if (!options.activation_fds.empty()) {
      // Out of the way first, so that moving one into place clobbers none.
      const size_t n = std::min<size_t>(options.activation_fds.size(), 16);
      int high[16];
      for (size_t i = 0; i < n; ++i) high[i] = fcntl(options.activation_fds[i], F_DUPFD_CLOEXEC, 100);
      for (size_t i = 0; i < n; ++i) dup2(high[i], 3 + static_cast<int>(i));
      setenv("LISTEN_FDS", std::to_string(n).c_str(), 1);
      setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1);
    }
    execvp(cargv[0], cargv.data());
    std::fprintf(stderr, "exec %s: %s\n", cargv[0], std::strerror(errno));
    _exit(127);
  }
  ::close(log_fd);

  std::function<bool()> listening;
  if (options.unix_socket) {
    fs::path p = *options.unix_socket;
    listening = [p] { return unix_socket_listening(p); };
  } else if (options.tcp_port) {
    uint16_t port = *options.tcp_port;
    listening = [port] { return tcp_port_listening(port); };
  } else {
    return true;
  }
  const auto deadline = Clock::now() + options.ready_timeout;
  for (;;) {
    if (listening()) return true;
    if (!running()) {
      error_ = "server exited with code " + std::to_string(*exit_code_) +
               " before listening; its output:\n" + log();
      return false;
    }
    if (Clock::now() > deadline) {
      error_ = "server did not listen within " +
               std::to_string(options.ready_timeout.count()) +
               " ms; its output:\n" + log();
      return false;
    }
    std::this_thread::sleep_for(10ms);
  }
}

bool Server::running() {
  if (pid_ <= 0 || exit_code_) return false;
  int status;
  pid_t w = waitpid(pid_, &status, WNOHANG);
  if (w == pid_) {
    exit_code_ = decode_status(status);
    return false;
  }
  return true;
}

void Server::signal(int signo) const {
  if (pid_ > 0 && !exit_code_) ::kill(pid_, signo);
}

std::optional<int> Server::wait_exit(Millis timeout) {
  if (pid_ <= 0) return std::nullopt;
  if (wait_until([this] { return !running(); }, timeout)) return exit_code_;
  return std::nullopt;
}

int Server::stop(Millis timeout) {
  if (pid_ <= 0) return -1;
  if (exit_code_) return *exit_code_;
  ::kill(pid_, SIGTERM);
  if (auto code = wait_exit(timeout)) return *code;
  ::kill(pid_, SIGKILL);
  wait_exit(5s);
  return -1;
}

std::string Server::log() const { return read_text_file(log_file_); }

PidGuard::~PidGuard() {
  if (pid_ <= 0 || !process_alive(pid_)) return;
  ::kill(pid_, SIGKILL);
  wait_until([this] { return !process_alive(pid_); }, 5s);
}

long proc_status_kib(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
  return -1;
}

bool runs_sanitized(pid_t pid) {
  const std::string maps = read_text_file("/proc/" + std::to_string(pid) + "/maps");
  return maps.find("libasan") != std::string::npos || maps.find("libtsan") != std::string::npos;
}

bool process_alive(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return false;
  auto paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return false;
  char state = line[paren + 2];
  return state != 'Z' && state != 'X';
}

// --- libnbd ------------------------------------------------------------------

std::string nbd_error_text() {
  const char* e = nbd_get_error();
  return std::string(e ? e : "(no libnbd error)") + " [errno " +
         std::to_string(nbd_get_errno()) + "]";
}

namespace {

// Connects without ever blocking longer than `timeout`: libnbd's blocking
// connect has no timeout and a server that never accepts would hang the test.
Nbd connect_bounded(const fs::path& socket, const Configure& configure,
                    Millis timeout, std::string* error) {
  Nbd h(nbd_create());
  if (!h) {
    *error = "nbd_create: " + nbd_error_text();
    return nullptr;
  }
  if (configure) configure(h.get());
  if (nbd_aio_connect_unix(h.get(), socket.c_str()) == -1) {
    *error = "nbd_aio_connect_unix: " + nbd_error_text();
    return nullptr;
  }
  const auto deadline = Clock::now() + timeout;
  while (nbd_aio_is_connecting(h.get()) ||
         (nbd_aio_is_negotiating(h.get()) && !nbd_get_opt_mode(h.get()))) {
    if (Clock::now() > deadline) {
      *error = "handshake did not finish within " + std::to_string(timeout.count()) +
               " ms (state " + nbd_connection_state(h.get()) + ")";
      return nullptr;
    }
    if (nbd_poll(h.get(), 100) == -1) {
      *error = "nbd_poll: " + nbd_error_text();
      return nullptr;
    }
  }
  if (!nbd_aio_is_ready(h.get()) &&
      !(nbd_get_opt_mode(h.get()) && nbd_aio_is_negotiating(h.get()))) {
    *error = std::string("connection failed: ") + nbd_error_text() + " (state " +
             nbd_connection_state(h.get()) + ")";
    return nullptr;
  }
  return h;
}

}  // namespace

Nbd nbd_try_connect_unix(const fs::path& socket, const Configure& configure,
                         Millis timeout) {
  std::string error;
  return connect_bounded(socket, configure, timeout, &error);
}

Nbd nbd_connect_to_unix(const fs::path& socket, const Configure& configure,
                        Millis timeout) {
  std::string error;
  Nbd h = connect_bounded(socket, configure, timeout, &error);
  if (!h) ADD_FAILURE() << "connecting to " << socket << ": " << error;
  return h;
}

namespace {

struct ExtentCollector {
  std::vector<Extent>* out;
  uint64_t offset;
  bool seen = false;
};

int collect_extents(void* user_data, const char* metacontext, uint64_t offset,
                    uint32_t* entries, size_t nr_entries, int* /*error*/) {
  auto* c = static_cast<ExtentCollector*>(user_data);
  if (std::strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  c->seen = true;
  uint64_t pos = offset;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    c->out->push_back({pos, entries[i], entries[i + 1]});
    pos += entries[i];
  }
  return 0;
}

}  // namespace

std::optional<std::vector<Extent>> block_status_map(nbd_handle* h,
                                                    uint64_t offset,
                                                    uint64_t length) {
  std::vector<Extent> raw;
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  for (int guard = 0; pos < end && guard < 100000; ++guard) {
    std::vector<Extent> got;
    ExtentCollector c{&got, pos};
    nbd_extent_callback cb{.callback = collect_extents, .user_data = &c, .free = nullptr};
    uint64_t count = std::min<uint64_t>(end - pos, 1u << 30);
    if (nbd_block_status(h, count, pos, cb, 0) == -1) {
      ADD_FAILURE() << "nbd_block_status at " << pos << ": " << nbd_error_text();
      return std::nullopt;
    }
    if (got.empty()) {
      ADD_FAILURE() << "block status at " << pos << " returned no extents";
      return std::nullopt;
    }
    if (got.front().offset != pos) {
      ADD_FAILURE() << "block status at " << pos << " started at " << got.front().offset;
      return std::nullopt;
    }
    for (const auto& e : got) {
      if (e.length == 0) {
        ADD_FAILURE() << "zero-length extent at " << e.offset;
        return std::nullopt;
      }
      raw.push_back(e);
    }
    pos = got.back().offset + got.back().length;
  }
  // Clip the last extent (a server may describe more than was asked) and merge.
  std::vector<Extent> merged;
  for (auto e : raw) {
    if (e.offset >= end) break;
    if (e.offset + e.length > end) e.length = end - e.offset;
    if (!merged.empty() && merged.back().flags == e.flags &&
        merged.back().offset + merged.back().length == e.offset) {
      merged.back().length += e.length;
    } else {
      merged.push_back(e);
    }
  }
  return merged;
}

std::string to_string(const std::vector<Extent>& extents) {
  std::ostringstream os;
  for (const auto& e : extents)
    os << "[" << e.offset << "+" << e.length << " flags=" << e.flags << "] ";
  return os.str();
}

// --- Raw protocol client -------------------------------------------------------

void append_be16(std::vector<uint8_t>& v, uint16_t x) {
  v.push_back(static_cast<uint8_t>(x >> 8));
  v.push_back(static_cast<uint8_t>(x));
}
void append_be32(std::vector<uint8_t>& v, uint32_t x) {
  append_be16(v, static_cast<uint16_t>(x >> 16));
  append_be16(v, static_cast<uint16_t>(x));
}
void append_be64(std::vector<uint8_t>& v, uint64_t x) {
  append_be32(v, static_cast<uint32_t>(x >> 32));
  append_be32(v, static_cast<uint32_t>(x));
}
uint16_t load_be16(const uint8_t* p) {
  return static_cast<uint16_t>((p[0] << 8) | p[1]);
}
uint32_t load_be32(const uint8_t* p) {
  return (uint32_t{load_be16(p)} << 16) | load_be16(p + 2);
}
uint64_t load_be64(const uint8_t* p) {
  return (uint64_t{load_be32(p)} << 32) | load_be32(p + 4);
}

RawClient::~RawClient() { close(); }

RawClient::RawClient(RawClient&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }

void RawClient::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool RawClient::connect_unix(const fs::path& path) {
  close();
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close();
    return false;
  }
  return true;
}

bool RawClient::send_bytes(std::span<const uint8_t> data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t r = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<size_t>(r);
  }
  return true;
}

bool RawClient::recv_bytes(std::span<uint8_t> out, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  size_t done = 0;
  while (done < out.size()) {
    auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    int pr = ::poll(&p, 1, static_cast<int>(left.count()));
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) return false;
    ssize_t r = ::recv(fd_, out.data() + done, out.size() - done, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<size_t>(r);
  }
  return true;
}

bool RawClient::wait_closed(Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  uint8_t buf[4096];
  for (;;) {
    auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    int pr = ::poll(&p, 1, static_cast<int>(left.count()));
    if (pr < 0 && errno == EINTR) continue;
    if (pr == 0) return false;
    if (pr < 0) return true;
    ssize_t r = ::recv(fd_, buf, sizeof buf, 0);
    if (r == 0) return true;
    if (r < 0 && errno != EINTR && errno != EAGAIN) return true;  // reset
  }
}

std::optional<RawClient::Greeting> RawClient::read_greeting() {
  uint8_t b[18];
  if (!recv_bytes(b)) return std::nullopt;
  return Greeting{load_be64(b), load_be64(b + 8), load_be16(b + 16)};
}

bool RawClient::send_client_flags(uint32_t flags) {
  std::vector<uint8_t> v;
  append_be32(v, flags);
  return send_bytes(v);
}

bool RawClient::send_option(uint32_t option, std::span<const uint8_t> payload) {
  std::vector<uint8_t> v;
  append_be64(v, nbdp::kIHaveOpt);
  append_be32(v, option);
  append_be32(v, static_cast<uint32_t>(payload.size()));
  v.insert(v.end(), payload.begin(), payload.end());
  return send_bytes(v);
}

std::optional<RawClient::OptionReply> RawClient::read_option_reply() {
  uint8_t b[20];
  if (!recv_bytes(b)) return std::nullopt;
  OptionReply r{load_be64(b), load_be32(b + 8), load_be32(b + 12), {}};
  uint32_t len = load_be32(b + 16);
  if (len > (1u << 20)) return std::nullopt;
  r.data.resize(len);
  if (len > 0 && !recv_bytes(r.data)) return std::nullopt;
  return r;
}

std::optional<RawClient::ExportData> RawClient::opt_go(std::string_view name) {
  std::vector<uint8_t> payload;
  append_be32(payload, static_cast<uint32_t>(name.size()));
  payload.insert(payload.end(), name.begin(), name.end());
  append_be16(payload, 0);  // no information requests
  if (!send_option(static_cast<uint32_t>(nbdp::Opt::Go), payload)) return std::nullopt;
  ExportData ed;
  bool have_export = false;
  for (int i = 0; i < 64; ++i) {
    auto r = read_option_reply();
    if (!r) return std::nullopt;
    if (r->type == static_cast<uint32_t>(nbdp::Rep::Ack)) {
      if (!have_export) return std::nullopt;
      return ed;
    }
    if (r->type & nbdp::kRepErrBit) return std::nullopt;
    if (r->type == static_cast<uint32_t>(nbdp::Rep::Info) && r->data.size() >= 12 &&
        load_be16(r->data.data()) == static_cast<uint16_t>(nbdp::Info::Export)) {
      ed.size = load_be64(r->data.data() + 2);
      ed.flags = load_be16(r->data.data() + 10);
      have_export = true;
    }
  }
  return std::nullopt;
}

std::optional<RawClient::ExportData> RawClient::handshake(std::string_view name,
                                                          bool structured) {
  auto g = read_greeting();
  if (!g) {
    ADD_FAILURE() << "no greeting from the server";
    return std::nullopt;
  }
  if (g->magic != nbdp::kNbdMagic || g->option_magic != nbdp::kIHaveOpt) {
    ADD_FAILURE() << "bad greeting magic";
    return std::nullopt;
  }
  if (!send_client_flags(nbdp::kClientFlagFixedNewstyle | nbdp::kClientFlagNoZeroes))
    return std::nullopt;
  if (structured) {
    if (!send_option(static_cast<uint32_t>(nbdp::Opt::StructuredReply), {})) return std::nullopt;
    auto r = read_option_reply();
    if (!r || r->type != static_cast<uint32_t>(nbdp::Rep::Ack)) {
      ADD_FAILURE() << "STRUCTURED_REPLY not acknowledged";
      return std::nullopt;
    }
  }
  auto e = opt_go(name);
  if (!e) ADD_FAILURE() << "NBD_OPT_GO failed";
  return e;
}

bool RawClient::send_request(uint16_t flags, uint16_t type, uint64_t cookie,
                             uint64_t offset, uint32_t length,
                             std::span<const uint8_t> payload) {
  std::vector<uint8_t> v;
  append_be32(v, nbdp::kRequestMagic);
  append_be16(v, flags);
  append_be16(v, type);
  append_be64(v, cookie);
  append_be64(v, offset);
  append_be32(v, length);
  v.insert(v.end(), payload.begin(), payload.end());
  return send_bytes(v);
}

std::optional<RawClient::SimpleReply> RawClient::read_simple_reply(Millis timeout) {
  uint8_t b[16];
  if (!recv_bytes(b, timeout)) return std::nullopt;
  return SimpleReply{load_be32(b), load_be32(b + 4), load_be64(b + 8)};
}

// --- Fixture -----------------------------------------------------------------

std::string ServerTest::uri(std::string_view export_name) const {
  return "nbd+unix:///" + std::string(export_name) + "?socket=" + socket_path().string();
}

void ServerTest::StartServer(std::vector<std::string> extra) {
  ASSERT_FALSE(server_binary().empty()) << "LAYERD_BIN is not set";
  if (!fs::exists(image_path())) create_pattern_image(image_path(), kImageSize, kSeed);
  ServerOptions o;
  o.args = std::move(extra);
  o.args.push_back("-k");
  o.args.push_back(socket_path().string());
  o.args.push_back(image_path().string());
  o.unix_socket = socket_path();
  o.log_file = dir_ / "server.log";
  ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
}

void ServerTest::StartDefaultServer(std::vector<std::string> extra) {
  std::vector<std::string> args{"-f", "raw", "-t", "-x", kExportName, "-D", kDescription};
  args.insert(args.end(), extra.begin(), extra.end());
  StartServer(std::move(args));
}

Nbd ServerTest::Connect(const Configure& configure) {
  return nbd_connect_to_unix(socket_path(), [&](nbd_handle* h) {
    nbd_set_export_name(h, kExportName);
    if (configure) configure(h);
  });
}

}  // namespace layerd::test
