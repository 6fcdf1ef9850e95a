// A second copier beside a block job's thread. A bulk copy past the page
// cache (BulkIoScope) waits for the device on every read and every write;
// one piece at a time leaves the device idle while the job turns a read
// into a write, and a copy at queue depth one is much slower than one
// through the cache. With a lane the job copies two pieces at once, its
// own and the lane's, so the device has two transfers in flight and the
// pieces drift into one reading while the other writes; through the page
// cache, the two use both CPUs where they are free.
//
// A piece sets its own I/O path (a BulkIoScope of the lane's thread, as
// the job's copy is at the time). The lane's thread ("lane:JOB") runs in
// the CPU class of the thread that makes it, at the nice value it is
// given: make it before entering the background class (job_cpu.h), so
// that it stays in the normal one: a thread in the background class would
// hold an image's metadata lock where readers wait for it.
//
// Thread safety: one owner thread calls start() and wait(), alternately.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

namespace layerd {

class CopyLane {
 public:
  // `job`: the job's id, for the thread's name. Throws std::system_error
  // when no thread can be made.
  CopyLane(const std::string& job, int nice);
  ~CopyLane();  // waits for the piece in flight, then ends the thread
  CopyLane(const CopyLane&) = delete;
  CopyLane& operator=(const CopyLane&) = delete;

  // Runs `piece` (not empty) on the lane's thread. The lane must be idle
  // (no start() without its wait()). A piece that throws ends with
  // not_enough_memory (std::bad_alloc) or io_error.
  void start(std::function<std::error_code()> piece);
  // Waits for the piece given last and returns its result.
  std::error_code wait();

 private:
  void main(const std::string& name, int nice);

  std::mutex mutex_;
  std::condition_variable cv_;
  std::function<std::error_code()> piece_;  // set: not taken yet
  bool busy_ = false;                       // a piece given, not waited for
  bool done_ = false;                       // its result is in result_
  bool stopping_ = false;
  std::error_code result_;
  std::thread thread_;
};

}  // namespace layerd
