// A reader/writer lock that prefers writers. std::shared_mutex on glibc
// prefers readers, so a steady stream of reads (each holding the lock for a
// pread) could starve allocating writes, flushes and snapshots forever.
// Meets the Lockable and SharedLockable requirements, so std::unique_lock,
// std::shared_lock and std::condition_variable_any work with it.
//
// epoch() counts exclusive acquisitions: a holder that lets go of the lock
// and takes it again can tell whether anyone else held it exclusively in
// between (Image::flush syncs without the lock that way).
//
// A thread that may run in a low CPU class (a block job's bulk copy) sets
// exclusive_hold_hook for itself: it is told before it waits for an
// exclusive hold and after it lets go of one, so that it can run in the
// normal class meanwhile. Readers then never wait for a holder that cannot
// get a CPU. The hook is the calling thread's alone (thread_local) and
// must not take this lock.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstdint>

namespace layerd::qcow2 {

class ExclusiveHoldHook {
 public:
  virtual void before_exclusive() = 0;
  virtual void after_exclusive() = 0;

 protected:
  ~ExclusiveHoldHook() = default;
};
inline thread_local ExclusiveHoldHook* exclusive_hold_hook = nullptr;

class WriterPreferringMutex {
 public:
  WriterPreferringMutex() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&rw_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  ~WriterPreferringMutex() { pthread_rwlock_destroy(&rw_); }
  WriterPreferringMutex(const WriterPreferringMutex&) = delete;
  WriterPreferringMutex& operator=(const WriterPreferringMutex&) = delete;

  void lock() {
    if (exclusive_hold_hook) exclusive_hold_hook->before_exclusive();
    pthread_rwlock_wrlock(&rw_);
    epoch_.fetch_add(1, std::memory_order_relaxed);
  }
  bool try_lock() {
    if (exclusive_hold_hook) exclusive_hold_hook->before_exclusive();
    if (pthread_rwlock_trywrlock(&rw_) != 0) {
      if (exclusive_hold_hook) exclusive_hold_hook->after_exclusive();
      return false;
    }
    epoch_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  // Exclusive acquisitions so far; read it with the lock held.
  uint64_t epoch() const { return epoch_.load(std::memory_order_relaxed); }
  void unlock() {
    pthread_rwlock_unlock(&rw_);
    if (exclusive_hold_hook) exclusive_hold_hook->after_exclusive();
  }
  void lock_shared() { pthread_rwlock_rdlock(&rw_); }
  bool try_lock_shared() { return pthread_rwlock_tryrdlock(&rw_) == 0; }
  void unlock_shared() { pthread_rwlock_unlock(&rw_); }

 private:
  pthread_rwlock_t rw_;
  std::atomic<uint64_t> epoch_{0};
};

}  // namespace layerd::qcow2
