// The threads that run the server's io_context.
//
// Normally one thread runs the event loop, and it does short blocking work
// itself: a buffered 4 KiB pwrite costs about as much as handing it to a
// worker thread, and the hand-off (a futex wake and two context switches)
// was half of the server's CPU time for small writes on 2 cores. Such work
// is wrapped in a BlockingSection. A monitor thread looks every
// millisecond: when every thread running the loop has been inside one
// section for longer than kStallLimit and is asleep in the kernel (the
// disk is slow, the kernel is throttling dirty pages; a thread that is
// only waiting for a CPU does not count), it puts another thread on the
// loop, so the other connections keep being served. Surplus threads go
// back to standby after their current handler once no section is open.
// For a while after a stall (see kStallMemoryMin), try_enter_blocking()
// declines, and callers send their blocking work to the worker pool; the
// while grows when stalls keep coming (a slow disk), so that blocking
// work then stays with the workers.
//
// Handlers may therefore run on any of these threads (never two at once on
// the same strand): state shared between handlers must live behind a
// strand (each Connection, the server) or a lock.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>

namespace layerd {

class LoopThreads {
 public:
  static constexpr std::chrono::milliseconds kStallLimit{1};
  // After a stall try_enter_blocking() declines for a while: 10 ms, doubled
  // for each stall that follows within twice the current while, up to 1 s.
  static constexpr std::chrono::milliseconds kStallMemoryMin{10};
  static constexpr std::chrono::milliseconds kStallMemoryMax{1000};
  static constexpr unsigned kMaxThreads = 16;

  // `max_threads` (1..kMaxThreads) bounds how many threads may run the
  // loop at once.
  LoopThreads(boost::asio::io_context& io, unsigned max_threads);
  ~LoopThreads();
  LoopThreads(const LoopThreads&) = delete;
  LoopThreads& operator=(const LoopThreads&) = delete;

  // Runs the io_context on the calling thread (and standbys, as needed)
  // until it runs out of work or is stopped; then joins every thread.
  void run();

  // Marks the calling loop thread as inside blocking work until destroyed.
  // Inactive (does nothing) when not entered on a loop thread.
  class BlockingSection {
   public:
    BlockingSection() = default;
    BlockingSection(BlockingSection&& o) noexcept : slot_(o.slot_) { o.slot_ = nullptr; }
    BlockingSection& operator=(BlockingSection&&) = delete;
    ~BlockingSection();
    explicit operator bool() const { return slot_ != nullptr; }

   private:
    friend class LoopThreads;
    explicit BlockingSection(std::atomic<int64_t>* slot) : slot_(slot) {}
    std::atomic<int64_t>* slot_ = nullptr;
  };

  // Enters a section if blocking here is a good idea: on a loop thread and
  // not declining after a stall. Otherwise an inactive section: hand the
  // work to another thread.
  BlockingSection try_enter_blocking();
  // Enters a section unconditionally (inactive off loop threads): for work
  // that must happen here.
  BlockingSection enter_blocking();

  // Threads that have run the loop so far (for tests and logs).
  unsigned threads_started() const;
  // Stalls detected so far.
  uint64_t stalls() const { return stalls_.load(std::memory_order_relaxed); }

 private:
  void loop(unsigned index);
  void monitor();
  bool should_park_locked() const;
  static int64_t now_ns();

  boost::asio::io_context& io_;
  const unsigned max_threads_;

  // since_[i]: when loop thread i entered its open section (steady clock,
  // ns), or 0.
  std::array<std::atomic<int64_t>, kMaxThreads> since_{};
  // stat_fd_[i]: loop thread i's /proc/thread-self/stat, or -1; guarded by
  // mutex_.
  std::array<int, kMaxThreads> stat_fd_;
  std::atomic<int64_t> stall_until_{0};  // try_enter_blocking declines until
  std::atomic<uint64_t> stalls_{0};
  int64_t last_stall_ = 0;                   // monitor only
  int64_t stall_memory_ = 0;                 // monitor only
  std::atomic<bool> monitor_idle_{false};

  mutable std::mutex mutex_;
  std::condition_variable standby_;       // parked loop threads
  std::condition_variable monitor_wake_;  // the monitor, when idle or done
  unsigned running_ = 0;        // guarded by mutex_: threads on the loop
  std::atomic<unsigned> running_threads_{0};  // running_, for a lock-free look
  unsigned unpark_tokens_ = 0;  // guarded by mutex_
  bool done_ = false;           // guarded by mutex_
  unsigned started_ = 0;        // guarded by mutex_: threads ever on the loop
  std::vector<std::thread> threads_;  // guarded by mutex_ (index + 1)
};

}  // namespace layerd
