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
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <span>
#include <string>

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
  std::mutex mutex_;  // the socket's send side
  std::atomic<bool> broken_{false};

  std::unique_ptr<std::byte[]> held_;
  size_t held_capacity_ = 0;
  size_t held_size_ = 0;      // committed bytes
  size_t held_reserved_ = 0;  // committed + handed out by hold_space()
  size_t held_replies_ = 0;
};

}  // namespace layerd
