#include "server/reply_sender.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "server/log.h"

namespace layerd {
namespace {

constexpr int kPollSliceMs = 1000;
// The held buffer keeps its memory between bursts up to this size.
constexpr size_t kKeptHeldBytes = 1 << 20;

}  // namespace

void ReplySender::advance(iovec*& iov, int& count, size_t sent) {
  while (count > 0 && sent >= iov->iov_len) {
    sent -= iov->iov_len;
    ++iov;
    --count;
  }
  if (count > 0) {
    iov->iov_base = static_cast<char*>(iov->iov_base) + sent;
    iov->iov_len -= sent;
  }
}

ssize_t ReplySender::send_some(iovec* iov, int count) {
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = static_cast<size_t>(count);
  for (;;) {
    ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    log_info("{}: send failed: {}", peer_, std::strerror(errno));
    return -1;
  }
}

bool ReplySender::wait_writable(int& stalled_ms) {
  pollfd p{fd_, POLLOUT, 0};
  if (::poll(&p, 1, kPollSliceMs) == 0 &&
      (stalled_ms += kPollSliceMs) >= kSendStall.count()) {
    log_info("{}: client stopped reading replies, dropping", peer_);
    return false;
  }
  return true;
}

bool ReplySender::send_blocking(iovec* iov, int count) {
  int stalled_ms = 0;
  while (count > 0) {
    ssize_t n = send_some(iov, count);
    if (n < 0) return false;
    if (n == 0) {
      if (!wait_writable(stalled_ms)) return false;
      continue;
    }
    stalled_ms = 0;
    advance(iov, count, static_cast<size_t>(n));
  }
  return true;
}

bool ReplySender::send_record_blocking(std::span<const std::byte> data) {
  int stalled_ms = 0;
  while (!data.empty()) {
    TlsSession::Result r = tls_->send(data);
    if (r.status == TlsSession::Status::Done) {
      data = data.subspan(r.bytes);
      stalled_ms = 0;
    } else if (r.status == TlsSession::Status::Failed) {
      log_info("{}: {}", peer_, tls_->error());
      return false;
    } else if (!wait_writable(stalled_ms)) {
      return false;  // WantWrite: GnuTLS keeps the record for the next call
    }
  }
  return true;
}

bool ReplySender::uncork_blocking() {
  int stalled_ms = 0;
  for (;;) {
    TlsSession::Status s = tls_->uncork();
    if (s == TlsSession::Status::Done) return true;
    if (s == TlsSession::Status::Failed) {
      log_info("{}: {}", peer_, tls_->error());
      return false;
    }
    if (!wait_writable(stalled_ms)) return false;
  }
}

// Pieces that fit in the record being filled are corked (GnuTLS copies
// them, then seals them as one record); a piece of a record or more goes
// out from where it lies, a record per call, after what was corked before.
// A reply's header and the data of a small read leave as one record; a
// large read's data is encrypted without a copy.
bool ReplySender::send_tls(const iovec* iov, int count) {
  const size_t record = tls_->record_size();
  size_t corked = 0;
  for (int i = 0; i < count; ++i) {
    std::span piece(static_cast<const std::byte*>(iov[i].iov_base), iov[i].iov_len);
    if (piece.empty()) continue;
    if (corked > 0 && corked + piece.size() > record) {
      if (!uncork_blocking()) return false;
      corked = 0;
    }
    if (corked + piece.size() <= record) {
      if (corked == 0) tls_->cork();
      if (!send_record_blocking(piece)) return false;  // corked: all taken
      corked += piece.size();
      continue;
    }
    if (!send_record_blocking(piece)) return false;
  }
  return corked == 0 || uncork_blocking();
}

void ReplySender::end_tls() {
  std::lock_guard lock(mutex_);
  if (tls_ && !broken_.load()) tls_->bye();
}

void ReplySender::mark_broken() {
  broken_.store(true);
  ::shutdown(fd_, SHUT_RDWR);
}

void ReplySender::abandon(const char* why) {
  log_info("{}: {}, dropping", peer_, why);
  mark_broken();
}

void ReplySender::send(iovec* iov, int count) {
  std::lock_guard lock(mutex_);
  if (broken_.load()) return;
  if (!(tls_ ? send_tls(iov, count) : send_blocking(iov, count))) mark_broken();
}

std::span<std::byte> ReplySender::hold_space(size_t n) {
  held_reserved_ = held_size_;
  if (held_size_ + n > held_capacity_) {
    size_t capacity = std::max(held_capacity_ * 2, held_size_ + n);
    std::unique_ptr<std::byte[]> bigger(new std::byte[capacity]);
    if (held_size_) std::memcpy(bigger.get(), held_.get(), held_size_);
    held_ = std::move(bigger);
    held_capacity_ = capacity;
  }
  held_reserved_ = held_size_ + n;
  return {held_.get() + held_size_, n};
}

void ReplySender::hold(const iovec* iov, int count) {
  size_t n = 0;
  for (int i = 0; i < count; ++i) n += iov[i].iov_len;
  std::span<std::byte> out = hold_space(n);
  for (int i = 0; i < count; ++i) {
    std::memcpy(out.data(), iov[i].iov_base, iov[i].iov_len);
    out = out.subspan(iov[i].iov_len);
  }
  commit_held();
}

void ReplySender::send_held() {
  if (held_size_ == 0) return;
  iovec iov{held_.get(), held_size_};
  send(&iov, 1);
  held_size_ = held_reserved_ = held_replies_ = 0;
  // A burst of large reads may have grown the buffer: do not keep that.
  if (held_capacity_ > kKeptHeldBytes) {
    held_.reset();
    held_capacity_ = 0;
  }
}

}  // namespace layerd
