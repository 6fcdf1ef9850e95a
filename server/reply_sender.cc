#include "server/reply_sender.h"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "server/log.h"

namespace layerd {
namespace {

constexpr int kPollSliceMs = 1000;

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
  if (pending_sent_ < pending_.size()) {
    iovec rest{pending_.data() + pending_sent_, pending_.size() - pending_sent_};
    if (!send_blocking(&rest, 1)) return mark_broken();
    pending_.clear();
    pending_sent_ = 0;
  }
  if (!send_blocking(iov, count)) mark_broken();
}

std::unique_lock<std::mutex> ReplySender::try_begin_inline() {
  std::unique_lock lock(mutex_, std::try_to_lock);
  if (lock.owns_lock() && (pending_sent_ < pending_.size() || broken_.load()))
    lock.unlock();
  return lock;
}

bool ReplySender::send_inline(std::unique_lock<std::mutex>& lock, iovec* iov,
                              int count) {
  ssize_t n = send_some(iov, count);
  if (n < 0) {
    mark_broken();
    lock.unlock();
    return false;
  }
  advance(iov, count, static_cast<size_t>(n));
  for (int i = 0; i < count; ++i) {
    auto* p = static_cast<const std::byte*>(iov[i].iov_base);
    pending_.insert(pending_.end(), p, p + iov[i].iov_len);
  }
  bool pending = !pending_.empty();
  lock.unlock();
  return pending;
}

ReplySender::Flush ReplySender::flush_pending() {
  std::unique_lock lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) return Flush::Busy;
  if (broken_.load()) {
    pending_.clear();
    pending_sent_ = 0;
    return Flush::Done;
  }
  if (pending_sent_ < pending_.size()) {
    iovec rest{pending_.data() + pending_sent_, pending_.size() - pending_sent_};
    ssize_t n = send_some(&rest, 1);
    if (n < 0) {
      mark_broken();
      pending_.clear();
      pending_sent_ = 0;
      return Flush::Done;
    }
    pending_sent_ += static_cast<size_t>(n);
  }
  if (pending_sent_ < pending_.size()) return Flush::Pending;
  pending_.clear();
  pending_sent_ = 0;
  return Flush::Done;
}

}  // namespace layerd
