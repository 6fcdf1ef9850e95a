// The block job thread's CPU class (overlay/job_cpu.h): the bulk copy in
// SCHED_IDLE, the normal class (at the job's nice value) around exclusive
// image locks and outside the bulk copy, and the starvation guard, driven
// by a fake clock and a fake CPU time. Each case runs on a thread of its
// own, since the class is a thread's.
#include "overlay/job_cpu.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <future>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "qcow2/rwlock.h"

namespace layerd {
namespace {

using namespace std::chrono_literals;

int policy() { return ::sched_getscheduler(0); }

// Runs `body` on a new thread (a job thread of its own).
template <typename F>
void on_thread(F body) {
  std::thread t(body);
  t.join();
}

// Whether this process may use the background class at all (root, or
// RLIMIT_NICE allowing the job's nice value).
bool background_usable() {
  bool usable = false;
  on_thread([&] {
    JobCpu cpu;
    cpu.start();
    cpu.set_bulk(true);
    usable = cpu.background();
    cpu.stop();
  });
  return usable;
}
#define SKIP_WITHOUT_BACKGROUND_CLASS() \
  if (!background_usable()) GTEST_SKIP() << "RLIMIT_NICE allows neither nice 0 nor " << JobCpu::kJobNice

// A clock and a CPU time the test moves.
struct FakeTime {
  JobCpu::Clock::time_point now{};
  uint64_t cpu_ns = 0;
  JobCpu make() {
    return JobCpu([this] { return now; }, [this] { return cpu_ns; }, /*watchdog=*/false);
  }
  void pass(std::chrono::milliseconds wall, std::chrono::milliseconds cpu) {
    now += wall;
    cpu_ns += static_cast<uint64_t>(std::chrono::nanoseconds(cpu).count());
  }
};

// Outside the bulk copy (and when starved, or at an exclusive lock) the
// job competes as an equal: at the process's own nice value, where the
// background class can be left again from it (root here).
TEST(JobCpu, TheBulkCopyRunsInTheBackgroundClassAndTheRestAtTheProcesssNiceValue) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  on_thread([] {
    const int own = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
    JobCpu cpu;
    cpu.start();
    EXPECT_EQ(policy(), SCHED_OTHER);
    if (::geteuid() == 0) {
      EXPECT_EQ(cpu.normal_nice(), own);
    }
    EXPECT_EQ(::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid())), cpu.normal_nice());
    cpu.set_bulk(true);
    EXPECT_EQ(policy(), SCHED_IDLE);
    EXPECT_TRUE(cpu.background());
    cpu.set_bulk(false);
    EXPECT_EQ(policy(), SCHED_OTHER);
    EXPECT_EQ(::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid())), cpu.normal_nice());
    cpu.set_bulk(true);
    cpu.stop();
    EXPECT_EQ(policy(), SCHED_OTHER);
  });
}

// Readers of an image must never wait for a lock holder that cannot get a
// CPU: waiting for and holding the exclusive lock is in the normal class.
TEST(JobCpu, AnExclusiveImageLockIsWaitedForAndHeldInTheNormalClass) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  qcow2::WriterPreferringMutex mu;
  on_thread([&] {
    JobCpu cpu;
    cpu.start();
    cpu.set_bulk(true);
    {
      std::unique_lock lk(mu);
      EXPECT_EQ(policy(), SCHED_OTHER);
    }
    EXPECT_EQ(policy(), SCHED_IDLE);
    {
      std::shared_lock lk(mu);  // shared holds block no reader
      EXPECT_EQ(policy(), SCHED_IDLE);
    }
    // A failed try_lock leaves the thread where it was.
    std::promise<void> held, release;
    std::thread other([&] {
      std::shared_lock lk(mu);
      held.set_value();
      release.get_future().wait();
    });
    held.get_future().wait();
    EXPECT_FALSE(mu.try_lock());
    EXPECT_EQ(policy(), SCHED_IDLE);
    release.set_value();
    other.join();
    cpu.stop();
  });
  // Threads without a hook are left alone.
  std::unique_lock lk(mu);
  EXPECT_EQ(qcow2::exclusive_hold_hook, nullptr);
}

TEST(JobCpu, AStarvedBulkCopyRunsInTheNormalClassUntilTheCpuIsFreeAgain) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  on_thread([] {
    FakeTime t;
    JobCpu cpu = t.make();
    cpu.start();
    cpu.set_bulk(true);
    t.pass(300ms, 1ms);  // wanted to run for 300 ms, ran for 1
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_OTHER);
    t.pass(300ms, 60ms);  // the machine is still busy
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_OTHER);
    cpu.begin_sleep();  // asleep for the rate limit: nothing to judge
    t.pass(290ms, 0ms);
    cpu.end_sleep();
    t.pass(10ms, 10ms);
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_OTHER);
    t.pass(300ms, 200ms);  // free again
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_IDLE);
    cpu.stop();
  });
}

TEST(JobCpu, ABulkCopyThatGetsItsShareStaysInTheBackground) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  on_thread([] {
    FakeTime t;
    JobCpu cpu = t.make();
    cpu.start();
    cpu.set_bulk(true);
    t.pass(50ms, 1ms);  // a window is not over yet
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_IDLE);
    t.pass(200ms, 60ms);
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_IDLE);
    cpu.stop();
  });
}

TEST(JobCpu, TimeSleptForTheRateLimitIsNotStarvation) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  on_thread([] {
    FakeTime t;
    JobCpu cpu = t.make();
    cpu.start();
    cpu.set_bulk(true);
    cpu.begin_sleep();
    t.pass(295ms, 0ms);
    cpu.end_sleep();
    t.pass(5ms, 1ms);
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_IDLE);
    // Mostly asleep, but starved while awake: still too little to judge.
    cpu.begin_sleep();
    t.pass(260ms, 0ms);
    cpu.end_sleep();
    t.pass(40ms, 0ms);
    cpu.piece_done();
    EXPECT_EQ(policy(), SCHED_IDLE);
    cpu.stop();
  });
}

// Runs a job thread's start and bulk copy in a child process that drops
// root for nobody with RLIMIT_NICE at `nice_limit`. 0: the background
// class was entered and left again for nice 0; 10: the same for nice 10;
// 1: it was not entered; 2: stuck in it; 4: the limit cannot be raised
// here (no CAP_SYS_RESOURCE).
int bulk_copy_as_nobody(rlim_t nice_limit) {
  pid_t child = ::fork();
  if (child < 0) return -1;
  if (child == 0) {
    rlimit limit{nice_limit, nice_limit};
    if (::setrlimit(RLIMIT_NICE, &limit) != 0) ::_exit(4);
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(3);
    int code = 0;
    std::thread t([&] {
      JobCpu cpu;
      cpu.start();
      cpu.set_bulk(true);
      const bool entered = cpu.background() && policy() == SCHED_IDLE;
      cpu.set_bulk(false);
      const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
      code = !entered ? 1 : policy() != SCHED_OTHER ? 2 : nice == 0 ? 0 : nice == 10 ? 10 : 3;
      cpu.stop();
    });
    t.join();
    ::_exit(code);
  }
  int status = 0;
  if (::waitpid(child, &status, 0) != child || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// A starved thread never gets to look at its clock: the watchdog moves it
// to the normal class from outside. (Here the thread blocks without
// saying it sleeps, which the watchdog cannot tell from starvation.)
TEST(JobCpu, TheWatchdogMovesAStarvedThreadThatCannotRunToTheNormalClass) {
  SKIP_WITHOUT_BACKGROUND_CLASS();
  std::promise<pid_t> tid;
  std::promise<void> done;
  std::thread job([&] {
    JobCpu cpu;
    cpu.start();
    cpu.set_bulk(true);
    tid.set_value(::gettid());
    done.get_future().wait();
    cpu.stop();
  });
  const pid_t t = tid.get_future().get();
  EXPECT_EQ(::sched_getscheduler(t), SCHED_IDLE);
  const auto deadline = std::chrono::steady_clock::now() + 3s;
  while (::sched_getscheduler(t) == SCHED_IDLE && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(::sched_getscheduler(t), SCHED_OTHER);
  done.set_value();
  job.join();
}

// Unprivileged, a thread may leave SCHED_IDLE again only if RLIMIT_NICE
// allows the job's nice value (systemd: LimitNICE=+10); without it the
// background class is never entered.
TEST(JobCpu, UnprivilegedWithoutRlimitNiceTheBackgroundClassIsNotEntered) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to become another user";
  EXPECT_EQ(bulk_copy_as_nobody(0), 1);
}

// With RLIMIT_NICE allowing nice 10 (systemd: LimitNICE=+10) the normal
// class is nice 10; allowing nice 0 (LimitNICE=20), the process's own.
TEST(JobCpu, UnprivilegedWithRlimitNiceTheBackgroundClassIsEnteredAndLeft) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to become another user";
  const int with_limit = bulk_copy_as_nobody(20 - JobCpu::kJobNice);
  if (with_limit == 4) GTEST_SKIP() << "RLIMIT_NICE cannot be raised here";
  EXPECT_EQ(with_limit, 10);
  EXPECT_EQ(bulk_copy_as_nobody(20), 0);
}

}  // namespace
}  // namespace layerd
