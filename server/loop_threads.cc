#include "server/loop_threads.h"

#include <algorithm>

namespace layerd {
namespace {

constexpr auto kIdleTick = std::chrono::milliseconds(50);
constexpr unsigned kTicksBeforeIdle = 100;

// The loop this thread runs, and its slot in since_.
thread_local const LoopThreads* tl_owner = nullptr;
thread_local std::atomic<int64_t>* tl_slot = nullptr;

int64_t to_ns(std::chrono::nanoseconds d) { return d.count(); }

}  // namespace

LoopThreads::LoopThreads(boost::asio::io_context& io, unsigned max_threads)
    : io_(io), max_threads_(std::clamp(max_threads, 1u, kMaxThreads)) {}

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
      if (now - since > to_ns(kStallLimit)) ++stalled;
    }
    idle_ticks = open ? 0 : idle_ticks + 1;
    if (stalled == 0 || stalled < running_) continue;
    // Every thread on the loop is stuck: put another one on it.
    stall_until_.store(now + to_ns(kStallMemory), std::memory_order_relaxed);
    stalls_.fetch_add(1, std::memory_order_relaxed);
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
