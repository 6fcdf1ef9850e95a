// The span of a file that writes went to since it was last taken: the
// smallest start and the largest end, for File::write_back_in_steps to
// step through only that (not a whole terabyte that is clean).
//
// A hint for write-back, not a record: a write that races with take() may
// be left out of both spans (the flush that follows a write-back still
// syncs it).
//
// Thread safety: lock-free, any number of threads. A write inside the
// span already only reads it (no store on the hot path).
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>

namespace layerd {

class WrittenSpan {
 public:
  // A write to [begin, end).
  void add(uint64_t begin, uint64_t end) {
    for (uint64_t e = end_.load(std::memory_order_relaxed);
         end > e && !end_.compare_exchange_weak(e, end, std::memory_order_relaxed);) {
    }
    for (uint64_t b = begin_.load(std::memory_order_relaxed);
         begin < b && !begin_.compare_exchange_weak(b, begin, std::memory_order_relaxed);) {
    }
  }
  // The span written since the last take(), as [first, second): empty
  // (first >= second) when nothing was written. Starts a new one.
  std::pair<uint64_t, uint64_t> take() {
    const uint64_t begin = begin_.exchange(UINT64_MAX, std::memory_order_relaxed);
    return {begin, end_.exchange(0, std::memory_order_relaxed)};
  }

 private:
  std::atomic<uint64_t> begin_{UINT64_MAX};
  std::atomic<uint64_t> end_{0};
};

}  // namespace layerd
