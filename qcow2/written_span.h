// The span of a file that writes went to since it was last taken: the
// smallest start and the largest end, for File::write_back_in_steps to
// step through only that (not a whole terabyte that is clean).
//
// A hint for write-back, not a record: pages a file changes by other
// means (the edges of a zeroed range) are not in it, and the flush that
// follows a write-back syncs them.
//
// Thread safety: any number of threads. A write inside the span only
// reads two atomics (unlocked: racing with a take(), it may be left out
// of both spans, which the following flush covers); one that grows the
// span, and take(), hold a mutex, so that a take() never splits a growth
// in two.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>

namespace layerd {

class WrittenSpan {
 public:
  // A write to [begin, end).
  void add(uint64_t begin, uint64_t end) {
    if (begin >= begin_.load(std::memory_order_relaxed) &&
        end <= end_.load(std::memory_order_relaxed))
      return;
    std::lock_guard growing(mutex_);
    if (begin < begin_.load(std::memory_order_relaxed)) begin_.store(begin, std::memory_order_relaxed);
    if (end > end_.load(std::memory_order_relaxed)) end_.store(end, std::memory_order_relaxed);
  }
  // The span written since the last take(), as [first, second): empty
  // (first >= second) when nothing was written. Starts a new one.
  std::pair<uint64_t, uint64_t> take() {
    std::lock_guard taking(mutex_);
    return {begin_.exchange(UINT64_MAX, std::memory_order_relaxed),
            end_.exchange(0, std::memory_order_relaxed)};
  }

 private:
  std::mutex mutex_;
  std::atomic<uint64_t> begin_{UINT64_MAX};
  std::atomic<uint64_t> end_{0};
};

}  // namespace layerd
