#include "server/listeners.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>

#include <fmt/format.h>

namespace layerd {
namespace {

// Room for a burst of connections (the kernel caps it at net.core.somaxconn):
// a Unix socket client connecting without blocking is refused outright
// (EAGAIN) while the backlog is full.
constexpr int kBacklog = SOMAXCONN;

// A Unix socket file nobody listens on any more (a previous run that was
// killed) may be replaced; a live one may not.
bool is_stale_socket(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  bool refused = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 &&
                 errno == ECONNREFUSED;
  ::close(fd);
  return refused;
}

bool fits_sun_path(const std::string& path) {
  return path.size() < sizeof(sockaddr_un::sun_path);
}

// Binds and listens on `path` (which fits sun_path); -1 and `error` set on
// failure.
int bind_and_listen(const std::string& path, std::string& error) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    error = fmt::format("socket: {}", std::strerror(errno));
    return -1;
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    error = std::strerror(errno);
    ::close(fd);
    return -1;
  }
  if (::listen(fd, kBacklog) != 0) {
    error = std::strerror(errno);
    ::close(fd);
    ::unlink(path.c_str());
    return -1;
  }
  return fd;
}

// Makes the socket file at `path` (gone or stale) a listening socket with
// permissions `mode` (else what the umask leaves). Returns the fd, or -1
// with `why` set.
int make_listening_file(const std::string& path, std::optional<uint32_t> mode,
                        std::string& why) {
  // A socket made under a temporary name in the same directory, then
  // renamed into place, appears only once it listens and has its mode: a
  // client that connects as soon as it sees the file is never refused.
  // (Where the temporary name would not fit a socket address, a path near
  // the 107-byte limit, the socket is bound in place and exists a moment
  // before it listens.)
  const std::string temporary = fmt::format("{}.{}~", path, ::getpid());
  const bool rename_into_place = fits_sun_path(temporary);
  const std::string& bound = rename_into_place ? temporary : path;
  ::unlink(bound.c_str());  // a stale socket, or one a killed run left
  // Listening sockets are opened before any thread starts, so the umask
  // may change for a moment: bind() makes the file with 0777 less the
  // umask, so it never has more permissions than `mode`.
  const mode_t old_umask = mode ? ::umask(static_cast<mode_t>(~*mode & 0777)) : 0;
  int fd = bind_and_listen(bound, why);
  if (mode) ::umask(old_umask);
  if (fd < 0 || !rename_into_place) return fd;
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    why = std::strerror(errno);
    ::close(fd);
    ::unlink(temporary.c_str());
    return -1;
  }
  return fd;
}

std::vector<ListeningSocket> open_unix(const std::string& path,
                                       std::optional<uint32_t> mode,
                                       std::string& error) {
  if (!fits_sun_path(path)) {
    error = fmt::format("socket path '{}' is too long", path);
    return {};
  }
  std::string why;
  struct stat existing {};
  int fd = -1;
  if (::lstat(path.c_str(), &existing) == 0 && !is_stale_socket(path))
    why = std::strerror(EADDRINUSE);  // what bind() says
  else
    fd = make_listening_file(path, mode, why);
  if (fd < 0) {
    error = fmt::format("cannot listen on '{}': {}", path, why);
    return {};
  }
  ListeningSocket l;
  l.fd = fd;
  l.family = AF_UNIX;
  l.unix_path = path;
  struct stat st{};
  if (::stat(path.c_str(), &st) == 0) {
    l.unix_dev = st.st_dev;
    l.unix_ino = st.st_ino;
  }
  return {l};
}

std::vector<ListeningSocket> open_tcp(const std::string& host, uint16_t port,
                                      std::string& error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0) {
    error = fmt::format("cannot resolve '{}': {}", host, ::gai_strerror(rc));
    return {};
  }
  std::vector<ListeningSocket> out;
  std::string last_error;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                      ai->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ai->ai_family == AF_INET6)  // one socket per family, as resolved
      ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, kBacklog) != 0) {
      last_error = std::strerror(errno);
      ::close(fd);
      continue;
    }
    ListeningSocket l;
    l.fd = fd;
    l.family = ai->ai_family;
    out.push_back(std::move(l));
  }
  ::freeaddrinfo(res);
  if (out.empty())
    error = fmt::format("cannot listen on {}:{}: {}", host, port,
                        last_error.empty() ? "no usable address" : last_error);
  return out;
}

}  // namespace

std::vector<ListeningSocket> open_listeners(const ServerOptions& o,
                                            std::string& error) {
  if (!o.socket_path.empty()) return open_unix(o.socket_path, o.socket_mode, error);
  return open_tcp(o.bind_address, o.port, error);
}

std::vector<ListeningSocket> activated_listeners(std::string& error) {
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  if (!pid || !fds) return {};
  char* end = nullptr;
  long listen_pid = std::strtol(pid, &end, 10);
  if (*end || listen_pid != static_cast<long>(::getpid())) return {};
  long count = std::strtol(fds, &end, 10);
  if (*end || count <= 0 || count > 64) {
    error = fmt::format("invalid LISTEN_FDS '{}'", fds);
    return {};
  }
  std::vector<std::string> names;
  if (const char* list = std::getenv("LISTEN_FDNAMES")) {
    std::string_view rest(list);
    for (size_t colon; (colon = rest.find(':')) != std::string_view::npos; rest.remove_prefix(colon + 1))
      names.emplace_back(rest.substr(0, colon));
    names.emplace_back(rest);
  }
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  std::vector<ListeningSocket> out;
  for (int fd = 3; fd < 3 + count; ++fd) {
    int family = 0;
    socklen_t len = sizeof(family);
    if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) != 0) {
      error = fmt::format("LISTEN_FDS: fd {} is not a socket", fd);
      return {};
    }
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    ListeningSocket l;
    l.fd = fd;
    l.family = family;
    if (static_cast<size_t>(fd - 3) < names.size()) l.activation_name = names[fd - 3];
    out.push_back(std::move(l));
  }
  return out;
}

void remove_socket_file(const ListeningSocket& l) {
  if (l.unix_path.empty()) return;
  struct stat st{};
  if (::stat(l.unix_path.c_str(), &st) != 0) return;
  if (st.st_dev != l.unix_dev || st.st_ino != l.unix_ino) return;  // not ours
  ::unlink(l.unix_path.c_str());
}

}  // namespace layerd
