#include "overlay/copy_lane.h"

#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <new>

namespace layerd {

CopyLane::CopyLane(const std::string& job, int nice)
    : thread_([this, name = ("lane:" + job).substr(0, 15), nice] { main(name, nice); }) {}

CopyLane::~CopyLane() {
  if (busy_) (void)wait();
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void CopyLane::start(std::function<std::error_code()> piece) {
  {
    std::lock_guard lock(mutex_);
    piece_ = std::move(piece);
    busy_ = true;
    done_ = false;
  }
  cv_.notify_all();
}

std::error_code CopyLane::wait() {
  std::unique_lock lock(mutex_);
  cv_.wait(lock, [&] { return done_; });
  busy_ = false;
  done_ = false;
  return result_;
}

void CopyLane::main(const std::string& name, int nice) {
  (void)::pthread_setname_np(::pthread_self(), name.c_str());
  (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice);
  std::unique_lock lock(mutex_);
  for (;;) {
    cv_.wait(lock, [&] { return stopping_ || piece_; });
    if (!piece_) return;  // stopping, nothing left
    auto piece = std::move(piece_);
    piece_ = nullptr;
    lock.unlock();
    std::error_code ec;
    try {
      ec = piece();
    } catch (const std::bad_alloc&) {
      ec = std::make_error_code(std::errc::not_enough_memory);
    } catch (...) {
      ec = std::make_error_code(std::errc::io_error);
    }
    lock.lock();
    result_ = ec;
    done_ = true;
    cv_.notify_all();
  }
}

}  // namespace layerd
