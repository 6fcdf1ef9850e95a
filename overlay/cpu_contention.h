// Whether other threads want the CPU a thread runs on, from the thread's
// scheduler statistics: the time it ran and the time it waited runnable
// (/proc/thread-self/schedstat). A bulk copy asks it between pieces to
// choose its path: through the page cache while the CPUs are free (the
// fastest copy), past it while clients want them (a quarter of the CPU
// time per byte: no copies into and out of the cache, no write-back or
// reclaim afterwards; see docs/performance.md).
//
// The judgement is made over every kWanted of time the thread wanted the
// CPU (ran or waited for it; time asleep or blocked on the disk does not
// count): contended when it waited for at least a third of it. In between,
// the last judgement holds; before the first, the CPU counts as free
// (judged() tells; a caller may assume worse until then).
//
// Thread safety: one object per thread, used by that thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

namespace layerd {

class CpuContention {
 public:
  static constexpr std::chrono::milliseconds kWanted{20};

  // The calling thread's nanoseconds run and waited runnable; false where
  // the kernel does not say (then the CPU always counts as free).
  struct Sample {
    uint64_t run_ns = 0;
    uint64_t wait_ns = 0;
  };
  using Reader = std::function<bool(Sample*)>;
  static bool read_this_thread(Sample* s);

  // `read` is for tests.
  explicit CpuContention(Reader read = read_this_thread);

  // Takes a new sample and returns the judgement.
  bool contended();
  // Whether a judgement was made yet (a whole window seen, or the kernel
  // does not say).
  bool judged() const { return judged_; }

 private:
  Reader read_;
  bool have_start_ = false;
  Sample start_;
  bool contended_ = false;
  bool judged_ = false;
};

}  // namespace layerd
