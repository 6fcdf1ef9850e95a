// The governor of an unthrottled job's bulk copy (overlay/job_governor.h),
// driven by a simulated job and client on a fake clock: the copy runs in
// pieces of 2 ms; the client makes requests at its full rate while the
// copy pauses and loses a given share of that rate while it runs.
#include "overlay/job_governor.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>

namespace layerd {
namespace {

using namespace std::chrono_literals;
using Clock = JobGovernor::Clock;

struct Simulation {
  Clock::time_point now{};
  double requests = 0;  // made by the client so far
  double client_rate = 100'000;  // requests per second while the job pauses
  double loss = 0;  // the share of that rate the client loses while the job runs
  Clock::duration ran{}, paused{};
  JobGovernor governor{[this] { return now; },
                       [this] { return static_cast<uint64_t>(requests); }};

  void advance(Clock::duration d, bool job_running) {
    const double rate = job_running ? client_rate * (1 - loss) : client_rate;
    requests += rate * std::chrono::duration<double>(d).count();
    now += d;
  }
  // Runs the job for `total` of simulated time.
  void run(Clock::duration total) {
    const Clock::time_point end = now + total;
    while (now < end) {
      advance(2ms, true);
      ran += 2ms;
      const Clock::duration pause = governor.after_piece();
      if (pause > Clock::duration::zero()) {
        advance(pause, false);
        paused += pause;
        governor.resumed();
      }
    }
  }
  double job_share() const {
    return std::chrono::duration<double>(ran).count() /
           std::chrono::duration<double>(ran + paused).count();
  }
  // What the client got of its full rate over the run.
  double client_share(double requests_before, Clock::duration total) const {
    return (requests - requests_before) /
           (client_rate * std::chrono::duration<double>(total).count());
  }
};

TEST(JobGovernor, WithoutClientsTheJobNeverPauses) {
  Simulation s;
  s.client_rate = 0;
  s.run(10s);
  EXPECT_LE(s.paused, 10 * JobGovernor::kProbe);  // one probe a second
  EXPECT_EQ(s.governor.duty(), 1.0);
}

TEST(JobGovernor, AFewRequestsASecondDoNotSlowTheJob) {
  Simulation s;
  s.client_rate = 50;  // fewer than kMinRequests in a long slice
  s.loss = 0.2;
  s.run(10s);
  EXPECT_LE(s.paused, 10 * JobGovernor::kProbe);
}

TEST(JobGovernor, ClientsTheJobDoesNotHurtCostItOnlyItsProbes) {
  Simulation s;
  s.loss = 0;
  s.run(10s);
  EXPECT_EQ(s.governor.duty(), 1.0);
  EXPECT_GT(s.job_share(), 0.9);
}

TEST(JobGovernor, ClientsTheJobHalvesKeepThreeQuartersOfTheirRate) {
  Simulation s;
  s.loss = 0.5;
  s.run(2s);  // the loss is learnt
  const double before = s.requests;
  const auto ran = s.ran, paused = s.paused;
  s.run(10s);
  EXPECT_GE(s.client_share(before, (s.ran - ran) + (s.paused - paused)), 0.74);
  EXPECT_NEAR(s.governor.duty(), 0.5, 0.05);
  EXPECT_NEAR(s.governor.loss(), 0.5, 0.05);
}

TEST(JobGovernor, TheJobAlwaysGetsOnEvenWhenItStopsTheClients) {
  Simulation s;
  s.loss = 1;
  s.run(10s);
  const double floor = 1 - JobGovernor::kClientShare;
  EXPECT_NEAR(s.governor.duty(), floor, 0.01);
  EXPECT_GE(s.job_share(), floor - 0.03);
}

TEST(JobGovernor, ClientsGoingIdleLetTheJobRunAtFullSpeedAgain) {
  Simulation s;
  s.loss = 0.6;
  s.run(5s);
  ASSERT_LT(s.governor.duty(), 0.5);
  s.client_rate = 0;
  s.run(1s);
  const auto paused = s.paused;
  s.run(5s);
  EXPECT_LE(s.paused - paused, 5 * JobGovernor::kProbe);
  EXPECT_EQ(s.governor.duty(), 1.0);
}

TEST(JobGovernor, ALossThatFadesLetsTheDutyComeBack) {
  Simulation s;
  s.loss = 0.8;
  s.run(5s);
  ASSERT_LT(s.governor.duty(), 0.35);
  s.loss = 0.1;  // the clients stop minding the job (another workload)
  s.run(5s);
  EXPECT_EQ(s.governor.duty(), 1.0);
}

}  // namespace
}  // namespace layerd
