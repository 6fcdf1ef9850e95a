#include "server/server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <unistd.h>

#include <memory>
#include <set>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/basic_socket_acceptor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "server/connection.h"
#include "server/log.h"
#include "server/loop_threads.h"
#include "server/worker_pool.h"

namespace layerd {
namespace asio = boost::asio;
using asio::use_awaitable;
using GenericAcceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;

namespace {

constexpr int kSendBufferBytes = 4 << 20;
constexpr auto kAcceptRetryDelay = std::chrono::milliseconds(100);

std::string describe_peer(const asio::generic::stream_protocol::socket& s,
                          int family, uint64_t serial) {
  if (family == AF_UNIX) return fmt::format("client {} (unix)", serial);
  boost::system::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return fmt::format("client {}", serial);
  char host[INET6_ADDRSTRLEN] = "?";
  const sockaddr* sa = reinterpret_cast<const sockaddr*>(ep.data());
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
  }
  return fmt::format("client {} ({}:{})", serial, host, port);
}

// The loop may run on more than one thread at a time (see LoopThreads):
// the server's own state is touched only on strand_, each connection's
// only on its own strand.
class ServerLoop {
 public:
  ServerLoop(const ServerConfig& config, ExportRegistry& exports)
      : config_(config),
        exports_(exports),
        workers_(config.worker_threads),
        loop_threads_(io_, config.worker_threads),
        strand_(asio::make_strand(io_)),
        signals_(strand_, SIGINT, SIGTERM),
        slots_(config.max_connections, config.max_handshakes) {}

  int run(std::vector<ListeningSocket>& listeners) {
    listeners_ = &listeners;
    for (auto& l : listeners) {
      auto acceptor = std::make_unique<GenericAcceptor>(strand_);
      acceptor->assign(asio::generic::stream_protocol(l.family, SOCK_STREAM),
                       l.fd);
      l.fd = -1;  // owned by the acceptor now
      asio::co_spawn(strand_, accept_loop(*acceptor, l.family), asio::detached);
      acceptors_.push_back(std::move(acceptor));
    }
    if (config_.reload) signals_.add(SIGHUP);
    wait_for_signal();
    loop_threads_.run();
    workers_.join();
    if (loop_threads_.stalls())
      log_info("event loop: {} stalls handed over, {} threads used",
               loop_threads_.stalls(), loop_threads_.threads_started());
    int status = 0;
    for (auto& e : exports_.all()) {
      if (auto ec = e->layer->flush()) {
        log_error("flush of export '{}' failed: {}", e->name, ec.message());
        status = 1;
      }
    }
    return status;
  }

 private:
  asio::awaitable<void> accept_loop(GenericAcceptor& acceptor, int family) {
    while (!stopping_) {
      asio::generic::stream_protocol::socket socket(asio::make_strand(io_));
      auto [ec] = co_await acceptor.async_accept(socket,
                                                 asio::as_tuple(use_awaitable));
      if (ec) {
        if (ec == asio::error::operation_aborted || stopping_) break;
        log_error("accept failed: {}", ec.message());
        // Out of file descriptors or memory: the pending connection stays
        // in the backlog, so do not retry at once.
        asio::steady_timer pause(strand_, kAcceptRetryDelay);
        co_await pause.async_wait(asio::as_tuple(use_awaitable));
        continue;
      }
      if (stopping_) break;
      if (family != AF_UNIX && !admitted(socket)) continue;
      if (family != AF_UNIX) {
        int one = 1;
        ::setsockopt(socket.native_handle(), IPPROTO_TCP, TCP_NODELAY, &one,
                     sizeof(one));
      }
      // Room for a few large READ replies at once, so workers hand data to
      // the kernel instead of waiting for the client to drain the socket.
      int sndbuf = kSendBufferBytes;
      ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDBUF, &sndbuf,
                   sizeof(sndbuf));
      std::string peer = describe_peer(socket, family, ++serial_);
      log_info("{}: connected", peer);
      auto conn = std::make_shared<Connection>(
          std::move(socket), exports_, workers_, loop_threads_, slots_,
          config_.limits, std::move(peer), config_.tls);
      connections_.insert(conn);
      auto executor = conn->executor();
      asio::co_spawn(executor, conn->run(),
                     asio::bind_executor(strand_, [this, conn](std::exception_ptr) {
                       on_closed(conn);
                     }));
    }
  }

  // Whether --allow/--deny let this TCP client in; closes it if not.
  bool admitted(asio::generic::stream_protocol::socket& socket) {
    if (config_.access.empty()) return true;
    boost::system::error_code ec;
    auto ep = socket.remote_endpoint(ec);
    if (!ec && config_.access.allows(reinterpret_cast<const sockaddr*>(ep.data())))
      return true;
    log_info("{}: refused by --allow/--deny",
             describe_peer(socket, AF_INET6, ++serial_));
    socket.close(ec);
    return false;
  }

  void wait_for_signal() {
    signals_.async_wait(asio::bind_executor(
        strand_, [this](const boost::system::error_code& ec, int sig) {
          if (ec) return;
          if (sig == SIGHUP) {
            log_info("signal {}: reloading the exports", sig);
            workers_.post([this] { config_.reload(); });
            wait_for_signal();
            return;
          }
          log_info("signal {}: shutting down", sig);
          shutdown();
        }));
  }

  void on_closed(const std::shared_ptr<Connection>& conn) {
    connections_.erase(conn);
    if (!config_.persistent && connections_.empty() && !stopping_) {
      log_info("last client left and -t was not given: exiting");
      shutdown();
    }
  }

  void shutdown() {
    if (stopping_) return;
    stopping_ = true;
    // The socket file goes first: from now on a client finds no server
    // (ENOENT, as with qemu-nbd) rather than one that refuses it.
    for (auto& l : *listeners_) remove_socket_file(l);
    boost::system::error_code ignored;
    for (auto& a : acceptors_) a->close(ignored);
    signals_.cancel(ignored);
    for (auto& c : connections_)
      asio::post(c->executor(), [c] { c->stop(); });
  }

  const ServerConfig& config_;
  ExportRegistry& exports_;
  asio::io_context io_;
  WorkerPool workers_;
  LoopThreads loop_threads_;
  asio::strand<asio::io_context::executor_type> strand_;
  asio::signal_set signals_;
  ClientSlots slots_;
  std::vector<std::unique_ptr<GenericAcceptor>> acceptors_;
  std::set<std::shared_ptr<Connection>> connections_;
  std::vector<ListeningSocket>* listeners_ = nullptr;
  uint64_t serial_ = 0;
  bool stopping_ = false;
};

}  // namespace

int serve(const ServerConfig& config, ExportRegistry& exports,
          std::vector<ListeningSocket> listeners) {
  ServerLoop loop(config, exports);
  int status = loop.run(listeners);
  for (auto& l : listeners) {
    if (l.fd >= 0) ::close(l.fd);
    remove_socket_file(l);
  }
  return status;
}

}  // namespace layerd
