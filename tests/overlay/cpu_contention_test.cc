// CpuContention: judged from the thread's run and run-queue wait times
// over every 20 ms it wanted the CPU; free until judged, and where the
// kernel does not say. The last test reads the real statistics of a
// thread that shares its CPU with a busy loop.
#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "overlay/cpu_contention.h"

namespace layerd {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t kMs = 1'000'000;

// A thread whose statistics the test sets.
struct FakeThread {
  CpuContention::Sample now;
  bool readable = true;
  CpuContention::Reader reader() {
    return [this](CpuContention::Sample* s) {
      if (readable) *s = now;
      return readable;
    };
  }
  void advance(uint64_t run_ms, uint64_t wait_ms) {
    now.run_ns += run_ms * kMs;
    now.wait_ns += wait_ms * kMs;
  }
};

TEST(CpuContention, FreeUntilJudged) {
  FakeThread t;
  CpuContention c(t.reader());
  EXPECT_FALSE(c.contended());
  t.advance(1, 9);  // waited most of the time, but wanted only 10 ms
  EXPECT_FALSE(c.contended());
  EXPECT_FALSE(c.judged());
  t.advance(2, 9);
  EXPECT_TRUE(c.contended());
  EXPECT_TRUE(c.judged());
}

TEST(CpuContention, WaitingAThirdOfTheTimeWantedIsContended) {
  FakeThread t;
  CpuContention c(t.reader());
  (void)c.contended();
  t.advance(14, 7);
  EXPECT_TRUE(c.contended());
  t.advance(15, 6);  // under a third
  EXPECT_FALSE(c.contended());
}

TEST(CpuContention, AJudgementHoldsUntilTheNextFullWindow) {
  FakeThread t;
  CpuContention c(t.reader());
  (void)c.contended();
  t.advance(5, 20);
  EXPECT_TRUE(c.contended());
  t.advance(10, 0);  // 10 ms: not a window yet
  EXPECT_TRUE(c.contended());
  t.advance(15, 0);  // the window is 25 ms, 0 waited
  EXPECT_FALSE(c.contended());
}

TEST(CpuContention, UnreadableStatisticsCountAsFree) {
  FakeThread t;
  t.readable = false;
  CpuContention c(t.reader());
  EXPECT_FALSE(c.contended());
  EXPECT_TRUE(c.judged()) << "the kernel cannot tell: judged free at once";
  t.readable = true;
  (void)c.contended();
  t.advance(5, 20);
  EXPECT_TRUE(c.contended());
  t.readable = false;
  EXPECT_FALSE(c.contended());
}

TEST(CpuContention, AThreadSharingItsCpuWithABusyLoopIsContended) {
  CpuContention::Sample s;
  if (!CpuContention::read_this_thread(&s)) GTEST_SKIP() << "no /proc/thread-self/schedstat";
  cpu_set_t all, one;
  ASSERT_EQ(::sched_getaffinity(0, sizeof all, &all), 0);
  int cpu = 0;
  while (!CPU_ISSET(cpu, &all)) ++cpu;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  std::atomic<bool> stop{false};
  std::thread hog([&] {
    ::sched_setaffinity(0, sizeof one, &one);
    while (!stop.load(std::memory_order_relaxed)) {
    }
  });
  EXPECT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);
  CpuContention c;
  bool contended = false;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  (void)c.contended();
  while (!contended && std::chrono::steady_clock::now() < deadline) {
    volatile uint64_t spin = 0;
    for (int i = 0; i < 1'000'000; ++i) spin = spin + 1;
    contended = c.contended();
  }
  stop.store(true);
  hog.join();
  ASSERT_EQ(::sched_setaffinity(0, sizeof all, &all), 0);
  EXPECT_TRUE(contended);
}

}  // namespace
}  // namespace layerd
