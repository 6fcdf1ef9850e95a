#include "server/loop_threads.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace layerd {
namespace {

constexpr auto kIdleTick = std::chrono::milliseconds(50);
constexpr unsigned kTicksBeforeIdle = 100;

// The loop this thread runs, and its slot in since_.
thread_local const LoopThreads* tl_owner = nullptr;
thread_local std::atomic<int64_t>* tl_slot = nullptr;

int64_t to_ns(std::chrono::nanoseconds d) { return d.count(); }

// Whether the thread whose /proc stat file is open as `fd` is asleep in
// the kernel (waiting for the disk, a lock, dirty-page throttling) rather
// than running or waiting for a CPU. Without /proc, assume asleep.
bool thread_sleeps(int fd) {
  if (fd < 0) return true;
  char buf[512];
  ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return true;
  buf[n] = '\0';
  const char* paren = std::strrchr(buf, ')');  // the name may hold spaces
  if (!paren || paren[1] != ' ') return true;
  return paren[2] != 'R';
}

}  // namespace

LoopThreads::LoopThreads(boost::asio::io_context& io, unsigned max_threads)
    : io_(io), max_threads_(std::clamp(max_threads, 1u, kMaxThreads)) {
  stat_fd_.fill(-1);
}

LoopThreads::~LoopThreads() {
  // run() joins everything; this only covers a run() that threw.
  {
    std::lock_guard lock(mutex_);
    done_ = true;
  }
  standby_.notify_all();
  monitor_wake_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

int64_t LoopThreads::now_ns() {
  return to_ns(std::chrono::steady_clock::now().time_since_epoch());
}

LoopThreads::BlockingSection::~BlockingSection() {
  if (slot_) slot_->store(0, std::memory_order_relaxed);
}

LoopThreads::BlockingSection LoopThreads::enter_blocking() {
  if (tl_owner != this) return {};
  tl_slot->store(now_ns(), std::memory_order_relaxed);
  if (monitor_idle_.load(std::memory_order_relaxed)) {
    std::lock_guard lock(mutex_);
    monitor_idle_.store(false, std::memory_order_relaxed);
    monitor_wake_.notify_one();
  }
  return BlockingSection(tl_slot);
}

LoopThreads::BlockingSection LoopThreads::try_enter_blocking() {
  if (tl_owner != this) return {};
  if (now_ns() < stall_until_.load(std::memory_order_relaxed)) return {};
  return enter_blocking();
}

unsigned LoopThreads::threads_started() const {
  std::lock_guard lock(mutex_);
  return started_;
}

void LoopThreads::run() {
  {
    std::lock_guard lock(mutex_);
    running_ = 1;
    running_threads_.store(1, std::memory_order_relaxed);
    started_ = 1;
    done_ = false;
  }
  std::thread monitor_thread([this] { monitor(); });
  loop(0);
  {
    std::lock_guard lock(mutex_);
    done_ = true;
  }
  standby_.notify_all();
  monitor_wake_.notify_all();
  monitor_thread.join();
  // No thread is added once done_ is set, so the list is stable now.
  for (auto& t : threads_) t.join();
  threads_.clear();
}

bool LoopThreads::should_park_locked() const {
  if (running_ <= 1) return false;
  // Stay while a section is open: its thread may be stuck.
  for (unsigned i = 0; i <= threads_.size(); ++i)
    if (since_[i].load(std::memory_order_relaxed) != 0) return false;
  return true;
}

void LoopThreads::loop(unsigned index) {
  tl_owner = this;
  tl_slot = &since_[index];
  {
    std::lock_guard lock(mutex_);
    stat_fd_[index] = ::open("/proc/thread-self/stat", O_RDONLY | O_CLOEXEC);
  }
  for (;;) {
    if (io_.run_one() == 0 || io_.stopped()) {
      std::lock_guard lock(mutex_);
      done_ = true;
      standby_.notify_all();
      monitor_wake_.notify_all();
      break;
    }
    if (running_threads_.load(std::memory_order_relaxed) <= 1) continue;
    std::unique_lock lock(mutex_);
    if (!should_park_locked()) continue;
    --running_;
    running_threads_.store(running_, std::memory_order_relaxed);
    standby_.wait(lock, [&] { return unpark_tokens_ > 0 || done_; });
    if (done_) break;
    --unpark_tokens_;  // the monitor counted us as running again
  }
  tl_owner = nullptr;
  tl_slot = nullptr;
  std::lock_guard lock(mutex_);
  if (stat_fd_[index] >= 0) ::close(stat_fd_[index]);
  stat_fd_[index] = -1;
}

void LoopThreads::monitor() {
  std::unique_lock lock(mutex_);
  unsigned idle_ticks = 0;
  while (!done_) {
    // Tick every kStallLimit while sections come and go; after a quiet
    // while every kIdleTick, until enter_blocking() wakes us.
    const bool idle = idle_ticks >= kTicksBeforeIdle;
    monitor_idle_.store(idle, std::memory_order_relaxed);
    monitor_wake_.wait_for(lock, idle ? std::chrono::milliseconds(kIdleTick)
                                      : std::chrono::milliseconds(kStallLimit));
    if (done_) break;
    if (idle && !monitor_idle_.load(std::memory_order_relaxed)) idle_ticks = 0;
    const int64_t now = now_ns();
    const unsigned threads = static_cast<unsigned>(threads_.size()) + 1;
    unsigned open = 0, stalled = 0;
    for (unsigned i = 0; i < threads; ++i) {
      int64_t since = since_[i].load(std::memory_order_relaxed);
      if (since == 0) continue;
      ++open;
      // A thread that is merely preempted (two busy cores) is not stuck:
      // another thread on the loop would only compete for the same CPUs.
      if (now - since > to_ns(kStallLimit) && thread_sleeps(stat_fd_[i])) ++stalled;
    }
    idle_ticks = open ? 0 : idle_ticks + 1;
    if (stalled == 0) continue;
    if (stalled >= running_) {
      // Every thread on the loop is stuck: a stall. Put another thread on
      // the loop (below), and decline blocking for longer if stalls keep
      // coming.
      stall_memory_ = now - last_stall_ < 2 * stall_memory_
                          ? std::min(2 * stall_memory_, to_ns(kStallMemoryMax))
                          : to_ns(kStallMemoryMin);
      last_stall_ = now;
      stalls_.fetch_add(1, std::memory_order_relaxed);
    }
    // Decline blocking while any thread is stuck, and for a while after.
    stall_until_.store(now + stall_memory_, std::memory_order_relaxed);
    if (stalled < running_) continue;
    if (running_ < threads) {  // some are parked
      ++unpark_tokens_;
      ++running_;
      standby_.notify_one();
    } else if (threads < max_threads_) {
      ++running_;
      ++started_;
      threads_.emplace_back([this, threads] { loop(threads); });
    }
    running_threads_.store(running_, std::memory_order_relaxed);
  }
}

}  // namespace layerd
