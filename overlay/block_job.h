// Block jobs: long-running operations on an export's graph (stream, commit)
// that run on a thread of their own while clients are served.
//
// A job follows QEMU's job state machine with auto-finalize and
// auto-dismiss (qapi/job.json): created -> running [<-> paused]
// [-> ready (<-> standby)] -> waiting -> pending -> concluded -> null, or
// -> aborting -> concluded -> null when it fails or is cancelled. Every
// transition is reported to the JobObserver (JOB_STATUS_CHANGE), as are
// readiness (BLOCK_JOB_READY), the end (BLOCK_JOB_COMPLETED with or without
// an error, or BLOCK_JOB_CANCELLED) and I/O errors (BLOCK_JOB_ERROR).
//
// A subclass implements run(), which copies in pieces and calls
// checkpoint() between them (pauses wait there, cancellation is seen
// there) and throttle() after each (the rate limit). A job that reaches a
// steady state (active commit in sync) calls wait_ready(), which returns
// when the user completes or cancels it.
//
// Thread safety: the control calls (pause, resume, cancel, complete,
// set_speed) and the getters may be called from any thread. Observer calls
// come from the job's thread (and from the control caller's thread for
// pause/resume transitions) and must not call back into the job's control
// calls synchronously.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "overlay/client_activity.h"
#include "overlay/cpu_contention.h"
#include "overlay/job_cpu.h"
#include "qcow2/file.h"

namespace layerd {

enum class JobStatus {
  Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting,
  Concluded, Null,
};
// QEMU's names: "created", "running", ..., "null".
const char* job_status_name(JobStatus s);

// A snapshot of a job's state, for query-block-jobs and events.
struct JobInfo {
  std::string id;
  std::string type;    // "stream", "commit"
  std::string device;  // the export
  JobStatus status = JobStatus::Created;
  uint64_t offset = 0;
  uint64_t len = 0;
  uint64_t speed = 0;  // bytes per second, 0: unlimited
  bool busy = false;
  bool paused = false;
  bool ready = false;
};

// Receives a job's transitions. Calls come from the job's thread (and from
// control callers for pause and resume) with the job's lock held: an
// observer must not call back into the job; `info` is the job's state.
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  virtual void status_changed(const JobInfo& info) = 0;
  virtual void ready(const JobInfo& info) = 0;
  // `error` is empty on success.
  virtual void completed(const JobInfo& info, const std::string& error) = 0;
  virtual void cancelled(const JobInfo& info) = 0;
  // `operation` is "read" or "write"; the job then fails (action "report").
  virtual void io_error(const JobInfo& info, const std::string& operation) = 0;
};

class BlockJob {
 public:
  BlockJob(std::string id, std::string type, std::string device,
           JobObserver* observer);
  virtual ~BlockJob();  // the job must have ended (wait_finished)
  BlockJob(const BlockJob&) = delete;
  BlockJob& operator=(const BlockJob&) = delete;

  const std::string& id() const { return id_; }
  const std::string& type() const { return type_; }
  const std::string& device() const { return device_; }
  // The image files the job changes, or drops from its export's graph:
  // while it runs, no other export may start using one of them. Fixed
  // before start(); any thread.
  const std::vector<std::string>& files() const { return files_; }
  void set_files(std::vector<std::string> files) { files_ = std::move(files); }
  // Whether the job's bulk copy gives way to busy clients (BulkCopy; on
  // by default, QMP's `give-way`). Fixed before start().
  void set_gives_way(bool on) { gives_way_ = on; }
  JobInfo info() const;
  JobStatus status() const;
  bool finished() const;  // concluded (or null)

  // Starts the job's thread (created -> running).
  void start(uint64_t speed);

  void set_speed(uint64_t bytes_per_second);
  // false if the job is paused already (pause) or was not (resume).
  bool pause();
  bool resume();
  // Cancels: a job that is not ready ends as cancelled, its work undone
  // where the job type says so (the graph is always left valid). A ready
  // job cancelled without `force` ends as completed without its final
  // switch (QEMU's "point-in-time copy" semantics); with `force`, as
  // cancelled.
  void cancel(bool force);
  // Asks a ready job to make its final switch. false (with `error`) when
  // the job is not ready or does not support it.
  bool complete(std::string* error);

  // Waits for the thread to end.
  void wait_finished();

 protected:
  // The work. Returns "" on success or the error message. Runs on the
  // job's thread.
  virtual std::string run() = 0;
  // Whether complete() is accepted at all (active commit).
  virtual bool completable() const { return false; }

  // --- For run() ----------------------------------------------------------
  // Waits while paused; false when the job was cancelled (run() then
  // undoes what it must and returns).
  bool checkpoint();
  // Accounts `bytes` of work against the speed limit and sleeps as long
  // as the limit asks; a pause, a cancel or a speed change wakes it. Call
  // it after every piece: it also runs the bulk copy's starvation guard
  // and its judgement of the CPU (BulkCopy), and gives way to clients.
  void throttle(uint64_t bytes);
  void set_len(uint64_t len) { len_.store(len); }
  void add_len(uint64_t more) { len_.fetch_add(more); }
  void add_offset(uint64_t done) { offset_.fetch_add(done); }
  uint64_t speed() const;
  uint64_t offset_done() const { return offset_.load(); }
  uint64_t len_now() const { return len_.load(); }
  // Reports an I/O error of `operation` ("read"/"write") to the observer.
  void report_io_error(const std::string& operation);
  // Enters the ready state and waits until the user completes (true) or
  // cancels (false) the job. `keep_in_sync` runs (without the job's lock)
  // every 100 ms while waiting, e.g. to copy what fell out of sync; its
  // non-empty result fails the job (returned in `*error`).
  enum class ReadyEnd { Complete, Cancel, Error };
  ReadyEnd wait_ready(const std::function<std::string()>& keep_in_sync,
                      std::string* error);
  bool cancelled() const { return cancel_.load(); }
  // The nice value of the job thread's normal CPU class (job_cpu.h), for
  // helper threads of its copy.
  int job_nice() const { return cpu_.normal_nice(); }
  // The job starts its final switch: a cancel from now on comes too late
  // and the job ends as it ends (completed, or failed).
  void finishing() { finishing_.store(true); }
  bool force_cancelled() const { return force_.load(); }
  // While one lives, the job's thread copies in bulk: in the background
  // CPU class, which any client thread preempts (job_cpu.h). While clients
  // are busy (kBusyClientRate requests a second or more, of any export:
  // client_activity.h) and want the CPU the copy wants (cpu_contention.h),
  // judged after every piece in throttle(), the copy gives way: it goes
  // past the page cache where its buffers are aligned (BulkIoScope,
  // qcow2/file.h; direct_io() tells helpers of the copy) and pauses after
  // each piece for three times as long as the piece took (a duty of a quarter,
  // kContendedDuty). Past the cache, the kernel's work for the copy (no
  // write-back, no reclaim afterwards) is done when a piece is, so a pause
  // is a pause of that work too. A copy that only shares the CPU with
  // other programs (or its own write-back) goes on at full speed. Clients
  // must not wait for the job meanwhile (no range lock, no paused
  // requests).
  class BulkCopy {
   public:
    static constexpr double kContendedDuty = 1.0 / 4;
    static constexpr double kBusyClientRate = 100;
    static constexpr std::chrono::milliseconds kCarefulStart{100};
    static constexpr std::chrono::milliseconds kCalmBeforeCache{100};
    // `gives_way`: false for a copy whose work grows while it gives way
    // (an active commit's tracking copy, which must gain on the client
    // writes): it always copies at full speed.
    explicit BulkCopy(BlockJob& job, bool gives_way = true)
        : job_(job), gives_way_(gives_way && job.gives_way_) {
      job_.cpu_.set_bulk(true);
      job_.bulk_ = this;
      piece_started();
      (void)contention_.contended();  // the first sample: judged from here
      requests_ = client_activity::requests();
      requests_at_ = piece_start_;
    }
    ~BulkCopy() {
      job_.bulk_ = nullptr;
      job_.cpu_.set_bulk(false);
    }
    BulkCopy(const BulkCopy&) = delete;
    BulkCopy& operator=(const BulkCopy&) = delete;
    // Whether the copy goes past the page cache now.
    bool direct_io() const { return direct_io_.has_value(); }

   private:
    friend class BlockJob;
    void piece_started() { piece_start_ = std::chrono::steady_clock::now(); }
    // Judges clients and the CPU after a piece; returns how long the copy
    // gives way. Until a signal is judged over a whole window, the copy
    // assumes the worst of it: clients count as busy once one request
    // came, and the CPU as contended for kCarefulStart after the first
    // piece (on a free CPU a copy that gives way wants little of it, so
    // its first judgement may come much later; a starved one is judged
    // at the end of its first piece, which waited long). So beside busy clients the copy
    // gives way from its second piece on, instead of copying its first
    // tens of MiB through the page cache at full speed (on two lanes).
    // The path goes back through the cache only once clients or the CPU
    // have been calm for kCalmBeforeCache: a client's rate judged over
    // 20 ms dips now and then, and each dip would send pieces through the
    // cache on two lanes.
    std::chrono::microseconds piece_done() {
      const auto now = std::chrono::steady_clock::now();
      if (first_done_ == std::chrono::steady_clock::time_point{}) first_done_ = now;
      bool contended = false;
      if (gives_way_) {
        const bool cpu = contention_.contended() ||
                         (!contention_.judged() && now - first_done_ < kCarefulStart);
        const bool clients = clients_busy(now);
        contended = cpu && (clients_judged_ ? clients : client_activity::requests() != requests_);
      }
      if (contended) {
        last_contended_ = now;
        if (!direct_io()) direct_io_.emplace();
      } else if (direct_io() && now - last_contended_ >= kCalmBeforeCache) {
        direct_io_.reset();
      }
      if (!contended) return {};
      // At most a second: a piece that waited long (a flush) is no
      // reason to stop for longer.
      return std::min<std::chrono::microseconds>(
          std::chrono::duration_cast<std::chrono::microseconds>(
              (now - piece_start_) * ((1 - kContendedDuty) / kContendedDuty)),
          std::chrono::seconds(1));
    }
    // The client request rate since the last look, at least 20 ms ago.
    bool clients_busy(std::chrono::steady_clock::time_point now) {
      const std::chrono::duration<double> elapsed = now - requests_at_;
      if (elapsed < CpuContention::kWanted) return clients_busy_;
      const uint64_t requests = client_activity::requests();
      clients_busy_ = static_cast<double>(requests - requests_) >= kBusyClientRate * elapsed.count();
      clients_judged_ = true;
      requests_ = requests;
      requests_at_ = now;
      return clients_busy_;
    }
    BlockJob& job_;
    const bool gives_way_;
    CpuContention contention_;
    std::optional<BulkIoScope> direct_io_;
    std::chrono::steady_clock::time_point piece_start_;
    std::chrono::steady_clock::time_point first_done_;  // the first piece's end
    std::chrono::steady_clock::time_point last_contended_;
    client_activity::Watch watch_;
    uint64_t requests_ = 0;
    std::chrono::steady_clock::time_point requests_at_;
    bool clients_busy_ = false;
    bool clients_judged_ = false;
  };

 private:
  void set_status(JobStatus s);  // with mutex_ held
  // throttle()'s parts: a bulk copy's pause, and the speed limit's.
  void give_way(std::chrono::microseconds pause);
  void rate_limit(uint64_t bytes);
  JobInfo info_locked() const;
  void thread_main();

  const std::string id_, type_, device_;
  std::vector<std::string> files_;
  bool gives_way_ = true;
  JobObserver* const observer_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  JobStatus status_ = JobStatus::Created;
  bool paused_ = false;  // by the user
  bool complete_requested_ = false;
  bool completed_by_cancel_ = false;  // a ready job cancelled without force
  bool busy_ = false;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> force_{false};
  std::atomic<bool> finishing_{false};
  std::atomic<uint64_t> offset_{0};
  std::atomic<uint64_t> len_{0};
  uint64_t speed_ = 0;
  // Rate limit: the work done since `window_start_`.
  std::chrono::steady_clock::time_point window_start_;
  uint64_t window_bytes_ = 0;
  JobCpu cpu_;  // the job thread's alone
  BulkCopy* bulk_ = nullptr;  // the job thread's alone
  std::thread thread_;
};

}  // namespace layerd
