#include "server/worker_pool.h"

#include <chrono>

namespace layerd {
namespace {

constexpr size_t kJobsPerAwakeWorker = 4;
constexpr auto kStallLimit = std::chrono::milliseconds(1);
constexpr auto kIdleTick = std::chrono::milliseconds(50);
constexpr unsigned kTicksBeforeIdle = 100;

}  // namespace

WorkerPool::WorkerPool(unsigned threads) : ring_(64) {
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { run_worker(); });
  monitor_ = std::thread([this] { run_monitor(); });
}

WorkerPool::~WorkerPool() { join(); }

void WorkerPool::join() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  monitor_wake_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
  if (monitor_.joinable()) monitor_.join();
}

void WorkerPool::push(Job job) {
  bool wake = false;
  {
    std::lock_guard lock(mutex_);
    if (count_ == ring_.size()) {  // grow, keeping order
      std::vector<Job> bigger(ring_.size() * 2);
      for (size_t i = 0; i < count_; ++i)
        bigger[i] = std::move(ring_[(head_ + i) % ring_.size()]);
      ring_ = std::move(bigger);
      head_ = 0;
    }
    ring_[(head_ + count_) % ring_.size()] = std::move(job);
    ++count_;
    const size_t awake = threads_.size() - sleeping_;
    wake = sleeping_ > 0 && (awake == 0 || count_ > kJobsPerAwakeWorker * awake);
  }
  if (wake) wake_.notify_one();
}

// Wakes a sleeper when queued jobs stop moving: every awake worker is busy
// with something slow. Ticks every kStallLimit while jobs flow and backs
// off to kIdleTick once the pool has been idle for a while, so an idle
// server does not wake up a thousand times a second.
void WorkerPool::run_monitor() {
  std::unique_lock lock(mutex_);
  uint64_t seen = dequeued_;
  unsigned idle_ticks = 0;
  while (!stopping_) {
    monitor_wake_.wait_for(lock, idle_ticks < kTicksBeforeIdle ? kStallLimit : kIdleTick);
    if (count_ > 0 && sleeping_ > 0 && dequeued_ == seen) wake_.notify_one();
    idle_ticks = (count_ == 0 && dequeued_ == seen) ? idle_ticks + 1 : 0;
    seen = dequeued_;
  }
}

void WorkerPool::run_worker() {
  std::unique_lock lock(mutex_);
  for (;;) {
    while (count_ == 0 && !stopping_) {
      ++sleeping_;
      wake_.wait(lock);
      --sleeping_;
    }
    if (count_ == 0) return;  // stopping and drained
    Job job = std::move(ring_[head_]);
    head_ = (head_ + 1) % ring_.size();
    --count_;
    ++dequeued_;
    lock.unlock();
    job();
    lock.lock();
  }
}

}  // namespace layerd
