// Serializes replies onto one connection's socket from many threads.
//
// Workers send with send(), which blocks until every byte is out (polling
// while the socket buffer is full). The I/O thread must never block, so it
// uses try_begin_inline() / send_inline(): if the socket is free it sends
// with MSG_DONTWAIT and, should the kernel take only part, keeps the rest
// in a pending buffer that the next sender (or flush_pending()) writes
// before anything else. Replies therefore never interleave on the wire.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

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

  // For the I/O thread: a lock on the socket if it is free right now and
  // nothing is pending; otherwise an unlocked lock (hand the work to a
  // worker instead).
  std::unique_lock<std::mutex> try_begin_inline();

  // Sends without blocking under a lock from try_begin_inline(); what the
  // socket does not take is copied to the pending buffer. Returns true if
  // output is now pending (call flush_pending() when the socket is
  // writable).
  bool send_inline(std::unique_lock<std::mutex>& lock, iovec* iov, int count);

  enum class Flush { Done, Pending, Busy };
  // For the I/O thread: writes pending output without blocking. Pending:
  // wait until the socket is writable and call again. Busy: a worker holds
  // the socket (and will write the pending output before its own); call
  // again a little later.
  Flush flush_pending();

  bool broken() const { return broken_.load(); }

  // Gives up on the connection: no more replies, socket shut down.
  void abandon(const char* why);

 private:
  // Sends as much as the socket takes now; returns bytes sent or -1 on a
  // hard error.
  ssize_t send_some(iovec* iov, int count);
  static void advance(iovec*& iov, int& count, size_t sent);
  bool send_blocking(iovec* iov, int count);
  void mark_broken();

  int fd_;
  std::string peer_;
  std::mutex mutex_;
  std::vector<std::byte> pending_;  // guarded by mutex_
  size_t pending_sent_ = 0;         // guarded by mutex_
  std::atomic<bool> broken_{false};
};

}  // namespace layerd
