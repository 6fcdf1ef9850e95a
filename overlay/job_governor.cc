#include "overlay/job_governor.h"

#include <algorithm>

namespace layerd {

namespace {
double seconds(JobGovernor::Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
}  // namespace

JobGovernor::JobGovernor(std::function<Clock::time_point()> now,
                         std::function<uint64_t()> requests)
    : now_(now ? std::move(now) : [] { return Clock::now(); }),
      requests_(requests ? std::move(requests) : [] { return client_activity::requests(); }) {
  restart();
  last_probe_ = start_;
}

void JobGovernor::restart() {
  pausing_ = false;
  start_ = now_();
  start_requests_ = requests_();
}

JobGovernor::Clock::duration JobGovernor::slice() const {
  return loss_ < (1 - kClientShare) / 2 ? Clock::duration(kLongSlice) : Clock::duration(kSlice);
}

JobGovernor::Clock::duration JobGovernor::after_piece() {
  const Clock::time_point now = now_();
  const Clock::duration ran = now - start_;
  if (pausing_ || ran < slice()) return {};
  const uint64_t made = requests_() - start_requests_;
  if (made < kMinRequests && !clients_in_last_pause_) {
    if (now - last_probe_ < kIdleProbe) {  // clients idle: what was measured fades
      loss_ /= 2;
      duty_ = 1;
      restart();
      return {};
    }
  }
  run_rate_ = static_cast<double>(made) / seconds(ran);
  const auto pause = std::chrono::duration_cast<Clock::duration>(ran * ((1 - duty_) / duty_));
  start_ = now;
  start_requests_ = requests_();
  pausing_ = true;
  last_probe_ = now;
  return std::max<Clock::duration>(pause, kProbe);
}

void JobGovernor::resumed() {
  if (!pausing_) return;
  const Clock::duration paused = now_() - start_;
  const uint64_t made = requests_() - start_requests_;
  // Too few requests in a pause say nothing about the loss.
  clients_in_last_pause_ = made >= kMinPauseRequests;
  if (paused > Clock::duration::zero() && clients_in_last_pause_) {
    const double paused_rate = static_cast<double>(made) / seconds(paused);
    const double sample = std::clamp(1 - run_rate_ / paused_rate, 0.0, 1.0);
    loss_ = (loss_ + sample) / 2;
    const double allowed = 1 - kClientShare;
    duty_ = loss_ <= allowed ? 1.0 : allowed / loss_;
  }
  restart();
}

}  // namespace layerd
