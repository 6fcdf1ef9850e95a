// How busy clients are, for block jobs that give way to them (BulkCopy in
// block_job.h).
//
// The server notes every request it receives. While no job watches, that
// costs one relaxed load of a counter that does not change; while one
// does, one relaxed add to a process-wide counter (all exports: a job
// shares the CPUs and the disk with every client, not only its export's).
//
// Thread safety: every function may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>

namespace layerd::client_activity {

inline std::atomic<int> watchers{0};
inline std::atomic<uint64_t> counted{0};

inline void note_request() {
  if (watchers.load(std::memory_order_relaxed) != 0)
    counted.fetch_add(1, std::memory_order_relaxed);
}

// Requests noted while some Watch lived (a count to take differences of).
inline uint64_t requests() { return counted.load(std::memory_order_relaxed); }

// While one lives, requests are counted.
class Watch {
 public:
  Watch() { watchers.fetch_add(1, std::memory_order_relaxed); }
  ~Watch() { watchers.fetch_sub(1, std::memory_order_relaxed); }
  Watch(const Watch&) = delete;
  Watch& operator=(const Watch&) = delete;
};

}  // namespace layerd::client_activity
