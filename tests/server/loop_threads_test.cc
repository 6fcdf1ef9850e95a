// LoopThreads: one thread runs the event loop until a handler blocks
// inside a BlockingSection for longer than the stall limit; then another
// thread takes the loop over, and the spare goes back to standby later.
#include "server/loop_threads.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

namespace layerd {
namespace {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

TEST(LoopThreads, OneThreadRunsEverythingWhenNothingBlocks) {
  asio::io_context io;
  LoopThreads loop(io, 4);
  std::set<std::thread::id> seen;
  int left = 2000;
  std::function<void()> step = [&] {
    seen.insert(std::this_thread::get_id());
    // Short sections that never stall.
    auto section = loop.try_enter_blocking();
    EXPECT_TRUE(section);
    if (--left > 0) asio::post(io, step);
  };
  asio::post(io, step);
  loop.run();
  EXPECT_EQ(left, 0);
  EXPECT_EQ(seen.size(), 1u);
  EXPECT_EQ(loop.threads_started(), 1u);
  EXPECT_EQ(loop.stalls(), 0u);
}

TEST(LoopThreads, AnotherThreadServesTheLoopWhileAHandlerBlocks) {
  asio::io_context io;
  LoopThreads loop(io, 4);
  const auto start = Clock::now();
  Clock::time_point timer_fired{};
  asio::steady_timer timer(io, milliseconds(20));
  timer.async_wait([&](auto) { timer_fired = Clock::now(); });
  asio::post(io, [&] {
    auto section = loop.try_enter_blocking();
    ASSERT_TRUE(section);
    std::this_thread::sleep_for(milliseconds(400));  // a pwrite stuck on the disk
  });
  loop.run();
  ASSERT_NE(timer_fired, Clock::time_point{});
  // Without a second thread the timer would fire after the 400 ms block.
  EXPECT_LT(timer_fired - start, milliseconds(250));
  EXPECT_GE(loop.threads_started(), 2u);
  EXPECT_GE(loop.stalls(), 1u);
}

TEST(LoopThreads, AHandlerThatComputesIsNotTakenForAStuckOne) {
  // Long but running (or waiting for a CPU): another loop thread would
  // only compete for the same cores.
  asio::io_context io;
  LoopThreads loop(io, 4);
  asio::post(io, [&] {
    auto section = loop.try_enter_blocking();
    ASSERT_TRUE(section);
    const auto end = Clock::now() + milliseconds(60);
    volatile uint64_t spins = 0;
    while (Clock::now() < end) spins = spins + 1;
  });
  loop.run();
  EXPECT_EQ(loop.stalls(), 0u);
  EXPECT_EQ(loop.threads_started(), 1u);
}

TEST(LoopThreads, BlockingIsDeclinedForAWhileAfterAStall) {
  asio::io_context io;
  LoopThreads loop(io, 4);
  bool declined_right_after = false, allowed_later = false;
  asio::post(io, [&] {
    {
      auto section = loop.try_enter_blocking();
      ASSERT_TRUE(section);
      std::this_thread::sleep_for(milliseconds(50));
    }
    declined_right_after = !loop.try_enter_blocking();
    // An unconditional section is still possible (work that must be here).
    EXPECT_TRUE(loop.enter_blocking());
    std::this_thread::sleep_for(LoopThreads::kStallMemoryMin + milliseconds(50));
    allowed_later = static_cast<bool>(loop.try_enter_blocking());
  });
  loop.run();
  EXPECT_TRUE(declined_right_after);
  EXPECT_TRUE(allowed_later);
}

TEST(LoopThreads, SectionsOffTheLoopAreInactive) {
  asio::io_context io;
  LoopThreads loop(io, 4);
  EXPECT_FALSE(loop.try_enter_blocking());
  EXPECT_FALSE(loop.enter_blocking());
  bool on_worker = true;
  std::thread([&] { on_worker = static_cast<bool>(loop.try_enter_blocking()); }).join();
  EXPECT_FALSE(on_worker);
}

TEST(LoopThreads, SpareThreadsGoBackToStandbyAfterTheStall) {
  asio::io_context io;
  LoopThreads loop(io, 4);
  std::mutex mu;
  std::set<std::thread::id> late_threads;
  int left = 3000;
  std::function<void()> step = [&] {
    if (--left < 500) {
      std::lock_guard lock(mu);
      late_threads.insert(std::this_thread::get_id());
    }
    if (left > 0) asio::post(io, step);
  };
  asio::post(io, [&] {
    auto section = loop.enter_blocking();
    std::this_thread::sleep_for(milliseconds(30));
    asio::post(io, step);
  });
  loop.run();
  EXPECT_GE(loop.threads_started(), 2u);
  // Long after the stall, one thread again runs the handlers.
  EXPECT_EQ(late_threads.size(), 1u);
}

TEST(LoopThreads, EveryStuckThreadGetsARelief) {
  // Two handlers block one after the other on different threads: each
  // stall brings another thread, up to the limit, and short work still
  // runs while both are stuck.
  asio::io_context io;
  LoopThreads loop(io, 3);
  std::atomic<int> blocked{0};
  Clock::time_point quick_ran{};
  const auto start = Clock::now();
  for (int i = 0; i < 2; ++i) {
    asio::post(io, [&] {
      auto section = loop.enter_blocking();
      ++blocked;
      std::this_thread::sleep_for(milliseconds(300));
    });
  }
  asio::steady_timer timer(io, milliseconds(60));
  timer.async_wait([&](auto) { quick_ran = Clock::now(); });
  loop.run();
  EXPECT_EQ(blocked.load(), 2);
  EXPECT_EQ(loop.threads_started(), 3u);
  ASSERT_NE(quick_ran, Clock::time_point{});
  EXPECT_LT(quick_ran - start, milliseconds(250));
}

TEST(LoopThreads, RunReturnsOnceTheWorkIsDone) {
  asio::io_context io;
  LoopThreads loop(io, 2);
  int ran = 0;
  asio::post(io, [&] {
    auto section = loop.enter_blocking();
    std::this_thread::sleep_for(milliseconds(20));
    ++ran;
  });
  loop.run();  // returns, with the standby thread joined
  EXPECT_EQ(ran, 1);
  EXPECT_TRUE(io.stopped());
}

}  // namespace
}  // namespace layerd
