// Keeps an unthrottled block job from taking more than a share of the
// clients' request rate, as Linux md's resync slows down while its disks
// see other I/O (speed_limit_min).
//
// The CPU class of the job's thread (job_cpu.h) is not enough: on a small
// machine a bulk copy in SCHED_IDLE still costs a busy 4K reader 30 to 45%
// of its IOPS (docs/performance.md), because the reader's threads then share
// CPUs more often, and that cost goes away only while the copy stops for
// several milliseconds at a time. So the copy runs in slices: after each
// slice of kSlice during which clients made requests, it pauses and
// compares the clients' rate while it ran with their rate while it paused.
// The loss it measures (smoothed over slices) sets the share of time it
// runs, its duty, so that clients keep kClientShare of their rate:
// duty = (1 - kClientShare) / loss, so never below 1 - kClientShare (a job
// that stops its clients entirely still runs a quarter of the time), with
// a pause of at least kProbe per slice while clients are active (the pause
// is the measurement). A slice in which clients made fewer than
// kMinRequests requests, after a pause in which they made none either,
// counts as idle: the job runs on, with one probe every kIdleProbe (a job
// that stopped its clients would see none while it runs), so a job with
// no clients about runs at (1 - kProbe / kIdleProbe) of full speed.
//
// A job given a speed limit is not governed: the user's rate wins.
//
// Thread safety: one object per job, used from the job's thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

#include "overlay/client_activity.h"

namespace layerd {

class JobGovernor {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kSlice{50};
  // Slices last this long once the measured loss is below half of what is
  // allowed, so that a job that does not hurt its clients pauses seldom.
  static constexpr std::chrono::milliseconds kLongSlice{200};
  static constexpr std::chrono::milliseconds kProbe{15};
  static constexpr double kClientShare = 0.75;
  static constexpr std::chrono::seconds kIdleProbe{1};
  static constexpr uint64_t kMinRequests = 20;     // in a slice
  static constexpr uint64_t kMinPauseRequests = 5;  // in a pause

  // `now` and `requests` are for tests; the defaults are the steady clock
  // and client_activity::requests() (with a Watch held meanwhile).
  explicit JobGovernor(std::function<Clock::time_point()> now = {},
                       std::function<uint64_t()> requests = {});

  // Begins a slice (after a pause of the job's own, or at its start).
  void restart();
  // After each piece of the copy: how long to pause now (zero: go on).
  // The caller pauses, then calls resumed() (also when the pause ended
  // early); not calling it means the pause did not happen.
  Clock::duration after_piece();
  void resumed();

  // The share of time the copy runs (1 while clients are idle).
  double duty() const { return duty_; }
  // The smoothed share of their rate clients lose while the copy runs.
  double loss() const { return loss_; }

 private:
  Clock::duration slice() const;

  std::function<Clock::time_point()> now_;
  std::function<uint64_t()> requests_;
  client_activity::Watch watch_;
  Clock::time_point start_;  // of the current slice or pause
  uint64_t start_requests_ = 0;
  double run_rate_ = 0;  // requests per second in the last slice
  bool pausing_ = false;
  bool clients_in_last_pause_ = false;
  Clock::time_point last_probe_;
  double loss_ = 0;
  double duty_ = 1;
};

}  // namespace layerd
