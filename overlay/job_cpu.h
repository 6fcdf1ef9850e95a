// The CPU class of a block job's thread.
//
// An unthrottled copy would take every CPU cycle the serving threads leave
// for a moment, and on a busy machine it holds on to them: a client thread
// that wakes waits for the copy's time slice to end (milliseconds, at any
// nice value), which costs a 4K random reader half its IOPS. So the bulk
// copy runs as SCHED_IDLE: it gets only CPU time nothing else wants, and
// any other thread that wakes takes its CPU at once. Where clients wait for
// the job (sync mode, the final switch) it runs as a normal thread at
// kJobNice, as it does outside the bulk copy, and so does it while it
// waits for or holds an image's exclusive metadata lock (readers would
// wait for it: qcow2/rwlock.h's exclusive_hold_hook).
//
// SCHED_IDLE can starve on a machine whose CPUs are all busy with other
// work (a build, other guests): it then runs a few milliseconds a second.
// The starvation guard watches the share of CPU the copy gets while it
// wants to run (time it sleeps for its rate limit or a pause does not
// count), per window of kWindow: under kStarvedShare puts the copy in the
// normal class, where it stays until a window shows the CPU free again
// (kFreeShare or more), so a busy machine costs a job one slow window per
// busy spell, not its progress.
//
// Thread safety: one object per job thread; every call comes from that
// thread and changes only that thread's scheduling.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

#include "qcow2/rwlock.h"

namespace layerd {

class JobCpu final : private qcow2::ExclusiveHoldHook {
 public:
  using Clock = std::chrono::steady_clock;
  // Nanoseconds of CPU time the calling thread has used.
  using CpuTime = std::function<uint64_t()>;

  static constexpr int kJobNice = 10;
  static constexpr std::chrono::milliseconds kWindow{250};
  static constexpr double kStarvedShare = 0.10;
  static constexpr double kFreeShare = 0.50;

  // `now` and `cpu_time` are for tests; the defaults are the steady clock
  // and CLOCK_THREAD_CPUTIME_ID.
  explicit JobCpu(std::function<Clock::time_point()> now = {}, CpuTime cpu_time = {});

  JobCpu(const JobCpu&) = delete;
  JobCpu& operator=(const JobCpu&) = delete;

  // On the job's thread, first: the normal class at kJobNice, and the
  // thread's exclusive_hold_hook. Finds out whether the background class
  // can be left again (unprivileged, RLIMIT_NICE must allow kJobNice;
  // found once per user and limit); if not, it is never entered, and
  // stderr says so.
  void start();
  // On the job's thread, last: removes the hook.
  void stop();
  // Enters (true) or leaves (false) the bulk copy.
  void set_bulk(bool bulk);
  // After each piece of the bulk copy: the starvation guard.
  void piece_done();
  // The thread slept (rate limit, pause) for `d`: not time it wanted to run.
  void slept(Clock::duration d) { slept_ += d; }

  // Whether the thread is in the background class now.
  bool background() const { return background_; }

 private:
  void before_exclusive() override;
  void after_exclusive() override;
  // Puts the thread in the class it should be in now.
  void apply();
  void new_window();

  std::function<Clock::time_point()> now_;
  CpuTime cpu_time_;
  bool usable_ = false;  // the background class can be left again
  bool bulk_ = false;
  bool background_ = false;
  bool boosted_ = false;  // the guard keeps a starved bulk copy in the normal class
  int exclusive_holds_ = 0;  // waited for or held image locks
  Clock::time_point window_start_;
  uint64_t window_cpu_ = 0;
  Clock::duration slept_{};
};

}  // namespace layerd
