// Connection's TLS steps (see connection.h): the handshake's reads and
// writes once TLS is up, the TLS handshake after STARTTLS, and the
// reader's decrypting reads. Everything here runs on the connection's
// strand and waits through Asio, never on the socket directly: input by
// a one-byte MSG_PEEK (Asio sees every readiness change, where waiting
// for readability after a recv of our own could miss one), output by
// writing the session's buffered records.
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "server/connection.h"
#include "server/log.h"

namespace layerd {

namespace asio = boost::asio;
using asio::use_awaitable;

asio::awaitable<void> Connection::handshake_read(std::span<std::byte> in) {
  if (!tls_) {
    co_await asio::async_read(socket_, asio::buffer(in.data(), in.size()), use_awaitable);
    co_return;
  }
  for (size_t got = 0; got < in.size();)
    got += co_await tls_read_some(in.subspan(got));
}

asio::awaitable<void> Connection::handshake_write(std::span<const std::byte> out) {
  if (!tls_) {
    co_await asio::async_write(socket_, asio::buffer(out.data(), out.size()), use_awaitable);
    co_return;
  }
  while (!out.empty()) {
    // Buffered output: GnuTLS takes a record at a time and never waits.
    TlsSession::Result r = tls_->send(out);
    if (r.status != TlsSession::Status::Done)
      throw boost::system::system_error(asio::error::connection_aborted, tls_->error());
    out = out.subspan(r.bytes);
  }
  co_await write_tls_output();
}

asio::awaitable<void> Connection::write_tls_output() {
  std::vector<std::byte>& pending = tls_->output();
  if (pending.empty()) co_return;
  co_await asio::async_write(socket_, asio::buffer(pending), use_awaitable);
  pending.clear();
}

asio::awaitable<void> Connection::wait_readable() {
  std::byte probe;
  co_await socket_.async_receive(asio::buffer(&probe, 1), Socket::message_peek,
                                 use_awaitable);
}

asio::awaitable<bool> Connection::start_tls() {
  std::string error;
  tls_ = TlsSession::create(*tls_credentials_, fd_, &error);
  if (!tls_) {
    log_error("{}: {}", peer_, error);
    co_return false;
  }
  for (;;) {
    const TlsSession::Status s = tls_->handshake();
    co_await write_tls_output();  // also the alert that tells why it failed
    if (s == TlsSession::Status::Done) break;
    if (s == TlsSession::Status::Failed) {
      log_info("{}: {}", peer_, tls_->error());
      co_return false;
    }
    co_await wait_readable();  // buffered output never waits to be written
  }
  log_info("{}: TLS started: {}", peer_, tls_->describe());
  co_return true;
}

// GnuTLS hands out one record at a time; the records already at hand are
// taken together, so that a burst of pipelined requests is read (and its
// replies sent) as one, as without TLS. An end or error after some bytes
// is reported by the next call.
asio::awaitable<size_t> Connection::tls_read_some(std::span<std::byte> out) {
  size_t got = 0;
  for (;;) {
    TlsSession::Result r = tls_->recv(out.subspan(got));
    if (r.status == TlsSession::Status::Done && r.bytes > 0) {
      got += r.bytes;
      if (got < out.size()) continue;
      co_return got;
    }
    if (got > 0) co_return got;
    if (r.status == TlsSession::Status::Done)
      throw boost::system::system_error(asio::error::eof);
    if (r.status == TlsSession::Status::Failed)
      throw boost::system::system_error(asio::error::connection_aborted, tls_->error());
    co_await wait_readable();
  }
}

}  // namespace layerd
