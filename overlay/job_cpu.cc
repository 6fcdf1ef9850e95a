// The block job thread's CPU class (see job_cpu.h).
#include "overlay/job_cpu.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <optional>
#include <thread>

namespace layerd {

namespace {

uint64_t cpu_ns(clockid_t clock) {
  timespec ts{};
  ::clock_gettime(clock, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(ts.tv_nsec);
}

bool set_policy(int policy) {
  sched_param p{};
  return ::sched_setscheduler(0, policy, &p) == 0;  // 0: the calling thread
}

// The nice value a job thread runs at in the normal class, and whether it
// may leave SCHED_IDLE for that class again. Unprivileged, a thread may
// only when RLIMIT_NICE allows that nice value, and a seccomp filter may
// forbid both. The thread's own nice value (the process's) comes first, so
// that a starved or lock-holding job competes as an equal; else kJobNice
// (systemd's LimitNICE=+10 allows it); else the class is never entered and
// the job runs at kJobNice. Tried on a thread of its own, so that no job
// thread is left stuck in the background class; again only when the user,
// the limit or the nice value changed.
JobCpu::NormalClass probe_normal_class() {
  struct Probe {
    uid_t euid;
    rlim_t nice_limit;
    int own_nice;
    JobCpu::NormalClass found;
  };
  static std::mutex mutex;
  static std::optional<Probe> last;
  rlimit nice_limit{};
  (void)::getrlimit(RLIMIT_NICE, &nice_limit);
  const uid_t euid = ::geteuid();
  const int own = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
  std::lock_guard lock(mutex);
  if (last && last->euid == euid && last->nice_limit == nice_limit.rlim_cur &&
      last->own_nice == own)
    return last->found;
  const int fallback = std::max(own, JobCpu::kJobNice);
  JobCpu::NormalClass found{false, fallback};
  std::thread probe([&] {  // a new thread starts at its creator's nice value
    for (int nice : {own, fallback}) {
      (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice);
      if (set_policy(SCHED_IDLE) && set_policy(SCHED_OTHER)) {
        found = {true, nice};
        return;
      }
    }
  });
  probe.join();
  if (!found.background_usable)
    std::fprintf(stderr,
                 "layerd: block jobs run at nice %d, not in the background class "
                 "(SCHED_IDLE): leaving it again needs RLIMIT_NICE of at least %d "
                 "(systemd: LimitNICE=+%d) or CAP_SYS_NICE\n",
                 fallback, 20 - fallback, fallback);
  last = Probe{euid, nice_limit.rlim_cur, own, found};
  return found;
}

}  // namespace

JobCpu::JobCpu(std::function<Clock::time_point()> now, CpuTime cpu_time, bool watchdog)
    : now_(now ? std::move(now) : [] { return Clock::now(); }),
      cpu_time_(std::move(cpu_time)),
      with_watchdog_(watchdog) {}

JobCpu::~JobCpu() {
  if (watchdog_.joinable()) {  // stop() was not called: end the watchdog anyway
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    stop_cv_.notify_all();
    watchdog_.join();
  }
}

void JobCpu::start() {
  tid_ = ::gettid();
  if (!cpu_time_) {
    clockid_t clock{};
    if (::pthread_getcpuclockid(::pthread_self(), &clock) != 0) clock = CLOCK_THREAD_CPUTIME_ID;
    cpu_time_ = [clock] { return cpu_ns(clock); };
  }
  normal_ = probe_normal_class();
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(tid_), normal_.nice);
  usable_ = normal_.background_usable;
  qcow2::exclusive_hold_hook = this;
  if (usable_ && with_watchdog_) watchdog_ = std::thread([this] { watch(); });
}

void JobCpu::stop() {
  qcow2::exclusive_hold_hook = nullptr;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    bulk_ = false;
    apply_locked();
  }
  stop_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

void JobCpu::set_bulk(bool bulk) {
  std::lock_guard lock(mutex_);
  bulk_ = bulk;
  boosted_ = false;
  apply_locked();
  new_window_locked();
}

void JobCpu::begin_sleep() {
  std::lock_guard lock(mutex_);
  asleep_ = true;
  asleep_since_ = now_();
}

void JobCpu::end_sleep() {
  std::lock_guard lock(mutex_);
  asleep_ = false;
  slept_ += now_() - std::max(asleep_since_, window_start_);
}

bool JobCpu::background() const {
  std::lock_guard lock(mutex_);
  return background_;
}

void JobCpu::before_exclusive() {
  std::lock_guard lock(mutex_);
  if (exclusive_holds_++ == 0) apply_locked();
}

void JobCpu::after_exclusive() {
  std::lock_guard lock(mutex_);
  if (--exclusive_holds_ == 0) apply_locked();
}

void JobCpu::piece_done() {
  std::lock_guard lock(mutex_);
  judge_locked(true);
}

void JobCpu::watch() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    stop_cv_.wait_for(lock, kWindow / 2);
    if (!stopping_ && !boosted_ && !asleep_) judge_locked(false);
  }
}

void JobCpu::judge_locked(bool may_free) {
  if (!bulk_) return;
  const Clock::duration elapsed = now_() - window_start_;
  if (elapsed < kWindow) return;
  const auto wanted_ns = static_cast<double>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed - std::min(slept_, elapsed))
          .count());
  const auto window_ns = static_cast<double>(std::chrono::nanoseconds(kWindow).count());
  if (wanted_ns >= window_ns / 2) {  // else mostly asleep: nothing to judge
    const double share = static_cast<double>(cpu_time_() - window_cpu_) / wanted_ns;
    if (!boosted_ && share < kStarvedShare) boosted_ = true;
    else if (boosted_ && may_free && share >= kFreeShare) boosted_ = false;
    apply_locked();
  }
  new_window_locked();
}

void JobCpu::apply_locked() {
  const bool on = usable_ && bulk_ && !boosted_ && exclusive_holds_ == 0;
  if (on == background_) return;
  sched_param p{};
  if (::sched_setscheduler(tid_, on ? SCHED_IDLE : SCHED_OTHER, &p) == 0) background_ = on;
}

void JobCpu::new_window_locked() {
  window_start_ = now_();
  window_cpu_ = cpu_time_();
  slept_ = {};
}

}  // namespace layerd
