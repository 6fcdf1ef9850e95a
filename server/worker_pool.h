// The threads that run requests against the layers.
//
// Tuned for a steady stream of short jobs on few cores, where waking a
// sleeping thread for every request costs more than the request itself
// (measured on 2 cores: futex wake-ups and context switches were half of
// the server's CPU time for 4K writes). post() wakes a sleeper only when
// no worker is awake or the queue holds more than kJobsPerAwakeWorker jobs
// per awake worker; otherwise the awake workers take the new jobs in turn.
// So that a job that blocks for long (a slow disk) never holds up the jobs
// queued behind it, a monitor thread wakes a sleeper whenever queued work
// has not moved for 1 ms (50 ms once the pool has been idle a while).
//
// Jobs are stored inline (no allocation per post); the queue is a ring
// buffer that only grows.
#pragma once

#include <cstdint>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace layerd {

class WorkerPool {
 public:
  explicit WorkerPool(unsigned threads);
  // Finishes queued jobs, then joins.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Runs `f()` on a worker. F must fit in kJobBytes and be nothrow movable.
  template <typename F>
  void post(F&& f);

  // Lets queued jobs finish, then stops the threads. Idempotent.
  void join();

 private:
  static constexpr size_t kJobBytes = 96;

  // A move-only void() callable stored in place.
  class Job {
   public:
    Job() = default;
    template <typename F>
    explicit Job(F&& f) {
      using T = std::decay_t<F>;
      static_assert(sizeof(T) <= kJobBytes && alignof(T) <= alignof(std::max_align_t));
      static_assert(std::is_nothrow_move_constructible_v<T>);
      new (storage_) T(std::forward<F>(f));
      ops_ = &ops_for<T>;
    }
    Job(Job&& o) noexcept { take(o); }
    Job& operator=(Job&& o) noexcept {
      if (this != &o) {
        reset();
        take(o);
      }
      return *this;
    }
    ~Job() { reset(); }
    void operator()() { ops_->run(storage_); }

   private:
    struct Ops {
      void (*run)(void*);
      void (*move)(void* from, void* to);
      void (*destroy)(void*);
    };
    template <typename T>
    static constexpr Ops ops_for{
        [](void* p) { (*static_cast<T*>(p))(); },
        [](void* from, void* to) {
          new (to) T(std::move(*static_cast<T*>(from)));
          static_cast<T*>(from)->~T();
        },
        [](void* p) { static_cast<T*>(p)->~T(); }};
    void take(Job& o) {
      ops_ = o.ops_;
      if (ops_) ops_->move(o.storage_, storage_);
      o.ops_ = nullptr;
    }
    void reset() {
      if (ops_) ops_->destroy(storage_);
      ops_ = nullptr;
    }
    alignas(std::max_align_t) std::byte storage_[kJobBytes];
    const Ops* ops_ = nullptr;
  };

  void push(Job job);
  void run_worker();
  void run_monitor();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<Job> ring_;  // guarded by mutex_
  size_t head_ = 0;        // guarded by mutex_
  size_t count_ = 0;       // guarded by mutex_
  unsigned sleeping_ = 0;  // guarded by mutex_
  bool stopping_ = false;  // guarded by mutex_
  uint64_t dequeued_ = 0;  // guarded by mutex_: jobs taken so far
  std::condition_variable monitor_wake_;
  std::vector<std::thread> threads_;
  std::thread monitor_;
};

template <typename F>
void WorkerPool::post(F&& f) {
  push(Job(std::forward<F>(f)));
}

}  // namespace layerd
