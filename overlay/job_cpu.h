// The CPU class of a block job's thread.
//
// An unthrottled copy would take every CPU cycle the serving threads leave
// for a moment, and on a busy machine it holds on to them: a client thread
// that wakes waits for the copy's time slice to end (milliseconds, at any
// nice value), which costs a 4K random reader half its IOPS. So the bulk
// copy runs as SCHED_IDLE: it gets only CPU time nothing else wants, and
// any other thread that wakes takes its CPU at once. Where clients wait for
// the job (sync mode, the final switch) it runs as a normal thread, at the
// process's nice value (kJobNice where the background class could not be
// left again from that), as it does outside the bulk copy, and so does it
// while it waits for or holds an image's exclusive metadata lock (readers
// would wait for it: qcow2/rwlock.h's exclusive_hold_hook).
//
// SCHED_IDLE can starve on a machine whose CPUs are all busy with other
// work (a build, other guests): it then runs a few milliseconds a second.
// The starvation guard watches the share of CPU the copy gets while it
// wants to run (time it sleeps for its rate limit or a pause does not
// count), per window of kWindow: under kStarvedShare puts the copy in the
// normal class, where it stays until a window shows the CPU free again
// (kFreeShare or more), so a busy machine costs a job one window per busy
// spell, not its progress. A starved thread cannot look at its own clock,
// so a watchdog thread does that part (and a copy blocked on the disk
// counts as starved: harmless, it uses no CPU either way).
//
// Thread safety: one object per job thread. start(), stop(), set_bulk(),
// piece_done() and the sleep calls come from the job's thread; the watchdog
// thread shares the state under mutex_ (taken by the exclusive-lock hook
// too, never while an image lock is held or awaited).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "qcow2/rwlock.h"

namespace layerd {

class JobCpu final : private qcow2::ExclusiveHoldHook {
 public:
  using Clock = std::chrono::steady_clock;
  // Nanoseconds of CPU time the job's thread has used (callable from any
  // thread).
  using CpuTime = std::function<uint64_t()>;

  // The nice value of the normal class where it cannot be the process's
  // own (the background class could not be left again from that).
  static constexpr int kJobNice = 10;
  struct NormalClass {
    bool background_usable;  // SCHED_IDLE can be left again for it
    int nice;
  };
  static constexpr std::chrono::milliseconds kWindow{100};
  static constexpr double kStarvedShare = 0.10;
  static constexpr double kFreeShare = 0.50;

  // `now`, `cpu_time` and `watchdog` are for tests; the defaults are the
  // steady clock, the job thread's CPU clock and a watchdog thread.
  explicit JobCpu(std::function<Clock::time_point()> now = {}, CpuTime cpu_time = {},
                  bool watchdog = true);
  ~JobCpu();  // after stop()

  JobCpu(const JobCpu&) = delete;
  JobCpu& operator=(const JobCpu&) = delete;

  // On the job's thread, first: the normal class, and the thread's
  // exclusive_hold_hook. Finds out at which nice value the background
  // class can be left again: the process's own, else kJobNice
  // (unprivileged, RLIMIT_NICE must allow it; found once per user, limit
  // and nice value); if at neither, it is never entered, the job runs at
  // kJobNice and stderr says so.
  void start();
  // On the job's thread, last: removes the hook, ends the watchdog.
  void stop();
  // Enters (true) or leaves (false) the bulk copy.
  void set_bulk(bool bulk);
  // After each piece of the bulk copy: the starvation guard.
  void piece_done();
  // Around a sleep (rate limit, pause): not time the thread wants to run.
  void begin_sleep();
  void end_sleep();

  // Whether the thread is in the background class now.
  bool background() const;
  // The nice value of its normal class (after start()).
  int normal_nice() const { return normal_.nice; }

 private:
  void before_exclusive() override;
  void after_exclusive() override;
  void watch();
  // With mutex_ held: judges the window if it is over (`may_free`: also
  // lets a boosted copy go back; the watchdog only boosts).
  void judge_locked(bool may_free);
  // With mutex_ held: puts the job's thread in the class it should be in.
  void apply_locked();
  void new_window_locked();

  std::function<Clock::time_point()> now_;
  CpuTime cpu_time_;
  const bool with_watchdog_;
  pid_t tid_ = 0;  // the job's thread
  mutable std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread watchdog_;
  NormalClass normal_{false, kJobNice};
  bool usable_ = false;  // the background class can be left again
  bool bulk_ = false;
  bool background_ = false;
  bool boosted_ = false;  // the guard keeps a starved bulk copy in the normal class
  int exclusive_holds_ = 0;  // waited for or held image locks
  Clock::time_point window_start_;
  uint64_t window_cpu_ = 0;
  Clock::duration slept_{};
  bool asleep_ = false;
  Clock::time_point asleep_since_;
};

}  // namespace layerd
