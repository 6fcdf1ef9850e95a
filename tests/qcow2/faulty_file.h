// A File that forwards to another File and fails chosen operations, for
// tests of error paths (EIO mid-write, failed flush, ...).
//
// Two ways to choose: the counters of FaultyFile itself (the n-th pwrite,
// a failing flush, a "crash" after which nothing is written), or a
// FaultPlan shared by several FaultyFiles (an image, its backing image and
// its data file), which numbers every I/O of all of them in one sequence
// and fails the one at a chosen index in a chosen way, for sweeps over
// every I/O of a workload (fault_sweep_test.cc).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

#include "qcow2/file.h"

namespace layerd::qcow2 {

// The I/O calls of a File, as a FaultPlan counts them.
enum class IoKind { Read, Write, Flush, Truncate, PunchHole, WriteZeroes };
const char* io_kind_name(IoKind k);

// How the chosen I/O fails.
enum class FaultKind {
  Eio,          // any call: EIO, nothing done
  Enospc,       // writes, truncate, write_zeroes: ENOSPC, nothing done
  // A write: the 512-byte sectors of its first half reach the file (none
  // of a write of one sector), then ENOSPC.
  TornWrite,
  NotSupported, // punch_hole: EOPNOTSUPP (file systems without it)
  // From the chosen I/O on, every call that needs space fails with
  // ENOSPC, as on a full disk, until disarm() ("space was freed"); the
  // rest works. A write or write_zeroes needs space when it touches a
  // block of the file that holds nothing yet: past the end, or a hole
  // (never written, or punched), counted in 4 KiB blocks as file systems
  // allocate them; a growing truncate needs space too.
  DiskFull,
};
const char* fault_kind_name(FaultKind k);

// The fault kinds that apply to an I/O of kind `io` (DiskFull not among
// them: it applies at every index).
std::vector<FaultKind> fault_kinds_for(IoKind io);

// Thread-safe.
class FaultPlan {
 public:
  // Fails the I/O at `index` (0-based, counted from now) as `kind`.
  void arm(uint64_t index, FaultKind kind);
  // No more faults (DiskFull ends); counting goes on.
  void disarm();
  // I/Os counted since construction (or the last arm()).
  uint64_t count() const;
  // Whether the armed fault has happened (once, or DiskFull since).
  bool fired() const;
  // The kinds of the I/Os counted, when recording (a counting run).
  void record(bool on);
  std::vector<IoKind> recorded() const;

  // For FaultyFile: counts one I/O of kind `io` (which needs space on the
  // disk when `needs_space`) and says how it must fail: {} for not at all.
  // `*torn` is set for a TornWrite.
  std::error_code next(IoKind io, bool needs_space, bool* torn);

 private:
  mutable std::mutex mu_;
  uint64_t count_ = 0;
  bool armed_ = false;
  uint64_t index_ = 0;
  FaultKind kind_ = FaultKind::Eio;
  bool fired_ = false;
  bool recording_ = false;
  std::vector<IoKind> recorded_;
};

// With a FaultPlan it also keeps the file system's view of the file's
// space (which blocks hold data; at first those `inner` reports as data),
// for DiskFull.
class FaultyFile : public File {
 public:
  explicit FaultyFile(std::shared_ptr<File> inner,
                      std::shared_ptr<FaultPlan> plan = nullptr);

  // The n-th (0-based) pwrite from now on fails with EIO; -1 disables.
  // With `sticky`, every later pwrite, flush, truncate, punch_hole and
  // write_zeroes fails too: the file stays as it was at that moment, as if
  // the machine had crashed (with writes reaching the disk in order).
  void fail_pwrite_after(int n, bool sticky = false) {
    sticky_ = sticky;
    crashed_ = false;
    pwrites_left_ = n;
  }
  bool crashed() const { return crashed_; }
  void fail_pread_after(int n) { preads_left_ = n; }
  void fail_flush(bool on) { fail_flush_ = on; }
  int pwrites() const { return pwrites_; }
  int preads() const { return preads_; }
  int flushes() const { return flushes_; }

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override;
  std::error_code pwrite(std::span<const std::byte> data,
                         uint64_t offset) override;
  std::error_code flush() override;
  // Fails with fail_flush() (and after a crash), as the flush it leads to.
  std::error_code write_back_in_steps() override;
  std::error_code truncate(uint64_t size) override;
  std::error_code punch_hole(uint64_t offset, uint64_t length) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length) override;
  uint64_t size() const override { return inner_->size(); }
  uint64_t extent_at(uint64_t offset, uint64_t length,
                     bool* is_data) const override {
    return inner_->extent_at(offset, length, is_data);
  }
  bool writable() const override { return inner_->writable(); }
  std::error_code lock(const LockSet& wanted, LockConflict* conflict) override {
    return inner_->lock(wanted, conflict);
  }
  std::error_code reopen(OpenMode mode) override { return inner_->reopen(mode); }

 private:
  static bool tick(std::atomic<int>& left);
  std::error_code planned(IoKind io, bool needs_space, bool* torn = nullptr);
  // The space model (only with a plan): whether [offset, offset + length)
  // touches a block without data; marking a range written (its blocks
  // hold data) or punched (the blocks wholly inside it are holes again).
  bool needs_space(uint64_t offset, uint64_t length);
  void took_space(uint64_t offset, uint64_t length);
  void freed_space(uint64_t offset, uint64_t length);
  void resized(uint64_t size);
  std::shared_ptr<File> inner_;
  std::shared_ptr<FaultPlan> plan_;
  std::atomic<int> pwrites_left_{-1}, preads_left_{-1};
  std::atomic<bool> fail_flush_{false};
  std::atomic<bool> sticky_{false}, crashed_{false};
  std::atomic<int> pwrites_{0}, flushes_{0}, preads_{0};
  std::mutex space_mu_;
  std::vector<bool> has_data_;  // per 4 KiB block, up to the file's size
};

}  // namespace layerd::qcow2
