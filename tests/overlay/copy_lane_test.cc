// CopyLane: pieces run on the lane's own thread ("lane:JOB"), one at a
// time, their results come back through wait(), and the lane waits for a
// piece in flight before it goes.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "overlay/copy_lane.h"

namespace layerd {
namespace {

using namespace std::chrono_literals;

TEST(CopyLane, RunsEachPieceOnItsOwnNamedThreadAtTheGivenNice) {
  CopyLane lane("job7", 5);
  pid_t tid = 0;
  char name[16] = {};
  int nice = -100;
  lane.start([&] {
    tid = ::gettid();
    ::pthread_getname_np(::pthread_self(), name, sizeof name);
    errno = 0;
    nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
    return std::error_code{};
  });
  EXPECT_FALSE(lane.wait());
  EXPECT_NE(tid, ::gettid());
  EXPECT_STREQ(name, "lane:job7");
  // Raising the nice value needs no privilege.
  EXPECT_EQ(nice, std::max(5, ::getpriority(PRIO_PROCESS, 0)));
}

TEST(CopyLane, ReturnsTheResultOfEachPiece) {
  CopyLane lane("j", 0);
  for (int i = 0; i < 50; ++i) {
    const std::error_code want = i % 3 == 0 ? std::make_error_code(std::errc::no_space_on_device)
                                            : std::error_code{};
    lane.start([want] { return want; });
    EXPECT_EQ(lane.wait(), want) << i;
  }
}

TEST(CopyLane, RunsBesideTheOwner) {
  CopyLane lane("j", 0);
  std::atomic<bool> owner_done{false};
  lane.start([&] {
    // Only returns once the owner got on with its own piece meanwhile.
    while (!owner_done.load()) std::this_thread::sleep_for(1ms);
    return std::error_code{};
  });
  owner_done.store(true);
  EXPECT_FALSE(lane.wait());
}

TEST(CopyLane, GoingAwayWaitsForThePieceInFlight) {
  std::atomic<bool> finished{false};
  {
    CopyLane lane("j", 0);
    lane.start([&] {
      std::this_thread::sleep_for(50ms);
      finished.store(true);
      return std::error_code{};
    });
  }
  EXPECT_TRUE(finished.load());
}

}  // namespace
}  // namespace layerd
