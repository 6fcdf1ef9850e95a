// The QMP control socket (see qmp.h for the protocol as clients see it).
//
// Shape: one io_context on one thread. Each client is a read loop that
// hands its bytes to its QmpSession (qmp_protocol.h), which dispatches every
// complete message right there on the server thread, and queues the reply
// lines; a write loop drains the queue. emit() formats the event line on the
// caller's thread and posts it to the server thread, which appends it to
// the queue of every negotiated client, so emit() never waits for a client.
#include "server/qmp.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include "server/log.h"

namespace layerd {

namespace asio = boost::asio;
namespace json = boost::json;
using asio::local::stream_protocol;

// ---------------------------------------------------------------------------

struct QmpServer::Impl {
  struct Client;

  struct Listener {
    stream_protocol::acceptor acceptor;
    std::string path;  // empty for adopted sockets
    dev_t dev = 0;
    ino_t ino = 0;
  };

  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  std::thread thread;
  std::atomic<bool> running{false};
  std::atomic<bool> stopped{false};
  bool files_removed = false;
  QmpCommands commands;
  std::vector<std::unique_ptr<Listener>> listeners;
  std::vector<std::shared_ptr<Client>> clients;  // server thread only

  struct Client : std::enable_shared_from_this<Client> {
    Client(Impl& impl_, stream_protocol::socket s)
        : impl(impl_), socket(std::move(s)), session(impl_.commands) {}

    Impl& impl;
    stream_protocol::socket socket;
    bool closed = false;
    bool writing = false;
    std::deque<std::shared_ptr<const std::string>> queue;
    size_t queued_bytes = 0;
    QmpSession session;
    std::array<char, 64 * 1024> buffer;

    void start() {
      send(std::make_shared<const std::string>(qmp::greeting_line()));
      read();
    }

    void read() {
      socket.async_read_some(asio::buffer(buffer),
                             [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                               if (self->closed) return;
                               if (ec) {
                                 self->close();
                                 return;
                               }
                               self->received(n);
                               if (!self->closed) self->read();
                             });
    }

    void received(size_t n) {
      session.feed(buffer.data(), n, [this](std::string line) {
        send(std::make_shared<const std::string>(std::move(line)));
        return !closed;
      });
    }

    void send(std::shared_ptr<const std::string> line) {
      if (closed) return;
      queued_bytes += line->size();
      queue.push_back(std::move(line));
      if (queued_bytes > kMaxQueuedBytes) {
        log_error("qmp: a client does not read its replies and events ({} bytes queued); "
                  "disconnecting it",
                  queued_bytes);
        close();
        return;
      }
      if (!writing) write();
    }

    void write() {
      writing = true;
      auto line = queue.front();
      asio::async_write(socket, asio::buffer(*line),
                        [self = shared_from_this(), line](boost::system::error_code ec, size_t) {
                          self->writing = false;
                          if (self->closed) return;
                          if (ec) {
                            self->close();
                            return;
                          }
                          self->queued_bytes -= line->size();
                          self->queue.pop_front();
                          if (!self->queue.empty()) self->write();
                        });
    }

    void close() {
      if (closed) return;
      closed = true;
      boost::system::error_code ignored;
      socket.close(ignored);
      queue.clear();
      queued_bytes = 0;
      auto& list = impl.clients;
      for (size_t i = 0; i < list.size(); ++i) {
        if (list[i].get() == this) {
          list.erase(list.begin() + i);  // may drop the last owner but one
          break;
        }
      }
    }
  };

  void accept(Listener& l) {
    l.acceptor.async_accept([this, &l](boost::system::error_code ec, stream_protocol::socket s) {
      if (!running.load()) return;
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        auto c = std::make_shared<Client>(*this, std::move(s));
        clients.push_back(c);
        c->start();
      } else {
        log_error("qmp: accept: {}", ec.message());
      }
      accept(l);
    });
  }

  void close_all() {
    for (auto& l : listeners) {
      boost::system::error_code ignored;
      l->acceptor.close(ignored);
    }
    auto list = clients;  // close() edits clients
    for (auto& c : list) c->close();
    clients.clear();
  }

  void remove_socket_files() {
    for (auto& l : listeners) {
      if (l->path.empty()) continue;
      struct stat st;
      // Only our own socket: someone may have replaced it meanwhile.
      if (::lstat(l->path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == l->dev &&
          st.st_ino == l->ino) {
        ::unlink(l->path.c_str());
      }
    }
  }
};

QmpServer::QmpServer() : impl_(std::make_unique<Impl>()) {}

QmpServer::~QmpServer() { stop(); }

void QmpServer::add_command(std::string name, Handler handler) {
  impl_->commands.add(std::move(name), std::move(handler));
}

const QmpCommands& QmpServer::commands() const { return impl_->commands; }

bool QmpServer::listen(const std::string& path, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error) *error = std::move(msg);
    return false;
  };
  if (impl_->running || impl_->stopped) return fail("QMP: listen() after start()");
  sockaddr_un sun{};
  if (path.empty() || path.size() >= sizeof sun.sun_path)
    return fail("QMP socket path '" + path + "' is empty or too long");
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return fail("QMP socket path '" + path + "' exists and is not a socket");
    // A socket file: in use if someone accepts on it, stale otherwise.
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return fail(std::string("socket: ") + std::strerror(errno));
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path, path.data(), path.size());
    int r = ::connect(probe, reinterpret_cast<sockaddr*>(&sun), sizeof sun);
    int err = errno;
    ::close(probe);
    if (r == 0) return fail("QMP socket '" + path + "' is in use by another server");
    if (err != ECONNREFUSED && err != ENOENT)
      return fail("QMP socket '" + path + "': cannot tell whether it is in use: " +
                  std::strerror(err));
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return fail("QMP socket '" + path + "' is stale but cannot be removed: " +
                  std::strerror(errno));
  }
  auto l = std::make_unique<Impl::Listener>(
      Impl::Listener{stream_protocol::acceptor(impl_->io), path});
  boost::system::error_code ec;
  l->acceptor.open(stream_protocol(), ec);
  if (!ec) l->acceptor.bind(stream_protocol::endpoint(path), ec);
  if (ec) return fail("QMP socket '" + path + "': " + ec.message());
  if (::lstat(path.c_str(), &st) == 0) {
    l->dev = st.st_dev;
    l->ino = st.st_ino;
  }
  l->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    ::unlink(path.c_str());
    return fail("QMP socket '" + path + "': listen: " + ec.message());
  }
  impl_->listeners.push_back(std::move(l));
  return true;
}

bool QmpServer::adopt(int fd, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error) *error = std::move(msg);
    return false;
  };
  if (impl_->running || impl_->stopped) return fail("QMP: adopt() after start()");
  int domain = 0, listening = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0)
    return fail("QMP socket fd " + std::to_string(fd) + ": " + std::strerror(errno));
  len = sizeof listening;
  ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len);
  if (domain != AF_UNIX || !listening)
    return fail("QMP socket fd " + std::to_string(fd) + " is not a listening Unix socket");
  auto l = std::make_unique<Impl::Listener>(
      Impl::Listener{stream_protocol::acceptor(impl_->io), std::string()});
  boost::system::error_code ec;
  l->acceptor.assign(stream_protocol(), fd, ec);
  if (ec) return fail("QMP socket fd " + std::to_string(fd) + ": " + ec.message());
  impl_->listeners.push_back(std::move(l));
  return true;
}

void QmpServer::start() {
  Impl& m = *impl_;
  if (m.thread.joinable() || m.stopped) return;
  m.running = true;
  for (auto& l : m.listeners) m.accept(*l);
  m.guard.emplace(m.io.get_executor());
  m.thread = std::thread([&m] { m.io.run(); });
}

void QmpServer::stop() {
  Impl& m = *impl_;
  bool on_server_thread = m.io.get_executor().running_in_this_thread();
  if (!m.stopped.exchange(true)) {
    m.running = false;
    if (m.thread.joinable()) {
      // Closing cancels every pending operation; their handlers see the
      // client closed and stop, and run() returns when nothing is left.
      asio::post(m.io, [&m] {
        m.close_all();
        m.guard.reset();
      });
    } else {
      m.close_all();
    }
  }
  // From a handler the server thread cannot join itself: the next stop()
  // (the destructor's at the latest) joins and removes the files.
  if (on_server_thread) return;
  if (m.thread.joinable()) m.thread.join();
  if (!m.files_removed) {
    m.files_removed = true;
    m.remove_socket_files();
  }
}

void QmpServer::emit(std::string_view event, json::object data) {
  Impl& m = *impl_;
  if (!m.running.load()) return;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
  json::object o;
  o["timestamp"] = json::object{{"seconds", us / 1000000}, {"microseconds", us % 1000000}};
  o["event"] = event;
  if (!data.empty()) o["data"] = std::move(data);
  auto line = std::make_shared<const std::string>(qmp::to_line(o));
  auto deliver = [&m, line] {
    auto list = m.clients;  // send() may close and unlist a client
    for (auto& c : list)
      if (c->session.negotiated()) c->send(line);
  };
  // From a handler: at once, so that the event goes before the command's
  // reply as in QEMU (block-export-del's BLOCK_EXPORT_DELETED, say).
  if (m.io.get_executor().running_in_this_thread()) {
    deliver();
  } else {
    asio::post(m.io, std::move(deliver));
  }
}

}  // namespace layerd
