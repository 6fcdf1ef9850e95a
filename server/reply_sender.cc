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

bool ReplySender::send_blocking(iovec* iov, int count) {
  int stalled_ms = 0;
  while (count > 0) {
    ssize_t n = send_some(iov, count);
    if (n < 0) return false;
    if (n == 0) {
      pollfd p{fd_, POLLOUT, 0};
      if (::poll(&p, 1, kPollSliceMs) == 0 &&
          (stalled_ms += kPollSliceMs) >= kSendStall.count()) {
        log_info("{}: client stopped reading replies, dropping", peer_);
        return false;
      }
      continue;
    }
    stalled_ms = 0;
    advance(iov, count, static_cast<size_t>(n));
  }
  return true;
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
  if (!send_blocking(iov, count)) mark_broken();
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
