// The server process: where it listens, when it exits, how it reacts to
// signals, --fork and --pid-file, the client limit, and the command line.

#include <libnbd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

using Clock = std::chrono::steady_clock;

class Lifecycle : public ServerTest {
 protected:
  ServerOptions BaseOptions(std::vector<std::string> args) {
    if (!fs::exists(image_path())) create_pattern_image(image_path(), kImageSize, kSeed);
    ServerOptions o;
    o.args = std::move(args);
    o.args.push_back(image_path().string());
    o.log_file = dir_ / "server.log";
    return o;
  }
  void ExpectReadWorks(nbd_handle* h) {
    std::vector<uint8_t> buf(65536);
    ASSERT_EQ(nbd_pread(h, buf.data(), buf.size(), 65536, 0), 0) << nbd_error_text();
    EXPECT_EQ(first_difference(buf, pattern(65536, buf.size(), kSeed)), -1);
  }
};

// --- Where it listens ------------------------------------------------------------

TEST_F(Lifecycle, ServesOnAUnixSocket) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
}

void ServeOnTcp(Server& server, const fs::path& image, const fs::path& log,
                const std::string& address) {
  const uint16_t port = pick_free_port(address);
  ASSERT_NE(port, 0);
  ServerOptions o;
  o.args = {"-f", "raw", "-b", address, "-p", std::to_string(port), image.string()};
  o.tcp_port = port;
  o.log_file = log;
  ASSERT_TRUE(server.start(std::move(o))) << server.error();
  Nbd h(nbd_create());
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_connect_tcp(h.get(), address.c_str(), std::to_string(port).c_str()), 0)
      << nbd_error_text();
  std::vector<uint8_t> buf(65536);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), 1)), -1);
  auto data = pattern(0, 4096, 5);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 8192, 0), 0) << nbd_error_text();
}

TEST_F(Lifecycle, ServesOnTcpLoopbackIpv4) {
  create_pattern_image(image_path(), kImageSize, kSeed);
  ASSERT_NO_FATAL_FAILURE(ServeOnTcp(server_, image_path(), dir_ / "server.log", "127.0.0.1"));
}

TEST_F(Lifecycle, ServesOnTcpLoopbackIpv6) {
  if (!ipv6_loopback_available()) GTEST_SKIP() << "no ::1 here";
  create_pattern_image(image_path(), kImageSize, kSeed);
  ASSERT_NO_FATAL_FAILURE(ServeOnTcp(server_, image_path(), dir_ / "server.log", "::1"));
}

TEST_F(Lifecycle, ServesOnTheIpv6AnyAddress) {
  if (!ipv6_loopback_available()) GTEST_SKIP() << "no ::1 here";
  create_pattern_image(image_path(), kImageSize, kSeed);
  const uint16_t port = pick_free_port("::");
  ASSERT_NE(port, 0);
  ServerOptions o;
  o.args = {"-f", "raw", "-b", "::", "-p", std::to_string(port), image_path().string()};
  o.tcp_port = port;
  o.log_file = dir_ / "server.log";
  ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  Nbd h(nbd_create());
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_connect_tcp(h.get(), "::1", std::to_string(port).c_str()), 0) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Lifecycle, AStaleSocketFileIsReplaced) {
  {
    // Bound but never listened on, then closed: what a crashed server leaves.
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket_path().c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ::close(fd);
  }
  ASSERT_TRUE(fs::is_socket(socket_path()));
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
}

// What qemu-iotests' nbd_server_stop and start do: kill the server, delete
// its socket and start the next one at once. The first one, exiting later,
// must not delete the second one's socket.
TEST_F(Lifecycle, ExitLeavesASocketFileItDidNotCreate) {
  SKIP_UNLESS_LAYERD();  // qemu-nbd 7.2 unlinks the path whatever it is
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  ASSERT_TRUE(fs::remove(socket_path()));
  Server second;
  ServerOptions o = BaseOptions({"-f", "raw", "-t", "-k", socket_path().string()});
  o.unix_socket = socket_path();
  o.log_file = dir_ / "second.log";
  ASSERT_TRUE(second.start(std::move(o))) << second.error();
  // (/proc/net/unix still lists the first socket under that path.)
  ASSERT_TRUE(wait_until([&] { return fs::is_socket(socket_path()); }, 10s));
  EXPECT_EQ(server_.stop(), 0);
  ASSERT_TRUE(fs::is_socket(socket_path())) << "the second server's socket was removed";
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
  h.reset();
  EXPECT_EQ(second.stop(), 0);
  EXPECT_FALSE(fs::exists(socket_path())) << "a server removes its own socket";
}

// qemu-iotests' nbd-reconnect-on-open: once the last client of a server
// without -t has left, the next client must find no socket (ENOENT), not
// one that is no longer listened on (ECONNREFUSED).
TEST_F(Lifecycle, WithoutPersistentTheSocketGoesBeforeTheListenerCloses) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw"}));
  {
    Nbd h = nbd_connect_to_unix(socket_path());
    ASSERT_TRUE(h);
    ExpectReadWorks(h.get());
  }
  int refused = 0;
  const auto deadline = Clock::now() + 10s;
  while (fs::exists(socket_path()) && Clock::now() < deadline) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket_path().c_str(), sizeof addr.sun_path - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 &&
        errno == ECONNREFUSED)
      ++refused;
    ::close(fd);
  }
  EXPECT_FALSE(fs::exists(socket_path()));
  EXPECT_EQ(refused, 0) << "connections refused while the socket file was still there";
  EXPECT_EQ(server_.wait_exit(10s), 0);
}

int listening_unix_socket(const fs::path& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

TEST_F(Lifecycle, ServesOnASocketActivatedFd) {
  const fs::path sock = dir_ / "activated.sock";
  int fd = listening_unix_socket(sock);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  ServerOptions o = BaseOptions({"-f", "raw"});
  o.activation_fd = fd;
  const bool started = server_.start(std::move(o));
  ::close(fd);  // the server has its own copy now
  ASSERT_TRUE(started) << server_.error();
  Nbd h = nbd_connect_to_unix(sock);
  ASSERT_TRUE(h) << server_.log();
  ExpectReadWorks(h.get());
  h.reset();
  EXPECT_EQ(server_.wait_exit(5s), 0) << "without -t it exits after the client; log:\n"
                                      << server_.log();
}

TEST_F(Lifecycle, SocketActivationWithSocketOptionFails) {
  const fs::path sock = dir_ / "activated.sock";
  int fd = listening_unix_socket(sock);
  ASSERT_GE(fd, 0);
  ServerOptions o = BaseOptions({"-f", "raw", "-k", socket_path().string()});
  o.activation_fd = fd;
  const bool started = server_.start(std::move(o));
  ::close(fd);
  ASSERT_TRUE(started) << server_.error();
  EXPECT_EQ(server_.wait_exit(5s), 1) << "log:\n" << server_.log();
  EXPECT_FALSE(server_.log().empty()) << "no error message";
}

// Reads from `fd` until `text` has arrived (or 5 s passed); what was read.
std::string read_until(int fd, const std::string& text) {
  std::string got;
  char buf[4096];
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (got.find(text) == std::string::npos && std::chrono::steady_clock::now() < deadline) {
    ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) got.append(buf, static_cast<size_t>(n));
    else if (n == 0) break;
    else std::this_thread::sleep_for(10ms);
  }
  return got;
}

// --qmp-listen: of the sockets systemd passes, the one named (by
// FileDescriptorName=, in LISTEN_FDNAMES) speaks QMP, the others NBD.
TEST_F(Lifecycle, QmpListenTakesTheActivatedSocketOfThatName) {
  if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd's control socket";
  const fs::path nbd_sock = dir_ / "nbd.sock", qmp_sock = dir_ / "qmp.sock";
  int nbd_fd = listening_unix_socket(nbd_sock), qmp_fd = listening_unix_socket(qmp_sock);
  ASSERT_TRUE(nbd_fd >= 0 && qmp_fd >= 0) << std::strerror(errno);
  ServerOptions o = BaseOptions({"-f", "raw", "-t", "--qmp-listen", "control"});
  o.activation_fds = {qmp_fd, nbd_fd};
  o.env = {"LISTEN_FDNAMES=control:nbd"};
  o.unix_socket = nbd_sock;
  const bool started = server_.start(std::move(o));
  ::close(nbd_fd);
  ::close(qmp_fd);
  ASSERT_TRUE(started) << server_.error();
  Nbd h = nbd_connect_to_unix(nbd_sock);
  ASSERT_TRUE(h) << server_.log();
  ExpectReadWorks(h.get());
  int c = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, qmp_sock.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(::connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  EXPECT_NE(read_until(c, "\n").find("\"QMP\""), std::string::npos);
  const std::string cmds =
      "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-block-exports\"}\n";
  ASSERT_EQ(::send(c, cmds.data(), cmds.size(), MSG_NOSIGNAL), static_cast<ssize_t>(cmds.size()));
  EXPECT_NE(read_until(c, "node-name").find("\"node-name\""), std::string::npos);
  ::close(c);
}

TEST_F(Lifecycle, QmpListenWithoutSuchASocketFails) {
  if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd's control socket";
  RunResult r = run_server_binary(BaseOptions({"-f", "raw", "--qmp-listen", "control"}).args);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("none was passed"), std::string::npos) << r.err;
  const fs::path sock = dir_ / "nbd.sock";
  int fd = listening_unix_socket(sock);
  ASSERT_GE(fd, 0);
  ServerOptions o = BaseOptions({"-f", "raw", "--qmp-listen", "control"});
  o.activation_fd = fd;
  o.env = {"LISTEN_FDNAMES=nbd"};
  const bool started = server_.start(std::move(o));
  ::close(fd);
  ASSERT_TRUE(started) << server_.error();
  EXPECT_EQ(server_.wait_exit(5s), 1);
  EXPECT_NE(server_.log().find("no socket of that name was passed (LISTEN_FDNAMES: nbd)"),
            std::string::npos) << server_.log();
}

// --- When it exits -----------------------------------------------------------------

TEST_F(Lifecycle, ExitsWithZeroAfterTheLastClientLeavesWithoutPersistent) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
  EXPECT_TRUE(server_.running());
  nbd_shutdown(h.get(), 0);
  h.reset();
  EXPECT_EQ(server_.wait_exit(5s), 0) << "log:\n" << server_.log();
}

TEST_F(Lifecycle, WithoutPersistentItExitsOnlyWhenAllClientsHaveLeft) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-e", "2"}));
  Nbd a = nbd_connect_to_unix(socket_path());
  Nbd b = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(a && b);
  nbd_shutdown(a.get(), 0);
  a.reset();
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(server_.running()) << "exited while a client was still connected";
  ExpectReadWorks(b.get());
  nbd_shutdown(b.get(), 0);
  b.reset();
  EXPECT_EQ(server_.wait_exit(5s), 0) << "log:\n" << server_.log();
}

TEST_F(Lifecycle, KeepsServingAfterClientsLeaveWithPersistent) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  for (int i = 0; i < 3; ++i) {
    Nbd h = nbd_connect_to_unix(socket_path());
    ASSERT_TRUE(h) << "connection " << i;
    ExpectReadWorks(h.get());
    nbd_shutdown(h.get(), 0);
    h.reset();
    std::this_thread::sleep_for(200ms);
    ASSERT_TRUE(server_.running()) << "exited after client " << i;
  }
  EXPECT_EQ(server_.stop(), 0);
}

struct WriteOp {
  uint64_t offset;
  std::vector<uint8_t> data;
  int error = -1;  // -1: never completed
};

int write_done(void* user_data, int* error) {
  static_cast<WriteOp*>(user_data)->error = *error;
  return 1;
}

TEST_F(Lifecycle, SigtermWithWritesInFlightExitsZeroAndKeepsAcknowledgedData) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  constexpr size_t kBlock = 64 << 10;
  std::vector<WriteOp> ops;
  for (uint64_t i = 0; i < 48; ++i) ops.push_back({i * kBlock, pattern(i * kBlock, kBlock, 21)});
  // The first 8 are acknowledged before the signal.
  for (size_t i = 0; i < 8; ++i)
    ASSERT_EQ(nbd_pwrite(h.get(), ops[i].data.data(), kBlock, ops[i].offset, 0), 0) << nbd_error_text();
  for (size_t i = 0; i < 8; ++i) ops[i].error = 0;
  // Then 40 more and a flush in flight when SIGTERM arrives.
  for (size_t i = 8; i < ops.size(); ++i) {
    nbd_completion_callback cb{.callback = write_done, .user_data = &ops[i], .free = nullptr};
    ASSERT_NE(nbd_aio_pwrite(h.get(), ops[i].data.data(), kBlock, ops[i].offset, cb, 0), -1);
  }
  int flush_error = -1;
  nbd_completion_callback fcb{
      .callback = [](void* ud, int* e) { *static_cast<int*>(ud) = *e; return 1; },
      .user_data = &flush_error, .free = nullptr};
  ASSERT_NE(nbd_aio_flush(h.get(), fcb, 0), -1);
  server_.signal(SIGTERM);
  const auto deadline = Clock::now() + 10s;
  while (nbd_aio_in_flight(h.get()) > 0 && !nbd_aio_is_dead(h.get()) &&
         !nbd_aio_is_closed(h.get()) && Clock::now() < deadline) {
    if (nbd_poll(h.get(), 100) == -1) break;  // the server closed the connection
  }
  auto code = server_.wait_exit(10s);
  ASSERT_TRUE(code) << "server did not exit within 10 s of SIGTERM";
  EXPECT_EQ(*code, 0) << "log:\n" << server_.log();
  size_t acknowledged = 0;
  for (const auto& op : ops) {
    if (op.error != 0) continue;
    ++acknowledged;
    EXPECT_EQ(first_difference(read_file_range(image_path(), op.offset, kBlock), op.data), -1)
        << "acknowledged write at " << op.offset << " is not in the file";
  }
  EXPECT_GE(acknowledged, 8u);
  if (flush_error == 0) {
    // A successful flush was sent after all writes; any write the server
    // answered before it answered the flush is covered, and the server
    // must have answered all of them (requests of one connection that are
    // already in flight are finished before exit).
    for (const auto& op : ops)
      EXPECT_EQ(op.error, 0) << "write at " << op.offset << " lost though the flush after it succeeded";
  }
}

TEST_F(Lifecycle, SigtermWithAnIdleClientConnectedExitsZero) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
  EXPECT_EQ(server_.stop(10s), 0) << "log:\n" << server_.log();
}

TEST_F(Lifecycle, SigtermWithAClientStuckInTheHandshakeExitsPromptly) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());  // and then say nothing
  const auto t0 = Clock::now();
  server_.signal(SIGTERM);
  auto code = server_.wait_exit(5s);
  ASSERT_TRUE(code) << "server still running 5 s after SIGTERM with a client in the handshake";
  EXPECT_EQ(*code, 0) << "log:\n" << server_.log();
  EXPECT_LT(Clock::now() - t0, 3s);
}

TEST_F(Lifecycle, SigtermWithAClientWaitingForASlotExitsPromptly) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t", "-e", "1"}));
  Nbd first = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(first);
  RawClient waiting;  // sits in the listen backlog
  ASSERT_TRUE(waiting.connect_unix(socket_path()));
  server_.signal(SIGTERM);
  auto code = server_.wait_exit(5s);
  ASSERT_TRUE(code) << "server still running 5 s after SIGTERM";
  EXPECT_EQ(*code, 0) << "log:\n" << server_.log();
}

TEST_F(Lifecycle, SigintExitsZero) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  // Served one request first: the server is past its start-up.
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  ExpectReadWorks(h.get());
  server_.signal(SIGINT);
  EXPECT_EQ(server_.wait_exit(10s), 0) << "log:\n" << server_.log();
}

TEST_F(Lifecycle, DataWrittenBeforeSigtermIsInTheFile) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  auto data = pattern(0, 1 << 20, 31);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 1 << 20, 0), 0) << nbd_error_text();
  EXPECT_EQ(server_.stop(10s), 0);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 1 << 20, data.size()), data), -1);
}

// --- --fork and --pid-file -----------------------------------------------------------

TEST_F(Lifecycle, ForkReturnsOnceListeningAndPidFileNamesTheServer) {
  create_pattern_image(image_path(), kImageSize, kSeed);
  const fs::path pid_file = dir_ / "server.pid";
  RunResult r = run_server_binary({"-f", "raw", "-t", "--fork", "--pid-file", pid_file.string(),
                                   "-k", socket_path().string(), image_path().string()},
                                  10s);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  // Right when the parent exits the socket must accept connections.
  EXPECT_TRUE(unix_socket_listening(socket_path())) << "not listening when --fork returned";
  ASSERT_TRUE(wait_until([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; }, 2s))
      << "no pid file";
  const pid_t pid = std::atoi(read_text_file(pid_file).c_str());
  PidGuard guard(pid);
  ASSERT_GT(pid, 1);
  EXPECT_TRUE(process_alive(pid));
  {
    Nbd h = nbd_connect_to_unix(socket_path());
    ASSERT_TRUE(h);
    ExpectReadWorks(h.get());
  }
  ASSERT_TRUE(process_alive(pid)) << "-t server exited after the client left";
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  EXPECT_TRUE(wait_until([&] { return !process_alive(pid); }, 10s)) << "daemon ignored SIGTERM";
}

TEST_F(Lifecycle, ForkWithAMissingImageExitsOneInTheParent) {
  const fs::path pid_file = dir_ / "server.pid";
  RunResult r = run_server_binary({"-f", "raw", "-t", "--fork", "--pid-file", pid_file.string(),
                                   "-k", socket_path().string(), (dir_ / "missing.raw").string()},
                                  10s);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty()) << "the error must reach the caller's stderr";
  EXPECT_FALSE(unix_socket_listening(socket_path()));
  if (fs::exists(pid_file) && fs::file_size(pid_file) > 0) {
    PidGuard guard(std::atoi(read_text_file(pid_file).c_str()));
    EXPECT_FALSE(process_alive(guard.get())) << "a daemon was left running";
  }
}

TEST_F(Lifecycle, PidFileHoldsTheServerPid) {
  const fs::path pid_file = dir_ / "server.pid";
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t", "--pid-file", pid_file.string()}));
  ASSERT_TRUE(wait_until([&] { return fs::exists(pid_file) && fs::file_size(pid_file) > 0; }, 2s));
  EXPECT_EQ(std::atoi(read_text_file(pid_file).c_str()), server_.pid());
}

// --- Client limit (-e) ---------------------------------------------------------------

TEST_F(Lifecycle, SecondClientWaitsUntilTheFirstLeavesWithSharedOne) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t", "-e", "1"}));
  Nbd first = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(first);
  Nbd second(nbd_create());
  ASSERT_TRUE(second);
  ASSERT_EQ(nbd_aio_connect_unix(second.get(), socket_path().c_str()), 0) << nbd_error_text();
  const auto waited_until = Clock::now() + 1s;
  while (Clock::now() < waited_until && !nbd_aio_is_ready(second.get()) &&
         !nbd_aio_is_dead(second.get()))
    nbd_poll(second.get(), 50);
  EXPECT_FALSE(nbd_aio_is_ready(second.get())) << "second client served while the first is connected";
  ASSERT_FALSE(nbd_aio_is_dead(second.get())) << "second client was refused instead of waiting: "
                                              << nbd_error_text();
  ExpectReadWorks(first.get());  // the first one is not disturbed
  nbd_shutdown(first.get(), 0);
  first.reset();
  const auto deadline = Clock::now() + 5s;
  while (Clock::now() < deadline && !nbd_aio_is_ready(second.get()) &&
         !nbd_aio_is_dead(second.get()))
    nbd_poll(second.get(), 50);
  ASSERT_TRUE(nbd_aio_is_ready(second.get()))
      << "second client not served after the first left: " << nbd_connection_state(second.get());
  ExpectReadWorks(second.get());
}

TEST_F(Lifecycle, SharedTwoServesTwoClientsAtOnce) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t", "-e", "2"}));
  Nbd a = nbd_connect_to_unix(socket_path());
  Nbd b = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(a && b);
  ExpectReadWorks(a.get());
  ExpectReadWorks(b.get());
}

TEST_F(Lifecycle, LongOptionsAreAccepted) {
  create_pattern_image(image_path(), kImageSize, kSeed);
  ServerOptions o;
  o.args = {"--format=raw", "--persistent", "--read-only", "--shared=0",
            "--export-name=long", "--description=long options",
            "--socket=" + socket_path().string(), image_path().string()};
  o.unix_socket = socket_path();
  o.log_file = dir_ / "server.log";
  ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  Nbd h = nbd_connect_to_unix(socket_path(), [](nbd_handle* hh) {
    nbd_set_export_name(hh, "long");
    nbd_set_full_info(hh, true);
  });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_is_read_only(h.get()), 1);
  EXPECT_EQ(nbd_can_multi_conn(h.get()), 1);
  char* desc = nbd_get_export_description(h.get());
  ASSERT_NE(desc, nullptr) << nbd_error_text();
  EXPECT_STREQ(desc, "long options");
  free(desc);
  ExpectReadWorks(h.get());
  h.reset();
  std::this_thread::sleep_for(200ms);
  EXPECT_TRUE(server_.running()) << "--persistent server exited";
}

// --- Command line ----------------------------------------------------------------------

class Cli : public ServerTest {
 protected:
  void SetUp() override { create_pattern_image(image_path(), kImageSize, kSeed); }
  // Runs the binary with `args` + -k socket + image, expecting a quick exit.
  RunResult RunWithImage(std::vector<std::string> args, Millis timeout = 10s) {
    if (std::find(args.begin(), args.end(), "-f") == args.end()) {
      args.push_back("-f");
      args.push_back("raw");
    }
    args.push_back("-k");
    args.push_back(socket_path().string());
    args.push_back(image_path().string());
    return run_server_binary(args, timeout);
  }
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

TEST_F(Cli, HelpPrintsUsageOnStdoutAndExitsZero) {
  RunResult r = run_server_binary({"--help"});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(lower(r.out).find("usage"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("--socket"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("--shared"), std::string::npos) << r.describe();
}

TEST_F(Cli, VersionExitsZero) {
  for (const char* flag : {"--version", "-V"}) {
    RunResult r = run_server_binary({flag});
    EXPECT_EQ(r.exit_code, 0) << flag << ": " << r.describe();
    EXPECT_FALSE(r.out.empty()) << flag;
    if (!server_is_qemu_nbd()) {
      EXPECT_NE(r.out.find("layerd"), std::string::npos) << flag << ": " << r.out;
    }
  }
}

TEST_F(Cli, UnknownFlagFailsWithAMessage) {
  RunResult r = RunWithImage({"--no-such-flag"});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty());
}

TEST_F(Cli, MissingFileArgumentFails) {
  RunResult r = run_server_binary({"-k", socket_path().string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty());
}

TEST_F(Cli, NonexistentFileFailsNamingTheFile) {
  const std::string missing = (dir_ / "missing.raw").string();
  RunResult r = run_server_binary({"-f", "raw", "-k", socket_path().string(), missing});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("missing.raw"), std::string::npos) << r.describe();
}

TEST_F(Cli, UnreadableFileFails) {
  // Running as root, permissions cannot make a file unreadable; a directory
  // cannot be opened as an image either.
  const fs::path d = dir_ / "a-directory";
  fs::create_directory(d);
  RunResult r = run_server_binary({"-f", "raw", "-k", socket_path().string(), d.string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty());
  if (geteuid() != 0) {
    const fs::path f = dir_ / "unreadable.raw";
    create_pattern_image(f, 65536, 1);
    fs::permissions(f, fs::perms::none);
    RunResult r2 = run_server_binary({"-f", "raw", "-k", socket_path().string(), f.string()});
    EXPECT_EQ(r2.exit_code, 1) << r2.describe();
  }
}

TEST_F(Cli, Qcow2FormatFailsWithAClearMessage) {
  RunResult r = RunWithImage({"-f", "qcow2"});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(lower(r.err).find("qcow2"), std::string::npos) << r.describe();
}

TEST_F(Cli, UnknownFormatFails) {
  RunResult r = RunWithImage({"-f", "no-such-format"});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty());
}

TEST_F(Cli, InvalidOptionValuesFail) {
  for (std::vector<std::string> bad :
       {std::vector<std::string>{"--cache=bogus"}, {"--discard=bogus"}, {"--detect-zeroes=bogus"},
        {"--aio=bogus"}, {"-e", "abc"}, {"-e", "-1"}}) {
    // A server that wrongly accepts the value would serve forever: 3 s is
    // plenty for a command-line error.
    RunResult r = RunWithImage(bad, 3s);
    EXPECT_EQ(r.exit_code, 1) << bad[0] << (bad.size() > 1 ? " " + bad[1] : "") << ": "
                              << r.describe();
  }
}

TEST_F(Cli, InvalidPortFails) {
  for (const char* port : {"notaport", "70000"}) {
    RunResult r = run_server_binary({"-f", "raw", "-b", "127.0.0.1", "-p", port,
                                     image_path().string()}, 3s);
    EXPECT_EQ(r.exit_code, 1) << "-p " << port << ": " << r.describe();
  }
}

// qemu-nbd 7.2 options layerd leaves to other tools: refused by name, with
// what to use instead (`hint` must be in the message).
struct Unsupported {
  std::vector<std::string> args;
  std::string hint;
};

void PrintTo(const Unsupported& u, std::ostream* os) {
  for (const auto& arg : u.args) *os << arg << " ";
}

class UnsupportedOption : public Cli, public ::testing::WithParamInterface<Unsupported> {};

TEST_P(UnsupportedOption, FailsWithNotSupportedAndSaysWhatToUse) {
  SKIP_UNLESS_LAYERD();
  RunResult r = RunWithImage(GetParam().args);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("not supported"), std::string::npos) << r.describe();
  EXPECT_NE(r.err.find(GetParam().hint), std::string::npos) << r.describe();
  EXPECT_FALSE(unix_socket_listening(socket_path()));
}

INSTANTIATE_TEST_SUITE_P(
    Options, UnsupportedOption,
    ::testing::Values(
        Unsupported{{"-c", "/dev/nbd0"}, "nbd-client -unix SOCKET /dev/nbd0"},
        Unsupported{{"--connect=/dev/nbd0"}, "nbd-client"},
        Unsupported{{"-d"}, "nbd-client -d /dev/nbd0"},
        Unsupported{{"--disconnect"}, "nbd-client -d"},
        // Gone from qemu-nbd 7.2 too ("invalid option -- 'P'").
        Unsupported{{"-P", "1"}, "-o/--offset=START"},
        Unsupported{{"--partition=1"}, "-o/--offset=START"},
        Unsupported{{"--object", "secret,id=s0,data=x"}, "tls-creds-x509"},
        Unsupported{{"--tls-authz=authz0"}, "--tls-verify-peer"},
        Unsupported{{"--tls-hostname=example.com"}, "nbdinfo --list nbds://"},
        Unsupported{{"--selinux-label=system_u:object_r:svirt_t:s0"}, "chcon"}),
    [](const ::testing::TestParamInfo<Unsupported>& p) {
      std::string name;
      for (char ch : p.param.args[0])
        if (std::isalnum(static_cast<unsigned char>(ch))) name += ch;
      return name + "_" + std::to_string(p.index);
    });

struct Accepted {
  std::vector<std::string> args;
  bool layerd_only = false;
};

void PrintTo(const Accepted& a, std::ostream* os) {
  for (const auto& arg : a.args) *os << arg << " ";
}

class AcceptedOption : public Lifecycle, public ::testing::WithParamInterface<Accepted> {};

TEST_P(AcceptedOption, ServesReadsAndWrites) {
  if (GetParam().layerd_only) SKIP_UNLESS_LAYERD();
  std::vector<std::string> args{"-f", "raw", "-t"};
  args.insert(args.end(), GetParam().args.begin(), GetParam().args.end());
  ASSERT_NO_FATAL_FAILURE(StartServer(args));
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h) << server_.log();
  auto data = pattern(4096, 65536, 44);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 4096, 0), 0) << nbd_error_text();
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), 4096, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(back, data), -1);
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  h.reset();
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 4096, data.size()), data), -1);
}

INSTANTIATE_TEST_SUITE_P(
    Options, AcceptedOption,
    ::testing::Values(Accepted{{"--cache=writeback"}}, Accepted{{"--cache=writethrough"}},
                      Accepted{{"--cache=none"}}, Accepted{{"--cache=directsync"}},
                      Accepted{{"--cache=unsafe"}}, Accepted{{"-n"}},
                      Accepted{{"--aio=threads"}}, Accepted{{"--aio=native", "--cache=none"}},
                      Accepted{{"--aio=io_uring"}}, Accepted{{"--discard=unmap"}},
                      Accepted{{"--detect-zeroes=on"}},
                      Accepted{{"--discard=unmap", "--detect-zeroes=unmap"}},
                      Accepted{{"-v"}}, Accepted{{"--verbose"}},
                      Accepted{{"-T", "nbd_*"}}, Accepted{{"--trace=enable=nbd_*"}},
                      Accepted{{"-x", "", "-D", "description with spaces"}},
                      Accepted{{"--threads=4"}, true},
                      Accepted{{"--max-request-size=1048576"}, true},
                      Accepted{{"--handshake-limit=5"}, true}),
    [](const ::testing::TestParamInfo<Accepted>& p) {
      std::string name;
      for (const auto& a : p.param.args)
        for (char ch : a)
          if (std::isalnum(static_cast<unsigned char>(ch))) name += ch;
      return std::to_string(p.index) + "_" + name;
    });

}  // namespace
}  // namespace layerd::test
