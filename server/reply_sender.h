// Serializes replies onto one connection's socket from many threads.
//
// Workers send with send(), which blocks until every byte is out (polling
// while the socket buffer is full). Requests served on the event loop
// (cached reads, page-cache writes) do not send one by one: their replies
// are held in a buffer and go out together with send_held(), one sendmsg
// (and one wake-up of the client) for a whole burst of pipelined requests.
// The held buffer belongs to the connection's strand, so it needs no lock;
// send_held() itself takes the socket like send(). Replies never
// interleave on the wire.
//
// With TLS (use_tls(), once, before the first reply) the same lock makes
// this the session's only sender: replies become records (small pieces
// corked together into one record, large ones encrypted from where they
// lie, a record at a time), and GnuTLS's answer to a client's key update
// and the closing alert (end_tls()) go out under it too. Without TLS the
// path is the plain sendmsg one, as before.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "server/tls.h"

namespace layerd {

class ReplySender {
 public:
  // A client that accepts no reply bytes for this long is considered gone.
  static constexpr std::chrono::milliseconds kSendStall{30'000};

  ReplySender(int fd, std::string peer) : fd_(fd), peer_(std::move(peer)) {}

  // Blocking send of every byte of the iovecs (modifies them). If the
  // client is gone or stops reading for too long, marks the connection
  // broken and shuts the socket down.
  void send(iovec* iov, int count);

  // Held replies (connection strand only). hold_space() returns `n` bytes
  // at the end of the held buffer for the caller to fill with one reply;
  // commit_held() keeps them, drop_held() gives them back. hold() copies a
  // reply in whole.
  std::span<std::byte> hold_space(size_t n);
  void commit_held() { held_size_ = held_reserved_, ++held_replies_; }
  void drop_held() { held_reserved_ = held_size_; }
  void hold(const iovec* iov, int count);
  size_t held_replies() const { return held_replies_; }
  size_t held_bytes() const { return held_size_; }
  // Blocking send of everything held (see send()).
  void send_held();

  bool broken() const { return broken_.load(); }

  // From now on replies go through `tls` (not owned; outlives this), whose
  // output must be direct (TlsSession::use_direct_output()).
  void use_tls(TlsSession* tls) { tls_ = tls; }
  // Sends TLS's close alert, if the socket takes it now.
  void end_tls();

  // Gives up on the connection: no more replies, socket shut down.
  void abandon(const char* why);

 private:
  // Sends as much as the socket takes now; returns bytes sent or -1 on a
  // hard error.
  ssize_t send_some(iovec* iov, int count);
  static void advance(iovec*& iov, int& count, size_t sent);
  bool send_blocking(iovec* iov, int count);
  bool send_tls(const iovec* iov, int count);
  bool send_record_blocking(std::span<const std::byte> data);
  bool uncork_blocking();
  // Waits for room in the socket; false once the client has not taken a
  // byte for kSendStall (`stalled_ms` counts that, reset it on progress).
  bool wait_writable(int& stalled_ms);
  void mark_broken();

  int fd_;
  std::string peer_;
  TlsSession* tls_ = nullptr;
  std::mutex mutex_;  // the socket's send side (and the TLS session's)
  std::atomic<bool> broken_{false};

  std::unique_ptr<std::byte[]> held_;
  size_t held_capacity_ = 0;
  size_t held_size_ = 0;      // committed bytes
  size_t held_reserved_ = 0;  // committed + handed out by hold_space()
  size_t held_replies_ = 0;
};

}  // namespace layerd
