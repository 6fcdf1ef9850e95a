// The job state machine and its controls (see block_job.h).
#include "overlay/block_job.h"

#include <pthread.h>

namespace layerd {

const char* job_status_name(JobStatus s) {
  switch (s) {
    case JobStatus::Created: return "created";
    case JobStatus::Running: return "running";
    case JobStatus::Paused: return "paused";
    case JobStatus::Ready: return "ready";
    case JobStatus::Standby: return "standby";
    case JobStatus::Waiting: return "waiting";
    case JobStatus::Pending: return "pending";
    case JobStatus::Aborting: return "aborting";
    case JobStatus::Concluded: return "concluded";
    case JobStatus::Null: return "null";
  }
  return "unknown";
}

BlockJob::BlockJob(std::string id, std::string type, std::string device,
                   JobObserver* observer)
    : id_(std::move(id)), type_(std::move(type)), device_(std::move(device)),
      observer_(observer) {}

BlockJob::~BlockJob() { wait_finished(); }

JobInfo BlockJob::info() const {
  std::lock_guard lock(mutex_);
  return info_locked();
}

JobInfo BlockJob::info_locked() const {
  return JobInfo{.id = id_,
                 .type = type_,
                 .device = device_,
                 .status = status_,
                 .offset = offset_.load(),
                 .len = len_.load(),
                 .speed = speed_,
                 .busy = busy_,
                 .paused = paused_,
                 .ready = status_ == JobStatus::Ready || status_ == JobStatus::Standby};
}

JobStatus BlockJob::status() const {
  std::lock_guard lock(mutex_);
  return status_;
}

bool BlockJob::finished() const {
  JobStatus s = status();
  return s == JobStatus::Concluded || s == JobStatus::Null;
}

void BlockJob::set_status(JobStatus s) {
  if (status_ == s) return;
  status_ = s;
  observer_->status_changed(info_locked());
}

void BlockJob::start(uint64_t speed) {
  std::lock_guard lock(mutex_);
  speed_ = speed;
  window_start_ = std::chrono::steady_clock::now();
  observer_->status_changed(info_locked());  // created
  set_status(JobStatus::Running);
  busy_ = true;
  thread_ = std::thread([this] { thread_main(); });
}

void BlockJob::thread_main() {
  // Clients first: the job's thread has a nice value of its own, and
  // copies in bulk in the background class (job_cpu.h).
  cpu_.start();
  (void)::pthread_setname_np(::pthread_self(), ("job:" + id_).substr(0, 15).c_str());
  std::string error = run();
  cpu_.stop();
  std::unique_lock lock(mutex_);
  busy_ = false;
  paused_ = false;
  const bool was_cancelled = cancel_.load() && !completed_by_cancel_ && !finishing_.load();
  if (!error.empty() || was_cancelled) {
    set_status(JobStatus::Aborting);
    if (error.empty()) observer_->cancelled(info_locked());
    else observer_->completed(info_locked(), error);
  } else {
    set_status(JobStatus::Waiting);
    set_status(JobStatus::Pending);
    observer_->completed(info_locked(), {});
  }
  set_status(JobStatus::Concluded);
  set_status(JobStatus::Null);
  wake_.notify_all();
}

void BlockJob::wait_finished() {
  if (thread_.joinable()) thread_.join();
}

uint64_t BlockJob::speed() const {
  std::lock_guard lock(mutex_);
  return speed_;
}

void BlockJob::set_speed(uint64_t bytes_per_second) {
  std::lock_guard lock(mutex_);
  speed_ = bytes_per_second;
  window_start_ = std::chrono::steady_clock::now();
  window_bytes_ = 0;
  wake_.notify_all();
}

// A pause takes effect when the job reaches its next checkpoint (its status
// turns "paused" there), as QEMU's pause points do.
bool BlockJob::pause() {
  std::lock_guard lock(mutex_);
  if (paused_) return false;
  paused_ = true;
  wake_.notify_all();
  return true;
}

bool BlockJob::resume() {
  std::lock_guard lock(mutex_);
  if (!paused_) return false;
  paused_ = false;
  wake_.notify_all();
  return true;
}

void BlockJob::cancel(bool force) {
  std::lock_guard lock(mutex_);
  if (force) force_.store(true);
  cancel_.store(true);
  wake_.notify_all();
}

bool BlockJob::complete(std::string* error) {
  std::lock_guard lock(mutex_);
  if (!completable()) {
    *error = "Job '" + id_ + "' in state '" + job_status_name(status_) +
             "' cannot accept command verb 'complete'";
    return false;
  }
  if (status_ != JobStatus::Ready && status_ != JobStatus::Standby) {
    *error = "The active block job '" + id_ + "' cannot be completed";
    return false;
  }
  complete_requested_ = true;
  wake_.notify_all();
  return true;
}

bool BlockJob::checkpoint() {
  std::unique_lock lock(mutex_);
  if (paused_ && !cancel_.load()) {
    busy_ = false;
    set_status(JobStatus::Paused);
    cpu_.begin_sleep();
    wake_.wait(lock, [&] { return !paused_ || cancel_.load(); });
    cpu_.end_sleep();
    set_status(JobStatus::Running);
    busy_ = true;
    if (bulk_) bulk_->piece_started();  // a pause is not the next piece's time
  }
  return !cancel_.load();
}

void BlockJob::throttle(uint64_t bytes) {
  cpu_.piece_done();
  if (bulk_) give_way(bulk_->piece_done());
  rate_limit(bytes);
  if (bulk_) bulk_->piece_started();
}

void BlockJob::give_way(std::chrono::microseconds pause) {
  if (pause <= std::chrono::microseconds::zero()) return;
  std::unique_lock lock(mutex_);
  busy_ = false;
  cpu_.begin_sleep();
  const uint64_t speed = speed_;
  wake_.wait_for(lock, pause, [&] { return cancel_.load() || paused_ || speed_ != speed; });
  cpu_.end_sleep();
  busy_ = true;
}

void BlockJob::rate_limit(uint64_t bytes) {
  using namespace std::chrono;
  std::unique_lock lock(mutex_);
  if (speed_ == 0) return;
  const auto now = steady_clock::now();
  window_bytes_ += bytes;
  auto due = window_start_ + microseconds(window_bytes_ * 1'000'000 / speed_);
  if (due + seconds(1) < now) {  // idle for a while: no catching up in a burst
    window_start_ = now;
    window_bytes_ = 0;
    return;
  }
  const uint64_t speed = speed_;
  busy_ = false;
  cpu_.begin_sleep();
  wake_.wait_until(lock, due, [&] {
    return cancel_.load() || paused_ || speed_ != speed;
  });
  cpu_.end_sleep();
  busy_ = true;
}

void BlockJob::report_io_error(const std::string& operation) {
  std::lock_guard lock(mutex_);
  observer_->io_error(info_locked(), operation);
}

BlockJob::ReadyEnd BlockJob::wait_ready(
    const std::function<std::string()>& keep_in_sync, std::string* error) {
  std::unique_lock lock(mutex_);
  set_status(JobStatus::Ready);
  observer_->ready(info_locked());
  for (;;) {
    if (cancel_.load()) {
      if (!force_.load()) completed_by_cancel_ = true;
      return ReadyEnd::Cancel;
    }
    set_status(paused_ ? JobStatus::Standby : JobStatus::Ready);
    if (complete_requested_ && !paused_) return ReadyEnd::Complete;
    busy_ = false;
    wake_.wait_for(lock, std::chrono::milliseconds(100));
    busy_ = true;
    if (complete_requested_ || cancel_.load() || paused_) continue;
    lock.unlock();
    std::string why = keep_in_sync();
    lock.lock();
    if (!why.empty()) {
      *error = why;
      return ReadyEnd::Error;
    }
  }
}

}  // namespace layerd
